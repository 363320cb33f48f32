"""One request from its prompt to its result, across the stages of its tool calls.

A ``Generation`` is built in the caller's thread (``EngineSession.start``), which raises
what the request itself gets wrong. From then on the engine thread drives it, between two
engine steps: ``tokens`` with each step's new ids, ``finished`` when a stage ends. ``fail``
may come from any thread (a cancel, a failed step). ``on_end`` is called exactly once, with
the ``GenResult`` or the error, and nothing reaches ``on_tokens`` after it.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ...errors import FanoutError
from ...wire.generation import FinishReason, GenRequest, GenResult
from ..base import TokensFn
from .deltas import Deltas

EndFn = Callable[[GenResult | FanoutError], None]


class Generation:
    def __init__(self, request: GenRequest, prompt: list[int], deltas: Deltas,
                 on_tokens: TokensFn, on_end: EndFn,
                 next_stage: Callable[[Generation, Any], Any]) -> None:
        self.request = request
        self.prompt = prompt
        self.deltas = deltas
        self.job: Any = None  # the stage the engine runs now (a jobs.Job, which imports this)
        self._on_tokens = on_tokens
        self._on_end = on_end
        self._next_stage = next_stage
        self._lock = threading.Lock()
        self.ended = False

    def tokens(self, ids: list[int], logprobs: list[float] | None) -> bool:
        """The current stage's new ids; True once the answer is complete (a stop string,
        the tool calls closed): the engine may drop the stage. ``on_tokens`` may raise."""
        if self.ended:
            return True
        delta = self.deltas.push(ids, logprobs)
        if delta is not None:
            self._on_tokens(delta)
        if self.deltas.stopped:
            self._end(self._result("stop"))
            return True
        return False

    def finished(self, reason: FinishReason) -> Any:
        """The current stage ended ("stop" or "length"): the next stage's job, else None
        (the generation has then ended)."""
        if self.ended:
            return None
        if reason == "stop" and self.job is not None:
            following = self._next_stage(self, self.job)
            if following is not None:
                self.job = following
                return following
        tail = self.deltas.flush()
        if tail is not None:
            self._on_tokens(tail)
        self._end(self._result(reason))
        return None

    def fail(self, exc: FanoutError) -> None:
        self._end(exc)

    def _result(self, reason: FinishReason) -> GenResult:
        return GenResult(self.deltas.finish_reason(reason), len(self.prompt),
                         len(self.deltas.ids))

    def _end(self, outcome: GenResult | FanoutError) -> None:
        with self._lock:
            if self.ended:
                return
            self.ended = True
        self._on_end(outcome)
