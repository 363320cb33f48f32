"""The cluster's status as typed records: what ``status`` replies carry, parsed once.

The scheduler's core builds a ``Status`` (``SchedulerState.snapshot``), its shell sends
``to_wire()``, and every reader (the CLI, ``/metrics``, ``/health/ready``, the launchers)
gets ``Status.from_wire(...)`` and reads attributes. A malformed status is a
``ProtocolError``. ``ModelLoad`` is also what a worker reports while it loads a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ProtocolError
from .records import plain, read

WorkerState = Literal["starting", "up", "lost", "gone"]
# "gone": the worker's node left; set by the scheduler, never reported by a worker.
LoadState = Literal["loading", "ready", "unavailable", "gone"]
BreakerState = Literal["closed", "open", "half-open"]

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Between two tokens of one stream: milliseconds, not seconds.
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


def _itl() -> Histogram:
    return Histogram(bounds=ITL_BUCKETS_S)


@dataclass(frozen=True)
class Calibration:
    """What a worker measured in the warm-up run(s) of a model it just loaded, which the
    scheduler's estimates start from (``core/estimates.py``).

    service_s: the warm-up's wall time (one task; for an LLM, one short generation alone).
    cpu_s: process CPU seconds the warm-up burned: how many host cores the device's runs use.
    ttft_s, token_s: LLM, alone: time to the first token, then seconds per further token.
    batch, batch_token_s: LLM: seconds per token with ``batch`` sequences decoded together.
    batch, batch_service_s: a tensor model that batches: the wall time of one engine call
      of ``batch`` tasks.
    """

    service_s: float | None = None
    cpu_s: float | None = None
    ttft_s: float | None = None
    token_s: float | None = None
    batch: int = 1
    batch_token_s: float | None = None
    batch_service_s: float | None = None

    @property
    def host_cores(self) -> float | None:
        """Cores of the host the warm-up kept busy while it ran (CPU seconds per second)."""
        if self.cpu_s is None or not self.service_s:
            return None
        return self.cpu_s / self.service_s


@dataclass(frozen=True)
class ModelLoad:
    """Where loading one model on one worker stands: the worker reports it, the scheduler
    keeps it, the status shows it."""

    state: LoadState = "loading"
    error: str | None = None  # the engine's text, when unavailable
    detail: str = ""  # the current step: "compiling for HTP", "worker restarting"
    load_s: float = 0.0
    calibration: Calibration | None = None  # what its warm-up measured, once ready
    max_batch: int = 1  # tasks (rows) the worker runs as one engine call, once ready

    def to_wire(self) -> dict:
        return plain(self)

    @classmethod
    def from_wire(cls, d: Any) -> ModelLoad:
        return read(cls, d, "model load")


@dataclass
class Histogram:
    """Observations in Prometheus' cumulative-bucket form: upper ``bounds``, then +Inf."""

    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    bounds: tuple[float, ...] = LATENCY_BUCKETS_S

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float, times: int = 1) -> None:
        self.total += seconds * times
        for i, bound in enumerate(self.bounds):
            if seconds <= bound:
                self.counts[i] += times
                return
        self.counts[-1] += times

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[float | str, int]]:
        """(upper bound, observations at or below it), the last bound being "+Inf"."""
        cumulative: list[tuple[float | str, int]] = []
        running = 0
        bounds: list[float | str] = [*self.bounds, "+Inf"]
        for bound, n in zip(bounds, self.counts):
            running += n
            cumulative.append((bound, running))
        return cumulative

    def copy(self) -> Histogram:
        return Histogram(list(self.counts), self.total, self.bounds)

    def to_plain(self) -> dict:
        return {"buckets": [list(b) for b in self.buckets()], "sum": self.total,
                "count": self.count}

    @classmethod
    def from_plain(cls, d: Any) -> Histogram:
        wire = read(_HistogramWire, d, "histogram")
        bounds = [b for b, _ in wire.buckets]
        finite = [b for b in bounds[:-1] if isinstance(b, float)]
        if bounds[-1:] != ["+Inf"] or len(finite) != len(bounds) - 1 or any(
                a >= b for a, b in zip(finite, finite[1:])):
            raise ProtocolError("buckets: expected increasing bounds, then +Inf")
        totals = [n for _, n in wire.buckets]
        counts = [n - m for n, m in zip(totals, [0, *totals])]
        if any(n < 0 for n in counts) or totals[-1] != wire.count:
            raise ProtocolError("buckets: expected cumulative counts ending at count")
        return cls(counts, wire.sum, tuple(finite))


@dataclass(frozen=True)
class _HistogramWire:
    buckets: list[tuple[float | str, int]]
    sum: float
    count: int


@dataclass(frozen=True)
class ModelStatus(ModelLoad):
    """One model on one worker: its load state, then what it has served there."""

    done: int = 0
    failed: int = 0
    failed_over: int = 0  # tries that failed here and went on to another device
    expected_s: float | None = None  # the measured service time (EWMA); None: no task yet
    breaker: BreakerState = "closed"
    latency: Histogram = field(default_factory=Histogram)  # service time of a run here
    # For what finished here: from submit to the answer, and to the first token (generations).
    request: Histogram = field(default_factory=Histogram)
    ttft: Histogram = field(default_factory=Histogram)
    itl: Histogram = field(default_factory=_itl)  # between tokens streamed from here
    queue_wait: Histogram = field(default_factory=Histogram)  # queued, until dispatched here
    prompt_tokens: int = 0  # of the generations finished here
    completion_tokens: int = 0  # generated here, all time
    batches: dict[str, int] = field(default_factory=dict)  # batch size -> tasks run in one


@dataclass(frozen=True)
class WorkerStatus:
    """One device's worker."""

    device: str
    kind: str = ""  # npu | gpu | cpu
    state: WorkerState = "starting"
    pid: int | None = None
    node: str = ""
    capacity: int = 1
    in_flight: int = 0  # running, or prefetched: held by the worker
    queued: int = 0  # tasks waiting for a model this worker serves
    prefetch: int = 0  # tasks it may hold beyond its capacity, as placement sees it now
    done: int = 0
    failed: int = 0
    failed_over: int = 0
    lost: int = 0
    restarts: int = 0
    peak_running: int = 0  # the most runs ever at once, as the worker measured it
    last_exit: str = ""
    template: str = ""  # the config device this worker is (an instance of)
    epoch: int = 0
    models: dict[str, ModelStatus] = field(default_factory=dict)
    cores: int = 0  # cores of its node it may use, as it reports them
    host_cores: float = 0.0  # host cores one of its runs keeps busy (its CPU time per run time)


@dataclass(frozen=True)
class Counters:
    """Tasks the scheduler has seen end one way or another, since it started."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    overloaded: int = 0
    cancelled: int = 0
    deadline: int = 0


@dataclass(frozen=True)
class ClusterInfo:
    """The scheduler process: where it listens, what it runs, whether it is ready."""

    address: str
    worker_address: str = ""
    pid: int = 0
    node: str = ""
    launcher: str = "local"  # local | ray
    started: float = 0.0  # a Unix time
    ready: bool = False  # every worker up (or gone with its node), no model still loading
    max_message_bytes: int = 0
    models: tuple[str, ...] = ()
    internal_errors: int = 0  # exceptions caught handling a message or ticking: should stay 0
    backlog_bytes: int = 0  # answers waiting for clients that read slower than they come
    task_timeout_s: float = 0.0  # a task's deadline when its submit names none (0: unknown)
    max_task_timeout_s: float = 0.0  # the most a submit may name (0: unknown)


@dataclass(frozen=True)
class Status:
    """The whole cluster: each worker and its models, the queue, the counters."""

    workers: tuple[WorkerStatus, ...] = ()
    queued: int = 0
    unanswered: int = 0  # tasks accepted and not answered yet
    counters: Counters = field(default_factory=Counters)
    max_queue: int = 0
    queued_by_model: dict[str, int] = field(default_factory=dict)
    cluster: ClusterInfo | None = None  # filled in by the scheduler's shell
    # node -> cores kept busy there by what is not a worker (the scheduler, clients, others)
    other_cores: dict[str, float] = field(default_factory=dict)
    held_bytes: int = 0  # input bytes of the unanswered tasks (bounded by max_queue_bytes)
    max_queue_bytes: int = 0

    def worker(self, device: str) -> WorkerStatus:
        """The worker of ``device``; ``KeyError`` naming the devices there are."""
        for w in self.workers:
            if w.device == device:
                return w
        raise KeyError(f"no worker {device!r}; there are {[w.device for w in self.workers]}")

    def to_wire(self) -> dict:
        return plain(self)

    @classmethod
    def from_wire(cls, d: Any) -> Status:
        return read(cls, d, "status")

