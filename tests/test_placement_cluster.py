"""Placement end to end, under both launchers: calibrated at load, never waiting on a slower
device, and a failed or killed device's share moving to the others at once.

The devices are onnxruntime CPU workers, some slowed by the fault wrapper (``hang_s``: the
run waits first), so the speeds are known and sleeping, not competing for this machine's cores.
"""
from __future__ import annotations

import os
import signal

import pytest

from runtime.bench.placement import rate_alone, work_left

from .conftest import sentences, wait_for, worker


@pytest.fixture(scope="module", params=["local", "ray"])
def launcher(request) -> str:
    return request.param


SLOW_PREFERRED = """
    devices:
      - {name: slow, kind: cpu, backend: onnxruntime, capacity: 2, faults: {hang_s: 0.2}}
      - {name: fast, kind: cpu, backend: onnxruntime, capacity: 2}
    models:
      - {name: minilm, source: "packaged:minilm", devices: [slow, fast]}
"""


@pytest.fixture(scope="module")
def slow_preferred(module_clusters):
    return module_clusters.start(SLOW_PREFERRED)


def test_each_device_reports_its_measured_time_per_task_before_any_task_ran(slow_preferred):
    status = slow_preferred.status()
    slow, fast = (worker(status, d)["models"]["minilm"] for d in ("slow", "fast"))
    assert slow["done"] == fast["done"] == 0
    assert slow["expected_s"] >= 0.2  # the warm-up waited like every run there
    assert fast["expected_s"] < 0.1


def test_a_first_fanout_does_not_wait_for_the_slow_preferred_device(slow_preferred):
    results = slow_preferred.client().map("minilm", sentences(20))
    assert {r.device for r in results} == {"fast"}  # the slow one would end a task later
    span = max(r.finished_at for r in results) - min(r.submitted_at for r in results)
    assert span < 0.2  # less than one run of the slow device


def test_when_the_fast_device_fails_its_share_moves_and_the_rest_ends_near_the_fluid_bound(
        clusters):
    cluster = clusters.start("""
        scheduler: {breaker_threshold: 3, breaker_cooldown_s: 600}
        devices:
          - {name: fast, kind: cpu, backend: onnxruntime, capacity: 2,
             faults: {fail_after: 30, message: "accelerator reset"}}
          - {name: mid, kind: cpu, backend: onnxruntime, capacity: 2, faults: {hang_s: 0.05}}
          - {name: slow, kind: cpu, backend: onnxruntime, capacity: 2, faults: {hang_s: 0.1}}
        models:
          - {name: minilm, source: "packaged:minilm", devices: [fast, mid, slow]}
          - {name: minilm-mid, source: "packaged:minilm", devices: [mid]}
          - {name: minilm-slow, source: "packaged:minilm", devices: [slow]}
    """)
    client = cluster.client()
    rates = {d: rate_alone(client, f"minilm-{d}", sentences(20)) for d in ("mid", "slow")}
    results = client.map("minilm", sentences(200))
    failures = sorted(a.ended_at for r in results for a in r.attempts)
    assert len(failures) >= 3 and {a.device for r in results for a in r.attempts} == {"fast"}
    assert worker(cluster.status(), "fast")["models"]["minilm"]["breaker"] == "open"
    opened = failures[-1]  # no task goes to "fast" after this
    after = [r for r in results if r.started_at >= opened]
    assert after and {r.device for r in after} <= {"mid", "slow"}
    fluid = work_left(results, opened) / sum(rates.values())  # at their rates alone
    took = max(r.finished_at for r in results) - opened
    assert took <= 1.2 * fluid, (took, fluid)
    # each survivor took a share in proportion to its rate
    served = {d: sum(r.device == d for r in after) for d in rates}
    assert served["mid"] > served["slow"] > 0


def test_a_fast_device_killed_mid_fanout_leaves_no_task_waiting_for_it(clusters):
    cluster = clusters.start("""
        devices:
          - {name: fast, kind: cpu, backend: onnxruntime, capacity: 2}
          - {name: slow, kind: cpu, backend: onnxruntime, capacity: 4, faults: {hang_s: 0.05}}
        models:
          - {name: minilm, source: "packaged:minilm", devices: [fast, slow]}
    """)
    client = cluster.client()
    futures = [client.submit("minilm", x) for x in sentences(600)]
    wait_for(lambda: sum(f.done() for f in futures) >= 100, what="100 tasks done")
    os.kill(worker(cluster.status(), "fast")["pid"], signal.SIGKILL)
    results = [f.result(timeout=60) for f in futures]
    assert client.unmatched == 0
    ends = sorted(r.finished_at for r in results)
    # No stall: results kept coming from the slow device while "fast" was dead or restarting.
    assert max(b - a for a, b in zip(ends, ends[1:])) < 0.5
    assert any(a.kind == "worker_lost" for r in results for a in r.attempts)
