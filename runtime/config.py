"""Typed configuration: one dataclass per subsystem, loaded from YAML.

Every field documents its bounds. Validation errors are ``ConfigError`` and quote the file,
the field path and the bad value. Environment variables are read only here, in the loader.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_ADDRESS = "tcp://127.0.0.1:8471"
DEVICE_KINDS = ("npu", "gpu", "cpu")
BACKENDS = ("qnn", "onnxruntime", "openvino", "openvino-genai")


@dataclass
class FaultConfig:
    """Fault injection around the real backend, for tests and drills (off unless set).

    fail_after: the first N runs succeed, later runs raise DeviceError (0 = fail every run).
    fail_every: every Nth run raises DeviceError (>= 1; 0 = off).
    fail_load: loading any listed model (or all, if the list is empty and this is true) fails.
    hang_s: each run sleeps this long first (0..3600), to test deadlines and hung workers.
    models: restrict the faults to these models (empty = all).
    message: the error text the injected fault carries.
    """

    fail_after: int | None = None
    fail_every: int = 0
    fail_load: bool = False
    hang_s: float = 0.0
    models: list[str] = field(default_factory=list)
    message: str = "injected device fault"


@dataclass
class DeviceConfig:
    """One device = one worker process.

    name: unique, [a-z0-9_-]{1,32}.  kind: npu | gpu | cpu.
    backend: qnn (onnxruntime + QNN plugin EP; kind npu = HTP backend, gpu = QNN GPU backend),
      onnxruntime (CPU EP), openvino (device from ``options.device`` or kind: NPU/GPU/CPU),
      openvino-genai (LLMs; later issue).
    capacity: tasks run at once, 1..256.
    fallback: device names to try after this one for any model it serves (appended to a
      model's own order).
    options: backend options (e.g. qnn: soc_model, htp_performance_mode; openvino: device).
    """

    name: str
    kind: str
    backend: str
    capacity: int = 1
    fallback: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    faults: FaultConfig | None = None


@dataclass
class ModelConfig:
    """One model.

    source: ``packaged:NAME`` (fetched on demand into the model cache) or a path to an .onnx
      file, an OpenVINO .xml file, or a model folder (relative paths: to the config file).
    devices: device names in order of preference = fallback order (default: every device,
      npu first, then gpu, then cpu).
    options: per-device options, e.g. ``{npu0: {shapes: {input_ids: [1, 32]}, soc_model: "69"}}``.
      ``shapes`` fixes free dimensions; ``pad`` (default true) pads smaller inputs to them.
    """

    name: str
    source: str
    devices: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class SchedulerConfig:
    """The scheduler process.

    address: where clients connect; tcp://HOST:PORT (port 0 = pick a free one).
    worker_address: where workers connect (default: loopback, a free port).
    token: shared secret clients and workers must present; required when binding a
      non-loopback address (env FANOUT_TOKEN).
    max_queue: tasks waiting for a slot, 1..1_000_000; past it submits get Overloaded.
    task_timeout_s: default deadline of a task, 0.1..86400.
    heartbeat_interval_s: 0.05..10.  heartbeat_timeout_s: a worker silent this long is hung
      and is killed and restarted, > 2 * heartbeat_interval_s.
    load_timeout_s: a worker that has not registered this long after start is restarted.
    max_attempts: tries of one task across devices and lost workers, 1..32.
    breaker_threshold: consecutive device errors of one (worker, model) that open its
      breaker, 1..1000.  breaker_cooldown_s: how long it stays open before one probe task.
    restart_backoff_s: first delay before restarting a dead worker (doubles, max 30 s).
    max_message_bytes: largest message accepted on any socket, 1 KiB..4 GiB.
    """

    address: str = DEFAULT_ADDRESS
    worker_address: str = "tcp://127.0.0.1:0"
    token: str | None = None
    max_queue: int = 10_000
    task_timeout_s: float = 120.0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    load_timeout_s: float = 600.0
    max_attempts: int = 4
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 10.0
    restart_backoff_s: float = 0.5
    max_message_bytes: int = 256 * 1024 * 1024


@dataclass
class Config:
    devices: list[DeviceConfig]
    models: list[ModelConfig]
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    model_cache: str | None = None  # where packaged models and compiled contexts live (env FANOUT_HOME)
    source: str = "<defaults>"  # the file this came from, for messages

    def device(self, name: str) -> DeviceConfig:
        for d in self.devices:
            if d.name == name:
                return d
        raise KeyError(name)

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def device_order(self, model: str) -> list[str]:
        """The model's devices in preference order, then their fallbacks (deduplicated)."""
        m = self.model(model)
        base = m.devices or [d.name for d in sorted(
            self.devices, key=lambda d: DEVICE_KINDS.index(d.kind))]
        order: list[str] = []
        for name in base:
            if name not in order:
                order.append(name)
        i = 0  # the list grows while we walk it: fallbacks of fallbacks come last
        while i < len(order):
            order += [f for f in self.device(order[i]).fallback if f not in order]
            i += 1
        return order
