"""Typed headers of the messages every task sends (msgspec): read and checked in C, a tenth of
the time of the field-by-field readers, for the four messages of a task's round trip
(Submit, Run, Done, Result).

It is a fast path only: a header it reads is one the full decoder (``protocol.Decoder``)
accepts, with the same values; anything else (another type, a field out of its type or range
or unknown to it, a Result with attempts, garbage) returns None and the full decoder reads
it, so every error says what it always said. The array descriptions are checked against
their frames by the full decoder's own code either way.
"""
from __future__ import annotations

from typing import Annotated, Any

import msgspec

# The readers refuse inf and nan; a bound does (nan fails every comparison).
Finite = Annotated[float, msgspec.Meta(ge=-1.7976931348623157e308, le=1.7976931348623157e308)]


class _Header(msgspec.Struct, tag_field="t", forbid_unknown_fields=True):
    v: Any


class Submit(_Header, tag="submit"):
    task_id: str
    model: str
    inputs: list = []
    timeout_s: Finite | None = None


class Run(_Header, tag="run"):
    attempt: int
    model: str
    inputs: list = []
    timeout_s: Finite | None = None


class Done(_Header, tag="done"):
    attempt: int
    outputs: list = []
    service_s: Finite = 0.0
    batch: int = 1


class Result(_Header, tag="result"):
    task_id: str
    device: str
    outputs: list = []
    attempts: Annotated[list, msgspec.Meta(max_length=0)] = []
    service_s: Finite = 0.0
    submitted_at: Finite = 0.0
    started_at: Finite = 0.0
    finished_at: Finite = 0.0


class _Unsent(_Header, tag="\x00"):
    """No message has this type; in every union, so that msgspec requires the tag (it reads a
    header without one as the only struct it was given)."""


TYPES: dict[str, type[_Header]] = {"submit": Submit, "run": Run, "done": Done, "result": Result}


class Reader:
    """Reads the headers of the given message types (those of one socket), or says None."""

    def __init__(self, types: set[str]):
        chosen = tuple(TYPES[t] for t in sorted(types) if t in TYPES)
        self._decoder = msgspec.msgpack.Decoder(_union((*chosen, _Unsent))) if chosen else None

    def read(self, head: bytes | memoryview) -> tuple[str, dict[str, Any]] | None:
        """(type, every field: the header's, else the message's default) if this is a
        well-formed header of one of the types, else None (the full decoder then reads it,
        and says what is wrong)."""
        if self._decoder is None:
            return None
        try:
            header = self._decoder.decode(head)
        except Exception:  # anything it cannot read, the full decoder reads and explains
            return None
        if type(header) is _Unsent:
            return None
        return header.__struct_config__.tag, msgspec.structs.asdict(header)


def _union(types: tuple[type[_Header], ...]) -> Any:
    union: Any = types[0]
    for t in types[1:]:
        union = union | t
    return union
