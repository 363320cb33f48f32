"""OpenVINO backend: one compiled model per model, a pool of infer requests for concurrent runs.

Output names are the model's own tensor names as read from the file (for an .onnx model:
the ONNX graph output names, the same keys onnxruntime returns), so results compare across
backends.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, DeviceError, InvalidInput, ModelUnavailable
from .base import CancelToken, ModelSpec, ProgressFn, TensorSpec

# Engine texts that mean the caller's tensors do not fit the model (not a device fault).
_INPUT_ERRORS = ("ParameterMismatch", "Can't set the input tensor", "shape.compatible",
                 "Port for tensor name")


def _ov():
    import openvino as ov  # lazily: a QNN worker never loads OpenVINO

    return ov


class OvSession:
    """A compiled model; each concurrent ``run`` borrows its own infer request."""

    def __init__(self, compiled: Any, label: str, output_names: list[str]) -> None:
        self._compiled = compiled
        self._label = label
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self.outputs = output_names
        self.inputs = [TensorSpec(_name(p), _np_dtype(p.get_element_type()),
                                  tuple(d.get_length() if d.is_static else None
                                        for d in p.get_partial_shape()))
                       for p in compiled.inputs]
        self._input_names = {s.name for s in self.inputs}

    def run(self, inputs: dict[str, np.ndarray], cancel: CancelToken) -> dict[str, np.ndarray]:
        unknown = set(inputs) - self._input_names
        missing = self._input_names - set(inputs)
        if unknown or missing:
            raise InvalidInput(f"{self._label}: inputs must be {sorted(self._input_names)}; "
                               f"unknown {sorted(unknown)}, missing {sorted(missing)}")
        if cancel.cancelled:
            raise Cancelled(f"{self._label}: run cancelled")
        request = self._borrow()
        try:
            for name, value in inputs.items():
                request.set_tensor(name, _ov().Tensor(np.ascontiguousarray(value)))
            cancel.on_cancel(request.cancel)
            request.start_async()
            request.wait()
            if cancel.cancelled:
                raise Cancelled(f"{self._label}: run cancelled")
            result = {name: np.array(request.get_output_tensor(i).data, copy=True)
                      for i, name in enumerate(self.outputs)}
        except Cancelled:
            raise  # the request is dropped: a cancelled request may keep stale internal shapes
        except Exception as e:
            if cancel.cancelled:
                raise Cancelled(f"{self._label}: run cancelled") from e
            raise _run_error(e, self._label) from e
        self._give_back(request)
        return result

    def _borrow(self) -> Any:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            compiled = self._compiled
        if compiled is None:
            raise DeviceError(f"{self._label}: session is closed")
        return compiled.create_infer_request()

    def _give_back(self, request: Any) -> None:
        with self._lock:
            if self._compiled is not None:
                self._idle.append(request)

    def close(self) -> None:
        with self._lock:
            self._idle.clear()
            self._compiled = None


def _run_error(e: Exception, label: str) -> Exception:
    text = str(e).strip()
    if isinstance(e, (TypeError, ValueError, KeyError)) or any(s in text for s in _INPUT_ERRORS):
        return InvalidInput(f"{label}: {text}")
    return DeviceError(f"{label}: {text}")


def _name(port: Any) -> str:
    names = port.get_names()
    return port.any_name if len(names) != 1 else next(iter(names))


def _np_dtype(et: Any) -> str:
    try:
        return np.dtype(et.to_dtype()).name
    except Exception:
        return str(et)


def _model_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for pattern in ("openvino_model.xml", "*.xml", "*.onnx"):
        found = sorted(path.glob(pattern))
        if len(found) == 1:
            return found[0]
    raise ModelUnavailable(f"{path}: expected one openvino_model.xml, .xml or .onnx file in "
                           f"the folder")


class OpenVinoBackend:
    """OpenVINO on one device: "CPU", "GPU" or "NPU" (any name ``Core.available_devices`` lists)."""

    name = "openvino"

    def __init__(self, device: str = "CPU", options: dict[str, Any] | None = None) -> None:
        self.device = device
        self.options = dict(options or {})
        self._core = None

    def _get_core(self, cache_dir: str | None) -> Any:
        core = self._core
        if core is None:
            core = self._core = _ov().Core()
        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            core.set_property({"CACHE_DIR": str(cache_dir)})
        return core

    def load(self, model: ModelSpec, progress: ProgressFn) -> OvSession:
        label = f"{model.name}@openvino-{self.device}"
        opts = {**self.options, **model.options}
        try:
            core = self._get_core(model.cache_dir)
            available = core.available_devices
        except Exception as e:
            raise ModelUnavailable(f"{label}: OpenVINO unavailable: {e}") from e
        # not refused up front: AUTO/HETERO are not listed, and the engine's own text says more
        base = self.device.split(".")[0]
        listed = base in {d.split(".")[0] for d in available}
        unlisted = "" if listed else (f"device {self.device!r} is not available "
                                      f"(available: {', '.join(available) or 'none'}); ")
        try:
            ov_model = core.read_model(str(_model_file(Path(model.path))))
            output_names = [_name(p) for p in ov_model.outputs]
            shapes = opts.get("shapes")
            if shapes:
                ov_model.reshape({name: _ov().PartialShape([int(d) for d in dims])
                                  for name, dims in shapes.items()})
            progress(f"compiling {model.name} for OpenVINO {self.device} ...")
            config = {str(k): str(v) for k, v in (opts.get("config") or {}).items()}
            if base == "CPU":
                # OpenVINO's CPU default is bf16 where AMX exists: results ~1e-2 off fp32
                # onnxruntime, so a task that fails over would come back visibly different.
                config.setdefault("INFERENCE_PRECISION_HINT", "f32")
            compiled = core.compile_model(ov_model, self.device, config)
        except ModelUnavailable:
            raise
        except Exception as e:
            raise ModelUnavailable(f"{label}: {unlisted}{str(e).strip()}") from e
        return OvSession(compiled, label, output_names)

    def close(self) -> None:
        self._core = None
