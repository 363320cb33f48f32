"""The pipe between a worker and its engine process: length-prefixed msgpack frames, each
a list of messages, and the codecs of what crosses it (requests, deltas, results, errors).

Worker to engine: ``["load", spec]``, ``["gen", rid, request]``, ``["cancel", rid]``,
``["close"]``. Engine to worker: ``["note", text]``, ``["ready", info]``,
``["failed", text]`` while loading; then ``["t", rid, delta]``, ``["d", rid, result]``,
``["e", rid, kind, message]``. The engine sends one frame per step with every sequence's
new tokens, not one message per token and sequence.
"""
from __future__ import annotations

import dataclasses
import os
import select
import struct
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import msgpack

from ...errors import DeviceError, FanoutError, error_class
from ...wire.generation import Delta, GenRequest, GenResult, TokenLogprob, Tool, ToolCall

MAX_FRAME_BYTES = 256 << 20  # a prompt of the longest context is a few MB; this only bounds junk
_HEADER = struct.Struct("<I")


class PipeFrames:
    """Frames from a pipe's file descriptor, for one reading thread, that another thread can
    ask about: ``pending`` is true while bytes wait in the pipe or frames read from it are
    being handled. The engine process's step holds the GIL: requests that came together
    reached its pipe together but were read one per step, so a fan-out of 8 joined the
    batch over four steps. Its engine thread now lets what is already there in first."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray()
        self._busy = False

    def frames(self) -> Iterator[list]:
        """The messages of every whole frame one read brought, until the pipe ends (so that
        requests that came together are handled together); the caller handles them before
        the next read, and ``pending`` stays true until it asks for more."""
        while True:
            self._busy = False
            select.select([self._fd], [], [])  # blocks without the GIL
            self._busy = True  # from here until every frame read is handled
            chunk = os.read(self._fd, 1 << 20)
            if not chunk:
                return
            self._buffer += chunk
            messages: list = []
            while len(self._buffer) >= _HEADER.size:
                (n,) = _HEADER.unpack_from(self._buffer)
                if n > MAX_FRAME_BYTES:
                    raise DeviceError(f"engine pipe: a frame of {n} bytes exceeds "
                                      f"{MAX_FRAME_BYTES}")
                if len(self._buffer) < _HEADER.size + n:
                    break
                data = bytes(self._buffer[_HEADER.size:_HEADER.size + n])
                del self._buffer[:_HEADER.size + n]
                messages += _frame(data)
            if messages:
                yield messages

    @property
    def pending(self) -> bool:
        return self._busy or bool(select.select([self._fd], [], [], 0)[0])

    def wait_drained(self, at_most_s: float) -> None:
        """Wait (sleeping, so that the reader has the GIL) while input is pending."""
        deadline = time.monotonic() + at_most_s
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.0002)


def _frame(data: bytes) -> list:
    messages = msgpack.unpackb(data, raw=False, strict_map_key=False)
    if not isinstance(messages, list):
        raise DeviceError(f"engine pipe: a frame must be a list, got {type(messages)}")
    return messages


class Channel:
    """Frames over a pair of byte streams; ``write`` may be called from any thread."""

    def __init__(self, reader: IO[bytes], writer: IO[bytes]) -> None:
        self._reader = reader
        self._writer = writer
        self._write_lock = threading.Lock()

    def write(self, messages: list) -> None:
        data = msgpack.packb(messages, use_bin_type=True)
        with self._write_lock:
            self._writer.write(_HEADER.pack(len(data)) + data)
            self._writer.flush()

    def read(self) -> list | None:
        """The next frame's messages; None at the end of the stream."""
        header = self._reader.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        (n,) = _HEADER.unpack(header)
        if n > MAX_FRAME_BYTES:
            raise DeviceError(f"engine pipe: a frame of {n} bytes exceeds {MAX_FRAME_BYTES}")
        data = self._reader.read(n)
        if len(data) < n:
            return None
        return _frame(data)


def request_to_wire(r: GenRequest) -> dict:
    return dataclasses.asdict(r)  # tools become plain dicts of their fields


def request_from_wire(d: dict) -> GenRequest:
    return GenRequest(**{**d, "tools": [Tool(**t) for t in d.get("tools", [])]})


def delta_to_wire(d: Delta) -> list:
    return [d.ids, d.text, [[c.name, c.arguments, c.index, c.id] for c in d.tool_calls],
            [[x.token, x.logprob] for x in d.logprobs]]


def delta_from_wire(v: list) -> Delta:
    ids, text, calls, logprobs = v
    return Delta(list(ids), text, [ToolCall(*c) for c in calls],
                 [TokenLogprob(*x) for x in logprobs])


def result_to_wire(r: GenResult) -> list:
    return [r.finish_reason, r.prompt_tokens, r.completion_tokens]


def result_from_wire(v: list) -> GenResult:
    return GenResult(*v)


def error_to_wire(e: FanoutError) -> list:
    return [e.kind, e.message]


def error_from_wire(kind: Any, message: Any) -> FanoutError:
    try:
        return error_class(kind)(str(message))
    except KeyError:
        return DeviceError(f"{message} (engine error of unknown kind {kind!r})")
