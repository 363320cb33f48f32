"""How much a peer may make the scheduler hold, and that every accepted task is answered
exactly once within those bounds: answers for a slow reader, the queue in bytes and per
client, messages at and over the size limits.
"""
from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq

import runtime
from runtime.errors import InvalidInput
from runtime.wire import protocol as p

from ._peers import hello, noop_input, readable, recv, tiny_models, to_client, wait_until
from .conftest import worker

LIMIT = 64 * 1024


def start(clusters, models, scheduler: str = "", capacity: int = 4, faults: str = ""):
    return clusters.start(f"""
        scheduler: {{{scheduler}}}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: {capacity}{faults}}}
        models:
          - {{name: noop, source: {models['noop']}}}
          - {{name: add, source: {models['add']}}}
    """)


def welcomed(ctx, address: str, rcvhwm: int | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.connect(address)
    hello(sock)
    assert isinstance(recv(sock), p.Welcome)
    return sock


def read_answers(sock: zmq.Socket, expected: int, timeout: float = 20.0) -> list[p.Message]:
    answers: list[p.Message] = []
    deadline = time.monotonic() + timeout
    while len(answers) < expected and time.monotonic() < deadline:
        if readable(sock, 200):
            answers.append(recv(sock))
    time.sleep(0.2)  # and nothing more after them
    while readable(sock, 0):
        answers.append(recv(sock))
    return answers


def once_each(answers: list[p.Message], ids: list[str]) -> None:
    got = sorted(a.task_id for a in answers)
    assert got == sorted(ids), f"{len(got)} answers for {len(ids)} tasks"


# -- item 8: a slow reader gets every answer ----------------------------------------------------

def test_a_client_that_reads_late_gets_every_answer_once(clusters, tmp_path, ctx):
    models = tiny_models(tmp_path / "m", add_shape=(1024,))  # answers of 4 KiB: 12 MB in all
    cluster = start(clusters, models)
    sock = welcomed(ctx, cluster.address, rcvhwm=50)
    ids = [f"t{i}" for i in range(3000)]
    item = {"a": np.ones(1024, np.float32), "b": np.ones(1024, np.float32)}
    for tid in ids:
        sock.send_multipart(p.encode(p.Submit(task_id=tid, model="add", inputs=item)))
    # All done on the scheduler's side before this client reads a single answer.
    assert wait_until(lambda: cluster.status()["counters"]["completed"] >= len(ids), timeout=30)
    answers = read_answers(sock, len(ids))
    once_each(answers, ids)
    assert all(isinstance(a, p.Result) for a in answers)


def test_a_fan_out_sent_in_packs_is_answered_in_packs_each_task_once(clusters, models, ctx):
    cluster = start(clusters, models)
    sock = welcomed(ctx, cluster.address)
    ids = [f"t{i}" for i in range(600)]
    submits = [p.encode(p.Submit(task_id=tid, model="noop", inputs=noop_input(i)))
               for i, tid in enumerate(ids)]
    sent = p.packed(submits)
    assert len(sent) < 10  # up to PACK_MESSAGES submits a pack
    for frames in sent:
        sock.send_multipart(frames)
    assert wait_until(lambda: cluster.status()["counters"]["completed"] >= len(ids), timeout=30)
    arrived = []  # multipart messages, each a pack of answers or one alone
    while sock.poll(500):
        arrived.append(sock.recv_multipart())
    answers = [to_client(m) for frames in arrived for m in p.unpack(frames)]
    once_each(answers, ids)
    for a in answers:  # each answer is its own task's
        np.testing.assert_array_equal(a.outputs["y"], noop_input(int(a.task_id[1:]))["x"])
    assert len(arrived) < len(ids) / 4, f"{len(ids)} answers came in {len(arrived)} messages"


def answers_pile_up(clusters, tmp_path, ctx, n: int = 3000):
    """A cluster whose client of 4 KiB answers submits ``n`` and reads none: far more than
    ZMQ and the kernel buffer wait in the scheduler's outbox."""
    models = tiny_models(tmp_path / "m", add_shape=(1024,))
    cluster = start(clusters, models, f"max_client_backlog_bytes: {LIMIT}")
    sock = welcomed(ctx, cluster.address, rcvhwm=10)
    ids = [f"t{i}" for i in range(n)]
    item = {"a": np.ones(1024, np.float32), "b": np.ones(1024, np.float32)}
    for tid in ids:
        sock.send_multipart(p.encode(p.Submit(task_id=tid, model="add", inputs=item)))
    return cluster, sock, ids, item


def test_a_client_whose_answers_pile_up_is_told_overloaded_and_loses_nothing(clusters, tmp_path,
                                                                             ctx):
    cluster, sock, ids, item = answers_pile_up(clusters, tmp_path, ctx)
    assert wait_until(lambda: cluster.status()["counters"]["completed"] >= len(ids), timeout=30)
    # Far more answers wait for it than the bound: new work is refused until it reads.
    assert cluster.status()["cluster"]["backlog_bytes"] > LIMIT
    late = [f"late{i}" for i in range(50)]
    for tid in late:
        sock.send_multipart(p.encode(p.Submit(task_id=tid, model="add", inputs=item)))
    answers = read_answers(sock, len(ids) + len(late), timeout=30)
    once_each(answers, ids + late)
    assert all(isinstance(a, p.Result) for a in answers if a.task_id in ids)
    refused = [a for a in answers if a.task_id in late]
    assert all(isinstance(a, p.Failure) and a.error.kind == "overloaded" for a in refused)
    assert "max_client_backlog_bytes" in refused[0].error.message
    sock.send_multipart(p.encode(p.Submit(task_id="again", model="add", inputs=item)))
    assert isinstance(recv(sock), p.Result)  # read up: served again


def test_a_client_that_keeps_sending_and_never_reads_is_forgotten_and_holds_nothing(
        clusters, tmp_path, ctx):
    cluster, sock, ids, item = answers_pile_up(clusters, tmp_path, ctx)
    assert wait_until(lambda: cluster.status()["counters"]["completed"] >= len(ids), timeout=30)
    for i in range(1100):  # refused, refused, ... and never a read
        sock.send_multipart(p.encode(p.Submit(task_id=f"more{i}", model="add", inputs=item)))
    assert wait_until(lambda: cluster.status()["cluster"]["backlog_bytes"] == 0, timeout=10)
    status = cluster.status()
    assert status["unanswered"] == 0 and status["held_bytes"] == 0
    with runtime.connect(cluster.address) as other:
        assert other.infer("add", item).device == "cpu0"


# -- item 9: the queue in bytes, and each client's share ---------------------------------------

def test_the_queue_is_bounded_in_bytes_and_per_client(clusters, tmp_path, ctx):
    models = tiny_models(tmp_path / "m", add_shape=(12800,))  # a task holds ~100 KiB
    cluster = start(clusters, models, "max_queue_bytes: 1048576, max_client_share: 0.5, "
                                      "max_message_bytes: 1048576",
                    capacity=5, faults=", faults: {hang_s: 1.0}")
    rng = np.random.default_rng(0)
    payload = {"a": rng.random(12800, dtype=np.float32), "b": rng.random(12800, dtype=np.float32)}
    a, b, c = (welcomed(ctx, cluster.address) for _ in range(3))
    sent = {"a": [f"a{i}" for i in range(8)], "b": [f"b{i}" for i in range(8)], "c": ["c0"]}
    for name, sock in (("a", a), ("b", b), ("c", c)):
        for tid in sent[name]:
            sock.send_multipart(p.encode(p.Submit(task_id=tid, model="add", inputs=payload)))
        time.sleep(0.1)
    for name, sock in (("a", a), ("b", b), ("c", c)):
        got = read_answers(sock, len(sent[name]), timeout=30)
        once_each(got, sent[name])
        refused = [x for x in got if isinstance(x, p.Failure)]
        served = [x for x in got if isinstance(x, p.Result)]
        for x in served:
            np.testing.assert_allclose(x.outputs["y"], payload["a"] + payload["b"], rtol=1e-6)
        if name in "ab":  # half of 1 MiB each: five tasks of ~100 KiB, the rest refused
            assert (len(served), len(refused)) == (5, 3), (name, got)
            assert all(x.error.kind == "overloaded" and "max_client_share" in x.error.message
                       for x in refused)
        else:  # a and b hold nearly all of it between them
            assert len(refused) == 1 and "max_queue_bytes" in refused[0].error.message
    status = cluster.status()
    assert status["unanswered"] == 0 and status["counters"]["overloaded"] == 7


def test_a_clients_share_of_the_queue_is_bounded_in_tasks_too(clusters, models, ctx):
    # No prefetch: the one slot holds one task, so the rest wait in the scheduler's queue.
    cluster = start(clusters, models, "max_queue: 10, max_client_share: 0.5", capacity=1,
                    faults=", prefetch: 0, faults: {hang_s: 0.2}")
    greedy = welcomed(ctx, cluster.address)
    for i in range(10):
        greedy.send_multipart(p.encode(p.Submit(task_id=f"g{i}", model="noop",
                                                inputs=noop_input(i))))
    time.sleep(0.3)
    with runtime.connect(cluster.address) as other:  # still has its share
        assert other.infer("noop", noop_input(1), timeout=10).device == "cpu0"
    answers = read_answers(greedy, 10, timeout=20)
    once_each(answers, [f"g{i}" for i in range(10)])
    refused = [x for x in answers if isinstance(x, p.Failure)]
    # One runs, five (its share of ten) wait: the other four are refused.
    assert len(refused) == 4 and all("max_client_share" in x.error.message for x in refused)


def test_a_share_or_byte_bound_out_of_range_is_a_config_error(tmp_path):
    from runtime.config.loader import load_config
    from runtime.errors import ConfigError
    for bad in ("max_client_share: 0", "max_client_share: 1.5", "max_queue_bytes: 10",
                "max_client_backlog_bytes: -1",
                "max_queue_bytes: 2097152, max_message_bytes: 4194304"):
        path = tmp_path / "c.yaml"
        path.write_text(f"scheduler: {{{bad}}}\ndevices: [{{name: cpu0, kind: cpu, "
                        f"backend: onnxruntime}}]\nmodels: [{{name: m, source: x.onnx}}]\n")
        with pytest.raises(ConfigError, match=r"scheduler\.(max_client_share|max_queue_bytes|"
                                              r"max_client_backlog_bytes)"):
            load_config(path, env={})


# -- item 10: errors the client can match -------------------------------------------------------

def test_a_header_too_large_is_refused_by_the_client_at_once(clusters, models):
    cluster = start(clusters, models)
    with runtime.connect(cluster.address) as client:
        started = time.monotonic()
        with pytest.raises(InvalidInput, match="header"):
            client.generate("noop", [{"role": "user", "content": "x" * (2 << 20)}], timeout=30)
        assert time.monotonic() - started < 2
        assert client.infer("noop", noop_input(1)).device == "cpu0"


def test_a_raw_submit_with_a_header_over_the_limit_is_answered_for_its_task(clusters, models,
                                                                             ctx):
    cluster = start(clusters, models)
    sock = welcomed(ctx, cluster.address)
    for t, body in (("submit", {"model": "noop", "inputs": []}),
                    ("generate", {"model": "noop", "request": {"prompt": "x"}})):
        head = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": t, "task_id": f"big-{t}", **body,
                              "junk": "y" * (p.MAX_HEADER_BYTES + 1000)})
        sock.send_multipart([head])
        reply = recv(sock)
        assert isinstance(reply, p.Failure) and reply.task_id == f"big-{t}", reply
        assert reply.error.kind == "protocol" and "header" in reply.error.message


# -- item 12: a submit of exactly the limit -----------------------------------------------------

def submit_to_add(n: int) -> tuple[list, np.ndarray, np.ndarray]:
    """A Submit to ``add`` of two float32[n]: its frames and the two arrays."""
    a = np.arange(n, dtype=np.float32)
    b = np.full(n, 2, np.float32)
    return p.encode(p.Submit(task_id="t", model="add", inputs={"a": a, "b": b})), a, b


def test_a_submit_of_exactly_the_size_limit_is_run_and_answered(tmp_path, clusters, ctx):
    frames, a, b = submit_to_add(8000)
    limit = p.frames_size(frames)  # the cluster's limit is this submit's size, to the byte
    models = tiny_models(tmp_path / "m", add_shape=a.shape)
    cluster = start(clusters, models, f"max_message_bytes: {limit}, task_timeout_s: 10")
    pid = worker(cluster.status(), "cpu0")["pid"]
    sock = welcomed(ctx, cluster.address)
    sock.send_multipart(frames)
    assert sock.poll(3000), "no answer within 3 s"
    reply = p.Decoder(p.SCHEDULER_TO_CLIENT, 2 * limit).decode(sock.recv_multipart())
    assert isinstance(reply, p.Result), reply
    np.testing.assert_array_equal(reply.outputs["y"], a + b)
    assert worker(cluster.status(), "cpu0")["pid"] == pid


def test_the_worker_secret_cannot_be_set_in_a_config_file(tmp_path):
    from runtime.config.loader import load_config
    from runtime.errors import ConfigError
    path = tmp_path / "c.yaml"
    path.write_text("scheduler: {worker_token: chosen-by-me}\ndevices: [{name: cpu0, kind: cpu, "
                    "backend: onnxruntime}]\nmodels: [{name: m, source: x.onnx}]\n")
    with pytest.raises(ConfigError, match="scheduler.worker_token: is made by the scheduler"):
        load_config(path, env={})
