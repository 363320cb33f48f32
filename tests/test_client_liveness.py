"""Clients always come back (issue 11, items 4 and 11).

Every call honours its timeout, a scheduler that died or stopped is noticed within ~2 s and
every unfinished call fails with ``ClusterUnavailable``, ``close()`` takes at most a second,
and a client that stalled, or whose scheduler came back, says hello again.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import time

import numpy as np
import pytest
import zmq

import runtime
from runtime.errors import Cancelled, ClusterUnavailable, InvalidInput
from runtime.frontdoors.client import CLOSE_WITHIN_S, AsyncClient
from runtime.wire import protocol as p

from ._peers import Link, wait_until
from .conftest import sentences

SLOW_CPU = """
    scheduler: {{token: {token}}}
    devices:
      - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1, faults: {{hang_s: {hang}}}}}
    models:
      - {{name: minilm, source: "packaged:minilm"}}
"""
DETECTED_WITHIN_S = 3.0  # the ~1.5 s heartbeat timeout, plus a loaded machine's slack


def big_inputs(n: int, tokens: int = 4096) -> list[dict[str, np.ndarray]]:
    """Inputs of 64 KiB: a few thousand fill the socket's buffers and its send queue."""
    x = sentences(1, seq=tokens)[0]
    return [x] * n


def timed(call):
    started = time.monotonic()
    try:
        outcome = call()
    except Exception as exc:
        outcome = exc
    return outcome, time.monotonic() - started


@pytest.fixture
def slow(clusters):
    return clusters.start(SLOW_CPU.format(token="null", hang=0.5))


def test_calls_fail_soon_after_the_scheduler_is_killed_and_close_is_quick(slow):
    client = runtime.connect(slow.address)
    futures = [client.submit("minilm", x, timeout=30) for x in sentences(50)]
    time.sleep(0.3)  # some are running, the rest queued
    os.kill(slow.pid, signal.SIGKILL)
    started = time.monotonic()
    done, not_done = concurrent.futures.wait(futures, timeout=DETECTED_WITHIN_S + 5)
    assert not not_done, f"{len(not_done)} calls still waiting after the scheduler died"
    errors = [f.exception() for f in futures]
    assert all(isinstance(e, ClusterUnavailable) for e in errors if e is not None)
    assert sum(isinstance(e, ClusterUnavailable) for e in errors) >= 40
    assert time.monotonic() - started < DETECTED_WITHIN_S
    outcome, took = timed(lambda: client.status(timeout=3))
    assert isinstance(outcome, ClusterUnavailable) and took < 3.5
    outcome, took = timed(lambda: client.infer("minilm", sentences(1)[0], timeout=2))
    assert isinstance(outcome, ClusterUnavailable) and took < 2.5
    _, took = timed(client.close)
    assert took < CLOSE_WITHIN_S + 0.2


def test_a_stopped_scheduler_with_thousands_of_messages_queued_fails_every_call_in_time(slow):
    client = runtime.connect(slow.address)
    os.kill(slow.pid, signal.SIGSTOP)
    try:
        outcome, took = timed(lambda: client.map("minilm", big_inputs(2000), timeout=5,
                                                 return_exceptions=True))
        assert took < 5 + DETECTED_WITHIN_S, f"map(timeout=5) took {took:.1f} s"
        assert all(isinstance(r, ClusterUnavailable) for r in outcome)
        outcome, took = timed(lambda: client.status(timeout=3))
        assert isinstance(outcome, ClusterUnavailable) and took < 3.5
        outcome, took = timed(lambda: client.infer("minilm", sentences(1)[0], timeout=2))
        assert isinstance(outcome, ClusterUnavailable) and took < 2.5
    finally:
        os.kill(slow.pid, signal.SIGCONT)
    # The scheduler is back: the client reconnected by itself and said hello again (after
    # the scheduler has dealt with what it read late: on a loaded machine, seconds).
    deadline = time.monotonic() + 40
    while True:
        try:
            result = client.infer("minilm", sentences(1)[0], timeout=10)
            break
        except ClusterUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert result.device == "cpu0" and client._async.reconnects >= 1
    _, took = timed(client.close)
    assert took < CLOSE_WITHIN_S + 0.2


def test_a_client_whose_link_went_silent_comes_back_though_the_scheduler_holds_the_old_one(slow):
    # A link that dies without a word to either end (a cable pulled, a NAT that forgot it):
    # the client stops hearing heartbeats and connects again, while the scheduler still
    # holds the old connection. A ROUTER refuses a second connection under a routing id it
    # holds and never reads it: the client must come back under a new one.
    link = Link(slow.address[len("tcp://"):])
    try:
        client = runtime.connect(link.address)
        assert client.infer("minilm", sentences(1)[0], timeout=10).device == "cpu0"
        lost = [client.submit("minilm", x, timeout=30) for x in sentences(20)]  # 10 s of work
        time.sleep(0.3)
        link.go_silent()
        assert wait_until(lambda: client._async.reconnects >= 1, 10) is not None
        assert all(isinstance(f.exception(timeout=5), ClusterUnavailable) for f in lost)
        outcome, took = timed(lambda: client.status(timeout=5))
        assert not isinstance(outcome, Exception), f"{outcome!r} after {took:.1f} s"
        # The hello on the new connection named the old one: its tasks, whose calls failed,
        # were cancelled at once, not run for nobody until its silence gave it away (5 s).
        assert outcome["unanswered"] == 0, outcome
        assert client.infer("minilm", sentences(1)[0], timeout=10).device == "cpu0"
        assert link.connections == 2 and client._async.unmatched == 0
        # And the scheduler let the lost connection go: nothing came on it though pinged.
        assert wait_until(lambda: "target" in link.hung_up, 10) is not None, link.hung_up
        assert link.hung_up == ["client", "target"]
        client.close()
    finally:
        link.close()


def test_closing_a_client_whose_scheduler_is_stopped_takes_at_most_a_second(slow):
    client = runtime.connect(slow.address)
    for x in big_inputs(1500):
        client.submit("minilm", x)  # many stay in the client's send queue
    os.kill(slow.pid, signal.SIGSTOP)
    try:
        _, took = timed(client.close)
    finally:
        os.kill(slow.pid, signal.SIGCONT)
    assert took < CLOSE_WITHIN_S + 0.2
    # And its sockets are released, not left for a garbage collector to hang on.
    deadline = time.monotonic() + 2
    while not client._async.ctx.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client._async.sock.closed and client._async.ctx.closed


def test_a_client_whose_event_loop_stalled_past_its_silence_limit_says_hello_again(clusters):
    cluster = clusters.start(SLOW_CPU.format(token="s3cret", hang=8.0))

    async def scenario():
        client = await AsyncClient(cluster.address, token="s3cret").connect()
        try:
            running = asyncio.ensure_future(client.ainfer("minilm", sentences(1)[0]))
            await asyncio.sleep(0.5)
            time.sleep(5.5)  # the loop stalls: no keepalive for longer than five of them
            # The scheduler forgot us and cancelled our task: a typed answer, not a hang.
            with pytest.raises(Cancelled, match="went silent"):
                await asyncio.wait_for(running, 5)
            # And we are known again at once: the cluster needs the token's hello first.
            status = await client.astatus(timeout=3)
            assert status["unanswered"] == 0
        finally:
            await client.close()

    asyncio.run(scenario())


def test_a_timeout_past_the_clusters_bound_or_not_finite_is_invalid_input(clusters):
    cluster = clusters.start("""
        scheduler: {max_task_timeout_s: 600}
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """)
    client = cluster.client()
    x = sentences(1)[0]
    for bad in (601, 1e300, float("inf"), float("nan"), -1):
        with pytest.raises(InvalidInput, match="timeout"):
            client.infer("minilm", x, timeout=bad)
    assert client.infer("minilm", x, timeout=600).device == "cpu0"
    # A submit that bypassed the client is refused by the scheduler the same way.
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(cluster.address)
    try:
        sock.send_multipart(p.encode(p.Submit(task_id="t", model="minilm", inputs=x,
                                              timeout_s=1e12)))
        reply = p.Decoder(p.SCHEDULER_TO_CLIENT, 1 << 30).decode(sock.recv_multipart())
    finally:
        sock.close()
        ctx.term()
    assert isinstance(reply, p.Failure) and reply.error.kind == "invalid_input"
    assert "scheduler.max_task_timeout_s" in reply.error.message
