"""The scheduler's FIFO of waiting tasks: a deque's face, with removal in O(1).

A cancelled, expired or hopeless task leaves the queue from anywhere in it. With a deque that
was a scan that compared tasks field by field: 10,000 cancels of queued tasks took seconds of
scheduler time, and a task whose payload nests deeply raised ``RecursionError`` comparing it.
Here tasks are keys of an ordered dict (compared by identity), and re-runs go to the front
with ``move_to_end(last=False)``.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class TaskQueue(Generic[T]):
    """Waiting tasks in order; each at most once. Items must hash by identity."""

    def __init__(self) -> None:
        self._items: OrderedDict[T, None] = OrderedDict()

    def append(self, item: T) -> None:
        self._items[item] = None

    def appendleft(self, item: T) -> None:
        self._items[item] = None
        self._items.move_to_end(item, last=False)

    def extendleft(self, items: Iterable[T]) -> None:
        """Like ``deque.extendleft``: each goes to the front in turn (so the last comes first)."""
        for item in items:
            self.appendleft(item)

    def popleft(self) -> T:
        return self._items.popitem(last=False)[0]

    def discard(self, item: T) -> bool:
        """Take ``item`` out wherever it is; False if it was not queued."""
        return self._items.pop(item, _ABSENT) is not _ABSENT

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)


_ABSENT = object()
