"""Dynamic batching in the worker's core, on real engines: waiting tasks of one model run as one
engine call and each gets back what it would have got alone (within floating-point error), on
onnxruntime CPU, the QNN HTP simulator (a static batch, padded to) and OpenVINO CPU."""
from __future__ import annotations

import queue
import time

import numpy as np
import pytest

from runtime.backends.base import CancelToken, ModelSpec
from runtime.backends.faults import FaultyBackend
from runtime.backends.onnx import OnnxCpuBackend, QnnBackend
from runtime.backends.onnx_proto import one_node_model
from runtime.backends.openvino_backend import OpenVinoBackend
from runtime.config.schema import FaultConfig
from runtime.core.batching import batching_for
from runtime.core.tensors import fit_inputs
from runtime.core.worker import LoadChanged, Outcome, WorkerCore

from ._models import minilm_inputs, minilm_path

OUTPUTS = ("onnx::Shape_422", "461")  # MiniLM: every token's state [b, seq, 384], pooled [b, 384]

try:
    import onnxruntime_qnn  # noqa: F401
    HAVE_QNN = True
except ImportError:
    HAVE_QNN = False
needs_qnn = pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn is not installed")


class Events(queue.SimpleQueue):
    def ready(self, timeout: float = 120.0) -> LoadChanged:
        while True:
            event = self.get(timeout=timeout)
            if isinstance(event, LoadChanged) and event.load.state != "loading":
                assert event.load.state == "ready", event.load
                return event

    def outcomes(self, n: int, timeout: float = 60.0) -> dict[int, Outcome]:
        got: dict[int, Outcome] = {}
        while len(got) < n:
            event = self.get(timeout=timeout)
            if isinstance(event, Outcome):
                assert event.attempt not in got, f"attempt {event.attempt} answered twice"
                got[event.attempt] = event
        return got


def start_core(backend, options: dict, capacity: int = 1, cache: str | None = None,
               path: str | None = None, name: str = "minilm"):
    events = Events()
    spec = ModelSpec(name, path or str(minilm_path()), options, cache)
    core = WorkerCore("dev0", capacity, backend, [spec], events.put)
    core.start_loading()
    loaded = events.ready()
    return core, events, loaded


def texts(lengths: list[int]) -> list[dict[str, np.ndarray]]:
    return [minilm_inputs(1, n, seed=i) for i, n in enumerate(lengths)]


def alone(session, inputs: dict[str, np.ndarray], model: str = "minilm") -> dict:
    """What one task gets run by itself (the unbatched path: fitted, run, cut back)."""
    fitted, padding = fit_inputs(session.inputs, inputs, model, "dev0")
    return padding.unpad(session.run(fitted, CancelToken()))


def assert_close(got: dict, want: dict, tol: float) -> None:
    for name in OUTPUTS:
        assert got[name].shape == want[name].shape, name
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol)


def run_all(core: WorkerCore, events: Events, batch: list[dict],
            model: str = "minilm") -> list[Outcome]:
    for attempt, inputs in enumerate(batch, start=1):
        core.run(attempt, model, inputs)
    got = events.outcomes(len(batch))
    return [got[a] for a in range(1, len(batch) + 1)]


@pytest.fixture
def cpu_core():
    """MiniLM on onnxruntime CPU, up to 4 rows a call; a batch waits up to 0.5 s to fill."""
    core, events, loaded = start_core(OnnxCpuBackend(), {"max_batch": 4, "max_delay_ms": 500})
    yield core, events, loaded
    core.close()


def test_queued_tasks_of_different_lengths_run_as_one_call_and_match_their_runs_alone(cpu_core):
    core, events, loaded = cpu_core
    batch = texts([16, 9, 16, 12])
    outcomes = run_all(core, events, batch)
    assert [o.kind for o in outcomes] == [None] * 4
    assert [o.batch for o in outcomes] == [4] * 4  # one engine call
    session = core.sessions["minilm"]
    for outcome, inputs in zip(outcomes, batch):
        assert_close(outcome.outputs, alone(session, inputs), 1e-4)  # padding masked out
    assert loaded.load.max_batch == 4
    assert loaded.load.calibration.batch == 4 and loaded.load.calibration.batch_service_s > 0


def test_a_batch_takes_at_most_max_batch_rows_and_the_rest_form_the_next(cpu_core):
    core, events, _ = cpu_core
    batch = texts([8] * 6) + [minilm_inputs(3, 8, seed=9)]  # a task of 3 rows
    outcomes = run_all(core, events, batch)
    assert [o.batch for o in outcomes] == [4, 4, 4, 4, 2, 2, 1]  # 4 rows, 2 + ... no room for 3
    assert outcomes[-1].outputs[OUTPUTS[0]].shape == (3, 8, 384)


def test_a_lone_task_waits_no_longer_than_max_delay(cpu_core):
    core, events, _ = cpu_core
    started = time.perf_counter()
    (outcome,) = run_all(core, events, texts([8]))
    assert outcome.batch == 1 and 0.45 < time.perf_counter() - started < 5.0


def test_without_pad_only_tasks_of_one_shape_share_a_call():
    core, events, _ = start_core(OnnxCpuBackend(), {"max_batch": 8, "max_delay_ms": 300,
                                                    "pad": False})
    try:
        outcomes = run_all(core, events, texts([8, 12, 8, 12, 8]))
        assert [o.batch for o in outcomes] == [3, 2, 3, 2, 3]
    finally:
        core.close()


def test_a_batch_that_fails_runs_each_task_alone_so_only_the_bad_one_fails(cpu_core):
    core, events, _ = cpu_core
    batch = texts([8, 8, 8])
    bad = {k: v.copy() for k, v in batch[1].items()}
    bad["input_ids"][0, 3] = 10**9  # no such token: the engine refuses the whole call
    outcomes = run_all(core, events, [batch[0], bad, batch[2]])
    assert outcomes[1].kind is not None and outcomes[1].outputs is None
    session = core.sessions["minilm"]
    for outcome, inputs in ((outcomes[0], batch[0]), (outcomes[2], batch[2])):
        assert outcome.kind is None and outcome.batch == 1
        assert_close(outcome.outputs, alone(session, inputs), 1e-5)


def test_a_cancel_of_a_waiting_task_is_answered_at_once_while_the_slot_stays_busy():
    backend = FaultyBackend(OnnxCpuBackend(), FaultConfig(hang_s=30.0))
    core, events, _ = start_core(backend, {"warmup": False})
    try:
        core.run(1, "minilm", texts([8])[0])  # hangs in the only slot
        core.run(2, "minilm", texts([8])[0])  # waits behind it
        core.cancel(2)
        got = events.outcomes(1, timeout=5.0)
        assert got[2].kind == "cancelled" and core.in_flight() == 1
        core.cancel(1)
        assert events.outcomes(1, timeout=10.0)[1].kind == "cancelled"
        assert core.in_flight() == 0
    finally:
        core.close()


def test_batching_is_off_unless_asked_or_a_static_batch_is_compiled():
    from runtime.backends.base import TensorSpec
    free = [TensorSpec("x", "float32", (None, 8))]
    assert batching_for(free, {}) is None
    assert batching_for(free, {"max_batch": 16}).max_rows == 16
    static = [TensorSpec("x", "float32", (4, 8))]
    assert batching_for(static, {}).max_rows == 4 and batching_for(static, {}).static_rows == 4
    assert batching_for(static, {"max_batch": 2}).max_rows == 2
    assert batching_for(static, {"max_batch": 1}) is None
    assert batching_for([TensorSpec("x", "float32", (1, 8))], {"max_batch": 8}) is None
    # a vector's one static axis is its length: no batch of 1,024 tasks a call
    assert batching_for([TensorSpec("x", "float32", (1024,))], {}) is None


def test_openvino_batched_results_match_its_runs_alone():
    core, events, _ = start_core(OpenVinoBackend("CPU"), {"max_batch": 4, "max_delay_ms": 500})
    try:
        batch = texts([16, 10, 13])
        outcomes = run_all(core, events, batch)
        assert [o.batch for o in outcomes] == [3] * 3
        session = core.sessions["minilm"]
        for outcome, inputs in zip(outcomes, batch):
            assert_close(outcome.outputs, alone(session, inputs), 1e-4)
    finally:
        core.close()


@needs_qnn
def test_qnn_static_batch_runs_what_fits_and_sends_a_too_long_task_on(tmp_path):
    """HTP compiled for a static [2, 8] (a Relu: zero padding leaves it alone): two tasks
    share a call, padded to 8 values; one of 12 cannot run on it and fails as unsupported,
    for the next device to take."""
    path = tmp_path / "relu.onnx"
    path.write_bytes(one_node_model("Relu", ["x"], (2, 8), "relu"))
    core, events, loaded = start_core(QnnBackend("npu"), {"soc_model": "69",
                                                          "max_delay_ms": 2000},
                                      cache=str(tmp_path), path=str(path), name="relu")
    try:
        assert loaded.load.max_batch == 2 and loaded.load.detail == "ready"  # its static batch
        rng = np.random.default_rng(0)
        batch = [{"x": rng.random((1, n), dtype=np.float32)} for n in (8, 12, 5)]
        outcomes = run_all(core, events, batch, "relu")
        assert outcomes[1].kind == "unsupported" and "static shape" in outcomes[1].message
        assert outcomes[0].batch == outcomes[2].batch == 2
        session = core.sessions["relu"]
        for outcome, inputs in ((outcomes[0], batch[0]), (outcomes[2], batch[2])):
            want = alone(session, inputs, "relu")
            np.testing.assert_allclose(outcome.outputs["y"], want["y"], rtol=1e-3, atol=1e-3)
    finally:
        core.close()


@needs_qnn
def test_qnn_minilm_whose_batch_rows_come_out_wrong_runs_task_by_task(tmp_path):
    """The HTP simulator computes MiniLM's second row of a [2, 16] batch wrongly: the check
    at load finds it, and each task runs alone (padded) and gets its own right answer."""
    shapes = {"input_ids": [2, 16], "attention_mask": [2, 16]}
    core, events, loaded = start_core(QnnBackend("npu"), {
        "soc_model": "69", "shapes": shapes, "warmup": False}, cache=str(tmp_path))
    try:
        assert loaded.load.max_batch == 1
        assert "batching off" in loaded.load.detail and "identical rows" in loaded.load.detail
        batch = texts([16, 11])
        outcomes = run_all(core, events, batch)
        assert [o.batch for o in outcomes] == [1, 1]
        session = core.sessions["minilm"]
        for outcome, inputs in zip(outcomes, batch):
            assert_close(outcome.outputs, alone(session, inputs), 1e-5)
    finally:
        core.close()
