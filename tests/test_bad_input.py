"""Bad input gets a clear, typed error; no process dies of it; later tasks still succeed."""
from __future__ import annotations

import socket

import msgpack
import numpy as np
import pytest
import zmq

import runtime
from runtime.errors import ClusterUnavailable, InvalidInput, Unauthorized
from runtime.wire import protocol as p

from .conftest import sentences, worker

LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def cluster(module_clusters):
    return module_clusters.start(f"""
        scheduler: {{max_message_bytes: {LIMIT}}}
        devices:
          - {{name: npu0, kind: npu, backend: qnn, capacity: 1}}
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}}
        models:
          - name: minilm
            source: "packaged:minilm"
            devices: [npu0, cpu0]
            options:
              npu0: {{shapes: {{input_ids: [1, 32], attention_mask: [1, 32]}}, soc_model: "69"}}
    """)


@pytest.fixture
def raw(cluster):
    """A bare DEALER socket on the scheduler's client port, to send what no client would."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(cluster.address)
    yield sock
    sock.close()
    ctx.term()


def reply_of(sock) -> p.Message:
    return p.Decoder(p.SCHEDULER_TO_CLIENT, 1 << 30).decode(sock.recv_multipart())


@pytest.fixture(autouse=True)
def cluster_still_serves(cluster):
    """After each bad input: every process alive, and a good task still succeeds."""
    pids = {w["device"]: w["pid"] for w in cluster.status()["workers"]}
    yield
    result = cluster.client().infer("minilm", sentences(1)[0])
    assert result.device in ("npu0", "cpu0")
    status = cluster.status()
    assert cluster.process.poll() is None
    assert {w["device"]: w["pid"] for w in status["workers"]} == pids, "a worker died"


def test_wrong_input_names_are_invalid_input_naming_what_is_expected(cluster):
    x = sentences(1)[0]
    with pytest.raises(InvalidInput, match=r"missing \['attention_mask'\].*unexpected \['mask'\]"):
        cluster.client().infer("minilm", {"input_ids": x["input_ids"], "mask": x["input_ids"]})


def test_wrong_dtype_is_invalid_input_and_is_not_retried(cluster):
    x = {k: v.astype(np.int32) for k, v in sentences(1)[0].items()}
    with pytest.raises(InvalidInput, match="dtype int32, expected int64") as info:
        cluster.client().infer("minilm", x)
    assert info.value.attempts == []  # never re-run on another device


def test_wrong_rank_is_invalid_input(cluster):
    x = {k: v[0] for k, v in sentences(1)[0].items()}
    with pytest.raises(InvalidInput, match="rank 1"):
        cluster.client().infer("minilm", x)


def test_input_longer_than_the_npu_static_shape_runs_on_cpu(cluster):
    x = sentences(1, seq=48)[0]  # the NPU compiled [1, 32]
    result = cluster.client().infer("minilm", x)
    assert result.device == "cpu0"
    assert result["onnx::Shape_422"].shape == (1, 48, 384)


def test_unknown_model_is_invalid_input_listing_the_served_models(cluster):
    with pytest.raises(InvalidInput, match="unknown model 'nope'.*minilm"):
        cluster.client().infer("nope", sentences(1)[0])


def test_an_object_array_is_refused_by_the_client(cluster):
    with pytest.raises(InvalidInput, match="dtype object"):
        cluster.client().infer("minilm", {"input_ids": np.array(["a"], dtype=object)})


def test_garbage_bytes_get_a_protocol_error_reply(raw):
    raw.send_multipart([b"\xc1\xff garbage \x00"])
    reply = reply_of(raw)
    assert isinstance(reply, p.Reply) and reply.error.kind == "protocol"
    assert "undecodable header" in reply.error.message


def test_another_protocol_version_is_refused_with_a_clear_error(raw):
    raw.send_multipart([msgpack.packb({"v": 99, "t": "hello", "version": 99, "role": "client"})])
    reply = reply_of(raw)
    assert reply.error.kind == "protocol" and "version 99 is not supported" in \
        reply.error.message


def test_a_frame_that_lies_about_its_array_size_is_refused(raw):
    head = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "submit", "task_id": "t1",
                          "model": "minilm", "inputs": [["input_ids", "int64", [1, 8]]]})
    raw.send_multipart([head, b"\x00" * 10])
    reply = reply_of(raw)
    assert isinstance(reply, p.Failure) and reply.task_id == "t1"
    assert "needs 64 bytes in 1 frame(s)" in reply.error.message and "got 10" in \
        reply.error.message


def test_an_oversized_submit_is_answered_with_an_error_for_that_task(raw):
    big = np.zeros((1, LIMIT // 8 + 1024), np.int64)  # over the limit, under twice it
    frames = p.encode(p.Submit(task_id="big", model="minilm",
                               inputs={"input_ids": big, "attention_mask": big}))
    raw.send_multipart(frames)
    reply = reply_of(raw)
    assert isinstance(reply, p.Failure) and reply.task_id == "big"
    assert reply.error.kind == "protocol" and "larger than the limit" in reply.error.message


def test_the_client_refuses_a_message_over_the_cluster_limit_before_sending(cluster):
    big = np.zeros((1, LIMIT // 8 + 1024), np.int64)
    with pytest.raises(InvalidInput, match="exceeds the cluster's limit"):
        cluster.client().infer("minilm", {"input_ids": big, "attention_mask": big})


def test_raw_tcp_garbage_on_the_client_port_harms_nothing(cluster):
    host, port = cluster.address[len("tcp://"):].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 64)
        try:
            s.recv(1024)
        except OSError:
            pass


def test_a_client_that_vanishes_with_tasks_in_flight_harms_nothing(cluster):
    client = runtime.connect(cluster.address)
    futures = [client.submit("minilm", x) for x in sentences(8)]
    client.close()  # gone before its answers arrive
    assert all(f.done() for f in futures)
    with pytest.raises(ClusterUnavailable):
        futures[-1].result()


def test_a_message_type_meant_for_workers_is_refused_on_the_client_port(raw):
    raw.send_multipart(p.encode(p.Heartbeat(in_flight=1)))
    reply = reply_of(raw)
    assert "unexpected message type 'heartbeat'" in reply.error.message


def test_a_cluster_with_a_token_refuses_clients_without_it(clusters):
    cluster = clusters.start("""
        scheduler: {token: "s3cret-token"}
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """)
    with pytest.raises(Unauthorized, match="needs a token"):
        runtime.connect(cluster.address, token="wrong")
    with runtime.connect(cluster.address, token="s3cret-token") as client:
        assert client.infer("minilm", sentences(1)[0]).device == "cpu0"
    assert worker(cluster.status(), "cpu0")["state"] == "up"


def replies_of(sock, n: int) -> list[p.Message]:
    """The next ``n`` replies, those of a pack one by one."""
    out: list[p.Message] = []
    decoder = p.Decoder(p.SCHEDULER_TO_CLIENT, 1 << 30)
    while len(out) < n:
        out += [decoder.decode(m) for m in p.unpack(sock.recv_multipart())]
    return out


def test_a_pack_of_submits_is_answered_task_by_task_and_its_bad_ones_fail_alone(raw):
    x = {k: np.asarray(v) for k, v in sentences(2)[0].items()}
    lying = [msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "submit", "task_id": "lies",
                            "model": "minilm", "inputs": [["input_ids", "int64", [1, 8]]]}),
             b"\x00" * 10]
    raw.send_multipart(p.pack([
        p.encode(p.Submit(task_id="a", model="minilm", inputs=x)), lying,
        p.encode(p.Submit(task_id="nope", model="nope", inputs=x)),
        [b"\xc1 garbage"],
        p.encode(p.Submit(task_id="b", model="minilm", inputs=x))]))
    replies = {getattr(r, "task_id", None): r for r in replies_of(raw, 5)}
    assert isinstance(replies["a"], p.Result) and isinstance(replies["b"], p.Result)
    a, b = replies["a"].outputs, replies["b"].outputs  # the same input: the same embedding
    assert a and sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-2, atol=1e-2)  # NPU or CPU
    assert replies["lies"].error.kind == "protocol" and "got 10" in replies["lies"].error.message
    assert "unknown model 'nope'" in replies["nope"].error.message
    assert "undecodable header" in replies[None].error.message  # the garbage, answered too


@pytest.mark.parametrize("counts, says", [([2, 2], "add up to 4, but 5 frames"),
                                          ([2, 2, 0, 1], "positive integers")])
def test_a_pack_that_lies_about_its_frames_is_refused_whole_with_a_protocol_error(raw, counts,
                                                                                   says):
    submit = p.encode(p.Submit(task_id="a", model="minilm", inputs=sentences(1)[0]))
    raw.send_multipart([msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "pack", "n": counts})]
                       + submit + submit[:2])
    reply = reply_of(raw)
    assert isinstance(reply, p.Reply) and reply.error.kind == "protocol"
    assert says in reply.error.message
