"""Lost and hung workers, and overload: every accepted task answered exactly once."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from runtime.errors import Overloaded
from runtime.shells.supervisor import process_alive

from .conftest import sentences, wait_for, worker

TWO_CPU_WORKERS = """
    scheduler: {{heartbeat_interval_s: 0.2, heartbeat_timeout_s: {timeout}}}
    devices:
      - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2, faults: {{hang_s: {hang}}}}}
      - {{name: cpu1, kind: cpu, backend: onnxruntime, capacity: 2, faults: {{hang_s: {hang}}}}}
    models:
      - {{name: minilm, source: "packaged:minilm", devices: [cpu0, cpu1]}}
"""


@pytest.fixture(scope="module", params=["local", "ray"])
def launcher(request) -> str:
    """The tests here run under both launchers, but for the one marked local only."""
    return request.param


def check_results(results, batch, reference):
    for result, inputs in zip(results, batch):
        np.testing.assert_allclose(result["onnx::Shape_422"],
                                   reference(inputs)["onnx::Shape_422"], rtol=1e-5, atol=1e-5)


def kill_mid_fanout(cluster, client, batch, device, sig, after):
    futures = [client.submit("minilm", x) for x in batch]
    wait_for(lambda: sum(f.done() for f in futures) >= after, what=f"{after} tasks done")
    victim = worker(cluster.status(), device)["pid"]
    os.kill(victim, sig)
    results = [f.result(timeout=60) for f in futures]
    return victim, results


def test_a_worker_killed_mid_fanout_loses_nothing_and_delivers_each_result_once(
        clusters, reference):
    cluster = clusters.start(TWO_CPU_WORKERS.format(timeout=5.0, hang=0.01))
    client = cluster.client()
    batch = sentences(200)
    victim, results = kill_mid_fanout(cluster, client, batch, "cpu0", signal.SIGKILL, after=40)
    assert len(results) == 200
    check_results(results, batch, reference)
    lost = [r for r in results if any(a.kind == "worker_lost" for a in r.attempts)]
    assert lost, "the killed worker held tasks in flight; they must show a worker_lost try"
    assert client.unmatched == 0  # no task answered twice
    status = wait_for(lambda: (s := clusters.track(cluster)) and worker(s, "cpu0")["state"] == "up"
                      and s, what="cpu0 to be restarted")
    cpu0 = worker(status, "cpu0")
    assert cpu0["pid"] != victim and cpu0["restarts"] == 1 and cpu0["lost"] == 1
    assert status["counters"]["completed"] == 200 and status["unanswered"] == 0
    assert client.infer("minilm", batch[0]).device in ("cpu0", "cpu1")  # and it still serves


def test_a_stopped_worker_is_detected_killed_and_its_tasks_re_run(clusters, reference):
    cluster = clusters.start(TWO_CPU_WORKERS.format(timeout=1.0, hang=0.05))
    client = cluster.client()
    batch = sentences(60)
    victim, results = kill_mid_fanout(cluster, client, batch, "cpu0", signal.SIGSTOP, after=10)
    check_results(results, batch, reference)
    hung = [r for r in results if r.attempts]
    assert hung and all(a.device == "cpu0" and a.kind == "worker_lost" and "heartbeat" in
                        a.message for r in hung for a in r.attempts)
    assert all(r.device == "cpu1" for r in hung)
    assert client.unmatched == 0
    wait_for(lambda: not process_alive(victim), what="the stopped worker to be killed")
    status = wait_for(lambda: (s := clusters.track(cluster)) and worker(s, "cpu0")["state"] == "up"
                      and s, what="cpu0 to be restarted")
    assert worker(status, "cpu0")["pid"] != victim


def test_tasks_beyond_the_queue_bound_get_overloaded_and_nothing_else_is_lost(
        clusters, reference):
    cluster = clusters.start("""
        scheduler: {max_queue: 4, max_client_share: 1}  # one client may fill the whole queue
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1, faults: {hang_s: 0.3}}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """)
    client = cluster.client()
    batch = sentences(20)
    futures = [client.submit("minilm", x) for x in batch]
    outcomes = [f.exception(timeout=60) or f.result() for f in futures]
    overloaded = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [(o, x) for o, x in zip(outcomes, batch) if not isinstance(o, Exception)]
    assert len(overloaded) + len(served) == 20  # no other outcome
    assert overloaded and "queue is full" in str(overloaded[0])
    assert 5 <= len(served) < 20  # one running and four queued at least were accepted
    check_results([o for o, _ in served], [x for _, x in served], reference)
    status = cluster.status()
    assert status["counters"]["overloaded"] == len(overloaded)
    assert status["unanswered"] == 0
    # Once the queue drains, new work is accepted again.
    assert client.infer("minilm", batch[0]).device == "cpu0"


@pytest.mark.parametrize("deadline", [0.5])
def test_a_task_past_its_deadline_gets_deadline_exceeded_and_frees_its_slot(
        clusters, deadline):
    from runtime.errors import DeadlineExceeded
    cluster = clusters.start("""
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1, faults: {hang_s: 30}}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """)
    client = cluster.client()
    with pytest.raises(DeadlineExceeded, match="no result within"):
        client.infer("minilm", sentences(1)[0], timeout=deadline)
    # The hanging run honoured the cancel, so the slot is free again.
    wait_for(lambda: worker(cluster.status(), "cpu0")["in_flight"] == 0,
             what="the cancelled run to release its slot")
    assert worker(cluster.status(), "cpu0")["state"] == "up"


# Local only: it tests the local scheduler's watch of its parent; the Ray scheduler is a
# detached actor, made to outlive the program that started it.
@pytest.mark.parametrize("launcher", ["local"])
def test_killing_the_program_that_started_a_cluster_leaves_no_process_behind(clusters):
    import json
    import subprocess
    import sys
    import textwrap
    config = clusters.write("""
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1}
          - {name: cpu1, kind: cpu, backend: onnxruntime, capacity: 1}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """, name="parent.yaml")
    script = textwrap.dedent(f"""
        import json, time, runtime
        cluster = runtime.start({str(config)!r})
        pids = [cluster.pid] + [w["pid"] for w in cluster.status()["workers"]]
        print(json.dumps(pids), flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(parent.stdout.readline())
        clusters.pids.update(pids)  # teardown kills and fails on any left
        assert len(pids) == 3 and all(process_alive(p) for p in pids)
        parent.kill()  # a crash: no atexit, no finalizer runs
        parent.wait()
        wait_for(lambda: not any(process_alive(p) for p in pids), timeout=30,
                 what="the scheduler and workers of a crashed parent to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
