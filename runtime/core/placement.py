"""Placement policy: which worker takes a task, or whether it waits for a busy one.

Backlog-aware earliest expected completion, as StarPU's ``dmda`` and HEFT's earliest finish
time do it: a worker's expected finish for a task is when one of its slots frees, counting the
work already committed to it, plus the task's expected service time there. A task may wait in
the queue for a busy faster worker; a slower worker takes it only when that finishes it sooner.

The policy is one function of the candidates (``Policy``), so a benchmark can swap it; the
committed work it is given is projected by ``Lanes``, a pure model of each worker's slots.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A worker that could run the task: up, the model ready there, its breaker closed.

    Times are seconds from now.
    """

    device: str
    rank: int  # position in the model's device order (0 = most preferred)
    start_s: float  # when a slot is expected to free, counting committed work; 0 = free now
    service_s: float  # the task's expected service time there

    @property
    def free(self) -> bool:
        return self.start_s <= 0.0

    @property
    def finish_s(self) -> float:
        return self.start_s + self.service_s


Policy = Callable[[Sequence[Candidate]], "Candidate | None"]
HELD_S = 1e-9  # a booked slot is never free again within the pass, however short its task


def earliest_finish(candidates: Sequence[Candidate]) -> Candidate | None:
    """The candidate expected to finish the task first, busy or not (a busy one means: wait).

    At equal expected finish a free slot beats waiting, then the model's device order decides.
    """
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.finish_s, not c.free, c.rank))


def earliest_free_finish(candidates: Sequence[Candidate]) -> Candidate | None:
    """The policy before backlogs counted: the fastest worker that has a free slot now, so a
    slower device takes a task whenever the faster one is busy. Kept for comparison."""
    free = [c for c in candidates if c.free]
    return min(free, key=lambda c: (c.service_s, c.rank)) if free else None


class Lanes:
    """When each slot of each worker is expected to free, as one placement pass commits tasks.

    Built from the in-flight tasks' remaining expected times; ``commit`` books a task on a
    worker (dispatched now, or the worker a queued task waits for), so the next task of the
    same pass sees that work. Pure: nothing here reads a clock.
    """

    def __init__(self) -> None:
        self._slots: dict[str, list[float]] = {}  # device -> heap of free-at times (s from now)
        self.booked: dict[str, int] = {}  # device -> tasks booked there by this pass

    def __contains__(self, device: str) -> bool:
        return device in self._slots

    def add(self, device: str, capacity: int, remaining_s: Sequence[float],
            waiting_s: Sequence[float] = ()) -> None:
        """A worker with ``capacity`` slots whose running tasks need ``remaining_s`` more,
        and tasks waiting there (prefetched) of ``waiting_s`` each, taken in that order."""
        running = sorted(max(HELD_S, r) for r in remaining_s)[:capacity]
        slots = running + [0.0] * (capacity - len(running))
        heapq.heapify(slots)
        for service_s in waiting_s:
            heapq.heapreplace(slots, max(HELD_S, slots[0] + service_s))
        self._slots[device] = slots
        self.booked[device] = 0

    def start_s(self, device: str) -> float:
        """When the next task booked on ``device`` could start."""
        return self._slots[device][0]

    def commit(self, device: str, service_s: float) -> float:
        """Book a task of ``service_s`` on ``device``'s earliest slot; its expected finish."""
        slots = self._slots[device]
        finish = max(HELD_S, slots[0] + service_s)
        heapq.heapreplace(slots, finish)
        self.booked[device] += 1
        return finish


def cpu_stretch(cores: float, demand: float, extra: float) -> float:
    """How many times longer CPU work on a node takes once runs needing ``extra`` more cores
    start beside work wanting ``demand`` cores: 1 while it all fits, else as fair sharing of
    the cores stretches it (oversubscription after over before)."""
    if cores <= 0:
        return 1.0
    return max(1.0, (demand + extra) / cores) / max(1.0, demand / cores)


def throughput_lost(cpu_share: float, stretch: float) -> float:
    """The share of its throughput a worker loses when CPU work takes ``stretch`` times as
    long and its runs spend ``cpu_share`` of their time on the CPU (a run that mostly waits
    barely slows)."""
    share = min(1.0, max(0.0, cpu_share))
    return 1.0 - 1.0 / (1.0 + share * (stretch - 1.0))


def remaining_s(expected_s: float, elapsed_s: float) -> float:
    """How much longer a run is expected to take once it has run ``elapsed_s``.

    Past its expected time a run is expected to need as long again as it is overdue, so a
    stuck worker's backlog grows with the wait instead of looking free at any moment.
    """
    left = expected_s - elapsed_s
    return left if left >= 0 else -left
