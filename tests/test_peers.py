"""Who may talk to the scheduler: peers are authenticated per connection, their identities
cannot be guessed or taken over, and nothing a peer sends on the wire stops the cluster.

Each test plays the attacker with raw sockets against real scheduler and worker processes,
then checks that the cluster still serves, and that nothing accepted was lost or answered
twice.
"""
from __future__ import annotations

import os
import signal
import socket
import stat
import struct
import threading
import time

import numpy as np
import pytest
import zmq

import runtime
from runtime import cli
from runtime.config.keys import read_keys
from runtime.errors import Unauthorized
from runtime.wire import protocol as p

from ._peers import (
    dealer,
    hello,
    noop_input,
    received,
    recv,
    rss_mb,
    to_client,
    wait_until,
)
from .conftest import worker

TOKEN = "peers-token-4c1d9e"
# libzmq numbers a ROUTER's unnamed peers from glibc's first rand() (seed 1), +1 per peer
FIRST_AUTO_IDS = (0x6B8B4567, 0xE43C9869)  # the first ROUTER's, the second's


def config(models, *, token: str | None = None, keys=None, extra: str = "",
           device: str = "{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}") -> str:
    scheduler = f"scheduler: {{token: {TOKEN!r}{extra}}}" if token else \
        (f"scheduler: {{{extra.lstrip(', ')}}}" if extra else "")
    cluster = f"cluster: {{keys: {keys}}}" if keys else ""
    return f"""
        {scheduler}
        {cluster}
        devices:
          - {device}
        models:
          - {{name: noop, source: {models['noop']}}}
          - {{name: add, source: {models['add']}}}
    """


def add_batch(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(n)
    return [{"a": rng.random(4, dtype=np.float32), "b": rng.random(4, dtype=np.float32)}
            for _ in range(n)]


def assert_correct(results, batch, device="cpu0") -> None:
    assert len(results) == len(batch)
    for result, item in zip(results, batch):
        assert result.device == device and result.attempts == []
        np.testing.assert_allclose(result["y"], item["a"] + item["b"], rtol=1e-6)


def worker_address(cluster) -> str:
    return cluster.status()["cluster"]["worker_address"]


# -- item 2: the worker socket -----------------------------------------------------------------

def test_with_a_token_a_peer_posing_as_a_worker_gets_no_task_and_forges_no_result(
        clusters, models, ctx):
    cluster = clusters.start(config(models, token=TOKEN))
    before = worker(cluster.status(), "cpu0")
    # It knows what every client knows (the token, the worker address) and the routing id
    # a worker used to have.
    impostor = dealer(ctx, worker_address(cluster), identity=f"cpu0:{before['epoch']}".encode())
    impostor.send_multipart(p.encode(p.Register(
        version=p.PROTOCOL_VERSION, device="cpu0", epoch=before["epoch"], pid=1, node="evil",
        token=TOKEN)))
    time.sleep(0.5)
    batch = add_batch(20)
    with runtime.connect(cluster.address, token=TOKEN) as client:
        assert_correct(client.map("add", batch, timeout=5), batch)
    assert received(impostor) == []  # not one Run, not even a reply
    after = worker(cluster.status(), "cpu0")
    assert (after["pid"], after["epoch"], after["state"]) == (before["pid"], before["epoch"],
                                                              "up")


def test_a_holder_of_the_client_keys_cannot_pose_as_a_worker(clusters, models, ctx, tmp_path):
    key_file = tmp_path / "cluster.keys"
    assert cli.main(["keys", str(key_file)]) == 0
    cluster = clusters.start(config(models, token=TOKEN, keys=key_file))
    # What a client holds: its own key file (before there was one, the whole cluster file).
    held = client_key_file(key_file) if client_key_file(key_file).exists() else key_file
    client_keys = read_keys(held)
    before = worker(cluster.status(), "cpu0")
    impostor = dealer(ctx, worker_address(cluster), identity=f"cpu0:{before['epoch']}".encode(),
                      curve=(client_keys.server_public, client_keys.client_public,
                             client_keys.client_secret))
    impostor.send_multipart(p.encode(p.Register(
        version=p.PROTOCOL_VERSION, device="cpu0", epoch=before["epoch"], pid=1, node="evil",
        token=TOKEN)))
    time.sleep(0.5)
    batch = add_batch(20)
    with runtime.connect(cluster.address, token=TOKEN, keys=held) as client:
        assert_correct(client.map("add", batch, timeout=5), batch)
    assert received(impostor) == []
    assert worker(cluster.status(), "cpu0")["pid"] == before["pid"]


def client_key_file(key_file):
    """The client's part of a cluster key file, as `fanout keys` writes it next to it."""
    return key_file.with_name(key_file.name + ".client")


def test_with_a_token_a_peer_without_it_receives_nothing_and_reaches_no_task(
        clusters, models, ctx):
    cluster = clusters.start(config(models, token=TOKEN))
    stranger = dealer(ctx, cluster.address)
    hello(stranger, token="guess")
    stranger.send_multipart(p.encode(p.Submit(task_id="t1", model="noop",
                                              inputs=noop_input())))
    stranger.send_multipart(p.encode(p.StatusRequest(req_id="r1")))
    stranger.send_multipart(p.encode(p.Shutdown(req_id="r2")))
    assert received(stranger, wait_s=1.5) == []
    status = cluster.status()
    assert status["counters"]["submitted"] == 0 and status["unanswered"] == 0
    with pytest.raises(Unauthorized, match="token"):
        runtime.connect(cluster.address, token="guess", timeout=5)
    with runtime.connect(cluster.address, token=TOKEN) as client:
        assert client.infer("noop", noop_input(3)).device == "cpu0"


# -- what an authenticated worker may register as ------------------------------------------

@pytest.fixture(scope="module")
def keyed(module_clusters, models, tmp_path_factory):
    """A cluster with keys, and the worker part of them: this test can be a worker."""
    key_file = tmp_path_factory.mktemp("keys") / "cluster.keys"
    assert cli.main(["keys", str(key_file)]) == 0
    cluster = module_clusters.start(config(models, keys=key_file))
    worker_keys = read_keys(key_file).for_workers()
    return cluster, (worker_keys.server_public, worker_keys.worker_public,
                     worker_keys.worker_secret)


def register_as(ctx, keyed, **fields) -> p.Message:
    cluster, curve = keyed
    sock = dealer(ctx, worker_address(cluster), identity=os.urandom(16), curve=curve)
    sock.send_multipart(p.encode(p.Register(version=p.PROTOCOL_VERSION, pid=1, node="x",
                                            **fields)))
    assert sock.poll(5000), "no answer to a registration"
    return p.Decoder(p.SCHEDULER_TO_WORKER, 1 << 20).decode(sock.recv_multipart())


@pytest.mark.parametrize("fields, refusal", [
    ({"device": "ghost", "epoch": 1}, "not in this cluster's config"),
    ({"device": "cpu0", "epoch": 99}, "not the one this scheduler started"),
    ({"device": "cpu0", "epoch": "current"}, "registered from another connection"),
    ({"device": "cpu0", "epoch": "current", "models": {"noop": {"state": "ready",
                                                                 "load_s": "fast"}}},
     "register.models.noop.load_s: expected float, got str"),
], ids=["unknown device", "other epoch", "running worker", "malformed model entry"])
def test_an_authenticated_worker_may_register_only_as_the_incarnation_started(
        keyed, ctx, fields, refusal):
    cluster = keyed[0]
    before = worker(cluster.status(), "cpu0")
    if fields["epoch"] == "current":
        fields = {**fields, "epoch": before["epoch"]}
    reply = register_as(ctx, keyed, **fields)
    assert reply.error is not None and refusal in reply.error.message, reply
    after = worker(cluster.status(), "cpu0")
    assert (after["state"], after["pid"], after["epoch"]) == ("up", before["pid"],
                                                              before["epoch"])
    assert {w["device"] for w in cluster.status()["workers"]} == {"cpu0"}
    assert cluster.client().infer("noop", noop_input(7)).device == "cpu0"


# -- item 13: routing ids ---------------------------------------------------------------------

def test_the_task_id_in_use_error_names_no_routing_id(clusters, models, ctx):
    cluster = clusters.start(config(models, device="{name: cpu0, kind: cpu, backend: "
                                    "onnxruntime, capacity: 1, faults: {hang_s: 1.0}}"))
    peer = dealer(ctx, cluster.address, identity=b"my-own-routing-id")
    hello(peer)
    assert isinstance(recv(peer), p.Welcome)
    for _ in range(2):
        peer.send_multipart(p.encode(p.Submit(task_id="dup", model="noop", inputs=noop_input())))
    first = recv(peer)
    assert isinstance(first, p.Failure) and "already in use" in first.error.message
    assert "my-own-routing-id" not in first.error.message and "b'" not in first.error.message
    assert isinstance(recv(peer), p.Result)  # the first one, once


def test_a_peer_that_takes_a_clients_routing_id_gets_none_of_its_results(clusters, models, ctx):
    cluster = clusters.start(config(models, device="{name: cpu0, kind: cpu, backend: "
                                    "onnxruntime, capacity: 2, faults: {hang_s: 0.5}}"))
    with runtime.connect(cluster.address) as victim:
        batch = add_batch(6)
        futures = [victim.submit("add", x, timeout=10) for x in batch]
        time.sleep(0.2)
        # The strongest thief knows the victim's routing id (if the client chose one) and
        # tries the ids libzmq would have numbered the first peers with.
        own = victim._async.sock.getsockopt(zmq.ROUTING_ID)
        guesses = [own] if own else []
        guesses += [b"\x00" + struct.pack(">I", FIRST_AUTO_IDS[0] + k) for k in range(6)]
        thieves = [dealer(ctx, cluster.address, identity=g) for g in guesses]
        for thief in thieves:
            hello(thief)
        assert_correct([f.result(timeout=15) for f in futures], batch)
        assert victim.unmatched == 0
    stolen = [to_client(m) for t in thieves for m in received(t, wait_s=0.05)]
    assert not [m for m in stolen if isinstance(m, (p.Result, p.Failure))], stolen


def test_claiming_the_routing_ids_the_scheduler_hands_out_next_does_not_crash_it(
        clusters, models, ctx):
    cluster = clusters.start(config(models))
    front, back = cluster.address, worker_address(cluster)
    claims = [dealer(ctx, address, identity=b"\x00" + struct.pack(">I", first + k))
              for address, first in ((front, FIRST_AUTO_IDS[0]), (back, FIRST_AUTO_IDS[1]))
              for k in range(40)]
    for sock in claims:
        sock.send(b"claim")
    time.sleep(0.5)
    unnamed = [dealer(ctx, address) for address in (front, back) for _ in range(3)]
    for sock in unnamed:
        sock.send(b"no routing id")
    time.sleep(0.5)
    assert cluster.process.poll() is None, "the scheduler died"
    assert cluster.client().infer("noop", noop_input(1)).device == "cpu0"


# -- item 14: flooding the worker socket --------------------------------------------------------

def test_a_flood_on_the_worker_socket_neither_hides_a_hung_worker_nor_floods_the_log(
        clusters, models, ctx, capfd):
    cluster = clusters.start(config(models, extra=", heartbeat_interval_s: 0.2, "
                                                  "heartbeat_timeout_s: 1.5"))
    before = worker(cluster.status(), "cpu0")
    stop = threading.Event()
    target = worker_address(cluster)

    def flood():
        socks = [dealer(ctx, target) for _ in range(3)]
        while not stop.is_set():
            for sock in socks:
                try:
                    sock.send_multipart([b"\xc1garbage", b"x" * 64], zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.001)

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(2)]
    for t in flooders:
        t.start()
    try:
        time.sleep(0.5)
        os.kill(before["pid"], signal.SIGSTOP)
        noticed = wait_until(lambda: worker(cluster.status(), "cpu0")["epoch"] > before["epoch"],
                             timeout=8)
    finally:
        stop.set()
        for t in flooders:
            t.join(5)
        try:
            os.kill(before["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert noticed is not None and noticed < 1.5 + 2.0, f"hung worker noticed after {noticed}"
    assert wait_until(lambda: worker(cluster.status(), "cpu0")["state"] == "up", timeout=20)
    assert cluster.client().infer("noop", noop_input(2)).device == "cpu0"
    log = capfd.readouterr().err.splitlines()
    assert len(log) < 40, f"{len(log)} log lines, e.g. {log[:3]}"


# -- item 3: memory before authentication -------------------------------------------------------

def _stream(address: str, greeting_mechanism: bytes, frames, seconds: float) -> int:
    """Raw TCP: a ZMTP greeting, then ``frames`` (bytes chunks) until refused or timed out."""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    sent = 0
    deadline = time.monotonic() + seconds
    with socket.create_connection((host, int(port)), timeout=2) as conn:
        conn.sendall(b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00"
                     + greeting_mechanism.ljust(20, b"\x00") + b"\x00" * 32)
        try:
            for chunk in frames:
                if time.monotonic() > deadline:
                    break
                conn.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the scheduler hung up on us: the point
    return sent


def _endless_multipart():
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    yield b"\x04" + bytes([len(ready)]) + ready
    part = b"\x03" + struct.pack(">Q", 1 << 20) + b"x" * (1 << 20)  # 1 MiB, more to come
    for _ in range(400):
        yield part


def _huge_handshake_frame():
    yield b"\x06" + struct.pack(">Q", 400 << 20)  # a 400 MiB command, before any credential
    chunk = b"x" * (1 << 20)
    for _ in range(400):
        yield chunk


def test_with_a_token_an_unauthenticated_peer_cannot_grow_the_schedulers_memory(
        clusters, models):
    cluster = clusters.start(config(models, token=TOKEN))
    baseline = rss_mb(cluster.pid)
    peak = baseline
    for mechanism, frames in ((b"NULL", _endless_multipart()), (b"PLAIN", _huge_handshake_frame()),
                              (b"CURVE", _huge_handshake_frame())):
        sender = threading.Thread(target=_stream, args=(cluster.address, mechanism, frames, 3.0),
                                  daemon=True)
        sender.start()
        while sender.is_alive():
            peak = max(peak, rss_mb(cluster.pid))
            sender.join(0.05)
    assert peak - baseline < 40, f"scheduler RSS grew from {baseline:.0f} to {peak:.0f} MB"
    with runtime.connect(cluster.address, token=TOKEN) as client:
        assert client.infer("noop", noop_input(4)).device == "cpu0"


def _this_hosts_ip() -> str | None:
    """This machine's address on its default route, if it has one other than loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
        except OSError:
            return None
        ip = probe.getsockname()[0]
    return None if ip.startswith("127.") else ip


def test_without_credentials_the_sockets_listen_on_loopback_only(clusters, models):
    cluster = clusters.start(config(models))
    status = cluster.status()["cluster"]
    for address in (status["address"], status["worker_address"]):
        host, port = address[len("tcp://"):].rsplit(":", 1)
        assert host == "127.0.0.1", address
        ip = _this_hosts_ip()
        if ip is not None:  # reachable on loopback, refused on the host's own network address
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((ip, int(port)), timeout=2).close()
        socket.create_connection((host, int(port)), timeout=2).close()


def test_an_ipc_socket_is_for_its_owner_only(clusters, models, tmp_path):
    path = tmp_path / "sched.ipc"
    cluster = clusters.start(config(models), address=f"ipc://{path}")
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, oct(path.stat().st_mode)
    assert cluster.client().infer("noop", noop_input(5)).device == "cpu0"
