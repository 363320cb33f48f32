"""onnxruntime backends: the CPU EP, and the QNN plugin EP (HTP backend = NPU, GPU backend).

One ``InferenceSession`` per model, shared by every task of the worker (onnxruntime allows
concurrent ``run``). QNN sessions never fall back to the CPU EP, so a task reported as NPU ran
on the NPU, and they cache the compiled graph as an EPContext model next to the model cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import Cancelled, DeviceError, InvalidInput, ModelUnavailable
from .base import CancelToken, ModelSpec, ProgressFn, TensorSpec
from .onnx_proto import read_onnx_inputs

# Keys of a device's model options that this module interprets; every other key of a QNN
# device is passed to the QNN EP as a provider option (soc_model, htp_performance_mode, ...).
_OWN_OPTIONS = {"shapes", "pad", "device", "intra_op_num_threads", "inter_op_num_threads",
                "log_severity_level", "context_cache", "warmup", "max_batch", "max_delay_ms"}

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int16)": "int16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32", "tensor(uint64)": "uint64", "tensor(bool)": "bool",
    "tensor(string)": "object",
}


class OrtSession:
    """One onnxruntime session; ``run`` is safe from many threads and honours cancel."""

    def __init__(self, sess: ort.InferenceSession, label: str) -> None:
        self._sess = sess
        self._label = label
        self.inputs = [TensorSpec(i.name, _ORT_DTYPES.get(i.type, i.type),
                                  tuple(d if isinstance(d, int) else None for d in i.shape),
                                  tuple(d if isinstance(d, str) and d else None
                                        for d in i.shape))
                       for i in sess.get_inputs()]
        self.outputs = [o.name for o in sess.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], cancel: CancelToken) -> dict[str, np.ndarray]:
        ro = ort.RunOptions()
        cancel.on_cancel(lambda: setattr(ro, "terminate", True))
        try:
            values = self._sess.run(self.outputs, inputs, ro)
        except Exception as e:  # onnxruntime's pybind errors share no base but Exception
            if cancel.cancelled:
                raise Cancelled(f"{self._label}: run cancelled") from e
            raise _run_error(e, self._label) from e
        if cancel.cancelled:  # a single fused EP node may finish before it sees terminate
            raise Cancelled(f"{self._label}: run cancelled")
        return dict(zip(self.outputs, values))

    def close(self) -> None:
        self._sess = None  # onnxruntime frees on last reference


def _run_error(e: Exception, label: str) -> Exception:
    text = str(e)
    name = type(e).__name__
    if name == "InvalidArgument" or isinstance(e, (TypeError, ValueError, KeyError)):
        return InvalidInput(f"{label}: {text}")
    return DeviceError(f"{label}: {name}: {text}")


class OnnxCpuBackend:
    """onnxruntime with the CPU execution provider; dynamic shapes work."""

    name = "onnxruntime"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = dict(options or {})

    def load(self, model: ModelSpec, progress: ProgressFn) -> OrtSession:
        opts = {**self.options, **model.options}
        so = _session_options(opts)
        _apply_shapes(so, model, opts.get("shapes"), require_static=False)
        progress(f"loading {model.name} on the onnxruntime CPU EP ...")
        try:
            sess = ort.InferenceSession(model.path, so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ModelUnavailable(f"{model.name} on onnxruntime CPU: {e}") from e
        return OrtSession(sess, f"{model.name}@cpu")

    def close(self) -> None:
        pass


_qnn_lock = threading.Lock()
_qnn_registered = False


def register_qnn() -> Any:
    """Register the onnxruntime-qnn plugin EP library once per process; returns the module."""
    global _qnn_registered
    import onnxruntime_qnn as q  # lazily: only QNN workers load the plugin

    with _qnn_lock:
        if not _qnn_registered:
            try:
                ort.register_execution_provider_library(q.EP_NAME, q.get_library_path())
            except Exception as e:
                if "already registered" not in str(e):
                    raise
            _qnn_registered = True
    return q


def qnn_ep_device(kind: str) -> Any:
    """The ``OrtEpDevice`` of the QNN EP for ``kind`` (npu = HTP, gpu = GPU), or None.

    On Windows the QNN factory lists an NPU and a GPU device; on x86-64 Linux it lists one
    CPU-typed device that serves whichever backend library ``backend_path`` names (the HTP
    simulator). Prefer the matching hardware type; otherwise take the only QNN device there is.
    """
    want = ort.OrtHardwareDeviceType.NPU if kind == "npu" else ort.OrtHardwareDeviceType.GPU
    other = ort.OrtHardwareDeviceType.GPU if kind == "npu" else ort.OrtHardwareDeviceType.NPU
    devs = [d for d in ort.get_ep_devices() if d.ep_name == "QNNExecutionProvider"]
    for d in devs:
        if d.device.type == want:
            return d
    for d in devs:
        if d.device.type != other:
            return d
    return None


class QnnBackend:
    """onnxruntime + the QNN plugin EP; ``kind`` npu uses the HTP backend, gpu the GPU backend."""

    name = "qnn"

    def __init__(self, kind: str = "npu", options: dict[str, Any] | None = None) -> None:
        if kind not in ("npu", "gpu"):
            raise ValueError(f"QnnBackend kind must be 'npu' or 'gpu', got {kind!r}")
        self.kind = kind
        self.options = dict(options or {})

    def load(self, model: ModelSpec, progress: ProgressFn) -> OrtSession:
        label = f"{model.name}@qnn-{'htp' if self.kind == 'npu' else 'gpu'}"
        try:
            q = register_qnn()
            dev = qnn_ep_device(self.kind)
        except Exception as e:
            raise ModelUnavailable(f"{label}: QNN EP unavailable: {e}") from e
        if dev is None:
            raise ModelUnavailable(f"{label}: no QNNExecutionProvider device is listed")
        backend_path = q.get_qnn_htp_path() if self.kind == "npu" else q.get_qnn_gpu_path()
        opts = {**self.options, **model.options}
        provider_opts = {"backend_path": backend_path}
        provider_opts.update({k: _option_str(v) for k, v in opts.items() if k not in _OWN_OPTIONS})
        target = "HTP" if self.kind == "npu" else "GPU"

        ctx_path = None
        if model.cache_dir and opts.get("context_cache", True):
            key = _cache_key(model, opts, self.kind)
            ctx_path = Path(model.cache_dir) / f"{model.name}-{key}_ctx.onnx"
            if ctx_path.exists():
                so = _session_options(opts)
                so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
                so.add_provider_for_devices([dev], provider_opts)
                try:
                    sess = ort.InferenceSession(str(ctx_path), so)
                    progress(f"loaded cached QNN context {ctx_path.name} for {model.name}")
                    return OrtSession(sess, label)
                except Exception as e:  # stale or corrupt: recompile from the source model
                    progress(f"cached QNN context {ctx_path.name} unusable ({e}); recompiling")

        so = _session_options(opts)
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        _apply_shapes(so, model, opts.get("shapes"), require_static=True,
                      device_hint=f"options.<device>.shapes of model {model.name!r}")
        tmp_ctx = None
        if ctx_path is not None:
            ctx_path.parent.mkdir(parents=True, exist_ok=True)
            # compile under a private name and rename: concurrent workers never read half a file
            tmp_ctx = ctx_path.with_name(
                f".{ctx_path.stem}.{os.getpid()}.{threading.get_ident()}.onnx")
            so.add_session_config_entry("ep.context_enable", "1")
            so.add_session_config_entry("ep.context_embed_mode", "1")
            so.add_session_config_entry("ep.context_file_path", str(tmp_ctx))
        so.add_provider_for_devices([dev], provider_opts)
        progress(f"compiling {model.name} for QNN {target} ...")
        try:
            sess = ort.InferenceSession(model.path, so)
        except Exception as e:
            _unlink(tmp_ctx)
            raise ModelUnavailable(f"{label}: {e}") from e
        if tmp_ctx is not None and ctx_path is not None and tmp_ctx.exists():
            os.replace(tmp_ctx, ctx_path)
            progress(f"saved QNN context {ctx_path.name}")
        return OrtSession(sess, label)

    def close(self) -> None:
        pass


def _session_options(opts: dict[str, Any]) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.log_severity_level = int(opts.get("log_severity_level", 3))
    if opts.get("intra_op_num_threads"):
        so.intra_op_num_threads = int(opts["intra_op_num_threads"])
    if opts.get("inter_op_num_threads"):
        so.inter_op_num_threads = int(opts["inter_op_num_threads"])
    return so


def _apply_shapes(so: ort.SessionOptions, model: ModelSpec, shapes: dict | None,
                  require_static: bool, device_hint: str = "") -> None:
    """Fix the model's free dimensions from ``shapes: {input: [dims]}`` by symbolic dim name."""
    if not shapes and not require_static:
        return
    try:
        declared = read_onnx_inputs(model.path)
    except Exception as e:
        raise ModelUnavailable(f"{model.name}: cannot read the model's inputs: {e}") from e
    unknown = sorted(set(shapes or {}) - set(declared))
    if unknown:
        raise ModelUnavailable(f"{model.name}: shapes names {unknown}, which are not inputs of "
                               f"the model (inputs: {sorted(declared)})")
    sizes: dict[str, int] = {}
    for name, dims in declared.items():
        want = (shapes or {}).get(name)
        if want is not None and len(want) != len(dims):
            raise ModelUnavailable(
                f"{model.name}: shapes.{name} is {list(want)} but the input has rank {len(dims)}")
        for i, d in enumerate(dims):
            if isinstance(d, int):
                continue
            if want is None or want[i] is None:
                if require_static:
                    raise ModelUnavailable(
                        f"{model.name}: input {name!r} has free dimension {d or i!r}; the QNN "
                        f"backend needs static shapes: set {device_hint} in the config, "
                        f"e.g. {{{_shapes_example(declared)}}}")
                continue
            if not d:
                raise ModelUnavailable(
                    f"{model.name}: input {name!r} dimension {i} is free but unnamed; "
                    f"it cannot be fixed by name")
            size = int(want[i])
            if sizes.setdefault(d, size) != size:
                raise ModelUnavailable(
                    f"{model.name}: dimension {d!r} is set to both {sizes[d]} and {size} in shapes")
    for d, size in sizes.items():
        so.add_free_dimension_override_by_name(d, size)


def _shapes_example(declared: dict[str, list[int | str | None]]) -> str:
    def dim(d: int | str | None) -> str:
        return str(d) if isinstance(d, int) else (d or "?")

    return ", ".join(f"{n}: [{', '.join(dim(d) for d in dims)}]" for n, dims in declared.items())


def _cache_key(model: ModelSpec, opts: dict[str, Any], kind: str) -> str:
    st = os.stat(model.path)
    try:
        from importlib.metadata import version
        qnn_version = version("onnxruntime-qnn")
    except Exception:
        qnn_version = "?"
    blob = json.dumps([st.st_size, st.st_mtime_ns, kind, ort.__version__, qnn_version,
                       {k: v for k, v in opts.items()
                        if k not in ("pad", "log_severity_level", "warmup", "max_batch",
                                     "max_delay_ms")}],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _option_str(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _unlink(p: Path | None) -> None:
    if p is not None:
        try:
            p.unlink()
        except OSError:
            pass


# -- reading an ONNX model's declared inputs without loading its weights ----------------------
# ModelProto.graph=7, GraphProto.input=11, ValueInfoProto.name=1/.type=2, TypeProto.tensor_type=1,
# Tensor.shape=2, TensorShapeProto.dim=1, Dimension.dim_value=1/.dim_param=2 (onnx.proto3).
