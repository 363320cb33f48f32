"""Engine backends, one per device worker. Engines are imported lazily by ``make_backend``:
an OpenVINO worker never loads onnxruntime-qnn, and a QNN worker never loads OpenVINO."""
from __future__ import annotations

from ..config.schema import DeviceConfig
from ..errors import ConfigError
from .base import Backend


def make_backend(device: DeviceConfig) -> Backend:
    """The backend a device config names, wrapped with fault injection if ``faults`` is set."""
    backend: Backend
    if device.backend == "onnxruntime":
        from .onnx import OnnxCpuBackend

        backend = OnnxCpuBackend(device.options)
    elif device.backend == "qnn":
        if device.kind not in ("npu", "gpu"):
            raise ConfigError(f"device {device.name!r}: backend 'qnn' needs kind npu (HTP) or "
                              f"gpu, got kind {device.kind!r}")
        from .onnx import QnnBackend

        backend = QnnBackend(device.kind, device.options)
    elif device.backend == "openvino":
        from .openvino_backend import OpenVinoBackend

        backend = OpenVinoBackend(str(device.options.get("device") or device.kind.upper()),
                                  device.options)
    elif device.backend == "openvino-genai":
        from .genai import GenAIBackend

        backend = GenAIBackend(str(device.options.get("device") or device.kind.upper()),
                               device.options)
    else:
        raise ConfigError(f"device {device.name!r}: backend {device.backend!r} is not supported "
                          f"here; use onnxruntime, qnn, openvino or openvino-genai")
    if device.faults is not None:
        from .faults import FaultyBackend

        backend = FaultyBackend(backend, device.faults)
    return backend
