"""Fixtures: real clusters of real processes, checked at teardown for leftovers."""
from __future__ import annotations

import os
import re
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

import runtime
from runtime.shells.supervisor import process_alive

from ._models import minilm_inputs, minilm_path
from ._peers import tiny_models


@pytest.fixture(scope="session")
def minilm() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def reference(minilm):
    """MiniLM run directly in this process on the onnxruntime CPU EP: the expected outputs."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(minilm), providers=["CPUExecutionProvider"])

    def run(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(None, inputs)))
    return run


def sentences(n: int, seq: int = 16) -> list[dict[str, np.ndarray]]:
    """``n`` distinct MiniLM inputs."""
    return [minilm_inputs(1, seq, seed=i) for i in range(n)]


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def in_session(sid: int) -> list[str]:
    """Processes of a session: every descendant of its leader that did not call setsid."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited meanwhile
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
        if fields[0] != "Z" and int(fields[3]) == sid:
            found.append(text[:text.rindex(")") + 1])
    return found


def worker(status: dict, device: str) -> dict:
    return next(w for w in status["workers"] if w["device"] == device)


RAY_NEEDED = "the Ray launcher's tests need Ray: pip install 'ray[default]'"


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayNodes:
    """A head and two more Ray nodes, one with the custom resource {"NPU": 1}."""

    def __init__(self):
        from ray.cluster_utils import Cluster
        started = time.monotonic()
        self.client_port = _free_port()
        self.cluster = Cluster(initialize_head=True, connect=True,
                               head_node_args={"num_cpus": 1, "include_dashboard": False,
                                               # clients may join with ray://127.0.0.1:PORT
                                               "ray_client_server_port": self.client_port})
        self.npu = self.cluster.add_node(num_cpus=1, resources={"NPU": 1})
        self.plain = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        self.start_s = time.monotonic() - started

    def label(self, node) -> str:
        return f"{node.node_ip_address}/{node.node_id[:8]}"

    def labels(self) -> set[str]:
        return {self.label(n) for n in [self.cluster.head_node, self.npu, self.plain]}

    def close(self) -> None:
        import ray
        ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="session")
def ray_nodes():
    """The session's one Ray cluster (``ray.init`` is process-global), made on first use."""
    pytest.importorskip("ray", reason=RAY_NEEDED)
    nodes = RayNodes()
    print(f"\nRay cluster of 3 nodes up in {nodes.start_s:.1f} s")
    yield nodes
    nodes.close()


def our_actors(name: str) -> list[str]:
    """The live Ray actors of the Fanout cluster ``name``: its scheduler and its workers."""
    import ray

    from runtime.launchers import ray as ray_launcher
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == ray_launcher.NAMESPACE
            and (a["name"] == name or a["name"].startswith(name + "-"))]


SLOW_TEARDOWN_S = 5.0  # a teardown's status taking longer is worth a warning with stacks


class ClusterFactory:
    """Starts clusters from YAML text under one launcher ("local" or "ray"); at teardown stops
    them and asserts no process (and, under Ray, no actor) is left."""

    def __init__(self, tmp_path: Path, launcher: str = "local", prefix: str = "fanout"):
        self.tmp_path = tmp_path
        self.launcher = launcher
        self.prefix = prefix
        self.clusters: list = []
        self.pids: set[int] = set()

    def write(self, text: str, name: str = "cluster.yaml") -> Path:
        path = self.tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    def start(self, text: str, name: str | None = None, **kw):
        """``name``: the Ray scheduler actor's (default: unique per factory and start)."""
        if self.launcher == "ray":
            from runtime.launchers import ray as ray_launcher
            if name is None:
                name = f"{self.prefix}-{len(self.clusters) + 1}" if self.clusters else self.prefix
            cluster = ray_launcher.start(self.write(text, f"{name}.yaml"), name=name, **kw)
        else:
            cluster = runtime.start(self.write(text, f"{name or 'cluster'}.yaml"), **kw)
        self.clusters.append(cluster)
        self.pids.add(cluster.pid)
        self.track(cluster)
        return cluster

    def say_where(self, cluster, took: float, answered: bool) -> None:
        """A running scheduler that did not answer the teardown's status, or took seconds to
        (30 s teardowns were seen twice after test_client_liveness's SIGSTOP test, never
        alone): a warning with where its threads are, in the run's warnings summary."""
        import warnings

        from runtime.bench.chaos import _stacks
        try:
            where = _stacks(cluster.pid, "scheduler")
        except Exception as exc:
            where = f"no stacks: {exc}"
        what = f"took {took:.1f} s to answer" if answered else \
            f"did not answer (after {took:.1f} s)"
        warnings.warn(f"{self.prefix}: the scheduler {what} the teardown's status; "
                      f"{where[:3000]}", stacklevel=1)

    def track(self, cluster) -> dict:
        """Remember every worker pid seen, so teardown can check each one is gone."""
        status = cluster.status()
        self.pids.update(w["pid"] for w in status["workers"] if w["pid"])
        return status

    def close(self) -> None:
        for cluster in self.clusters:
            if not isinstance(cluster, runtime.Cluster) or cluster.process.poll() is None:
                asked, answered = time.monotonic(), True
                try:
                    self.track(cluster)
                except Exception:
                    answered = False
                took = time.monotonic() - asked
                if (not answered or took > SLOW_TEARDOWN_S) and isinstance(
                        cluster, runtime.Cluster) and cluster.process.poll() is None:
                    self.say_where(cluster, took, answered)
            cluster.shutdown()
        names = [c.name for c in self.clusters] if self.launcher == "ray" else []
        deadline = time.monotonic() + 15
        actors = [a for n in names for a in our_actors(n)]
        while actors and time.monotonic() < deadline:
            time.sleep(0.1)
            actors = [a for n in names for a in our_actors(n)]
        alive = [p for p in self.pids if process_alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if process_alive(p)]
        for pid in alive:  # do not leak into later tests even when this one fails
            os.kill(pid, signal.SIGKILL)
        assert not actors, f"Ray actors left after shutdown: {actors}"
        assert not alive, f"scheduler or worker processes left running after shutdown: {alive}"


def factory_for(request, launcher: str, tmp_path: Path) -> ClusterFactory:
    """A factory named after the test (or module) asking; "ray" brings up the shared Ray nodes."""
    if launcher == "ray":
        request.getfixturevalue("ray_nodes")
    prefix = re.sub(r"[^\w.]+", "-", request.node.name).strip("-")  # test_x[ray] -> test_x-ray
    return ClusterFactory(tmp_path, launcher, prefix)


@pytest.fixture(scope="session")
def launcher() -> str:
    """The launcher of ``clusters``; a module that runs under both overrides this with params."""
    return "local"


@pytest.fixture
def clusters(request, launcher, tmp_path):
    factory = factory_for(request, launcher, tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_clusters(request, launcher, tmp_path_factory):
    factory = factory_for(request, launcher, tmp_path_factory.mktemp("cluster"))
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny ONNX models of ``_peers`` (no-op and friends), built once per module."""
    return tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture
def ctx():
    """A ZMQ context for raw sockets posing as peers, destroyed without lingering."""
    context = zmq.Context()
    yield context
    context.destroy(linger=0)
