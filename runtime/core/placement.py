"""Placement policy: which worker takes a task. One function, so a benchmark can swap it."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A worker that could take the task now: it is up, has the model ready and a free slot."""

    device: str
    rank: int  # position in the model's device order (0 = most preferred)
    expected_s: float | None  # measured service time of this model here; None = not measured yet


Policy = Callable[[Sequence[Candidate]], "Candidate | None"]


def earliest_finish(candidates: Sequence[Candidate]) -> Candidate | None:
    """The candidate expected to finish first; the model's device order breaks ties.

    An unmeasured device counts as instant, so every device gets measured by its first task
    instead of being starved by a guess.
    """
    if not candidates:
        return None
    return min(candidates, key=lambda c: (c.expected_s or 0.0, c.rank))
