"""Node membership under the Ray launcher, on real Ray nodes of this machine (ray.cluster_utils).

Per-node devices get a worker on every node; a node that joins mid-run gets its workers and
they take tasks; a node that leaves mid-fan-out loses no task and its workers show as gone; a
device whose resources no node has is gone until a node that has them joins.
Each test removes the nodes it added: the Ray cluster is shared by the session.
"""
from __future__ import annotations

import collections

import numpy as np
import pytest

pytest.importorskip("ray", reason="the Ray launcher's tests need Ray: "
                    "pip install 'ray[default]'")

from .conftest import ClusterFactory, sentences, wait_for, worker  # noqa: E402
from .test_cluster import EMBEDDING, NPU_OPTIONS  # noqa: E402


def check_results(results, batch, reference):
    """CPU results match onnxruntime's exactly; the NPU's within fp16 error."""
    for result, inputs in zip(results, batch):
        expected = reference(inputs)[EMBEDDING]
        if result.device == "npu0":
            assert np.abs(result[EMBEDDING] - expected).max() < 0.02 * np.abs(expected).max()
        else:
            np.testing.assert_allclose(result[EMBEDDING], expected, rtol=1e-5, atol=1e-5)


@pytest.fixture
def on_ray(ray_nodes, tmp_path):
    factory = ClusterFactory(tmp_path, launcher="ray", prefix="fanout-nodes")
    yield factory
    factory.close()


@pytest.fixture
def extra_nodes(ray_nodes):
    """Adds nodes to the session's Ray cluster; removes whichever are still there at the end."""
    added = []

    def add(**resources):
        node = ray_nodes.cluster.add_node(num_cpus=1, resources=resources or None)
        added.append(node)
        ray_nodes.cluster.wait_for_nodes()
        return node

    yield add
    for node in added:
        if node in ray_nodes.cluster.worker_nodes:
            ray_nodes.cluster.remove_node(node)


def instance(node, template: str = "cpu") -> str:
    return f"{template}@{node.node_id[:8]}"


def state_of(status: dict, device: str) -> str | None:
    return next((w["state"] for w in status["workers"] if w["device"] == device), None)


def all_nodes(ray_nodes) -> list:
    return [ray_nodes.cluster.head_node, *ray_nodes.cluster.worker_nodes]


PER_NODE = f"""
    scheduler: {{heartbeat_interval_s: 0.2, heartbeat_timeout_s: 5.0}}
    devices:
      - {{name: npu0, kind: npu, backend: qnn, capacity: 1, resources: {{NPU: 1}}}}
      - {{name: cpu, kind: cpu, backend: onnxruntime, capacity: 2, per_node: true,
          faults: {{hang_s: HANG}}}}
    models:
      - name: minilm
        source: "packaged:minilm"
        devices: [npu0, cpu]
        options: {{npu0: {NPU_OPTIONS}}}
"""


def test_a_per_node_device_runs_on_every_node_and_a_fanout_spreads_over_all_of_them(
        ray_nodes, on_ray, reference):
    cluster = on_ray.start(PER_NODE.replace("HANG", "0.01"))
    status = cluster.status()
    nodes = all_nodes(ray_nodes)
    cpus = {instance(n): ray_nodes.label(n) for n in nodes}
    for name, label in cpus.items():
        w = worker(status, name)
        assert w["state"] == "up" and w["node"] == label and w["template"] == "cpu"
    assert worker(status, "npu0")["node"] == ray_nodes.label(ray_nodes.npu)
    assert {w["device"] for w in status["workers"]} == {"npu0", *cpus}

    batch = sentences(300, seq=12)
    results = cluster.client().map("minilm", batch)
    check_results(results, batch, reference)
    served = collections.Counter(r.device for r in results)
    assert set(served) <= {"npu0", *cpus}
    # 10 ms per CPU task, 2 slots on each node: every node takes a fair part of the 300
    for name in cpus:
        assert served[name] >= 300 / len(cpus) / 3, served
    assert cluster.client().unmatched == 0


def test_a_node_leaving_mid_fanout_loses_nothing_and_a_node_joining_takes_tasks(
        ray_nodes, on_ray, extra_nodes, reference):
    leaving = extra_nodes()
    cluster = on_ray.start(PER_NODE.replace("HANG", "0.25"))
    assert worker(cluster.status(), instance(leaving))["state"] == "up"
    client = cluster.client()
    batch = sentences(300, seq=12)
    futures = [client.submit("minilm", x, timeout=120) for x in batch]
    wait_for(lambda: sum(f.done() for f in futures) >= 30, what="30 tasks done")
    ray_nodes.cluster.remove_node(leaving)
    joining = extra_nodes()
    wait_for(lambda: state_of(on_ray.track(cluster), instance(joining)) == "up",
             timeout=60, what="the joining node's worker to be up")
    assert sum(f.done() for f in futures) < 300, "the fan-out ended before the node joined"
    results = [f.result(timeout=120) for f in futures]

    check_results(results, batch, reference)
    assert client.unmatched == 0  # each result delivered once
    lost = [a for r in results for a in r.attempts if a.kind == "worker_lost"]
    assert lost and {a.device for a in lost} == {instance(leaving)}
    served = collections.Counter(r.device for r in results)
    assert served[instance(joining)] > 0, served
    status = cluster.status()
    assert status["counters"]["completed"] == 300 and status["unanswered"] == 0
    gone = worker(status, instance(leaving))
    assert gone["state"] == "gone" and "left the Ray cluster" in gone["last_exit"]
    assert gone["node"] == ray_nodes.label(leaving)
    assert worker(status, instance(joining))["node"] == ray_nodes.label(joining)
    assert status["cluster"]["ready"]  # a gone worker does not hold readiness


def test_a_device_no_node_can_host_is_gone_until_a_node_with_its_resources_joins(
        ray_nodes, on_ray, extra_nodes):
    # The per-node workers wait 0.2 s a run, so once late0 is up placement prefers it.
    cluster = on_ray.start("""
        devices:
          - {name: late0, kind: cpu, backend: onnxruntime, capacity: 1, resources: {late: 1}}
          - {name: cpu, kind: cpu, backend: onnxruntime, capacity: 2, per_node: true,
             faults: {hang_s: 0.2}}
        models:
          - {name: minilm, source: "packaged:minilm", devices: [late0, cpu]}
    """)
    status = cluster.status()
    assert status["cluster"]["ready"]
    late = worker(status, "late0")
    assert late["state"] == "gone" and "resources {'late': 1.0}" in late["last_exit"]
    client = cluster.client()
    result = client.infer("minilm", sentences(1)[0])
    assert result.device.startswith("cpu@")
    (skipped,) = result.attempts
    assert skipped.device == "late0" and skipped.kind == "worker_gone"

    node = extra_nodes(late=1)
    status = wait_for(lambda: (s := cluster.status()) and worker(s, "late0")["state"] == "up"
                      and s["cluster"]["ready"] and s, timeout=60, what="late0 to be up")
    assert worker(status, "late0")["node"] == ray_nodes.label(node)
    assert client.infer("minilm", sentences(1)[0]).device == "late0"


def test_devices_auto_is_discovered_on_every_node_as_per_node_devices(ray_nodes, on_ray):
    cluster = on_ray.start("""
        devices: auto
        models:
          - {name: minilm, source: "packaged:minilm", devices: [cpu0]}
    """)
    status = cluster.status()
    cpus = {w["device"]: w for w in status["workers"] if w["template"] == "cpu0"}
    assert set(cpus) == {instance(n, "cpu0") for n in all_nodes(ray_nodes)}
    assert all(w["state"] == "up" for w in cpus.values())
    # devices no model names get no workers: discovery found more than cpu0 here
    assert {w["template"] for w in status["workers"]} == {"cpu0"}
    assert cluster.client().infer("minilm", sentences(1)[0]).device in cpus


def test_traffic_is_encrypted_with_keys_made_at_start_and_a_peer_without_them_is_refused(
        on_ray):
    import zmq

    import runtime
    from runtime.errors import Unauthorized
    from runtime.wire import protocol as p
    from runtime.wire.security import apply_client, generate_keys

    cluster = on_ray.start("""
        devices: [{name: cpu, kind: cpu, backend: onnxruntime, per_node: true}]
        models: [{name: minilm, source: "packaged:minilm"}]
    """)
    assert cluster.keys is not None  # generated at start, handed out through Ray
    client = runtime.connect("auto", name=cluster.name)  # found through Ray
    try:
        assert client.infer("minilm", sentences(1)[0]).device.startswith("cpu@")
    finally:
        client.close()
    # The token alone is not enough, nor are other keys.
    for keys in (None, generate_keys()):
        with pytest.raises(Unauthorized, match="CurveZMQ|keys"):
            runtime.connect(cluster.address, token=cluster.token, keys=keys, timeout=5)
    # A worker without the keys cannot register: it never hears back. Nor can one with what
    # Ray hands a client (the token and the client keys): they are not a worker's.
    assert cluster.keys.role == "client"
    ctx = zmq.Context()
    for keys in (None, cluster.keys):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, b"cpu:99")
        if keys is not None:
            apply_client(sock, keys)
        sock.connect(cluster.status()["cluster"]["worker_address"])
        sock.send_multipart(p.encode(p.Register(version=p.PROTOCOL_VERSION, device="cpu",
                                                epoch=99, pid=1, node="x", token=cluster.token,
                                                models={})))
        assert sock.poll(2000) == 0
        sock.close()
    ctx.term()
    assert all(w["epoch"] != 99 for w in cluster.status()["workers"])
    assert cluster.client().infer("minilm", sentences(1)[0]).device.startswith("cpu@")
