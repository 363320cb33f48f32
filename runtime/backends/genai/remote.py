"""The worker's side of an engine process: an ``LLMSession`` whose pipeline runs in a child
process (``engine_process.py``), so that no thread of the worker waits on ``step()``.

``generate`` sends the request and waits; a reader thread takes each frame the engine sends
(one per step) and hands every request its delta. If the engine process dies, its requests
fail as ``DeviceError`` (the scheduler re-runs them elsewhere) and the next request starts a
new one.
"""
from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import threading
from typing import Any

from ...errors import Cancelled, DeviceError, FanoutError, ModelUnavailable
from ...wire.generation import GenRequest, GenResult
from ..base import CancelToken, LLMSession, ProgressFn, TokensFn
from .channel import (
    Channel,
    delta_from_wire,
    error_from_wire,
    request_to_wire,
    result_from_wire,
)
from .session import unsupported

log = logging.getLogger("fanout.worker")
CLOSE_TIMEOUT_S = 10.0


class _Call:
    def __init__(self, on_tokens: TokensFn) -> None:
        self.on_tokens = on_tokens
        self.done = threading.Event()
        self.outcome: GenResult | FanoutError | None = None

    def end(self, outcome: GenResult | FanoutError) -> bool:
        if self.done.is_set():
            return False
        self.outcome = outcome
        self.done.set()
        return True


class _Engine:
    """One engine process and the thread that reads it."""

    def __init__(self, spec: dict[str, Any], progress: ProgressFn) -> None:
        self.label = spec["label"]
        self.proc = subprocess.Popen([sys.executable, "-m", __package__],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.channel = Channel(self.proc.stdout, self.proc.stdin)
        self.info = self._load(spec, progress)

    def _load(self, spec: dict[str, Any], progress: ProgressFn) -> dict:
        try:
            self.channel.write([["load", spec]])
            while (frame := self.channel.read()) is not None:
                for message in frame:
                    if message[0] == "note":
                        progress(message[1])
                    elif message[0] == "ready":
                        return message[1]
                    elif message[0] == "failed":
                        raise ModelUnavailable(message[1])
        except OSError as e:
            self.kill()
            raise ModelUnavailable(f"{self.label}: the engine process failed: {e}") from e
        except ModelUnavailable:
            self.kill()
            raise
        code = self.kill()
        raise ModelUnavailable(f"{self.label}: the engine process exited while loading "
                               f"(exit code {code})")

    def send(self, message: list) -> None:
        self.channel.write([message])

    def kill(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()

    def close(self) -> None:
        try:
            self.send(["close"])
        except OSError:
            pass
        try:
            self.proc.wait(CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("%s: the engine process did not close in %.0f s; killed", self.label,
                        CLOSE_TIMEOUT_S)
            self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class EngineProcessSession(LLMSession):
    """``spec``: what the engine process loads (see ``engine_process.open_session``)."""

    def __init__(self, spec: dict[str, Any], progress: ProgressFn) -> None:
        self._spec = spec
        self._label = spec["label"]
        self._calls: dict[int, _Call] = {}
        self._rids = itertools.count()
        self._lock = threading.Lock()
        self._closed = False
        self._engine: _Engine | None = None
        self._reader: threading.Thread | None = None
        self._start(progress)
        info = self._info
        self.context_length = int(info["context_length"])
        self.structured_output = bool(info["structured_output"])
        self.logprobs = bool(info["logprobs"])

    @property
    def pid(self) -> int | None:
        """The engine process's pid (None between a crash and the next request)."""
        return self._engine.proc.pid if self._engine is not None else None

    def _start(self, progress: ProgressFn) -> None:
        engine = _Engine(self._spec, progress)
        self._info = engine.info
        self._engine = engine
        self._reader = threading.Thread(target=self._read, args=(engine,), daemon=True,
                                        name=f"engine-{self._label}")
        self._reader.start()

    def generate(self, request: GenRequest, on_tokens: TokensFn,
                 cancel: CancelToken) -> GenResult:
        refused = unsupported(request, self._label, self.structured_output, self.logprobs)
        if refused is not None:
            raise refused
        call = _Call(on_tokens)
        with self._lock:
            if self._closed:
                raise DeviceError(f"{self._label}: session is closed")
            if self._engine is None:  # it died: a fresh one for this request
                try:
                    self._start(lambda _note: None)
                except ModelUnavailable as e:
                    raise DeviceError(f"{e.message} (restarting it after it died)") from e
            engine = self._engine
            assert engine is not None
            rid = next(self._rids)
            self._calls[rid] = call
            try:
                engine.send(["gen", rid, request_to_wire(request)])
            except OSError:
                pass  # it died: the reader fails this call with the others
        cancel.on_cancel(lambda: self._cancel(rid))
        call.done.wait()
        if isinstance(call.outcome, FanoutError):
            raise call.outcome
        assert call.outcome is not None
        return call.outcome

    def _cancel(self, rid: int) -> None:
        self._end(rid, Cancelled(f"{self._label}: generation cancelled"), stop_it=True)

    def _end(self, rid: int, outcome: GenResult | FanoutError, stop_it: bool = False) -> None:
        """End a call once; ``stop_it``: the engine is still generating it, stop that."""
        with self._lock:
            call = self._calls.pop(rid, None)
            engine = self._engine
        if call is None or not call.end(outcome):
            return
        if stop_it and engine is not None:
            try:
                engine.send(["cancel", rid])  # a no-op there if it already ended
            except OSError:
                pass

    def _read(self, engine: _Engine) -> None:
        try:
            while (frame := engine.channel.read()) is not None:
                for message in frame:
                    self._dispatch(message)
        except (OSError, ValueError, DeviceError) as e:
            log.error("%s: reading the engine process failed: %s", self._label, e)
        code = engine.kill()
        with self._lock:
            if self._engine is engine:
                self._engine = None
            calls, self._calls = self._calls, {}
            closed = self._closed
        why = (Cancelled(f"{self._label}: session closed") if closed else
               DeviceError(f"{self._label}: the engine process died (exit code {code})"))
        if not closed:
            log.error("%s: the engine process died (exit code %s); %d generation(s) failed",
                      self._label, code, len(calls))
        for call in calls.values():
            call.end(why)

    def _dispatch(self, message: list) -> None:
        kind, rid = message[0], message[1]
        if kind == "t":
            call = self._calls.get(rid)
            if call is None or call.done.is_set():
                return
            try:
                call.on_tokens(delta_from_wire(message[2]))
            except Exception as e:  # the caller's callback failed (e.g. an injected fault)
                self._end(rid, e if isinstance(e, FanoutError) else
                          DeviceError(f"{self._label}: {type(e).__name__}: {e}"), stop_it=True)
        elif kind == "d":
            self._end(rid, result_from_wire(message[2]))
        elif kind == "e":
            self._end(rid, error_from_wire(message[2], message[3]))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            engine, self._engine = self._engine, None
        if engine is not None:
            engine.close()
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(CLOSE_TIMEOUT_S)
