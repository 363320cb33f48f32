"""Prefetched tasks in a real cluster: held by the worker beyond its slots, they are lost with
it and re-run, and a cancel reaches them and frees their credit at once."""
from __future__ import annotations

import os
import signal

import numpy as np

from ._peers import tiny_models
from .conftest import sentences, wait_for, worker

ONE_SLOW_WORKER = """
    scheduler: {{heartbeat_interval_s: 0.2, restart_backoff_s: 0.1}}
    devices:
      - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1, prefetch: {prefetch},
          faults: {{hang_s: {hang}}}}}
    models:
      - {{name: minilm, source: "packaged:minilm"}}
"""


def test_a_worker_killed_holding_prefetched_tasks_loses_none_of_them(clusters, reference):
    cluster = clusters.start(ONE_SLOW_WORKER.format(prefetch=4, hang=0.3))
    client = cluster.client()
    batch = sentences(8)
    futures = [client.submit("minilm", x) for x in batch]
    # one running and four prefetched: the worker holds five, three wait in the scheduler
    wait_for(lambda: worker(cluster.status(), "cpu0")["in_flight"] == 5, timeout=30,
             what="cpu0 to hold capacity + prefetch tasks")
    assert cluster.status()["queued"] == 3
    victim = worker(cluster.status(), "cpu0")["pid"]
    os.kill(victim, signal.SIGKILL)
    results = [f.result(timeout=60) for f in futures]
    lost = [r for r in results if any(a.kind == "worker_lost" for a in r.attempts)]
    assert len(lost) >= 5  # the running one and every prefetched one were re-run
    for result, inputs in zip(results, batch):
        np.testing.assert_allclose(result["onnx::Shape_422"],
                                   reference(inputs)["onnx::Shape_422"], rtol=1e-5, atol=1e-5)
    assert client.unmatched == 0
    status = clusters.track(cluster)
    assert status["counters"]["completed"] == 8 and status["unanswered"] == 0


def test_a_cancel_of_a_prefetched_task_frees_its_credit_for_the_next(clusters):
    cluster = clusters.start(ONE_SLOW_WORKER.format(prefetch=1, hang=30))
    client = cluster.client()
    first, prefetched, waiting = (client.submit("minilm", x, timeout=60)
                                  for x in sentences(3))
    wait_for(lambda: cluster.status()["queued"] == 1, what="one task held, one prefetched")
    assert worker(cluster.status(), "cpu0")["in_flight"] == 2
    prefetched.cancel()  # the client tells the scheduler, which tells the worker
    # the worker answers the waiting task at once, so the queued one takes its credit
    wait_for(lambda: cluster.status()["queued"] == 0, timeout=5,
             what="the queued task to take the freed credit")
    status = cluster.status()
    assert worker(status, "cpu0")["in_flight"] == 2 and status["counters"]["cancelled"] == 1
    for future in (first, waiting):
        future.cancel()
    wait_for(lambda: worker(cluster.status(), "cpu0")["in_flight"] == 0, timeout=10,
             what="the hanging run to honour its cancel")


def test_a_worker_given_thousands_of_credits_while_stopped_loses_none_of_its_runs(
        clusters, tmp_path):
    # Given a worker that may hold 4,000 tasks, and is stopped (not reading its socket)
    models = tiny_models(tmp_path, add_shape=(1024,))
    cluster = clusters.start(f"""
        scheduler: {{heartbeat_interval_s: 0.5, heartbeat_timeout_s: 20}}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1, prefetch: 3999}}
        models:
          - {{name: add, source: {models['add']}}}
    """)
    client = cluster.client()
    pid = worker(cluster.status(), "cpu0")["pid"]
    one = np.ones(1024, np.float32)
    os.kill(pid, signal.SIGSTOP)
    try:
        # when 3,000 tasks of 8 KiB are sent to it at once (24 MB: more than ZMQ's queues
        # of 1,000 messages a side and the kernel's buffers hold),
        futures = [client.submit("add", {"a": one * i, "b": one}, timeout=60)
                   for i in range(3000)]
        wait_for(lambda: worker(cluster.status(), "cpu0")["in_flight"] == 3000, timeout=30,
                 what="every task to be given to the stopped worker")
    finally:
        os.kill(pid, signal.SIGCONT)
    # then once it reads again, every one is answered, by that worker, none re-run.
    results = [f.result(timeout=60) for f in futures]
    assert [float(r["y"][0]) for r in results] == [i + 1.0 for i in range(3000)]
    assert all(not r.attempts for r in results)
    assert worker(cluster.status(), "cpu0")["pid"] == pid
