"""The warm-up a worker runs when a model loads (runtime/core/warmup.py), on real engines."""
from __future__ import annotations

import time

import numpy as np
import pytest

from runtime import env
from runtime.backends.base import CancelToken, ModelSpec, TensorSpec
from runtime.backends.faults import FaultyBackend
from runtime.backends.genai import GenAIBackend
from runtime.backends.onnx import OnnxCpuBackend
from runtime.config.schema import FaultConfig
from runtime.core import warmup
from runtime.core.worker import LoadChanged, WorkerCore
from runtime.errors import DeviceError
from runtime.launchers.models import fetch

from ._models import minilm_inputs, minilm_path


def quiet(_note: str) -> None:
    pass


@pytest.fixture(scope="module")
def minilm() -> str:
    return str(minilm_path())


def test_a_representative_input_keeps_static_dims_and_fills_free_ones():
    specs = [TensorSpec("input_ids", "int64", (None, None)),
             TensorSpec("pixels", "float32", (1, 3, None, 8))]
    got = warmup.representative_inputs(specs)
    assert got["input_ids"].shape == (1, warmup.DEFAULT_FREE_DIM)
    assert got["pixels"].shape == (1, 3, warmup.DEFAULT_FREE_DIM, 8)
    assert got["input_ids"].dtype == np.int64 and not got["pixels"].any()


def test_the_warmup_option_sets_the_shape_of_an_input():
    specs = [TensorSpec("input_ids", "int64", (None, None))]
    got = warmup.representative_inputs(specs, {"input_ids": [2, 64]})
    assert got["input_ids"].shape == (2, 64)


def test_warming_up_a_cpu_session_measures_a_run_and_the_cpu_it_used(minilm):
    session = OnnxCpuBackend().load(ModelSpec("minilm", minilm), quiet)
    calibration = warmup.warm_up(session, ModelSpec("minilm", minilm), capacity=2)
    assert 0 < calibration.service_s < 1.0
    assert calibration.cpu_s is not None and calibration.host_cores > 0


def test_warmup_false_skips_it(minilm):
    session = OnnxCpuBackend().load(ModelSpec("minilm", minilm), quiet)
    assert warmup.warm_up(session, ModelSpec("minilm", minilm, {"warmup": False}), 2) is None


def test_the_fault_wrapper_delays_a_warm_up_but_neither_counts_nor_fails_it(minilm):
    backend = FaultyBackend(OnnxCpuBackend(), FaultConfig(fail_after=1, hang_s=0.1))
    session = backend.load(ModelSpec("minilm", minilm), quiet)
    calibration = warmup.warm_up(session, ModelSpec("minilm", minilm), capacity=1)
    assert calibration.service_s >= 0.1  # the drill's slow device is measured as slow
    session.run(minilm_inputs(seq=8), CancelToken())  # the first task's run still succeeds
    with pytest.raises(DeviceError, match="run 2"):
        session.run(minilm_inputs(seq=8), CancelToken())


def test_a_warm_up_that_runs_too_long_is_stopped_and_reported_as_at_least_the_limit(
        minilm, monkeypatch):
    monkeypatch.setattr(warmup, "WARMUP_TIMEOUT_S", 0.2)
    session = FaultyBackend(OnnxCpuBackend(), FaultConfig(hang_s=30)).load(
        ModelSpec("minilm", minilm), quiet)
    started = time.perf_counter()
    calibration = warmup.warm_up(session, ModelSpec("minilm", minilm), capacity=1)
    assert time.perf_counter() - started < 5
    assert calibration.service_s >= 0.2


def test_a_worker_reports_the_warm_ups_measures_with_the_models_ready_state(minilm):
    events: list = []
    core = WorkerCore("cpu0", 2, OnnxCpuBackend(), [ModelSpec("minilm", minilm)], events.append)
    try:
        core._load_all()  # in this thread: the loader thread's work, step by step
    finally:
        core.close()
    states = [e.load for e in events if isinstance(e, LoadChanged)]
    assert [s.detail for s in states][-2:] == ["warming up", "ready"]
    ready = states[-1]
    assert ready.state == "ready" and ready.calibration.service_s > 0
    assert ready.to_wire()["calibration"]["service_s"] == ready.calibration.service_s


@pytest.fixture(scope="module")
def llm():
    backend = GenAIBackend("CPU", {})
    session = backend.load(ModelSpec("smollm2", str(fetch("smollm2", env.home(), print))),
                           quiet)
    yield session
    session.close()
    backend.close()


def test_warming_up_an_llm_measures_tokens_alone_and_in_a_full_batch(llm):
    calibration = warmup.warm_up(llm, ModelSpec("smollm2", "unused"), capacity=4)
    assert calibration.ttft_s > 0 and calibration.token_s > 0
    assert calibration.batch == 4
    # four sequences decoded together cost less per step than four steps alone
    assert 0 < calibration.batch_token_s < 4 * calibration.token_s
