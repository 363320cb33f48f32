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


@dataclass(frozen=True)
class ModelLoad:
    """Where loading one model on one worker stands: the worker reports it, the scheduler
    keeps it, the status shows it."""

    state: LoadState = "loading"
    error: str | None = None  # the engine's text, when unavailable
    detail: str = ""  # the current step: "compiling for HTP", "worker restarting"
    load_s: float = 0.0

    def to_wire(self) -> dict:
        return plain(self)

    @classmethod
    def from_wire(cls, d: Any) -> ModelLoad:
        return read(cls, d, "model load")


@dataclass
class Histogram:
    """Service times in Prometheus' cumulative-bucket form (``LATENCY_BUCKETS_S``, then +Inf)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.total += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[float | str, int]]:
        """(upper bound, observations at or below it), the last bound being "+Inf"."""
        cumulative: list[tuple[float | str, int]] = []
        running = 0
        bounds: list[float | str] = [*LATENCY_BUCKETS_S, "+Inf"]
        for bound, n in zip(bounds, self.counts):
            running += n
            cumulative.append((bound, running))
        return cumulative

    def copy(self) -> Histogram:
        return Histogram(list(self.counts), self.total)

    def to_plain(self) -> dict:
        return {"buckets": [list(b) for b in self.buckets()], "sum": self.total,
                "count": self.count}

    @classmethod
    def from_plain(cls, d: Any) -> Histogram:
        wire = read(_HistogramWire, d, "latency")
        if [b for b, _ in wire.buckets] != [*LATENCY_BUCKETS_S, "+Inf"]:
            raise ProtocolError("latency.buckets: expected the bounds of LATENCY_BUCKETS_S, "
                                "then +Inf")
        totals = [n for _, n in wire.buckets]
        counts = [n - m for n, m in zip(totals, [0, *totals])]
        if any(n < 0 for n in counts) or totals[-1] != wire.count:
            raise ProtocolError("latency.buckets: expected cumulative counts ending at count")
        return cls(counts, wire.sum)


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
    latency: Histogram = field(default_factory=Histogram)
    tokens: int = 0  # generated tokens, all time
    tokens_per_s: float = 0.0  # recently


@dataclass(frozen=True)
class WorkerStatus:
    """One device's worker."""

    device: str
    kind: str = ""  # npu | gpu | cpu
    state: WorkerState = "starting"
    pid: int | None = None
    node: str = ""
    capacity: int = 1
    in_flight: int = 0
    queued: int = 0  # tasks waiting for a model this worker serves
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

