"""Fixtures: real clusters of real processes, checked at teardown for leftovers."""
from __future__ import annotations

import os
import signal
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import runtime
from runtime.supervisor import process_alive

from ._models import minilm_inputs, minilm_path


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


def worker(status: dict, device: str) -> dict:
    return next(w for w in status["workers"] if w["device"] == device)


class ClusterFactory:
    """Starts clusters from YAML text; at teardown stops them and asserts no process is left."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.clusters: list[runtime.Cluster] = []
        self.pids: set[int] = set()

    def write(self, text: str, name: str = "cluster.yaml") -> Path:
        path = self.tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    def start(self, text: str, **kw) -> runtime.Cluster:
        cluster = runtime.start(self.write(text), **kw)
        self.clusters.append(cluster)
        self.pids.add(cluster.pid)
        self.track(cluster)
        return cluster

    def track(self, cluster: runtime.Cluster) -> dict:
        """Remember every worker pid seen, so teardown can check each one is gone."""
        status = cluster.status()
        self.pids.update(w["pid"] for w in status["workers"] if w["pid"])
        return status

    def close(self) -> None:
        for cluster in self.clusters:
            if cluster.process.poll() is None:
                try:
                    self.track(cluster)
                except Exception:
                    pass
            cluster.shutdown()
        deadline = time.monotonic() + 15
        alive = [p for p in self.pids if process_alive(p)]
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if process_alive(p)]
        for pid in alive:  # do not leak into later tests even when this one fails
            os.kill(pid, signal.SIGKILL)
        assert not alive, f"processes left running after shutdown: {alive}"


@pytest.fixture
def clusters(tmp_path):
    factory = ClusterFactory(tmp_path)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_clusters(tmp_path_factory):
    factory = ClusterFactory(tmp_path_factory.mktemp("cluster"))
    yield factory
    factory.close()
