"""CurveZMQ: with a key file every socket is encrypted, and only holders of the keys get in."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import numpy as np
import pytest
import zmq

import runtime
from runtime.config.keys import read_keys, write_keys
from runtime.config.loader import load_config
from runtime.config.schema import HttpConfig
from runtime.errors import ConfigError, Unauthorized
from runtime.frontdoors.http_server import HttpServer
from runtime.wire import protocol as p
from runtime.wire.security import (
    CLIENT_DOMAIN,
    Door,
    Gate,
    apply_client,
    generate_keys,
    server_mechanism,
)

from .conftest import sentences, wait_for, worker

TOKEN = "tok-7f3a9c-must-never-cross-the-wire-in-clear"
EMBEDDING = "onnx::Shape_422"
REFUSED_FAST_S = 3.0

CONFIG = """
    scheduler: {token: "%s"}
    %s
    devices:
      - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
    models:
      - {name: minilm, source: "packaged:minilm"}
"""


def config_text(keys_path=None) -> str:
    return CONFIG % (TOKEN, f"cluster: {{keys: {keys_path}}}" if keys_path else "")


@pytest.fixture(autouse=True)
def no_keys_in_env(monkeypatch):
    """Each test says which keys a client has; none leak in from the environment."""
    monkeypatch.delenv("FANOUT_KEYS", raising=False)


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    return write_keys(tmp_path_factory.mktemp("keys") / "cluster.keys", generate_keys())


@pytest.fixture(scope="module")
def cluster(module_clusters, key_file):
    """An encrypted cluster: the key file and a token."""
    return module_clusters.start(config_text(key_file))


@pytest.fixture(scope="module")
def plain_cluster(module_clusters):
    """The same cluster without keys, to compare with."""
    return module_clusters.start(config_text())


def other_keys_file(tmp_path, keys) -> str:
    return str(write_keys(tmp_path / "other.keys", keys))


def assert_matches(result, expected) -> None:
    assert set(result.outputs) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(result.outputs[name], want, rtol=1e-5, atol=1e-5)


def refused_within(seconds: float, connect, match: str) -> Unauthorized:
    started = time.monotonic()
    with pytest.raises(Unauthorized, match=match) as info:
        connect()
    assert time.monotonic() - started < seconds
    return info.value


# -- holders of the keys are served ---------------------------------------------------------------

def test_a_client_with_the_keys_gets_correct_results_from_the_workers(cluster, key_file, reference):
    assert cluster.keys == read_keys(key_file)
    status = cluster.status()  # through the handle's own client, which has the keys
    assert worker(status, "cpu0")["state"] == "up"  # the worker got in with the keys too
    batch = sentences(4)
    with runtime.connect(cluster.address, token=TOKEN, keys=key_file) as client:
        for result, inputs in zip(client.map("minilm", batch), batch):
            assert result.device == "cpu0" and result.attempts == []
            assert_matches(result, reference(inputs))


def test_the_sync_client_reads_the_key_file_from_FANOUT_KEYS(cluster, key_file, monkeypatch):
    monkeypatch.setenv("FANOUT_KEYS", str(key_file))
    with runtime.connect(cluster.address, token=TOKEN) as client:
        assert client.infer("minilm", sentences(1)[0]).device == "cpu0"


def test_the_async_client_takes_keys_as_CurveKeys(cluster, key_file):
    async def run():
        client = await runtime.AsyncClient(cluster.address, TOKEN,
                                           keys=read_keys(key_file)).connect()
        try:
            return await client.ainfer("minilm", sentences(1)[0])
        finally:
            await client.close()
    assert asyncio.run(run()).device == "cpu0"


def test_the_http_api_connects_to_an_encrypted_cluster_with_the_configs_keys(
        cluster, key_file, tmp_path):
    path = tmp_path / "http.yaml"
    path.write_text(textwrap.dedent(config_text(key_file)))
    config = load_config(path)
    server = HttpServer.from_config(config, cluster.address,
                                    http=HttpConfig(address="127.0.0.1:0")).serve_in_thread()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health/ready",
                                    timeout=10) as resp:
            body = json.load(resp)
        assert resp.status == 200 and body["models"] == {"minilm": ["cpu0"]}
    finally:
        server.stop()


# -- everyone else is refused quickly, with advice ------------------------------------------------

def test_a_client_without_keys_is_refused_quickly_and_told_what_to_do(cluster):
    err = refused_within(REFUSED_FAST_S, lambda: runtime.connect(cluster.address, token=TOKEN),
                         "encrypts its traffic")
    assert "FANOUT_KEYS" in str(err) and "keys=" in str(err)


def test_a_client_with_another_clusters_keys_is_refused_quickly(cluster, tmp_path):
    other = other_keys_file(tmp_path, generate_keys())
    refused_within(REFUSED_FAST_S, lambda: runtime.connect(cluster.address, token=TOKEN,
                                                           keys=other),
                   "not this cluster's")


def test_a_client_key_pair_the_cluster_does_not_know_is_refused_quickly(cluster, key_file,
                                                                        tmp_path):
    stranger = generate_keys()  # knows the server's public key, but not the client pair
    keys = dataclasses.replace(read_keys(key_file), client_public=stranger.client_public,
                               client_secret=stranger.client_secret)
    refused_within(REFUSED_FAST_S, lambda: runtime.connect(cluster.address, token=TOKEN,
                                                           keys=keys),
                   "refused this client's CurveZMQ key")


def test_a_client_with_keys_is_told_when_the_cluster_does_not_encrypt(plain_cluster, key_file):
    refused_within(REFUSED_FAST_S, lambda: runtime.connect(plain_cluster.address, token=TOKEN,
                                                           keys=key_file),
                   "does not encrypt its traffic")
    with runtime.connect(plain_cluster.address, token=TOKEN) as client:  # keys were the problem
        assert client.infer("minilm", sentences(1)[0]).device == "cpu0"


def test_a_client_can_tell_an_encrypted_scheduler_from_a_plain_one(cluster, plain_cluster):
    assert asyncio.run(server_mechanism(cluster.address)) == "CURVE"
    assert asyncio.run(server_mechanism(plain_cluster.address)) == "PLAIN"  # its token
    assert asyncio.run(server_mechanism("tcp://127.0.0.1:9")) is None  # nobody there


def raw_dealer(ctx, address: str, keys=None, identity: bytes | None = None):
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    if keys is not None:
        apply_client(sock, keys)
    sock.connect(address)
    return sock


def test_a_raw_socket_without_keys_gets_nothing_and_the_cluster_serves_on(cluster, key_file):
    before = worker(cluster.status(), "cpu0")
    worker_address = cluster.status()["cluster"]["worker_address"]
    ctx = zmq.Context()
    try:
        front = raw_dealer(ctx, cluster.address)
        front.send_multipart(p.encode(p.Hello(version=p.PROTOCOL_VERSION, role="client",
                                              token=TOKEN)))
        # A worker impostor: the right token, the real device's name, a newer epoch.
        back = raw_dealer(ctx, worker_address, identity=b"cpu0:99")
        back.send_multipart(p.encode(p.Register(version=p.PROTOCOL_VERSION, device="cpu0",
                                                epoch=99, pid=1, node="x", token=TOKEN)))
        assert front.poll(2000) == 0 and back.poll(100) == 0
        # The same Hello over a socket with the keys is answered: the keys made the difference.
        keyed = raw_dealer(ctx, cluster.address, keys=read_keys(key_file))
        keyed.send_multipart(p.encode(p.Hello(version=p.PROTOCOL_VERSION, role="client",
                                              token=TOKEN)))
        assert keyed.poll(5000)
        assert isinstance(p.Decoder(p.SCHEDULER_TO_CLIENT, 1 << 20).decode(
            keyed.recv_multipart()), p.Welcome)
    finally:
        ctx.destroy(linger=0)
    after = worker(cluster.status(), "cpu0")
    assert (after["state"], after["pid"]) == ("up", before["pid"])
    assert cluster.client().infer("minilm", sentences(1)[0]).device == "cpu0"


# -- what crosses the wire -----------------------------------------------------------------------

class Relay:
    """A TCP relay between a client and the scheduler that keeps every byte it forwards."""

    def __init__(self, upstream: str):
        host, port = upstream[len("tcp://"):].rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.seen = bytearray()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                down, _ = self.listener.accept()
            except TimeoutError:
                continue
            up = socket.create_connection(self.upstream)
            self._conns += [down, up]
            for src, dst in ((down, up), (up, down)):
                t = threading.Thread(target=self._pump, args=(src, dst), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    self.seen += data
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def bytes(self) -> bytes:
        with self._lock:
            return bytes(self.seen)

    def close(self) -> None:
        self._stopped.set()
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._threads:
            t.join(timeout=5)
        for s in [self.listener, *self._conns]:
            s.close()


def traffic_through_relay(cluster, keys) -> tuple[bytes, dict, runtime.TaskResult]:
    """One task through a relay; the bytes that crossed, the inputs and the result."""
    relay = Relay(cluster.address)
    inputs = sentences(1, seq=24)[0]
    try:
        with runtime.connect(relay.address, token=TOKEN, keys=keys) as client:
            result = client.infer("minilm", inputs)
    finally:
        relay.close()
    return relay.bytes(), inputs, result


def secrets_of(inputs: dict, result) -> dict[str, bytes]:
    return {"token": TOKEN.encode(), "model name": b"minilm",
            "input_ids": inputs["input_ids"].tobytes(),
            "output": result[EMBEDDING].tobytes()[:512]}


def test_without_keys_the_token_and_the_tensors_cross_the_wire_in_clear(plain_cluster):
    wire, inputs, result = traffic_through_relay(plain_cluster, None)
    assert result.device == "cpu0"
    for what, needle in secrets_of(inputs, result).items():
        assert needle in wire, f"{what} not seen in clear: the relay would prove nothing"


def test_with_keys_neither_the_token_nor_the_tensors_cross_the_wire_in_clear(cluster,
                                                                              key_file):
    wire, inputs, result = traffic_through_relay(cluster, key_file)
    assert result.device == "cpu0"
    assert len(wire) > inputs["input_ids"].nbytes + result[EMBEDDING].nbytes  # it all went by
    for what, needle in secrets_of(inputs, result).items():
        assert needle not in wire, f"{what} crossed the wire in clear"


# -- the scheduler's gate, on real sockets in this process -------------------------------------

def test_the_gate_admits_only_the_client_key_and_logs_whom_it_refused(caplog):
    caplog.set_level(logging.WARNING, logger="fanout.security")
    keys = generate_keys()
    ctx = zmq.Context()
    gate = Gate(ctx, keys.server_secret, [Door(CLIENT_DOMAIN, curve_key=keys.client_public,
                                               who="client")])
    server = ctx.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    gate.serve(server, Door(CLIENT_DOMAIN, curve_key=keys.client_public, who="client"))
    address = f"tcp://127.0.0.1:{server.bind_to_random_port('tcp://127.0.0.1')}"
    stranger = generate_keys()
    workers = dataclasses.replace(keys, client_public=keys.worker_public,
                                  client_secret=keys.worker_secret)
    try:
        for who, client_keys in (("member", keys), ("plain", None), ("stranger", dataclasses.replace(
                stranger, server_public=keys.server_public)), ("worker", workers)):
            sock = raw_dealer(ctx, address, client_keys)
            sock.send(who.encode())
            got = server.poll(1000 if who == "member" else 500)
            assert bool(got) == (who == "member"), who
            if got:
                assert server.recv_multipart()[1] == b"member"
            sock.close()
        # The worker's key, refused as well, is counted in the next line about this peer.
        wait_for(lambda: len(caplog.records) >= 2, timeout=5, what="two refusal log lines")
    finally:
        server.close()
        gate.close()
        ctx.term()  # returns: the gate left no socket open
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("does not use CurveZMQ" in m for m in messages), messages
    assert any("refused a peer from 127.0.0.1" in m and stranger.client_public[:8] in m
               for m in messages), messages
    assert not any(keys.server_secret in m or stranger.client_secret in m for m in messages)


# -- key files -----------------------------------------------------------------------------------

def fanout(*args, env=None):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env, check=False)


def test_fanout_keys_writes_a_0600_file_the_config_accepts_by_path_and_by_env(tmp_path):
    path = tmp_path / "cluster.keys"
    out = fanout("keys", str(path))
    assert out.returncode == 0, out.stderr
    assert str(path) in out.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys = read_keys(path)
    assert keys.role == "cluster" and keys.worker_secret is not None
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(config_text("cluster.keys")))  # relative to the config
    assert load_config(config, env={}).cluster.keys == keys
    plain = tmp_path / "plain.yaml"
    plain.write_text(textwrap.dedent(config_text()))
    assert load_config(plain, env={"FANOUT_KEYS": str(path)}).cluster.keys == keys
    assert load_config(plain, env={}).cluster.keys is None


def test_fanout_keys_writes_a_client_file_that_holds_no_other_secret(tmp_path):
    path = tmp_path / "cluster.keys"
    assert fanout("keys", str(path)).returncode == 0
    client_file = tmp_path / "cluster.keys.client"
    assert stat.S_IMODE(client_file.stat().st_mode) == 0o600
    cluster, client = read_keys(path), read_keys(client_file)
    assert client.role == "client" and client == cluster.for_clients()
    text = client_file.read_text()
    assert cluster.server_secret not in text and cluster.worker_secret not in text
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(config_text("cluster.keys.client")))
    with pytest.raises(ConfigError, match="holds a client's keys; a scheduler needs the "
                                          "cluster's key file"):
        load_config(config, env={})


def test_fanout_keys_split_writes_the_client_and_worker_parts(tmp_path):
    path = tmp_path / "c.keys"
    assert fanout("keys", str(path)).returncode == 0
    (tmp_path / "c.keys.client").unlink()
    out = fanout("keys", "--split", str(path))
    assert out.returncode == 0, out.stderr
    cluster = read_keys(path)
    assert read_keys(tmp_path / "c.keys.client") == cluster.for_clients()
    worker_part = read_keys(tmp_path / "c.keys.worker")
    assert worker_part.role == "worker" and worker_part == cluster.for_workers()
    with pytest.raises(ConfigError, match="a client needs the client key file"):
        runtime.connect("tcp://127.0.0.1:9", keys=tmp_path / "c.keys.worker", timeout=1)


def test_fanout_keys_keeps_an_existing_file_unless_forced(tmp_path):
    path = tmp_path / "cluster.keys"
    assert fanout("keys", str(path)).returncode == 0
    first, first_keys = path.read_bytes(), read_keys(path)
    again = fanout("keys", str(path))
    assert again.returncode == 2 and "--force" in again.stderr
    assert path.read_bytes() == first
    forced = fanout("keys", str(path), "--force")
    assert forced.returncode == 0, forced.stderr
    assert path.read_bytes() != first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keys(path) != first_keys
    assert read_keys(tmp_path / "cluster.keys.client") == read_keys(path).for_clients()
    assert sorted(os.listdir(tmp_path)) == ["cluster.keys", "cluster.keys.client"]  # no temp


def bad_key_files(tmp_path) -> dict[str, tuple[object, list[str]]]:
    """name -> (path, secrets that must not show in any message)."""
    good = generate_keys()
    short = dataclasses.asdict(good) | {"server_secret": "SECRET-but-too-short"}
    files = {"a short secret": (json.dumps(short), [good.client_secret, "SECRET-but-too-short"]),
             "a missing key": (json.dumps({k: v for k, v in dataclasses.asdict(good).items()
                                           if k != "client_public"}),
                               [good.server_secret, good.client_secret]),
             "not JSON": (f"server_secret={good.server_secret}", [good.server_secret])}
    out = {}
    for i, (name, (text, secrets)) in enumerate(files.items()):
        path = tmp_path / f"bad{i}.keys"
        path.write_text(text)
        out[name] = (path, secrets)
    return out


def loaders(path, tmp_path) -> dict:
    """Every way a key file gets read: directly, by the config loader, by a client."""
    config = tmp_path / "c.yaml"
    config.write_text(textwrap.dedent(config_text(path)))
    return {"read_keys": lambda: read_keys(path),
            "load_config": lambda: load_config(config, env={}),
            "connect": lambda: runtime.connect("tcp://127.0.0.1:9", keys=path, timeout=1)}


def test_a_bad_key_file_is_a_config_error_naming_the_file_without_its_secrets(tmp_path):
    for name, (path, secrets) in bad_key_files(tmp_path).items():
        for how, load in loaders(path, tmp_path).items():
            with pytest.raises(ConfigError) as info:
                load()
            message = str(info.value)
            assert str(path) in message and "fanout keys" in message, (name, how, message)
            assert not any(s in message for s in secrets), (name, how, message)


def test_a_missing_key_file_says_how_to_write_one(tmp_path):
    with pytest.raises(ConfigError, match=r"cannot read the key file .*`fanout keys "):
        read_keys(tmp_path / "nowhere.keys")
