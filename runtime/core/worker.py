"""A device worker's logic: it owns one session per model and runs up to ``capacity`` tasks.

No sockets here (see ``worker_process.py``): results and state changes go to ``emit``, which
the shell turns into messages. ``run`` never blocks the caller; engines release the GIL, so
``capacity`` threads run inference at once while the shell keeps answering control messages.

Tasks beyond the running ones wait here in one FIFO queue (the scheduler's prefetch); a cancel
takes a waiting task out at once. A model that batches (``batching.py``) runs up to its
``max_rows`` rows of compatible waiting tasks as one engine call; a batch that fails is run
again task by task, so each task gets its own outcome.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

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
from ..wire.protocol import ALLOWED_DTYPES, dtype_name, result_bytes
from ..wire.status import ModelLoad
from .batching import (
    Batching,
    NotBatchable,
    Part,
    assemble,
    batching_for,
    fits,
    rows_disagree,
    shape_key,
    split,
)
from .tensors import fit_inputs
from .warmup import warm_up

log = logging.getLogger("fanout.worker")
_GENERATES: dict[type, bool] = {}


def _generates(session: object) -> bool:
    """``isinstance(session, LLMSession)``, by type (implementations subclass it): checking
    a Protocol costs microseconds, and the hot path asks for every task."""
    kind = type(session)
    known = _GENERATES.get(kind)
    if known is None:
        known = _GENERATES[kind] = isinstance(session, LLMSession)
    return known


@dataclass
class Outcome:
    """What one run produced: outputs or a generation, or an error kind and message."""

    attempt: int
    outputs: dict[str, np.ndarray] | None = None
    generated: GenResult | None = None
    kind: ErrorKind | None = None
    message: str = ""
    service_s: float = 0.0  # the engine call's wall time (a batch's, for each of its tasks)
    batch: int = 1  # tasks in that engine call


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


@dataclass(eq=False)
class _Job:
    """A task held here: waiting in the queue, or running."""

    attempt: int
    model: str
    arg: Any  # the inputs, or the GenRequest of a generation
    generate: bool
    token: CancelToken = field(default_factory=CancelToken)
    arrived: float = 0.0
    queued: bool = True


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
        self.batching: dict[str, Batching] = {}  # the models that batch here, once loaded
        self.states = {m.name: ModelLoad("loading", detail="queued for loading") for m in models}
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._queue: collections.deque[_Job] = collections.deque()  # waiting, in arrival order
        self._jobs: dict[int, _Job] = {}  # every task held: waiting or running
        self._collecting: set[str] = set()  # models a runner is filling a batch of
        self._closed = False
        self.running = 0  # engine calls under way right now
        self.peak_running = 0  # the most ever at once: proves the capacity limit held
        self._loader: threading.Thread | None = None
        self._runners = [threading.Thread(target=self._runner, name=f"{device}-{i}", daemon=True)
                         for i in range(capacity)]
        for runner in self._runners:
            runner.start()

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
        batching = None if isinstance(session, LLMSession) else batching_for(session.inputs,
                                                                             spec.options)
        detail = "ready"
        if batching is not None and not isinstance(session, LLMSession):
            progress("checking that batches come out right")
            why = self._rows_disagree(session, batching, spec)
            if why is not None:
                log.warning("%s: %s runs task by task: %s", self.device, name, why)
                batching, detail = None, f"ready (batching off: {why})"
        rows = batching.max_rows if batching else 1
        progress("warming up")
        try:
            calibration = warm_up(session, spec, self.capacity, max_batch=rows)
        except Exception as exc:  # the model loaded: tasks will tell whether the device works
            log.warning("%s: %s warm-up failed: %s", self.device, name, exc)
            calibration, detail = None, f"ready (warm-up failed: {exc})"
        self.sessions[name] = session
        if batching is not None:
            self.batching[name] = batching
        self._set_state(name, ModelLoad("ready", detail=detail, load_s=self.clock() - started,
                                        calibration=calibration, max_batch=rows))

    @staticmethod
    def _rows_disagree(session: Session, batching: Batching, spec: ModelSpec) -> str | None:
        warmup = spec.options.get("warmup")
        try:
            return rows_disagree(session, batching, warmup if isinstance(warmup, dict) else None)
        except Exception as exc:  # a batch the engine refuses is no batch to use
            return f"a batch of {batching.max_rows} failed: {type(exc).__name__}: {exc}"

    def _set_state(self, model: str, load: ModelLoad) -> None:
        self.states[model] = load
        self.emit(LoadChanged(model, load))

    # -- running --

    def run(self, attempt: int, model: str, inputs: dict[str, np.ndarray]) -> None:
        """Queue an inference; its ``Outcome`` is emitted when it ends."""
        self._enqueue(_Job(attempt, model, inputs, False, arrived=time.perf_counter()))

    def generate(self, attempt: int, model: str, request: GenRequest) -> None:
        """Queue a generation; ``TokensOut`` are emitted as they come, then its ``Outcome``."""
        self._enqueue(_Job(attempt, model, request, True, arrived=time.perf_counter()))

    def cancel(self, attempt: int) -> None:
        """Stop a task: one still waiting leaves the queue and is answered at once."""
        with self._lock:
            job = self._jobs.get(attempt)
            waiting = job is not None and job.queued
            if waiting:
                self._queue.remove(job)  # type: ignore[arg-type]
        if job is None:
            return
        if waiting:
            self._finish(Outcome(attempt, kind="cancelled", message="cancelled"))
        else:
            job.token.cancel()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            if not self._closed:
                self._jobs[job.attempt] = job
                self._queue.append(job)
                self._work.notify()
                return
        self.emit(Outcome(job.attempt, kind="cancelled", message="worker is stopping"))

    def _runner(self) -> None:
        """One slot: take the oldest waiting task (with its batch mates) and run it."""
        while True:
            with self._work:
                taken = self._take()
                if taken is None:
                    return
            jobs, batched = taken
            try:
                if batched:
                    self._execute_batch(jobs)
                else:
                    self._execute(jobs[0])
            except Exception:  # a bug here must not end the slot: every task gets an answer
                log.exception("%s: a run failed unexpectedly", self.device)
                for job in jobs:
                    self._finish(Outcome(job.attempt, kind="device",
                                         message="the worker failed to run the task"))

    def _take(self) -> tuple[list[_Job], bool] | None:
        """(Under the lock) the next task and, for a model that batches, its batch mates
        (then True); waits up to the model's delay for the batch to fill. None once closed."""
        while True:
            job = next((j for j in self._queue if j.generate
                        or j.model not in self._collecting), None)
            if job is not None:
                break
            if self._closed:
                return None
            self._work.wait()
        self._queue.remove(job)
        job.queued = False
        batching = None if job.generate else self.batching.get(job.model)
        key = self._key(job, batching) if batching is not None else None
        if batching is None or key is None:
            return [job], False
        jobs, rows = [job], key[1]
        self._collecting.add(job.model)
        try:
            deadline = job.arrived + batching.delay_s
            while True:
                rows = self._mates(jobs, key[0], rows, batching.max_rows)
                wait = deadline - time.perf_counter()
                if rows >= batching.max_rows or wait <= 0 or self._closed:
                    return jobs, True
                self._work.wait(wait)
        finally:
            self._collecting.discard(job.model)
            self._work.notify_all()  # tasks of this model may be waiting for a free runner

    def _mates(self, jobs: list[_Job], key: tuple, rows: int, max_rows: int) -> int:
        """Move waiting tasks that can share the batch of ``jobs`` into it; its rows now."""
        model, kept = jobs[0].model, collections.deque[_Job]()
        for job in self._queue:
            mate = None
            if rows < max_rows and job.model == model and not job.generate:
                mate = self._key(job, self.batching[model])
            if mate is not None and mate[0] == key and rows + mate[1] <= max_rows:
                job.queued = False
                jobs.append(job)
                rows += mate[1]
            else:
                kept.append(job)
        self._queue = kept
        return rows

    def _key(self, job: _Job, batching: Batching) -> tuple[tuple, int] | None:
        """What a batch mate of ``job`` must share, and its rows; None: it runs alone."""
        session = self.sessions.get(job.model)
        if session is None or _generates(session) or not isinstance(job.arg, dict):
            return None
        if not fits(cast(Session, session).inputs, job.arg, batching.pad):
            return None  # it fails alone, without taking a batch's room
        return shape_key(job.arg, batching.pad)

    def _execute(self, job: _Job) -> None:
        """Run one task alone on the model's session and emit its outcome, whatever happens."""
        started = self.clock()
        outcome = Outcome(job.attempt)
        token = job.token
        try:
            if token.cancelled:
                raise _Cancelled()
            session = self._session(job.model)
            with self._running():
                if job.generate:
                    self._generate(outcome, session, job.model, job.arg, token)
                else:
                    self._infer(outcome, session, job.model, job.arg, token)
            if token.cancelled:
                raise _Cancelled()
        except Exception as exc:
            _failed(outcome, exc, token)
        outcome.service_s = self.clock() - started
        self._finish(outcome)

    def _execute_batch(self, jobs: list[_Job]) -> None:
        """Run tasks of one model as one engine call; if it fails, each on its own."""
        model, batching = jobs[0].model, self.batching[jobs[0].model]
        try:
            session = self._session(model)
            if isinstance(session, LLMSession):  # a tensor model's batching, not an LLM's
                raise InvalidInput(f"model {model!r} generates text: call generate()")
        except Exception as exc:
            for job in jobs:
                self._fail(job, exc)
            return
        parts: list[tuple[_Job, Part]] = []
        for job in jobs:
            try:
                if job.token.cancelled:
                    raise _Cancelled()
                fitted, padding = fit_inputs(session.inputs, job.arg, model, self.device,
                                             pad=batching.pad, batch_free=True)
                rows = next(iter(fitted.values())).shape[0]
                parts.append((job, Part(fitted, rows, padding)))
            except Exception as exc:  # this task cannot run here: the others still do
                self._fail(job, exc)
        if not parts:
            return
        started = self.clock()
        token = _all_cancelled([job.token for job, _ in parts])
        try:
            inputs, layout, total = assemble([part for _, part in parts], batching.static_rows)
            with self._running():
                outputs = split(session.run(inputs, token), layout, total)
        except NotBatchable as exc:
            log.warning("%s: %s is run task by task: %s", self.device, model, exc)
            self.batching.pop(model, None)
            outputs = None
        except Exception as exc:
            if len(parts) == 1 or token.cancelled:  # its own outcome, or every task's cancel
                for job, _ in parts:
                    self._fail(job, exc, started)
                return
            log.info("%s: a batch of %d %s tasks failed (%s); running each alone",
                     self.device, len(parts), model, exc)
            outputs = None
        if outputs is None:
            for job, _ in parts:
                self._execute(job)
            return
        service = self.clock() - started
        for (job, _), out in zip(parts, outputs):
            outcome = Outcome(job.attempt, service_s=service, batch=len(parts))
            try:
                if job.token.cancelled:
                    raise _Cancelled()
                outcome.outputs = self._sendable(model, out)
            except Exception as exc:
                _failed(outcome, exc, job.token)
            self._finish(outcome)

    def _fail(self, job: _Job, exc: Exception, started: float | None = None) -> None:
        outcome = Outcome(job.attempt)
        _failed(outcome, exc, job.token)
        if started is not None:
            outcome.service_s = self.clock() - started
        self._finish(outcome)

    def _session(self, model: str) -> Session | LLMSession:
        session = self.sessions.get(model)
        if session is None:
            state = self.states.get(model)
            reason = state.error if state and state.error else "not loaded here"
            raise ModelUnavailable(f"{model} on {self.device}: {reason}")
        return session

    def _running(self) -> _Counting:
        return _Counting(self)

    def _infer(self, outcome: Outcome, session: Session | LLMSession, model: str,
               inputs: dict[str, np.ndarray], token: CancelToken) -> None:
        if _generates(session):
            raise InvalidInput(f"model {model!r} generates text: call generate(), not infer()")
        tensors = cast(Session, session)
        options = self.specs[model].options
        fitted, padding = fit_inputs(tensors.inputs, inputs, model, self.device,
                                     pad=bool(options.get("pad", True)))
        outcome.outputs = self._sendable(model, padding.unpad(tensors.run(fitted, token)))

    def _sendable(self, model: str, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``outputs`` if a result message can carry them. Any device would produce the same
        ones, so outputs too large or of a type the wire refuses are the task's fault."""
        for name, arr in outputs.items():
            if dtype_name(arr.dtype) not in ALLOWED_DTYPES:
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
        """Emit a held task's outcome, once: a task already answered is not answered again."""
        with self._lock:
            held = self._jobs.pop(outcome.attempt, None) is not None
        if held:
            self.emit(outcome)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
            self._queue.clear()
            self._work.notify_all()
        for job in jobs:
            job.token.cancel()
        for runner in self._runners:
            runner.join()
        for session in self.sessions.values():
            try:
                session.close()
            except Exception:
                log.exception("%s: closing a session failed", self.device)
        self.backend.close()


class _Counting:
    """Counts an engine call as running while it lasts (and the most at once)."""

    def __init__(self, core: WorkerCore) -> None:
        self.core = core

    def __enter__(self) -> None:
        with self.core._lock:
            self.core.running += 1
            self.core.peak_running = max(self.core.peak_running, self.core.running)

    def __exit__(self, *exc: object) -> None:
        with self.core._lock:
            self.core.running -= 1


def _all_cancelled(tokens: list[CancelToken]) -> CancelToken:
    """A token for one engine call of several tasks: cancelled once every task is."""
    if len(tokens) == 1:
        return tokens[0]
    batch = CancelToken()
    left = [len(tokens)]
    lock = threading.Lock()

    def one_less() -> None:
        with lock:
            left[0] -= 1
            done = left[0] == 0
        if done:
            batch.cancel()

    for token in tokens:
        token.on_cancel(one_less)
    return batch


def _failed(outcome: Outcome, exc: Exception, token: CancelToken) -> None:
    """Fill in the outcome of a run that raised ``exc``."""
    if isinstance(exc, _Cancelled):
        outcome.kind, outcome.message = "cancelled", "cancelled"
    elif isinstance(exc, FanoutError):
        outcome.kind, outcome.message = exc.kind, exc.message
        if token.cancelled:
            outcome.kind, outcome.message = "cancelled", f"cancelled ({exc.message})"
    else:  # an engine error we did not classify is the device's
        outcome.kind, outcome.message = "device", f"{type(exc).__name__}: {exc}"
    outcome.outputs = outcome.generated = None


class _Cancelled(Exception):
    pass
