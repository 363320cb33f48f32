"""Answers for clients that read slower than their answers come: none is dropped.

A ROUTER drops a message for a peer whose pipe is full (its high-water mark); with
``ROUTER_MANDATORY`` it says so instead (``EAGAIN``), and the message waits here, in order,
until the peer's pipe has room. The shell refuses new work from a client whose backlog is
over its bound, and forgets one that keeps sending while it does not read.

Before that, ``Held`` keeps a step's messages per peer and sends them together, as packs.
"""
from __future__ import annotations

import collections
import errno
from collections.abc import Callable

import zmq

from ..wire.protocol import frames_size, packed, send_frames


class Outbox:
    """Per-peer backlogs of the messages ``sock`` (a ROUTER with ``ROUTER_MANDATORY``) could
    not take yet."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self._waiting: dict[bytes, collections.deque[tuple[list, int]]] = {}
        self._bytes: collections.Counter[bytes] = collections.Counter()
        self.unreachable = 0  # messages for peers no longer connected: they went away

    def send(self, ident: bytes, frames: list) -> None:
        """Send ``frames`` to ``ident`` now, or as soon as it has room (never out of order)."""
        queue = self._waiting.get(ident)
        if queue is None and self._try(ident, frames):
            return
        if queue is None:
            queue = self._waiting[ident] = collections.deque()
        size = frames_size(frames)
        queue.append((frames, size))
        self._bytes[ident] += size

    def _try(self, ident: bytes, frames: list) -> bool:
        """True if the message is gone (sent, or its peer is gone); False if it must wait."""
        try:
            send_frames(self.sock, [ident] + frames, nonblocking=True)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            self.unreachable += 1  # not connected (it left): nobody to answer
        return True

    def flush(self) -> None:
        """Send what waits, peer by peer, until each peer's pipe is full again."""
        for ident in list(self._waiting):
            queue = self._waiting[ident]
            while queue:
                frames, size = queue[0]
                if not self._try(ident, frames):
                    break
                queue.popleft()
                self._bytes[ident] -= size
            if not queue:
                del self._waiting[ident]
                del self._bytes[ident]

    def backlog(self, ident: bytes) -> int:
        """Bytes waiting for ``ident``."""
        return self._bytes.get(ident, 0)

    def forget(self, ident: bytes) -> int:
        """Drop what waits for ``ident``; how many messages that was."""
        queue = self._waiting.pop(ident, None)
        self._bytes.pop(ident, None)
        return len(queue) if queue else 0

    @property
    def total_bytes(self) -> int:
        """Bytes waiting, for every peer."""
        return sum(self._bytes.values())


class Held:
    """Messages for each peer, held until the step that made them ends (a drain, a tick),
    then sent in order, several at a time as packs (``protocol.packed``): a fan-out's
    answers and runs cost one trip through the socket per peer and step, not one each."""

    def __init__(self, send: Callable[[bytes, list], object]):
        self._send = send
        self._held: dict[bytes, list[list]] = {}

    def put(self, ident: bytes, frames: list) -> None:
        held = self._held.get(ident)
        if held is None:
            self._held[ident] = [frames]
        else:
            held.append(frames)

    def send(self, failed: Callable[[bytes, Exception], None]) -> None:
        """Send everything held; a peer whose send fails costs no other peer its messages."""
        held, self._held = self._held, {}
        for ident, messages in held.items():
            self._send_all(ident, messages, failed)

    def send_to(self, ident: bytes, failed: Callable[[bytes, Exception], None]) -> None:
        """Send what is held for ``ident`` now (before its backlog is dropped, say)."""
        messages = self._held.pop(ident, None)
        if messages:
            self._send_all(ident, messages, failed)

    def _send_all(self, ident: bytes, messages: list[list],
                  failed: Callable[[bytes, Exception], None]) -> None:
        try:
            for frames in packed(messages):
                self._send(ident, frames)
        except Exception as exc:
            failed(ident, exc)
