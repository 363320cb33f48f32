"""Dynamic batching in a real cluster: an NPU compiled for a static batch runs the tasks that
fit its shape as one padded call, and a task too large for that shape goes on to the next
device while the rest run."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.backends.onnx_proto import one_node_model

from .conftest import worker

try:
    import onnxruntime_qnn  # noqa: F401
    HAVE_QNN = True
except ImportError:
    HAVE_QNN = False


@pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn is not installed")
def test_a_task_too_large_for_the_npus_static_shape_goes_on_to_the_cpu_and_the_rest_batch(
        clusters, tmp_path):
    # Given a Relu of any shape, compiled on the HTP for a static [2, 8], and a cpu0 slowed
    # (its warm-up too) so that placement sends every task to the NPU first,
    path = tmp_path / "relu.onnx"
    path.write_bytes(one_node_model("Relu", ["x"], ("batch", "n"), "relu"))
    cluster = clusters.start(f"""
        devices:
          - {{name: npu0, kind: npu, backend: qnn, capacity: 1, prefetch: 2}}
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1,
              faults: {{hang_s: 1.0}}}}
        models:
          - name: relu
            source: "{path}"
            devices: [npu0, cpu0]
            options: {{npu0: {{soc_model: "69", shapes: {{x: [2, 8]}}, max_delay_ms: 3000}}}}
    """)
    rng = np.random.default_rng(0)
    batch = [{"x": rng.standard_normal((1, n)).astype(np.float32)} for n in (8, 12, 5)]
    # when the three are fanned out at once,
    results = cluster.client().map("relu", batch, timeout=60)
    # then each gets its own Relu back, cut to its own length,
    for result, inputs in zip(results, batch):
        np.testing.assert_allclose(result["y"], np.maximum(inputs["x"], 0), rtol=1e-3,
                                   atol=1e-3)
    # the one of 12 values was refused by the NPU's static shape and run on the CPU,
    long = results[1]
    assert long.device == "cpu0"
    (attempt,) = long.attempts
    assert attempt.device == "npu0" and attempt.kind == "unsupported"
    assert "static shape" in attempt.message
    # and the two that fit ran on the NPU as one call of its static batch.
    assert results[0].device == results[2].device == "npu0"
    assert not results[0].attempts and not results[2].attempts
    npu = worker(cluster.status(), "npu0")["models"]["relu"]
    assert npu["max_batch"] == 2 and npu["batches"] == {"2": 2}, npu  # two tasks, one call
