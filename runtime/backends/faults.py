"""Fault injection around a real backend, for tests and failover drills (see ``FaultConfig``).

Runs that are not failed go to the real engine. Runs are counted per backend (one device
worker), over the models the faults apply to, under a lock: concurrent runs get distinct numbers;
the worker's warm-up run at load is delayed by ``hang_s`` like any run, but not counted.
For an LLM session each ``generate`` call is one run, and ``fail_after_tokens`` also fails a
generation mid-stream, after it has delivered that many tokens; ``garble_after_tokens`` makes
it stream a token id no vocabulary has at that point (what a broken worker would send).
"""
from __future__ import annotations

import threading

import numpy as np

from ..config.schema import FaultConfig
from ..errors import Cancelled, DeviceError, ModelUnavailable
from .base import (
    Backend,
    CancelToken,
    Delta,
    GenRequest,
    GenResult,
    LLMSession,
    ModelSpec,
    ProgressFn,
    Session,
    TokensFn,
    WarmUp,
)


class FaultyBackend:
    """Wraps ``inner`` and fails or delays its loads and runs as ``faults`` says."""

    def __init__(self, inner: Backend, faults: FaultConfig) -> None:
        self.inner = inner
        self.faults = faults
        self.name = inner.name
        self._lock = threading.Lock()
        self._runs = 0

    def applies_to(self, model: str) -> bool:
        return not self.faults.models or model in self.faults.models

    def load(self, model: ModelSpec, progress: ProgressFn) -> Session | LLMSession:
        if self.faults.fail_load and self.applies_to(model.name):
            raise ModelUnavailable(f"{model.name}: {self.faults.message} (injected load fault)")
        session = self.inner.load(model, progress)
        if not self.applies_to(model.name):
            return session
        if isinstance(session, LLMSession):
            return FaultyLLMSession(session, model.name, self)
        return FaultySession(session, model.name, self)

    def next_run(self) -> int:
        """The 1-based number of this run among the faulted runs of this backend."""
        with self._lock:
            self._runs += 1
            return self._runs

    def before_run(self, model: str, cancel: CancelToken) -> None:
        """The injected hang, then the run's number: raises if this run is to fail. A
        warm-up run is delayed like any run but not counted: the faults count tasks."""
        if self.faults.hang_s > 0:
            woken = threading.Event()
            cancel.on_cancel(woken.set)
            if woken.wait(self.faults.hang_s):
                raise Cancelled(f"{model}: run cancelled (during injected hang)")
        if isinstance(cancel, WarmUp):
            return
        n = self.next_run()
        if self.should_fail(n):
            raise DeviceError(f"{model}: {self.faults.message} (injected fault, run {n})")

    def should_fail(self, n: int) -> bool:
        f = self.faults
        if f.fail_after is not None and n > f.fail_after:
            return True
        return f.fail_every > 0 and n % f.fail_every == 0

    def close(self) -> None:
        self.inner.close()


class FaultySession:
    def __init__(self, inner: Session, model: str, backend: FaultyBackend) -> None:
        self._inner = inner
        self._model = model
        self._backend = backend
        self.inputs = inner.inputs
        self.outputs = inner.outputs

    def run(self, inputs: dict[str, np.ndarray], cancel: CancelToken) -> dict[str, np.ndarray]:
        self._backend.before_run(self._model, cancel)
        return self._inner.run(inputs, cancel)

    def close(self) -> None:
        self._inner.close()


GARBLED_TOKEN_ID = 1 << 40  # no vocabulary's: the wire refuses token ids of 2^31 and over


def _garbling(on_tokens: TokensFn, after: int) -> TokensFn:
    """``on_tokens``, and once ``after`` tokens are through, a delta with a token id no
    vocabulary has (then the rest as they come)."""
    delivered, sent = 0, False

    def garbling(delta: Delta) -> None:
        nonlocal delivered, sent
        on_tokens(delta)
        delivered += len(delta.ids)
        if not sent and delivered >= after:
            sent = True
            on_tokens(Delta([GARBLED_TOKEN_ID], text="?"))
    return garbling


class FaultyLLMSession(LLMSession):
    """An ``LLMSession`` whose generations fail as the faults say, before or mid-stream."""

    def __init__(self, inner: LLMSession, model: str, backend: FaultyBackend) -> None:
        self._inner = inner
        self._model = model
        self._backend = backend
        self.context_length = inner.context_length

    def generate(self, request: GenRequest, on_tokens: TokensFn,
                 cancel: CancelToken) -> GenResult:
        self._backend.before_run(self._model, cancel)
        if isinstance(cancel, WarmUp):
            return self._inner.generate(request, on_tokens, cancel)
        garble = self._backend.faults.garble_after_tokens
        if garble is not None:
            on_tokens = _garbling(on_tokens, garble)
        limit = self._backend.faults.fail_after_tokens
        if limit is None:
            return self._inner.generate(request, on_tokens, cancel)
        delivered = 0

        def limited(delta: Delta) -> None:
            # Pass at most `limit` tokens in all, then fail. A chunk cut short goes without its
            # text and calls: a device that continues from the delivered ids sends them again.
            nonlocal delivered
            take = delta.ids[:limit - delivered]
            whole = len(take) == len(delta.ids)
            if take or ((delta.text or delta.tool_calls) and delivered < limit):
                on_tokens(delta if whole else Delta(take, logprobs=delta.logprobs[:len(take)]))
            delivered += len(take)
            if delivered >= limit:
                raise DeviceError(f"{self._model}: {self._backend.faults.message} (injected "
                                  f"fault after {delivered} tokens)")

        return self._inner.generate(request, limited, cancel)

    def close(self) -> None:
        self._inner.close()
