"""Helpers for tests that play a peer on the wire: raw ZMQ sockets, tiny models, RSS."""
from __future__ import annotations

import selectors
import socket
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import zmq

from runtime.backends.onnx_proto import one_node_model
from runtime.wire import protocol as p

NOOP_SHAPE = (4,)


def tiny_models(folder: Path, add_shape: tuple[int, ...] = (4,)) -> dict[str, Path]:
    """``noop`` (Identity of float32[4]) and ``add`` (a + b), hand-encoded ONNX: they load in
    milliseconds, so a cluster of them starts fast."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"noop": folder / "noop.onnx", "add": folder / "add.onnx"}
    paths["noop"].write_bytes(one_node_model("Identity", ["x"], NOOP_SHAPE, "noop"))
    paths["add"].write_bytes(one_node_model("Add", ["a", "b"], add_shape, "add"))
    return paths


def noop_input(i: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.full(NOOP_SHAPE, i, np.float32)}


def dealer(ctx: zmq.Context, address: str, identity: bytes | None = None,
           plain: tuple[str, str] | None = None,
           curve: tuple[str, str, str] | None = None) -> zmq.Socket:
    """A bare DEALER: its own routing id, PLAIN credentials or CURVE keys (server public,
    public, secret) if given."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if plain is not None:
        sock.setsockopt(zmq.PLAIN_USERNAME, plain[0].encode())
        sock.setsockopt(zmq.PLAIN_PASSWORD, plain[1].encode())
    if curve is not None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, curve[0].encode())
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve[1].encode())
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve[2].encode())
    sock.connect(address)
    return sock


def hello(sock: zmq.Socket, token: str | None = None) -> None:
    sock.send_multipart(p.encode(p.Hello(version=p.PROTOCOL_VERSION, role="client", token=token)))


def received(sock: zmq.Socket, wait_s: float = 0.0) -> list[list[bytes]]:
    """Every message waiting on ``sock`` after up to ``wait_s`` seconds for the first (those
    of a pack one by one)."""
    out = _unread.pop(sock, [])
    if not out and wait_s and not sock.poll(int(wait_s * 1000)):
        return out
    while True:
        try:
            out.extend(p.unpack(sock.recv_multipart(zmq.NOBLOCK)))
        except zmq.Again:
            return out


_unread: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # the rest of a pack


def recv(sock: zmq.Socket) -> p.Message:
    """The next message from the scheduler to a client (a pack's one by one)."""
    waiting = _unread.get(sock)
    if not waiting:
        waiting = _unread[sock] = p.unpack(sock.recv_multipart())
    return to_client(waiting.pop(0))


def readable(sock: zmq.Socket, timeout_ms: int) -> bool:
    """A message waits (the rest of a pack, or on the socket) within ``timeout_ms``."""
    return bool(_unread.get(sock)) or bool(sock.poll(timeout_ms))


def to_client(frames: list) -> p.Message:
    return p.Decoder(p.SCHEDULER_TO_CLIENT, 1 << 30).decode(frames)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_until(predicate, timeout: float, interval: float = 0.05) -> float | None:
    """Seconds until ``predicate()`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    return None


class Link:
    """A TCP path from a local port to ``target`` (``host:port``), one thread: bytes flow both
    ways until ``go_silent()``; from then on the connections made so far carry nothing, as
    over a cable pulled or through a NAT that forgot them: what either end sends is lost,
    neither is told, and ``hung_up`` records which end gave up on its own (``"client"`` or
    ``"target"``). Connections made after it flow again."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._peer: dict[socket.socket, socket.socket] = {}  # each end -> the other
        self._side: dict[socket.socket, str] = {}  # each end -> "client" or "target"
        self._lost: set[socket.socket] = set()  # ends of connections gone silent
        self._cut = threading.Event()
        self.connections = 0
        self.hung_up: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)
        self._thread.start()

    def go_silent(self) -> None:
        self._cut.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._cut.is_set():
                self._lost.update(self._peer)
                self._cut.clear()
            for key, _ in self._sel.select(0.05):
                end = key.fileobj
                if end is self._listener:
                    self._accept()
                    continue
                try:
                    data = end.recv(1 << 16)
                except OSError:
                    data = b""
                if data and end not in self._lost:
                    self._peer[end].sendall(data)
                elif not data:
                    self._hang_up(end)

    def _accept(self) -> None:
        down, _ = self._listener.accept()
        up = socket.create_connection(self._target)
        self._peer[down], self._peer[up] = up, down
        self._side[down], self._side[up] = "client", "target"
        for end in (down, up):
            self._sel.register(end, selectors.EVENT_READ)
        self.connections += 1

    def _hang_up(self, end: socket.socket) -> None:
        """``end`` closed its side: a live connection is closed through; a lost one only
        records who gave up."""
        ends = [end] if end in self._lost else [end, self._peer[end]]
        if end in self._lost:
            self.hung_up.append(self._side[end])
        for one in ends:
            self._sel.unregister(one)
            one.close()
            self._peer.pop(one, None)
            self._side.pop(one, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for end in [*self._peer, self._listener]:
            end.close()
        self._sel.close()
