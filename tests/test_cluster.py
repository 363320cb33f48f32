"""End to end on real processes and engines: which device serves, and failover to CPU."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import sentences, wait_for, worker

EMBEDDING = "onnx::Shape_422"  # MiniLM's last hidden state [batch, seq, 384]
NPU_OPTIONS = '{shapes: {input_ids: [1, 32], attention_mask: [1, 32]}, soc_model: "69"}'


@pytest.fixture(scope="module", params=["local", "ray"])
def launcher(request) -> str:
    """Every test here runs under both launchers."""
    return request.param


def assert_matches(result, expected, rtol=1e-5, atol=1e-5):
    assert set(result.outputs) == set(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(result.outputs[name], want, rtol=rtol, atol=atol,
                                   err_msg=f"output {name} from {result.device}")


def test_onnxruntime_and_openvino_cpu_workers_match_a_direct_session(clusters, reference):
    cluster = clusters.start("""
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
          - {name: ovcpu, kind: cpu, backend: openvino, capacity: 1}
        models:
          - {name: minilm, source: "packaged:minilm", devices: [cpu0]}
          - {name: minilm-ov, source: "packaged:minilm", devices: [ovcpu]}
    """)
    client = cluster.client()
    batch = sentences(6)
    for result, inputs in zip(client.map("minilm", batch), batch):
        assert result.device == "cpu0" and result.attempts == []
        assert_matches(result, reference(inputs))
    for result, inputs in zip(client.map("minilm-ov", batch), batch):
        assert result.device == "ovcpu" and result.attempts == []
        expected = reference(inputs)
        np.testing.assert_allclose(result[EMBEDDING], expected[EMBEDDING], rtol=1e-3, atol=1e-4)
        np.testing.assert_array_equal(result["output"], expected["output"])


def test_npu_worker_serves_minilm_correctly_on_the_qnn_htp_backend(clusters, reference):
    cluster = clusters.start(f"""
        devices:
          - {{name: npu0, kind: npu, backend: qnn, capacity: 1}}
        models:
          - name: minilm
            source: "packaged:minilm"
            devices: [npu0]
            options: {{npu0: {NPU_OPTIONS}}}
    """)
    batch = sentences(2, seq=12)  # padded to the static 32 on the NPU, cut back after
    for result, inputs in zip(cluster.client().map("minilm", batch), batch):
        assert result.device == "npu0"
        expected = reference(inputs)
        assert result[EMBEDDING].shape == expected[EMBEDDING].shape == (1, 12, 384)
        # The HTP computes in fp16: compare within its error, relative to the output's scale.
        scale = np.abs(expected[EMBEDDING]).max()
        assert np.abs(result[EMBEDDING] - expected[EMBEDDING]).max() < 0.02 * scale
    assert worker(cluster.status(), "npu0")["models"]["minilm"]["state"] == "ready"


@pytest.fixture(scope="module")
def broken_npus(module_clusters):
    """QNN HTP without soc_model (fails to load) and OpenVINO NPU (no driver here), then CPU."""
    return module_clusters.start("""
        devices:
          - {name: npu0, kind: npu, backend: qnn, capacity: 1}
          - {name: ovnpu, kind: npu, backend: openvino, capacity: 1}
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
        models:
          - name: minilm
            source: "packaged:minilm"
            devices: [npu0, ovnpu, cpu0]
            options:
              npu0: {shapes: {input_ids: [1, 32], attention_mask: [1, 32]}}
              ovnpu: {shapes: {input_ids: [1, 32], attention_mask: [1, 32]}}
    """)


def test_qnn_load_failure_shows_as_unavailable_with_the_engine_error(broken_npus):
    model = worker(broken_npus.status(), "npu0")["models"]["minilm"]
    assert model["state"] == "unavailable"
    assert "QNN_COMMON_ERROR_MEM_ALLOC" in model["error"]


def test_openvino_npu_without_a_driver_shows_as_unavailable(broken_npus):
    status = broken_npus.status()
    model = worker(status, "ovnpu")["models"]["minilm"]
    assert model["state"] == "unavailable" and model["error"]
    assert worker(status, "ovnpu")["state"] == "up"  # the worker lives on without the model


def test_every_task_completes_on_cpu_when_the_npus_cannot_load(broken_npus, reference):
    batch = sentences(12)
    results = broken_npus.client().map("minilm", batch)
    for result, inputs in zip(results, batch):
        assert result.device == "cpu0"
        assert_matches(result, reference(inputs))
        # Each result says why it did not run on the preferred devices.
        assert [(a.device, a.kind) for a in result.attempts] == [
            ("npu0", "model_unavailable"), ("ovnpu", "model_unavailable")]
        assert "QNN_COMMON_ERROR_MEM_ALLOC" in result.attempts[0].message


def test_device_errors_at_run_time_are_re_run_on_cpu_with_the_failover_recorded(
        clusters, reference):
    # Without a warm-up npu0 counts as fast as cpu0, so the order sends tasks there first.
    cluster = clusters.start("""
        scheduler: {breaker_threshold: 2, breaker_cooldown_s: 60}
        devices:
          - {name: npu0, kind: npu, backend: qnn, capacity: 1,
              faults: {fail_after: 0, message: "HTP subsystem restart"}}
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
        models:
          - name: minilm
            source: "packaged:minilm"
            devices: [npu0, cpu0]
            options:
              npu0: {shapes: {input_ids: [1, 32], attention_mask: [1, 32]}, soc_model: "69",
                     warmup: false}
    """)
    client = cluster.client()
    batch = sentences(8)
    results = [client.infer("minilm", x) for x in batch]  # one at a time: npu0 is tried first
    failed_over = [r for r in results if r.failed_over]
    assert len(failed_over) == 2  # then the breaker keeps tasks off npu0
    for result, inputs in zip(results, batch):
        assert result.device == "cpu0"
        assert_matches(result, reference(inputs))
    for result in failed_over:
        (attempt,) = result.attempts
        assert attempt.device == "npu0" and attempt.kind == "device"
        assert "HTP subsystem restart" in attempt.message
    npu = worker(cluster.status(), "npu0")
    assert npu["failed_over"] == 2 and npu["models"]["minilm"]["breaker"] == "open"


def test_fanout_of_64_never_runs_two_tasks_at_once_on_the_npu(clusters, reference):
    # cpu0 is slowed (a fault wrapper adds 0.15 s a run) so the NPU keeps getting work.
    cluster = clusters.start(f"""
        devices:
          - {{name: npu0, kind: npu, backend: qnn, capacity: 1}}
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2, faults: {{hang_s: 0.15}}}}
        models:
          - name: minilm
            source: "packaged:minilm"
            devices: [npu0, cpu0]
            options: {{npu0: {NPU_OPTIONS}}}
    """)
    batch = sentences(64)
    results = cluster.client().map("minilm", batch)
    assert len(results) == 64
    served = {r.device for r in results}
    assert served == {"npu0", "cpu0"}
    for result, inputs in zip(results, batch):
        if result.device == "cpu0":
            assert_matches(result, reference(inputs))
    status = wait_for(lambda: (s := cluster.status()) and worker(s, "npu0")["peak_running"]
                      and worker(s, "cpu0")["peak_running"] == 2 and s,
                      what="the workers' heartbeats to report their peaks")
    npu = worker(status, "npu0")
    assert npu["done"] >= 2, "the NPU should have served several tasks of the fan-out"
    assert npu["peak_running"] == 1  # measured inside the worker, around the engine call
    assert worker(status, "cpu0")["peak_running"] == 2  # the measure does see concurrency
    assert status["counters"]["completed"] == 64
