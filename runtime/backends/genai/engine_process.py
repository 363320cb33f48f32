"""The engine process: one continuous-batching pipeline in a process of its own.

``step()`` holds the GIL for its whole length (20-100 ms a step here, 0.5-2 s when it
compiles a new grammar), so in the worker's process it would stall the heartbeats and every
control message behind it. Here it stalls nobody: the worker (``remote.py``) talks to this
process over a pipe (``channel.py``) and its own threads never wait on the engine.

Started as ``python -m runtime.backends.genai`` (``__main__.py``) with the pipe on stdin and
stdout (stdout is kept for frames; anything else the process prints goes to stderr). It
exits when told to close or when stdin ends: the worker is gone, however it died (no
PR_SET_PDEATHSIG: it fires when the thread that started the child ends, not its process).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from ...errors import DeviceError, FanoutError
from ...wire.generation import GenRequest, GenResult
from ..base import CancelToken
from .batched import BatchedLLMSession
from .channel import (
    Channel,
    PipeFrames,
    delta_to_wire,
    error_to_wire,
    request_from_wire,
    result_to_wire,
)
from .jobs import genai

# How long the engine thread lets requests already in its pipe in before it steps (a frame
# takes ~1 ms to read and tokenize; this only bounds a flood)
CATCH_UP_S = 0.02


def open_session(spec: dict[str, Any], after_step: Any,
                 catch_up: Any = None) -> BatchedLLMSession:
    """The session ``spec`` describes (built by ``GenAIBackend``): path, device, OpenVINO
    properties, SchedulerConfig fields, label, context length, structured output."""
    g = genai()
    sched = g.SchedulerConfig()
    for key, value in spec["scheduler"].items():
        setattr(sched, key, value)

    def make() -> Any:
        return g.ContinuousBatchingPipeline(spec["path"], sched, spec["device"],
                                            spec["properties"])

    return BatchedLLMSession(make, spec["label"], spec["context_length"],
                             spec["structured_output"], bool(sched.enable_prefix_caching),
                             after_step, catch_up)


class Outbox:
    """Messages for the worker, sent together: by the engine thread after each step, and
    at once by any other thread that ends a generation (a cancel, a refused request)."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._items: list = []
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # frames leave in the order their items came

    def put(self, message: list) -> None:
        with self._lock:
            self._items.append(message)

    def flush(self) -> None:
        with self._send_lock:
            with self._lock:
                items, self._items = self._items, []
            if items:
                self._channel.write(items)


class EngineServer:
    """``frames``: what comes from the worker, read on the calling thread of ``run``; the
    engine thread asks it whether more is pending before it admits and steps."""

    def __init__(self, channel: Channel, frames: PipeFrames) -> None:
        self.channel = channel
        self.frames = frames
        self.outbox = Outbox(channel)
        self.session: BatchedLLMSession | None = None
        self.tokens: dict[int, CancelToken] = {}

    def run(self) -> int:
        incoming = self.frames.frames()
        first = next(incoming, None)
        if not first or first[0][0] != "load":
            return 2
        spec = first[0][1]
        try:
            self.session = open_session(spec, self.outbox.flush,
                                        lambda: self.frames.wait_drained(CATCH_UP_S))
            self.session.warm_up()
        except Exception as e:
            text = e.message if isinstance(e, FanoutError) else str(e).strip()
            self.channel.write([["failed", f"{spec['label']}: {text}"]])
            return 1
        self.channel.write([["ready", {"context_length": self.session.context_length,
                                       "structured_output": self.session.structured_output,
                                       "logprobs": self.session.logprobs}]])
        try:
            for messages in incoming:
                gens: list = []  # consecutive requests: tokenized together, then started
                for message in messages:
                    if message[0] == "gen":
                        gens.append(message)
                        continue
                    self.generate_all(gens)
                    gens = []
                    if message[0] == "close":
                        return 0
                    self.handle(message)
                self.generate_all(gens)
            return 0
        finally:
            self.session.close()
            self.outbox.flush()

    def handle(self, message: list) -> None:
        match message:
            case ["gen", int(rid), dict(request)]:
                self.generate(rid, request)
            case ["cancel", int(rid)]:
                token = self.tokens.get(rid)
                if token is not None:
                    token.cancel()

    def generate_all(self, messages: list) -> None:
        """Start each ``["gen", rid, request]``, their chat prompts tokenized in one call."""
        if len(messages) < 2:
            for message in messages:
                self.handle(message)
            return
        assert self.session is not None
        requests: list = []
        for message in messages:
            try:
                requests.append(request_from_wire(message[2]))
            except Exception:  # generate() reads it again, and answers with the error
                requests.append(None)
        try:
            prompts = self.session.chat_prompts([r for r in requests if r is not None])
        except Exception:  # a bug here must not end the engine: each is tokenized alone
            prompts = [None] * len(requests)
        found = iter(prompts)
        for message, request in zip(messages, requests):
            prompt = next(found) if request is not None else None
            match message:
                case ["gen", int(rid), dict(wire)]:
                    self.generate(rid, wire, request, prompt)

    def generate(self, rid: int, wire: dict, request: GenRequest | None = None,
                 prompt: list[int] | None = None) -> None:
        assert self.session is not None
        session = self.session
        token = CancelToken()
        self.tokens[rid] = token

        def on_tokens(delta: Any) -> None:
            self.outbox.put(["t", rid, delta_to_wire(delta)])

        def on_end(outcome: GenResult | FanoutError) -> None:
            self.tokens.pop(rid, None)
            if isinstance(outcome, FanoutError):
                self.outbox.put(["e", rid, *error_to_wire(outcome)])
            else:
                self.outbox.put(["d", rid, result_to_wire(outcome)])
            if threading.current_thread() is not session._thread:
                self.outbox.flush()  # the engine thread flushes after its step

        try:
            session.start(request if request is not None else request_from_wire(wire),
                          on_tokens, on_end, token, prompt)
        except FanoutError as e:
            on_end(e)
        except Exception as e:  # a malformed request from our own worker: a bug, said so
            on_end(DeviceError(f"engine process: {type(e).__name__}: {e}"))


def main() -> int:
    frames_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt frames
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this ends
    return EngineServer(Channel(sys.stdin.buffer, frames_out),
                        PipeFrames(sys.stdin.fileno())).run()

