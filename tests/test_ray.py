"""The Ray launcher on a real Ray cluster of several nodes on this machine (ray.cluster_utils)."""
from __future__ import annotations

import functools
import textwrap

import numpy as np
import pytest

from .conftest import RAY_NEEDED

ray = pytest.importorskip("ray", reason=RAY_NEEDED)

import runtime  # noqa: E402
from runtime.errors import Unauthorized  # noqa: E402
from runtime.launchers import ray as ray_launcher  # noqa: E402
from runtime.shells.supervisor import process_alive  # noqa: E402

from .conftest import ClusterFactory, our_actors, sentences, wait_for, worker  # noqa: E402
from .test_cluster import EMBEDDING, NPU_OPTIONS, assert_matches  # noqa: E402
from .test_resilience import check_results  # noqa: E402

FANOUT = f"""
    devices:
      - {{name: npu0, kind: npu, backend: qnn, capacity: 1, resources: {{NPU: 1}},
          faults: {{fail_after: 0, models: [minilm-flaky], message: "HTP subsystem restart"}}}}
      - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2,
          faults: {{hang_s: 3.0, models: [minilm-flaky]}}}}
      - {{name: cpu1, kind: cpu, backend: onnxruntime, capacity: 2}}
    models:
      - name: minilm
        source: "packaged:minilm"
        devices: [npu0, cpu0, cpu1]
        options: {{npu0: {NPU_OPTIONS}}}
      - name: minilm-npu
        source: "packaged:minilm"
        devices: [npu0]
        options: {{npu0: {NPU_OPTIONS}}}
      - name: minilm-flaky  # cpu0 waits 3 s a run of it: placement tries the NPU first
        source: "packaged:minilm"
        devices: [npu0, cpu0]
        options: {{npu0: {NPU_OPTIONS}}}
"""


RayClusters = functools.partial(ClusterFactory, launcher="ray")


@pytest.fixture
def nodes(ray_nodes):
    """The shared Ray nodes; any node a test adds is removed after it, for the tests that follow."""
    before = ray_nodes.cluster.list_all_nodes()
    yield ray_nodes
    for node in ray_nodes.cluster.list_all_nodes():
        if node not in before:
            ray_nodes.cluster.remove_node(node)


@pytest.fixture
def ray_clusters(nodes, tmp_path):
    factory = RayClusters(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def fanout(ray_nodes, tmp_path_factory):
    factory = RayClusters(tmp_path_factory.mktemp("ray"))
    yield factory.start(FANOUT, name="fanout-test")
    factory.close()


def test_the_launcher_keyword_of_runtime_start_reaches_the_ray_launcher(nodes, tmp_path):
    path = tmp_path / "one.yaml"
    path.write_text(textwrap.dedent("""
        devices: [{name: cpu0, kind: cpu, backend: onnxruntime}]
        models: [{name: minilm, source: "packaged:minilm"}]
    """))
    with runtime.start(path, launcher="ray") as cluster:
        assert cluster.status()["cluster"]["launcher"] == "ray"
        assert cluster.client().infer("minilm", sentences(1)[0]).device == "cpu0"
    # ray.kill is asynchronous: the name goes once Ray's GCS has the actor's death
    wait_for(lambda: not our_actors(ray_launcher.SCHEDULER_NAME), timeout=15,
             what="the scheduler actor to be gone")


def test_the_cluster_section_of_the_config_chooses_ray_and_names_the_scheduler(nodes, tmp_path):
    path = tmp_path / "ray.yaml"
    path.write_text(textwrap.dedent("""
        cluster: {launcher: ray, name: fanout-from-config}
        devices: [{name: cpu0, kind: cpu, backend: onnxruntime}]
        models: [{name: minilm, source: "packaged:minilm"}]
    """))
    with runtime.start(path) as cluster:
        assert cluster.status()["cluster"]["launcher"] == "ray"
        assert "fanout-from-config" in our_actors("fanout-from-config")
        client = runtime.connect("auto", name="fanout-from-config")
        try:
            assert client.infer("minilm", sentences(1)[0]).device == "cpu0"
        finally:
            client.close()
    wait_for(lambda: not our_actors("fanout-from-config"), timeout=15,
             what="the scheduler actor to be gone")


def test_minilm_fans_out_over_ray_actors_with_correct_outputs_and_devices(fanout, reference):
    batch = sentences(24)
    results = fanout.client().map("minilm", batch)
    assert {r.device for r in results} <= {"npu0", "cpu0", "cpu1"}
    for result, inputs in zip(results, batch):
        if result.device != "npu0":
            assert_matches(result, reference(inputs))
    assert fanout.status()["cluster"]["launcher"] == "ray"


def test_the_npu_worker_actor_serves_on_the_qnn_htp_backend(fanout, reference):
    batch = sentences(2, seq=12)
    for result, inputs in zip(fanout.client().map("minilm-npu", batch), batch):
        assert result.device == "npu0" and result.attempts == []
        expected = reference(inputs)[EMBEDDING]
        assert result[EMBEDDING].shape == expected.shape == (1, 12, 384)
        assert np.abs(result[EMBEDDING] - expected).max() < 0.02 * np.abs(expected).max()


def test_a_device_error_on_the_npu_actor_is_re_run_on_a_cpu_actor_with_the_failover_recorded(
        fanout, reference):
    inputs = sentences(1)[0]
    result = fanout.client().infer("minilm-flaky", inputs)
    assert result.device == "cpu0"
    assert_matches(result, reference(inputs))
    (attempt,) = result.attempts
    assert attempt.device == "npu0" and attempt.kind == "device"
    assert "HTP subsystem restart" in attempt.message


def test_a_device_that_requires_an_npu_resource_runs_on_the_node_that_has_it(fanout, nodes):
    status = fanout.status()
    assert worker(status, "npu0")["node"] == nodes.label(nodes.npu)
    assert {worker(status, d)["node"] for d in ("cpu0", "cpu1")} <= nodes.labels()
    assert status["cluster"]["node"] in nodes.labels()


def test_a_client_finds_the_scheduler_through_ray_and_one_without_the_token_is_refused(fanout):
    assert not fanout.address.startswith("tcp://127.")  # reachable from the other nodes
    client = ray_launcher.connect("fanout-test")
    try:
        assert client.infer("minilm", sentences(1)[0]).device in ("npu0", "cpu0", "cpu1")
    finally:
        client.close()
    with pytest.raises(Unauthorized):
        runtime.connect(fanout.address, token="not-the-token", timeout=5)


def test_a_worker_actor_killed_mid_fanout_loses_nothing_and_is_restarted(ray_clusters, reference):
    cluster = ray_clusters.start("""
        scheduler: {heartbeat_interval_s: 0.2, heartbeat_timeout_s: 5.0}
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2, faults: {hang_s: 0.01}}
          - {name: cpu1, kind: cpu, backend: onnxruntime, capacity: 2, faults: {hang_s: 0.01}}
        models:
          - {name: minilm, source: "packaged:minilm", devices: [cpu0, cpu1]}
    """, name="fanout-kill")
    client = cluster.client()
    batch = sentences(200)
    victim = worker(cluster.status(), "cpu0")["pid"]
    futures = [client.submit("minilm", x) for x in batch]
    wait_for(lambda: sum(f.done() for f in futures) >= 40, what="40 tasks done")
    (actor,) = [n for n in our_actors("fanout-kill") if n.startswith("fanout-kill-cpu0-")]
    ray.kill(ray.get_actor(actor, namespace=ray_launcher.NAMESPACE))
    results = [f.result(timeout=60) for f in futures]

    assert len(results) == 200
    check_results(results, batch, reference)
    lost = [a for r in results for a in r.attempts if a.kind == "worker_lost"]
    assert lost and all(a.device == "cpu0" and "ray.kill" in a.message for a in lost)
    assert client.unmatched == 0  # no task answered twice
    status = wait_for(lambda: (s := ray_clusters.track(cluster))
                      and worker(s, "cpu0")["state"] == "up" and s, what="cpu0 to be restarted")
    cpu0 = worker(status, "cpu0")
    assert cpu0["pid"] != victim and cpu0["restarts"] == 1 and cpu0["lost"] == 1
    assert status["counters"]["completed"] == 200 and status["unanswered"] == 0
    assert not process_alive(victim)
    assert client.infer("minilm", batch[0]).device in ("cpu0", "cpu1")


def test_a_node_removed_mid_fanout_loses_nothing_and_the_scheduler_stays_up(
        nodes, ray_clusters, reference):
    # Each worker pinned to a node of its own: Ray's SPREAD alone may put both on the node
    # that is about to go, and the test is about losing one node's worker, not both.
    spare = nodes.cluster.add_node(num_cpus=1, resources={"spare": 1})
    stay = nodes.cluster.add_node(num_cpus=1, resources={"stay": 1})
    nodes.cluster.wait_for_nodes()
    cluster = ray_clusters.start("""
        scheduler: {heartbeat_interval_s: 0.2, heartbeat_timeout_s: 5.0}
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2, faults: {hang_s: 0.01},
             resources: {stay: 1}}
          - {name: cpu9, kind: cpu, backend: onnxruntime, capacity: 2, faults: {hang_s: 0.01},
             resources: {spare: 1}}
        models:
          - {name: minilm, source: "packaged:minilm", devices: [cpu0, cpu9]}
    """, name="fanout-node")
    status = cluster.status()
    assert worker(status, "cpu9")["node"] == nodes.label(spare)
    assert worker(status, "cpu0")["node"] == nodes.label(stay)
    client = cluster.client()
    batch = sentences(200)
    futures = [client.submit("minilm", x) for x in batch]
    wait_for(lambda: sum(f.done() for f in futures) >= 40, what="40 tasks done")
    nodes.cluster.remove_node(spare)
    results = [f.result(timeout=60) for f in futures]

    check_results(results, batch, reference)
    lost = [a for r in results for a in r.attempts if a.kind == "worker_lost"]
    assert lost and all(a.device == "cpu9" and "node" in a.message for a in lost)
    assert client.unmatched == 0
    status = cluster.status()  # the scheduler's node is the caller's, not the removed one
    assert status["counters"]["completed"] == 200 and status["unanswered"] == 0
    cpu9 = wait_for(lambda: (w := worker(cluster.status(), "cpu9"))["state"] == "gone" and w,
                    what="cpu9 to show as gone")  # until a node with {spare: 1} joins
    assert "resources {'spare': 1.0}" in cpu9["last_exit"]


def test_shutting_down_leaves_no_ray_actor_and_no_process_behind(nodes, tmp_path):
    factory = RayClusters(tmp_path)
    cluster = factory.start("""
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime}
          - {name: cpu1, kind: cpu, backend: onnxruntime}
        models: [{name: minilm, source: "packaged:minilm"}]
    """, name="fanout-down")
    assert sorted(our_actors("fanout-down")) == [
        "fanout-down", "fanout-down-cpu0-1", "fanout-down-cpu1-1"]
    pids = set(factory.pids)
    assert len(pids) == 3 and all(process_alive(p) for p in pids)
    cluster.shutdown()
    wait_for(lambda: not our_actors("fanout-down"), timeout=15, what="the actors to be gone")
    wait_for(lambda: not any(process_alive(p) for p in pids), timeout=15,
             what="the scheduler and worker actor processes to exit")
    cluster.shutdown()  # idempotent


def test_a_ray_client_finds_the_scheduler_with_runtime_connect_ray_url(fanout, nodes):
    import subprocess
    import sys

    script = textwrap.dedent(f"""
        import numpy as np, runtime
        client = runtime.connect("ray://127.0.0.1:{nodes.client_port}", name="fanout-test")
        ids = np.arange(1, 9, dtype=np.int64).reshape(1, 8)
        result = client.infer("minilm", {{"input_ids": ids, "attention_mask": np.ones_like(ids)}})
        print("served by", result.device, "at", client.address)
        client.close()
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("served by"))
    assert line.split()[2] in ("npu0", "cpu0", "cpu1")
    assert line.endswith(fanout.address)  # the address, token and keys came through Ray
