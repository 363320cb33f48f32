"""One message cannot take a process down: a poison message fails itself, typed, once.

The attack of issue 11, item 1: a ~1 KB ``generate`` whose first chat message nests a
thousand lists. Formatting its error once killed the worker, its re-runs killed the next
ones, and the scheduler died building the task's repr.
"""
from __future__ import annotations

import msgpack
import pytest
import zmq

from runtime.errors import InvalidInput
from runtime.wire import protocol as p
from runtime.wire.generation import build_request

from .conftest import worker

DEPTH = 1000  # deeper than Python's recursion limit, shallower than msgpack's


def nested_generate(task_id: str) -> bytes:
    """A ``generate`` header whose ``messages[0]`` is ``DEPTH`` lists deep, hand-encoded
    (msgpack's own packer refuses that depth; an attacker's does not)."""
    prefix = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "generate", "task_id": task_id,
                            "model": "smollm2"})
    request = (b"\x81" + msgpack.packb("messages") + b"\x91" + b"\x91" * DEPTH
               + msgpack.packb("x"))
    return b"\x85" + prefix[1:] + msgpack.packb("request") + request


@pytest.fixture(scope="module")
def llm(module_clusters):
    return module_clusters.start("""
        devices:
          - {name: cpu0, kind: cpu, backend: openvino-genai, capacity: 2}
          - {name: cpu1, kind: cpu, backend: openvino-genai, capacity: 2}
        models:
          - {name: smollm2, source: "packaged:smollm2"}
    """)


@pytest.fixture
def raw(llm):
    """A bare DEALER that said hello, for what no client would send."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(llm.address)
    sock.send_multipart(p.encode(p.Hello(version=p.PROTOCOL_VERSION, role="client")))
    assert isinstance(decode(sock.recv_multipart()), p.Welcome)
    yield sock
    sock.close()
    ctx.term()


def decode(frames) -> p.Message:
    return p.Decoder(p.SCHEDULER_TO_CLIENT, 1 << 30).decode(frames)


def test_a_deeply_nested_chat_message_is_invalid_input_once_and_no_process_dies(llm, raw):
    before = {w["device"]: w["pid"] for w in llm.status()["workers"]}
    client = llm.client()
    chats = [[{"role": "user", "content": f"Count to {i}."}] for i in range(6)]
    fanout = client._submit(client._async.agenerate_many("smollm2", chats, max_tokens=3))
    raw.send_multipart([nested_generate("poison")])
    reply = decode(raw.recv_multipart())
    assert isinstance(reply, p.Failure) and reply.task_id == "poison"
    assert reply.error.kind == "invalid_input" and "messages[0]" in reply.error.message
    assert len(reply.error.attempts) == 0  # answered by the first worker, never re-run
    answers = fanout.result(timeout=120)
    assert [a.usage["completion_tokens"] for a in answers] == [3] * 6  # nothing lost
    raw.setsockopt(zmq.RCVTIMEO, 500)
    with pytest.raises(zmq.Again):
        raw.recv_multipart()  # answered exactly once
    status = llm.status()
    assert {w["device"]: w["pid"] for w in status["workers"]} == before
    assert all(worker(status, d)["restarts"] == 0 for d in before)
    assert llm.process.poll() is None
    assert client.generate("smollm2", chats[0], max_tokens=2).usage["completion_tokens"] == 2


def test_the_client_refuses_a_deeply_nested_chat_message_before_sending():
    nested: list = ["x"]
    for _ in range(DEPTH):
        nested = [nested]
    with pytest.raises(InvalidInput, match=r"messages\[0\] must be a map"):
        build_request([nested], {})


@pytest.mark.parametrize("field", ["stop", "seed", "tool_choice", "tools", "response_format",
                                   "tool_schema", "format_schema"])
def test_a_request_nesting_past_the_recursion_limit_in_any_field_is_invalid_input(field):
    nested: list = ["x"]
    for _ in range(DEPTH):
        nested = [nested]
    deep_map: dict = {}
    for _ in range(DEPTH):
        deep_map = {"properties": deep_map}
    params = {
        "tool_schema": {"tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", **deep_map}}}]},
        "format_schema": {"response_format": {"type": "json_schema", "json_schema": {
            "name": "r", "schema": deep_map}}},
    }.get(field, {field: nested})
    with pytest.raises(InvalidInput):
        build_request("Hello", params)
