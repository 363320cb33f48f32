"""The Ray launcher on a real Ray cluster of several nodes on this machine (ray.cluster_utils)."""
from __future__ import annotations

import textwrap
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray launcher's tests need Ray: "
                          "pip install 'ray[default]'")

import runtime  # noqa: E402
from runtime import ray_launcher  # noqa: E402
from runtime.errors import Unauthorized  # noqa: E402
from runtime.supervisor import process_alive  # noqa: E402

from .conftest import sentences, wait_for, worker  # noqa: E402
from .test_cluster import EMBEDDING, NPU_OPTIONS, assert_matches  # noqa: E402
from .test_resilience import check_results  # noqa: E402

FANOUT = f"""
    devices:
      - {{name: npu0, kind: npu, backend: qnn, capacity: 1, resources: {{NPU: 1}},
          faults: {{fail_after: 0, models: [minilm-flaky], message: "HTP subsystem restart"}}}}
      - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}}
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
      - name: minilm-flaky
        source: "packaged:minilm"
        devices: [npu0, cpu0]
        options: {{npu0: {NPU_OPTIONS}}}
"""


class RayNodes:
    """A head and two more Ray nodes, one with the custom resource {"NPU": 1}."""

    def __init__(self):
        from ray.cluster_utils import Cluster
        started = time.monotonic()
        self.cluster = Cluster(initialize_head=True, connect=True,
                               head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.npu = self.cluster.add_node(num_cpus=1, resources={"NPU": 1})
        self.plain = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        self.start_s = time.monotonic() - started

    def label(self, node) -> str:
        return f"{node.node_ip_address}/{node.node_id[:8]}"

    def labels(self) -> set[str]:
        return {self.label(n) for n in [self.cluster.head_node, self.npu, self.plain]}

    def close(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def nodes():
    nodes = RayNodes()
    print(f"\nRay cluster of 3 nodes up in {nodes.start_s:.1f} s")
    yield nodes
    nodes.close()


def our_actors(name: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == ray_launcher.NAMESPACE
            and (a["name"] == name or a["name"].startswith(name + "-"))]


class RayClusters:
    """Starts Fanout clusters under the Ray launcher; at teardown asserts nothing is left."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.clusters: list = []
        self.pids: set[int] = set()

    def start(self, text: str, name: str):
        path = self.tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(text))
        cluster = ray_launcher.start(path, name=name)
        self.clusters.append(cluster)
        self.pids.add(cluster.pid)
        self.track(cluster)
        return cluster

    def track(self, cluster) -> dict:
        status = cluster.status()
        self.pids.update(w["pid"] for w in status["workers"] if w["pid"])
        return status

    def close(self) -> None:
        for cluster in self.clusters:
            try:
                self.track(cluster)
            except Exception:
                pass
            cluster.shutdown()
        for cluster in self.clusters:
            wait_for(lambda: not our_actors(cluster.name), timeout=15,
                     what=f"the actors of {cluster.name} to be gone")
        wait_for(lambda: not any(process_alive(p) for p in self.pids), timeout=15,
                 what="every scheduler and worker actor process to exit")


@pytest.fixture
def ray_clusters(nodes, tmp_path):
    factory = RayClusters(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def fanout(nodes, tmp_path_factory):
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
    assert not our_actors(ray_launcher.SCHEDULER_NAME)


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
    assert worker(status, "cpu9")["state"] != "up"  # waits for a node with {spare: 1}


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
