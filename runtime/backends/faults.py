"""Fault injection around a real backend, for tests and failover drills (see ``FaultConfig``).

Runs that are not failed go to the real engine. Runs are counted per backend (one device
worker), over the models the faults apply to, under a lock: concurrent runs get distinct numbers.
"""
from __future__ import annotations

import threading

import numpy as np

from ..config import FaultConfig
from ..errors import Cancelled, DeviceError, ModelUnavailable
from .base import Backend, CancelToken, ModelSpec, ProgressFn, Session


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

    def load(self, model: ModelSpec, progress: ProgressFn) -> Session:
        if self.faults.fail_load and self.applies_to(model.name):
            raise ModelUnavailable(f"{model.name}: {self.faults.message} (injected load fault)")
        session = self.inner.load(model, progress)
        if not self.applies_to(model.name):
            return session
        return FaultySession(session, model.name, self)

    def next_run(self) -> int:
        """The 1-based number of this run among the faulted runs of this backend."""
        with self._lock:
            self._runs += 1
            return self._runs

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
        faults = self._backend.faults
        if faults.hang_s > 0:
            woken = threading.Event()
            cancel.on_cancel(woken.set)
            if woken.wait(faults.hang_s):
                raise Cancelled(f"{self._model}: run cancelled (during injected hang)")
        n = self._backend.next_run()
        if self._backend.should_fail(n):
            raise DeviceError(f"{self._model}: {faults.message} (injected fault, run {n})")
        return self._inner.run(inputs, cancel)

    def close(self) -> None:
        self._inner.close()
