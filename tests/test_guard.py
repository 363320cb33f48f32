"""No exception in a handler or on the tick path stops the scheduler or a worker: a bug in one
message's handling fails that message (a typed error to its sender, one log line, rate-limited
per peer), never the process; and no process blocks on output nobody reads.
"""
from __future__ import annotations

import errno
import logging
import os
import resource
import threading
import time
from pathlib import Path

import msgpack
import pytest

import runtime
from runtime.config.loader import load_config
from runtime.core import scheduler as s
from runtime.errors import FanoutError
from runtime.shells.scheduler_process import SchedulerProcess
from runtime.wire import protocol as p
from runtime.wire.peerlog import PeerLog

from ._peers import dealer, hello, noop_input, recv, wait_until
from .conftest import worker


def config_text(models, scheduler: str = "") -> str:
    return f"""
        scheduler: {{{scheduler}}}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}}
        models:
          - {{name: noop, source: {models['noop']}}}
    """


# -- the tick path ------------------------------------------------------------------------------

def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_worker_restart_that_fails_for_want_of_file_descriptors_does_not_stop_the_scheduler(
        clusters, models):
    cluster = clusters.start(config_text(models, "restart_backoff_s: 0.1"))
    before = worker(cluster.status(), "cpu0")
    limits = resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE)
    try:
        # Not one descriptor to spare: starting a worker process fails with EMFILE.
        resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE,
                         (open_fds(cluster.pid), limits[1]))
        os.kill(before["pid"], 9)
        time.sleep(1.5)  # several restarts tried and failed
        assert cluster.process.poll() is None, "the scheduler died"
    finally:
        resource.prlimit(cluster.pid, resource.RLIMIT_NOFILE, limits)
    assert wait_until(lambda: worker(cluster.status(), "cpu0")["state"] == "up", timeout=30)
    after = worker(cluster.status(), "cpu0")
    assert after["epoch"] > before["epoch"] + 1  # the failed starts counted as exits
    assert "Too many open files" in after["last_exit"] or after["restarts"] >= 2
    assert cluster.client().infer("noop", noop_input(1)).device == "cpu0"


# -- handlers -----------------------------------------------------------------------------------

class Faulty:
    """An ``on_change`` hook (what ``fanout up`` prints progress with) that raises for some
    events, as a broken terminal would."""

    def __init__(self, *types: type, first_only: bool = False):
        self.types = types
        self.first_only = first_only
        self.raised = 0

    def __call__(self, proc, event) -> None:
        if isinstance(event, self.types) and not (self.first_only and self.raised):
            self.raised += 1
            raise BrokenPipeError(errno.EPIPE, "progress output is gone")


@pytest.fixture
def in_process(models, tmp_path):
    """A scheduler shell in this process (its workers are real processes), with a hook."""
    procs = []

    def start(hook) -> SchedulerProcess:
        path = tmp_path / "c.yaml"
        path.write_text(config_text(models, "address: 'tcp://127.0.0.1:0'"))
        proc = SchedulerProcess(load_config(path, env={}), on_change=hook)
        thread = threading.Thread(target=proc.serve, daemon=True)
        thread.start()
        procs.append((proc, thread))
        assert wait_until(lambda: proc.state.ready(), timeout=30)
        return proc

    yield start
    for proc, thread in procs:
        proc.stop()
        thread.join(15)
        assert not thread.is_alive()


def test_a_failure_while_welcoming_a_client_is_a_typed_error_to_it_and_the_next_is_served(
        in_process):
    proc = in_process(Faulty(s.ClientHello, first_only=True))
    started = time.monotonic()
    with pytest.raises(FanoutError, match="progress output is gone"):
        runtime.connect(proc.address, timeout=5)
    assert time.monotonic() - started < 2
    with runtime.connect(proc.address, timeout=5) as client:
        assert client.infer("noop", noop_input(1)).device == "cpu0"


def test_failures_in_handling_many_tasks_lose_none_answer_each_once_and_log_once(
        in_process, caplog):
    caplog.set_level(logging.WARNING, logger="fanout.scheduler")
    hook = Faulty(s.TaskSubmitted)
    proc = in_process(hook)
    with runtime.connect(proc.address, timeout=5) as client:
        results = client.map("noop", [noop_input(i) for i in range(100)], timeout=10)
        assert [float(r["y"][0]) for r in results] == [float(i) for i in range(100)]
        assert client.unmatched == 0
    assert hook.raised == 100
    errors = [r for r in caplog.records if "progress output is gone" in r.getMessage()]
    assert 1 <= len(errors) <= 2, [r.getMessage() for r in errors]
    assert proc.status().cluster.internal_errors == 100


def test_a_message_nested_too_deep_to_describe_gets_a_protocol_error(clusters, models, ctx):
    cluster = clusters.start(config_text(models))
    sock = dealer(ctx, cluster.address)
    hello(sock)
    assert isinstance(recv(sock), p.Welcome)
    nested = b"\x91" * 1020 + b"\xc0"  # msgpack reads up to 1,024 levels; repr() fails first
    for field in (b"\xa1v", b"\xa6inputs", b"\xa7task_id"):  # version, arrays, an id
        head = {"v": p.PROTOCOL_VERSION, "t": "submit", "task_id": "deep", "model": "noop",
                "inputs": []}
        packed = msgpack.packb(head)
        marker = {b"\xa1v": msgpack.packb("v") + msgpack.packb(p.PROTOCOL_VERSION),
                  b"\xa6inputs": msgpack.packb("inputs") + msgpack.packb([]),
                  b"\xa7task_id": msgpack.packb("task_id") + msgpack.packb("deep")}[field]
        sock.send_multipart([packed.replace(marker, field + nested)])
        assert sock.poll(3000), f"no answer to a message with a deep {field!r}"
        reply = recv(sock)
        assert reply.error.kind == "protocol", reply
    assert cluster.process.poll() is None
    assert cluster.client().infer("noop", noop_input(2)).device == "cpu0"


def test_a_run_the_worker_fails_to_handle_is_answered_and_the_worker_lives(clusters, models,
                                                                           ctx):
    cluster = clusters.start(config_text(models))
    pid = worker(cluster.status(), "cpu0")["pid"]
    sock = dealer(ctx, cluster.address)
    hello(sock)
    assert isinstance(recv(sock), p.Welcome)
    message = b"\x91" * 1020 + b"\xa1x"  # a chat message nested 1,020 lists deep
    head = msgpack.packb({"v": p.PROTOCOL_VERSION, "t": "generate", "task_id": "g",
                          "model": "noop", "request": {"messages": ["PLACEHOLDER"]}})
    sock.send_multipart([head.replace(msgpack.packb("PLACEHOLDER"), message)])
    assert sock.poll(10_000), "the generate was never answered"
    reply = recv(sock)
    assert isinstance(reply, p.Failure) and reply.task_id == "g"
    assert worker(cluster.status(), "cpu0")["pid"] == pid
    assert cluster.client().infer("noop", noop_input(3)).device == "cpu0"


# -- rate-limited logs --------------------------------------------------------------------------

def test_the_log_says_one_line_per_peer_and_kind_per_period(caplog):
    caplog.set_level(logging.WARNING, logger="fanout.test")
    now = [0.0]
    plog = PeerLog(logging.getLogger("fanout.test"), period_s=10.0, clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0, 11.0):
        now[0] = t
        plog.warning("peer-a", "bad", "bad message from %s", "peer-a")
        plog.warning("peer-b", "bad", "bad message from %s", "peer-b")
    plog.warning("peer-a", "other", "another kind of trouble")
    assert [r.getMessage() for r in caplog.records] == [
        "bad message from peer-a", "bad message from peer-b",
        "bad message from peer-a (2 more since the last report)",
        "bad message from peer-b (2 more since the last report)",
        "another kind of trouble"]


def test_the_log_forgets_peers_beyond_its_bound(caplog):
    plog = PeerLog(logging.getLogger("fanout.test"), period_s=10.0, max_peers=100)
    for i in range(10_000):
        plog.warning(f"peer-{i}", "bad", "bad")
    assert len(plog) <= 100


# -- output nobody reads ------------------------------------------------------------------------

def test_output_of_the_scheduler_and_its_workers_never_blocks_them(clusters, models, capfd):
    cluster = clusters.start(config_text(models))
    pids = [cluster.pid, worker(cluster.status(), "cpu0")["pid"]]
    chatter = b"a chatty engine says something on stdout\n" * 25_000  # ~1 MiB
    for pid in pids:
        fd = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY | os.O_NONBLOCK)
        try:
            written = 0
            while written < len(chatter):
                try:
                    written += os.write(fd, chatter[written:])
                except BlockingIOError:
                    pytest.fail(f"pid {pid}'s stdout is full after {written} bytes: nobody "
                                f"reads it, and a process writing there would block")
        finally:
            os.close(fd)
    assert cluster.client().infer("noop", noop_input(4)).device == "cpu0"
    assert Path(f"/proc/{pids[1]}").exists()
