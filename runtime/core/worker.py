"""A device worker's logic: it owns one session per model and runs up to ``capacity`` tasks.

No sockets here (see ``worker_process.py``): results and state changes go to ``emit``, which
the shell turns into messages. ``run`` never blocks the caller; engines release the GIL, so
``capacity`` threads run inference at once while the shell keeps answering control messages.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import (
    Backend,
    CancelToken,
    Delta,
    GenRequest,
    GenResult,
    LLMSession,
    ModelSpec,
    Session,
)
from ..errors import ErrorKind, FanoutError, InvalidInput, ModelUnavailable
from ..wire.protocol import ALLOWED_DTYPES, result_bytes
from ..wire.status import ModelLoad
from .tensors import fit_inputs
from .warmup import warm_up

log = logging.getLogger("fanout.worker")


@dataclass
class Outcome:
    """What one run produced: outputs or a generation, or an error kind and message."""

    attempt: int
    outputs: dict[str, np.ndarray] | None = None
    generated: GenResult | None = None
    kind: ErrorKind | None = None
    message: str = ""
    service_s: float = 0.0


@dataclass
class TokensOut:
    """New tokens of a running generation: ids, text, whole tool calls, logprobs."""

    attempt: int
    delta: Delta


@dataclass
class LoadChanged:
    """A model's load state moved on."""

    model: str
    load: ModelLoad


class WorkerCore:
    """Sessions and concurrency of one device. ``emit`` is called from worker threads.

    ``max_output_bytes``: the largest result message the cluster accepts; bigger outputs
    fail the task as invalid input."""

    def __init__(self, device: str, capacity: int, backend: Backend, models: list[ModelSpec],
                 emit: Callable[[Any], None], clock: Callable[[], float] = time.perf_counter,
                 max_output_bytes: int | None = None):
        self.device = device
        self.capacity = capacity
        self.backend = backend
        self.specs = {m.name: m for m in models}
        self.emit = emit
        self.clock = clock
        self.max_output_bytes = max_output_bytes
        self.sessions: dict[str, Session | LLMSession] = {}
        self.states = {m.name: ModelLoad("loading", detail="queued for loading") for m in models}
        self._pool = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix=device)
        self._tokens: dict[int, CancelToken] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.running = 0  # engine runs under way right now
        self.peak_running = 0  # the most ever at once: proves the capacity limit held
        self._loader: threading.Thread | None = None

    # -- loading --

    def start_loading(self) -> None:
        """Load every model in a background thread, one after another, reporting each step."""
        self._loader = threading.Thread(target=self._load_all, name=f"{self.device}-load",
                                        daemon=True)
        self._loader.start()

    def _load_all(self) -> None:
        for name, spec in self.specs.items():
            if self._closed:
                return
            self._load_one(name, spec)

    def _load_one(self, name: str, spec: ModelSpec) -> None:
        started = self.clock()

        def progress(note: str) -> None:
            self._set_state(name, ModelLoad("loading", detail=note,
                                            load_s=self.clock() - started))

        progress("loading")
        try:
            session = self.backend.load(spec, progress)
        except Exception as exc:  # any engine failure makes the model unavailable here only
            text = exc.message if isinstance(exc, FanoutError) else f"{type(exc).__name__}: {exc}"
            log.warning("%s: %s unavailable: %s", self.device, name, text)
            self._set_state(name, ModelLoad("unavailable", error=text,
                                            load_s=self.clock() - started))
            return
        detail = "ready"
        progress("warming up")
        try:
            calibration = warm_up(session, spec, self.capacity)
        except Exception as exc:  # the model loaded: tasks will tell whether the device works
            log.warning("%s: %s warm-up failed: %s", self.device, name, exc)
            calibration, detail = None, f"ready (warm-up failed: {exc})"
        self.sessions[name] = session
        self._set_state(name, ModelLoad("ready", detail=detail, load_s=self.clock() - started,
                                        calibration=calibration))

    def _set_state(self, model: str, load: ModelLoad) -> None:
        self.states[model] = load
        self.emit(LoadChanged(model, load))

    # -- running --

    def run(self, attempt: int, model: str, inputs: dict[str, np.ndarray]) -> None:
        """Start an inference; its ``Outcome`` is emitted when it ends."""
        self._start(attempt, self._infer, model, inputs)

    def generate(self, attempt: int, model: str, request: GenRequest) -> None:
        """Start a generation; ``TokensOut`` are emitted as they come, then its ``Outcome``."""
        self._start(attempt, self._generate, model, request)

    def cancel(self, attempt: int) -> None:
        with self._lock:
            token = self._tokens.get(attempt)
        if token is not None:
            token.cancel()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._tokens)

    def _start(self, attempt: int, body, *args) -> None:
        token = CancelToken()
        with self._lock:
            self._tokens[attempt] = token
        try:
            self._pool.submit(self._execute, attempt, token, body, *args)
        except RuntimeError:  # pool shut down: the worker is stopping
            self._finish(Outcome(attempt, kind="cancelled", message="worker is stopping"))

    def _execute(self, attempt: int, token: CancelToken, body, model: str, arg) -> None:
        """Run ``body`` on the model's session and emit its outcome, whatever happens."""
        started = self.clock()
        outcome = Outcome(attempt)
        try:
            if token.cancelled:
                raise _Cancelled()
            session = self.sessions.get(model)
            if session is None:
                state = self.states.get(model)
                reason = state.error if state and state.error else "not loaded here"
                raise ModelUnavailable(f"{model} on {self.device}: {reason}")
            with self._lock:
                self.running += 1
                self.peak_running = max(self.peak_running, self.running)
            try:
                body(outcome, session, model, arg, token)
            finally:
                with self._lock:
                    self.running -= 1
            if token.cancelled:
                raise _Cancelled()
        except _Cancelled:
            outcome.kind, outcome.message = "cancelled", "cancelled"
        except FanoutError as exc:
            outcome.kind, outcome.message = exc.kind, exc.message
            if token.cancelled:
                outcome.kind, outcome.message = "cancelled", f"cancelled ({exc.message})"
        except Exception as exc:  # an engine error we did not classify is the device's
            outcome.kind, outcome.message = "device", f"{type(exc).__name__}: {exc}"
        if outcome.kind is not None:
            outcome.outputs = outcome.generated = None
        outcome.service_s = self.clock() - started
        self._finish(outcome)

    def _infer(self, outcome: Outcome, session: Session | LLMSession, model: str,
               inputs: dict[str, np.ndarray], token: CancelToken) -> None:
        if isinstance(session, LLMSession):
            raise InvalidInput(f"model {model!r} generates text: call generate(), not infer()")
        options = self.specs[model].options
        fitted, padding = fit_inputs(session.inputs, inputs, model, self.device,
                                     pad=bool(options.get("pad", True)))
        outcome.outputs = self._sendable(model, padding.unpad(session.run(fitted, token)))

    def _sendable(self, model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``outputs`` if a result message can carry them. Any device would produce the same
        ones, so outputs too large or of a type the wire refuses are the task's fault."""
        for name, arr in outputs.items():
            if arr.dtype.name not in ALLOWED_DTYPES:
                raise InvalidInput(f"model {model!r} output {name!r} has dtype {arr.dtype}, "
                                   f"which cannot be sent; allowed: "
                                   f"{', '.join(sorted(ALLOWED_DTYPES))}")
        size = result_bytes(outputs)
        if self.max_output_bytes is not None and size > self.max_output_bytes:
            raise InvalidInput(f"outputs of {size} bytes exceed the limit of "
                               f"{self.max_output_bytes} bytes; raise "
                               f"scheduler.max_message_bytes")
        return outputs

    def _generate(self, outcome: Outcome, session: Session | LLMSession, model: str,
                  request: GenRequest, token: CancelToken) -> None:
        if not isinstance(session, LLMSession):
            raise InvalidInput(f"model {model!r} does not generate text: call infer()")

        def on_tokens(delta: Delta) -> None:
            self.emit(TokensOut(outcome.attempt, delta))

        outcome.generated = session.generate(request, on_tokens, token)

    def _finish(self, outcome: Outcome) -> None:
        with self._lock:
            self._tokens.pop(outcome.attempt, None)
        self.emit(outcome)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            tokens = list(self._tokens.values())
        for token in tokens:
            token.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for session in self.sessions.values():
            try:
                session.close()
            except Exception:
                log.exception("%s: closing a session failed", self.device)
        self.backend.close()


class _Cancelled(Exception):
    pass
