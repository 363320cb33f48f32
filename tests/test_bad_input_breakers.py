"""Bad input is the task's fault, never the devices': it opens no breaker (issue 11, item 7).

Two healthy CPU workers. Six tasks whose input only the engine can refuse used to fail as
device errors on both, open both breakers, and leave another caller's good task waiting
out the cooldown until its deadline.
"""
from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.backends.onnx_proto import one_node_model
from runtime.errors import InvalidInput, NoDeviceAvailable

from .conftest import sentences


@pytest.fixture(scope="module")
def cluster(module_clusters, tmp_path_factory):
    # y = a + b, with dims the model names apart: only onnxruntime, mid-run, sees a mismatch.
    add = tmp_path_factory.mktemp("models") / "add.onnx"
    add.write_bytes(one_node_model("Add", ["a", "b"], (1, "n"), "add",
                                   {"a": (1, "a_len"), "b": (1, "b_len")}))
    return module_clusters.start(f"""
        scheduler: {{breaker_threshold: 3, breaker_cooldown_s: 30}}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}}
          - {{name: cpu1, kind: cpu, backend: onnxruntime, capacity: 2}}
        models:
          - {{name: minilm, source: "packaged:minilm", devices: [cpu0, cpu1]}}
          - {{name: add, source: "{add}", devices: [cpu0, cpu1]}}
    """)


def breakers(cluster) -> dict:
    return {(w["device"], name): m["breaker"] for w in cluster.status()["workers"]
            for name, m in w["models"].items()}


def test_a_mask_shorter_than_its_input_ids_is_invalid_input_at_once_and_opens_no_breaker(
        cluster):
    x = sentences(1, seq=16)[0]
    bad = {"input_ids": x["input_ids"], "attention_mask": x["attention_mask"][:, :8]}
    caller, other = cluster.client(), runtime.connect(cluster.address)
    try:
        futures = [caller.submit("minilm", bad) for _ in range(6)]
        for f in futures:
            with pytest.raises(InvalidInput, match="must agree on dimension 'sequence_length'"):
                f.result(timeout=30)
            assert f.exception().attempts == []  # refused by the first device, never re-run
        assert set(breakers(cluster).values()) == {"closed"}
        assert other.infer("minilm", x, timeout=3).device in ("cpu0", "cpu1")
    finally:
        other.close()


def test_input_only_the_engine_refuses_on_every_device_opens_no_breaker(cluster):
    a = np.ones((1, 3), np.float32)
    bad = {"a": a, "b": np.ones((1, 4), np.float32)}
    caller, other = cluster.client(), runtime.connect(cluster.address)
    try:
        for f in [caller.submit("add", bad) for _ in range(6)]:
            with pytest.raises(NoDeviceAvailable) as info:
                f.result(timeout=30)
            assert sorted(t.device for t in info.value.attempts) == ["cpu0", "cpu1"]
            assert all(t.kind == "device" for t in info.value.attempts)
        assert set(breakers(cluster).values()) == {"closed"}
        result = other.infer("add", {"a": a, "b": 2 * a}, timeout=3)  # not DeadlineExceeded
        np.testing.assert_array_equal(result["y"], 3 * a)
        status = cluster.status()
        assert status["unanswered"] == 0 and other.unmatched == caller.unmatched == 0
    finally:
        other.close()
