"""The client never hangs on a reply it cannot read: the call it answers fails with
``ProtocolError`` at once, the reader goes on, and the next call succeeds.

The scheduler here is a raw ZMQ ROUTER socket that answers the hello properly and then each
call with what the test scripts, malformed on purpose.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable

import msgpack
import numpy as np
import pytest
import zmq

import runtime
from runtime.errors import ProtocolError
from runtime.wire import protocol as p
from runtime.wire.status import ClusterInfo

PROMPT_S = 5.0  # "at once": far less than any timeout, and the calls below have none
X = {"x": np.zeros((1, 4), np.float32)}


def header(**fields) -> list[bytes]:
    return [msgpack.packb({"v": p.PROTOCOL_VERSION, **fields}, use_bin_type=True)]


def good_result(task_id: str) -> list[bytes]:
    return p.encode(p.Result(task_id=task_id, device="cpu0", outputs=X))


class FakeScheduler:
    """Answers hello with a welcome; answers each call (submit, generate, status) with the
    next scripted function of its id, which returns the messages to send back."""

    def __init__(self, welcome_version: int = p.PROTOCOL_VERSION):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self.welcome_version = welcome_version
        self.script: queue.SimpleQueue[Callable[[str], list[list[bytes]]]] = \
            queue.SimpleQueue()
        self.decoder = p.Decoder(p.CLIENT_TO_SCHEDULER, 1 << 20)
        self.calls: list[str] = []  # the ids of the calls answered, in order
        self.cancelled: list[str] = []  # task ids the client cancelled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def answer(self, *replies: Callable[[str], list[bytes]]) -> None:
        """The next call gets these messages, each made from the call's id."""
        self.script.put(lambda ref: [reply(ref) for reply in replies])

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, *frames = self.sock.recv_multipart()
            for message in p.unpack(frames):  # a fan-out's submits come several to a pack
                self._handle(ident, self.decoder.decode(message))

    def _handle(self, ident: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Hello):
            welcome = p.encode(p.Welcome(version=p.PROTOCOL_VERSION,
                                         cluster=ClusterInfo(self.address)))
            if self.welcome_version != p.PROTOCOL_VERSION:
                welcome = [msgpack.packb({"v": self.welcome_version, "t": "welcome",
                                          "version": self.welcome_version})]
            self.sock.send_multipart([ident, *welcome])
        elif isinstance(msg, p.Cancel):
            self.cancelled.append(msg.task_id)
        elif isinstance(msg, p.Submit | p.Generate | p.StatusRequest):
            ref = msg.req_id if isinstance(msg, p.StatusRequest) else msg.task_id
            self.calls.append(ref)
            for reply in self.script.get(timeout=5)(ref):
                self.sock.send_multipart([ident, *reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def fake():
    scheduler = FakeScheduler()
    yield scheduler
    scheduler.close()


@pytest.fixture
def client(fake):
    with runtime.connect(fake.address, timeout=5) as c:
        yield c


def fails_promptly(call) -> ProtocolError:
    started = time.monotonic()
    with pytest.raises(ProtocolError) as info:
        call().result(timeout=PROMPT_S)
    assert time.monotonic() - started < PROMPT_S
    return info.value


MALFORMED = {
    "an attempt without its device": lambda ref: header(
        t="result", task_id=ref, device="cpu0", outputs=[],
        attempts=[{"kind": "device", "message": "boom"}]),
    "an attempt of an unknown kind": lambda ref: header(
        t="result", task_id=ref, device="cpu0", outputs=[],
        attempts=[{"device": "npu0", "kind": "meltdown", "message": "boom"}]),
    "a device that is a number": lambda ref: header(t="result", task_id=ref, device=7),
    "a service time that is a string": lambda ref: header(
        t="result", task_id=ref, device="cpu0", service_s="fast"),
    "an error without a message": lambda ref: header(
        t="failure", task_id=ref, error={"kind": "device"}),
    "an error that is a list": lambda ref: header(t="failure", task_id=ref, error=["device"]),
    "arrays that do not match their frames": lambda ref: header(
        t="result", task_id=ref, device="cpu0", outputs=[["y", "float32", [1, 4]]]),
}


@pytest.mark.parametrize("what", sorted(MALFORMED))
def test_a_malformed_reply_fails_its_call_and_the_next_call_succeeds(fake, client, what):
    fake.answer(MALFORMED[what])
    error = fails_promptly(lambda: client.submit("m", X))
    assert "could not be read" in str(error)
    fake.answer(good_result)
    assert client.submit("m", X).result(timeout=PROMPT_S).device == "cpu0"


def test_a_malformed_completion_fails_its_generation(fake, client):
    fake.answer(lambda ref: header(t="completion", task_id=ref, text=None, finish_reason="stop",
                                   device="cpu0"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fails_promptly(lambda: pool.submit(client.generate, "m", "hi"))
    fake.answer(good_result)
    assert client.infer("m", X).device == "cpu0"


def test_a_malformed_chunk_ends_its_stream_with_a_protocol_error_and_cancels_it(fake, client):
    fake.answer(lambda ref: p.encode(p.Chunk(task_id=ref, text="Hel", device="cpu0")),
                lambda ref: header(t="chunk", task_id=ref, text=["lo"], device="cpu0"))
    chunks = []
    with pytest.raises(ProtocolError, match="could not be read"):
        for chunk in client.stream("m", "hi"):
            chunks.append(chunk.text)
    assert chunks == ["Hel"]
    # the generation goes on over there: the client tells the scheduler to stop it
    deadline = time.monotonic() + PROMPT_S
    while not fake.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake.cancelled == fake.calls[-1:]
    fake.answer(good_result)
    assert client.infer("m", X).device == "cpu0"


def test_garbage_and_replies_for_unknown_tasks_harm_no_call(fake, client):
    fake.answer(lambda ref: [b"\xc1 not msgpack \x00"],
                lambda ref: header(t="result", task_id="nobody-waits", device=7),
                lambda ref: p.encode(p.Result(task_id="nobody-waits-either", device="cpu0")),
                good_result)
    assert client.submit("m", X).result(timeout=PROMPT_S).device == "cpu0"
    assert client.unreadable == 2 and client.unmatched == 1


def test_a_malformed_status_is_a_protocol_error_for_the_typed_status_only(fake, client):
    bad = {"workers": [{"device": "cpu0", "state": "exploded"}]}
    fake.answer(lambda ref: p.encode(p.Reply(req_id=ref, body=bad)))
    with pytest.raises(ProtocolError, match=r"status.workers\[0\].state"):
        client.cluster_status(timeout=PROMPT_S)
    fake.answer(lambda ref: p.encode(p.Reply(req_id=ref, body=bad)))
    assert client.status(timeout=PROMPT_S) == bad  # the plain dict, as sent


def test_unreadable_replies_are_logged_at_most_once_per_interval(fake, client, caplog):
    for _ in range(3):
        fake.answer(MALFORMED["a device that is a number"])
        fails_promptly(lambda: client.submit("m", X))
    lines = [r for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(lines) == 1 and lines[0].name == "fanout.client"


def test_a_welcome_in_another_protocol_version_fails_connect_at_once():
    scheduler = FakeScheduler(welcome_version=p.PROTOCOL_VERSION + 1)
    try:
        started = time.monotonic()
        with pytest.raises(ProtocolError, match="is not supported"):
            runtime.connect(scheduler.address, timeout=30)
        assert time.monotonic() - started < PROMPT_S  # not after the 30 s connect timeout
    finally:
        scheduler.close()


def test_a_fan_out_task_never_answered_fails_at_its_answer_time_and_the_rest_are_served(
        fake, client, monkeypatch):
    from runtime.errors import ClusterUnavailable
    from runtime.frontdoors import client as client_module
    monkeypatch.setattr(client_module, "ANSWER_MARGIN_S", 0.2)  # the way back: 0.2 s here
    for i in range(6):  # answered, lost, answered, lost, ...
        fake.answer(good_result) if i % 2 == 0 else fake.answer()
    started = time.monotonic()
    results = client.map("m", [X] * 6, timeout=0.3, return_exceptions=True)
    took = time.monotonic() - started
    assert [r.device for r in results[0::2]] == ["cpu0"] * 3
    assert all(isinstance(r, ClusterUnavailable) and "no answer for task" in str(r)
               for r in results[1::2]), results
    assert 0.5 <= took < 1.5, took  # at its answer time (0.3 + 0.2 s): not before, nor long after
    fake.answer(good_result)
    assert client.map("m", [X], timeout=0.3)[0].device == "cpu0"
