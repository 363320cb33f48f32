"""Fuzzed traffic for the scheduler's two sockets, from peers with and without credentials.

``Fuzzer`` makes messages the way a broken or hostile peer would: valid messages mutated field
by field (values of every wrong type, huge numbers, NaN, deep nesting, unknown fields, other
message types and versions), valid msgpack that is no message, raw bytes, and array frames
that lie about their size. ``fuzz`` sends them through ZMQ DEALER sockets (with the given
credentials, or none) and raw TCP connections, reading whatever comes back, and counts.

The caller checks what matters: every process alive, nothing accepted lost, normal work after
(``runtime.bench.chaos`` and ``tests/test_fuzz.py``).
"""
from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from ..shells.supervisor import process_alive
from ..wire import protocol as p

# Message types a fuzzed client or worker sends, and puts anywhere. Shutdown is never among
# them: from a peer allowed to send it, a well-formed one stops the cluster, as it should.
CLIENT_TYPES = ("hello", "keepalive", "bye", "submit", "generate", "cancel", "status")
WORKER_TYPES = ("register", "model_state", "heartbeat", "done", "tokens", "generated", "failed")
_EVERY: frozenset[type[p.Message]] = (p.CLIENT_TO_SCHEDULER | p.WORKER_TO_SCHEDULER
                                      | p.SCHEDULER_TO_CLIENT | p.SCHEDULER_TO_WORKER)
ALL_TYPES: tuple[str, ...] = tuple(sorted(
    cls.TYPE for cls in _EVERY if cls is not p.Shutdown)) + ("", "nope")
_NEST = "\x00nest\x00"  # replaced by a deeply nested list in the packed header


@dataclass(frozen=True)
class Credentials:
    """How a fuzzing peer authenticates: PLAIN (a token), CURVE (keys), or not at all."""

    plain: tuple[str, str] | None = None  # (username, password)
    curve: tuple[str, str, str] | None = None  # (server public, public, secret), Z85

    def apply(self, sock: zmq.Socket) -> None:
        if self.curve is not None:
            server, public, secret = self.curve
            sock.setsockopt(zmq.CURVE_SERVERKEY, server.encode())
            sock.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
            sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())
        elif self.plain is not None:
            sock.setsockopt(zmq.PLAIN_USERNAME, self.plain[0].encode())
            sock.setsockopt(zmq.PLAIN_PASSWORD, self.plain[1].encode())


@dataclass
class FuzzCount:
    """What one run of ``fuzz`` did."""

    sent: int = 0
    replies: int = 0
    raw_tcp: int = 0  # connections that sent raw bytes
    by_peer: dict[str, int] = field(default_factory=dict)


class Fuzzer:
    """Random messages for one side (``"client"`` or ``"worker"``), reproducible by seed."""

    def __init__(self, side: str, seed: int = 0, models: tuple[str, ...] = ("noop",),
                 devices: tuple[str, ...] = ("cpu0",)):
        self.side = side
        self.rng = random.Random(seed)
        self.models = models + ("nope", "")
        self.devices = devices + ("ghost",)
        self.types = CLIENT_TYPES if side == "client" else WORKER_TYPES
        self.task_ids = [f"fz-{i}" for i in range(16)]  # few: cancels and duplicates hit

    # -- values --

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        pick = r.randrange(14 if depth < 3 else 10)
        if pick < 3:
            return (None, True, False)[pick]
        if pick == 3:
            return r.choice([0, 1, -1, 2**31, 2**63 - 1, -(2**63), 2**64 - 1,
                             r.randrange(-9, 10**6)])
        if pick == 4:
            return r.choice([0.0, -0.0, 1.5, -1e308, 1e308, float("nan"), float("inf"),
                             float("-inf"), r.random()])
        if pick == 5:
            return r.choice(["", "x", "cpu0", "minilm", "noop", "\u00e9\u2603", "\x00", "\r\n",
                             "%s%n", "../../etc/passwd", "a" * r.randrange(1, 3000)])
        if pick == 6:
            return r.randbytes(r.randrange(0, 64))
        if pick == 7:
            return r.choice(self.task_ids)
        if pick == 8:
            return r.choice(self.models + self.devices)
        if pick == 9:
            return r.choice(ALL_TYPES)
        if pick == 10:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 4))]
        if pick == 11:
            return {str(self.value(depth + 1))[:20]: self.value(depth + 1)
                    for _ in range(r.randrange(0, 4))}
        if pick == 12:
            return [["input_ids", "int64", [1, 2]], [self.value(depth + 1)] * 3]
        return _NEST

    # -- messages --

    def frames(self, packs: bool = True) -> list[bytes]:
        """One fuzzed message, as the frames a DEALER sends (sometimes a pack of several)."""
        r = self.rng
        roll = r.random()
        if packs:
            if roll < 0.08:
                return self._fuzzed_pack()
            roll = r.random()
        if roll < 0.06:
            return [r.randbytes(r.randrange(0, 300)) for _ in range(r.randrange(1, 4))]
        if roll < 0.12:
            return [msgpack.packb(self.value(), use_bin_type=True)]
        if roll < 0.16:
            whole = self._pack(self._header(r.choice(self.types)))
            return [whole[:r.randrange(0, max(1, len(whole)))]]
        header = self._header(r.choice(self.types))
        for _ in range(r.choice([0, 1, 1, 2, 3, 5])):
            self._mutate(header)
        frames = [self._pack(header)] + self._data_frames(header)
        if r.random() < 0.1:
            frames.append(r.randbytes(r.randrange(0, 100)))
        return frames

    def _fuzzed_pack(self) -> list[bytes]:
        """A pack of fuzzed messages (now and then one in it is a pack too); sometimes its
        frame counts lie."""
        r = self.rng
        inner = [self.frames(packs=r.random() < 0.1) for _ in range(r.randrange(2, 6))]
        counts: Any = [len(frames) for frames in inner]
        lie = r.random()
        if lie < 0.1:
            counts[r.randrange(len(counts))] += r.choice([-1, 1])
        elif lie < 0.15:
            counts = counts[:-1]
        elif lie < 0.2:
            counts = self.value()
        head = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "pack", "n": counts},
                             use_bin_type=True)
        return [head] + [frame for frames in inner for frame in frames]

    def _header(self, t: str) -> dict:
        r = self.rng
        tid = r.choice(self.task_ids)
        arrays = [["x", "float32", [4]]]
        fields: dict[str, dict] = {
            "hello": {"version": p.PROTOCOL_VERSION, "role": "client", "keepalive_s": 1.0},
            "keepalive": {}, "bye": {},
            "submit": {"task_id": tid, "model": r.choice(self.models), "inputs": arrays,
                       "timeout_s": r.choice([None, 0.5, 2.0])},
            "generate": {"task_id": tid, "model": r.choice(self.models),
                         "request": {"messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 4}, "stream": r.random() < 0.5},
            "cancel": {"task_id": tid}, "status": {"req_id": tid},
            "register": {"version": p.PROTOCOL_VERSION, "device": r.choice(self.devices),
                         "epoch": r.randrange(0, 4), "pid": 1, "node": "fuzz", "models": {}},
            "model_state": {"model": r.choice(self.models),
                            "load": {"state": r.choice(["ready", "loading", "unavailable"])}},
            "heartbeat": {"in_flight": 0, "peak_running": 1},
            "done": {"attempt": r.randrange(0, 50), "outputs": arrays, "service_s": 0.01},
            "tokens": {"attempt": r.randrange(0, 50), "ids": [1, 2], "text": "ab"},
            "generated": {"attempt": r.randrange(0, 50), "finish_reason": "stop"},
            "failed": {"attempt": r.randrange(0, 50), "kind": "device", "message": "fuzz"},
        }
        return {"v": p.PROTOCOL_VERSION, "t": t, **fields[t]}

    def _mutate(self, header: dict) -> None:
        r = self.rng
        keys = list(header)
        what = r.random()
        if what < 0.55 and keys:
            header[r.choice(keys)] = self.value()
        elif what < 0.7 and keys:
            del header[r.choice(keys)]
        elif what < 0.85:
            header[str(self.value())[:30]] = self.value()
        elif what < 0.95:
            header["t"] = r.choice(ALL_TYPES)
        else:
            header["v"] = self.value()

    def _data_frames(self, header: dict) -> list[bytes]:
        """Frames for the arrays the header describes; sometimes of the wrong size."""
        r = self.rng
        specs = header.get("inputs", header.get("outputs"))
        if not isinstance(specs, list):
            return []
        out = []
        for spec in specs[:4]:
            size = 16
            if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[2], list):
                dims = [d for d in spec[2] if isinstance(d, int) and 0 <= d < 64]
                size = 4 * max(1, len(dims)) * (dims[0] if dims else 1)
            if r.random() < 0.2:
                size = r.choice([0, 1, size - 1, size + 1, 4096])
            out.append(r.randbytes(max(0, size)))
        return out

    def _pack(self, header: dict) -> bytes:
        try:
            packed = msgpack.packb(header, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            packed = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": str(header.get("t"))},
                                   use_bin_type=True)
        marker = msgpack.packb(_NEST, use_bin_type=True)
        if marker in packed:
            depth = self.rng.choice([100, 1000, 1020, 3000])  # msgpack stops at 1,024
            packed = packed.replace(marker, b"\x91" * depth + b"\xc0")
        return packed

    def messages(self, count: int) -> Iterator[list[bytes]]:
        for _ in range(count):
            yield self.frames()


def _drain(sock: zmq.Socket) -> int:
    """How many replies were waiting (those of a pack each counted)."""
    got = 0
    while True:
        try:
            frames = sock.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return got
        got += len(p.unpack(frames))


def fuzz(address: str, side: str, count: int, credentials: Credentials | None = None,
         token: str | None = None, seed: int = 0, peers: int = 4, raw_tcp_every: int = 200,
         models: tuple[str, ...] = ("noop",), devices: tuple[str, ...] = ("cpu0",)) -> FuzzCount:
    """Send ``count`` fuzzed messages to one scheduler socket from ``peers`` DEALERs with
    ``credentials`` (None: none), each first saying hello with ``token`` when it fuzzes the
    client side; one raw TCP connection of random bytes every ``raw_tcp_every`` messages."""
    fuzzer = Fuzzer(side, seed, models, devices)
    ctx = zmq.Context()
    result = FuzzCount()
    socks = []
    try:
        for _ in range(peers):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            if credentials is not None:
                credentials.apply(sock)
            sock.connect(address)
            if side == "client":
                sock.send_multipart(p.encode(p.Hello(version=p.PROTOCOL_VERSION, role="client",
                                                     token=token, keepalive_s=None)))
            socks.append(sock)
        for n, frames in enumerate(fuzzer.messages(count)):
            sock = socks[n % len(socks)]
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:  # no connection to queue it on: refused at the handshake
                pass
            result.sent += 1
            if n % 50 == 0:
                result.replies += sum(_drain(s) for s in socks)
            if raw_tcp_every and n % raw_tcp_every == 0:
                result.raw_tcp += _raw_tcp(address, fuzzer.rng)
        time.sleep(0.2)
        result.replies += sum(_drain(s) for s in socks)
    finally:
        ctx.destroy(linger=0)
    return result


_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00"


def _raw_tcp(address: str, rng: random.Random) -> int:
    """One TCP connection to ``address`` that sends a random greeting and random bytes."""
    if not address.startswith("tcp://"):
        return 0
    host, port = address[len("tcp://"):].rsplit(":", 1)
    mechanism = rng.choice([b"NULL", b"PLAIN", b"CURVE", b"GSSAPI", rng.randbytes(20)])
    payload = rng.choice([
        rng.randbytes(rng.randrange(1, 2000)),
        _GREETING + mechanism.ljust(20, b"\x00") + b"\x00" * 32 + rng.randbytes(300),
        _GREETING + mechanism.ljust(20, b"\x00") + b"\x00" * 32
        + b"\x06" + (1 << 40).to_bytes(8, "big") + rng.randbytes(500),
    ])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1) as conn:
            conn.sendall(payload)
            conn.settimeout(0.05)
            try:
                conn.recv(256)
            except OSError:
                pass
    except OSError:
        pass
    return 1


# -- a whole run against a cluster --------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    """One kind of fuzzing peer: which socket, with what, and what it should get back."""

    label: str  # e.g. "client socket, client keys"
    side: str  # "client" | "worker": which socket, and which messages it sends
    credentials: Credentials | None = None
    token: str | None = None
    heard: bool = True  # False: a peer that must not get a single frame back


@dataclass
class Row:
    peer: Peer
    count: FuzzCount
    seconds: float


@dataclass
class FuzzReport:
    rows: list[Row]
    crashed: list[str]  # processes that died or were restarted during the fuzz
    internal_errors: int  # exceptions the scheduler caught handling a message
    rss_mb: tuple[float, float]  # the scheduler's resident memory before, and at its peak
    normal_work_s: float  # a fan-out after it all, checked correct

    def lines(self) -> list[str]:
        out = [f"{'peer':<44} {'messages':>9} {'raw tcp':>8} {'replies':>8} {'msg/s':>8}"]
        for r in self.rows:
            out.append(f"{r.peer.label:<44} {r.count.sent:>9} {r.count.raw_tcp:>8} "
                       f"{r.count.replies:>8} {r.count.sent / max(r.seconds, 1e-9):>8.0f}")
        out.append(f"crashes: {len(self.crashed)} {self.crashed or ''}; internal errors "
                   f"caught: {self.internal_errors}; scheduler RSS {self.rss_mb[0]:.0f} MB "
                   f"before, {self.rss_mb[1]:.0f} MB at most; a 200-task fan-out after it: "
                   f"correct in {self.normal_work_s:.2f} s")
        return out


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def fuzz_cluster(cluster, client, peers: list[Peer], count: int, seed: int = 0,
                 model: str = "add") -> FuzzReport:
    """``count`` fuzzed messages from each of ``peers`` against a running cluster (a handle
    with ``status()`` and ``pid``), then a checked fan-out of ``model`` (a + b of float32[4])
    through ``client``. Nothing here asserts: the report says what happened."""
    import threading

    import numpy as np

    before = cluster.status()
    pids = {w["device"]: (w["pid"], w["epoch"]) for w in before["workers"]}
    front, back = before["cluster"]["address"], before["cluster"]["worker_address"]
    rss = [_rss_mb(cluster.pid)]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.05):
            rss.append(_rss_mb(cluster.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    rows = []
    try:
        for i, peer in enumerate(peers):
            started = time.perf_counter()
            counted = fuzz(front if peer.side == "client" else back, peer.side, count,
                           peer.credentials, peer.token, seed=seed + i,
                           models=(model, "noop"), devices=tuple(pids))
            rows.append(Row(peer, counted, time.perf_counter() - started))
    finally:
        sampling.set()
        sampler.join()
    after = cluster.status()
    crashed = [] if process_alive(cluster.pid) else ["scheduler"]
    crashed += [w["device"] for w in after["workers"]
                if (w["pid"], w["epoch"]) != pids.get(w["device"])]
    rng = np.random.default_rng(seed)
    batch = [{"a": rng.random(4, dtype=np.float32), "b": rng.random(4, dtype=np.float32)}
             for _ in range(200)]
    started = time.perf_counter()
    results = client.map(model, batch, timeout=30)
    took = time.perf_counter() - started
    for result, item in zip(results, batch):
        if not np.allclose(result["y"], item["a"] + item["b"]):
            raise AssertionError(f"a wrong result after the fuzz: {result}")
    return FuzzReport(rows, crashed, after["cluster"]["internal_errors"],
                      (rss[0], max(rss)), took)
