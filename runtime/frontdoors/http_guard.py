"""The HTTP server's connections, bounded: how many, and how long one may take to send.

aiohttp has no header read timeout and no connection cap: 1,100 half-sent requests held
1,100 file descriptors until the process could open no more (issue 11, item 6). Each
connection's protocol is wrapped here: past ``http.max_connections`` a new one is answered
429 and closed at once; one that has not finished sending its request's headers within
``http.header_timeout_s`` of connecting (or of its previous answer) is answered 408 and
closed (closed quietly when it sent nothing: an idle keep-alive). The body's own timeout is
the request handler's (``http.body_timeout_s``).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger("fanout.http")

SWEEP_S = 0.25  # how often the connections waiting for headers are checked
REFUSED_LINGER_S = 1.0  # a refused connection is closed after at most this


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                 "param": None, "code": code}}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, and when it last began waiting for headers."""

    def __init__(self, guard: ConnectionGuard, inner: Any):
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.waiting_since: float | None = guard.loop.time()  # None: a request is being served
        self.received = False  # bytes came since it began waiting

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.guard.open[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.inner.data_received(data)

    def eof_received(self) -> Any:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.open.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def __getattr__(self, name: str) -> Any:  # anything else asyncio asks of the protocol
        return getattr(self.inner, name)


class _Refused(asyncio.Protocol):
    """A connection over the cap: told so, and closed once its request is read (closing
    with it unread would reset the connection before the answer is)."""

    def __init__(self, answer: bytes):
        self.answer = answer

    def connection_made(self, transport: Any) -> None:
        transport.write(self.answer)
        transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # read, so that closing does not reset

    def eof_received(self) -> bool:
        return False  # the client is done too: close now


class ConnectionGuard:
    def __init__(self, max_connections: int, header_timeout_s: float):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.loop = asyncio.get_running_loop()
        self.open: dict[Any, _Connection] = {}
        self.refused = 0  # connections answered 429
        self.timed_out = 0  # connections answered 408 (or closed idle)
        self._full = _response(429, "Too Many Requests",
                               f"the server has {max_connections} connections open, its limit "
                               f"(http.max_connections); retry shortly", "too_many_connections")
        self._slow = _response(408, "Request Timeout",
                               f"the request's headers did not arrive within "
                               f"{header_timeout_s:g} s (http.header_timeout_s)",
                               "request_timeout")
        self._sweeper = self.loop.create_task(self._sweep())

    def protocol(self, server: web.Server) -> asyncio.Protocol:
        """The protocol for a new connection (what ``loop.create_server`` asks for)."""
        if len(self.open) >= self.max_connections:
            self.refused += 1
            return _Refused(self._full)
        return _Connection(self, server())

    def serving(self, transport: Any) -> None:
        """A request's headers arrived: its time is the handler's now."""
        conn = self.open.get(transport)
        if conn is not None:
            conn.waiting_since = None

    def served(self, transport: Any) -> None:
        """A request was answered: the next one's headers are waited for from now."""
        conn = self.open.get(transport)
        if conn is not None:
            conn.waiting_since, conn.received = self.loop.time(), False

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_S)
            late = self.loop.time() - self.header_timeout_s
            for transport, conn in list(self.open.items()):
                if conn.waiting_since is not None and conn.waiting_since < late \
                        and not transport.get_write_buffer_size():  # an answer still leaving
                    self.timed_out += 1
                    if conn.received:  # half a request: say why it ends
                        transport.write(self._slow)
                    transport.close()
                    conn.waiting_since = None

    def close(self) -> None:
        self._sweeper.cancel()


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections go through a ``ConnectionGuard``."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard):
        super().__init__(runner, host, port)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        # As TCPSite.start does, with each connection's protocol made by the guard.
        self._server = await asyncio.get_running_loop().create_server(
            lambda: self.guard.protocol(server), self._host, self._port,
            backlog=self._backlog, reuse_address=self._reuse_address)
        self._bound_port = self._server.sockets[0].getsockname()[1]
