"""Placement and failover as a pure state machine: events in, actions out.

No sockets, no processes, no sleeping: the clock is injected. The process shell
(``scheduler_process.py``) turns socket messages and process exits into events and carries
out the actions. Payloads (the task's input frames, a result's output frames) are opaque here.

Rules:
- a task goes to the worker expected to finish it first (``placement.py``), counting the work
  already committed to each worker, among those that have the model ready and whose breaker
  for the model is closed; it waits in a bounded FIFO queue while that worker is busy, or
  while none can take it (full queue -> ``Overloaded`` at once);
- what the scheduler holds is bounded in bytes and per client: the input bytes of every
  unanswered task (``max_queue_bytes``), each client's share of tasks and bytes
  (``max_client_share``), and the answers waiting for a client to read them
  (``max_client_backlog_bytes``, measured by the shell): past any, ``Overloaded`` at once;
- a worker holds up to ``capacity + prefetch`` tensor tasks (credits): those beyond its slots
  wait there, so a slot never idles for a round trip; they are committed work on its lanes,
  re-run if it is lost and cancelled like running ones. A generation takes a free slot only;
- a device error re-runs the task on the next device of the model's order that it has not
  failed on; an input error is answered at once and never re-run;
- a lost worker (exit, missed heartbeats, a run that ignores its deadline) has its in-flight
  tasks re-run and is restarted with backoff;
- every task is answered exactly once: late results of re-run or finished tasks are dropped;
- under a launcher that tracks nodes, workers come and go with them: ``WorkerAdded`` starts
  one (a ``per_node`` device's instance on a node that joined, or a device whose node is
  back), ``WorkerGone`` re-runs its tasks elsewhere and leaves it "gone", not restarted;
- a client that said hello with a keepalive and then stays silent past
  ``CLIENT_SILENCE_FACTOR`` keepalives (at least ``CLIENT_SILENCE_FLOOR_S``) has its tasks
  cancelled on ``Tick`` and is forgotten (``ForgetClient``); a goodbye does the same at once.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config.schema import Config
from ..errors import (
    Attempt,
    Cancelled,
    DeadlineExceeded,
    ErrorKind,
    FanoutError,
    InvalidInput,
    ModelUnavailable,
    NoDeviceAvailable,
    Overloaded,
    brief,
    error_class,
)
from ..wire.status import (
    ITL_BUCKETS_S,
    BreakerState,
    ClusterInfo,
    Counters,
    Histogram,
    LoadState,
    ModelLoad,
    ModelStatus,
    Status,
    WorkerState,
    WorkerStatus,
)
from . import placement
from .estimates import EWMA, Calibration, Estimate
from .task_queue import TaskQueue

# Queued tasks of one kind (model, devices excluded) a placement pass may leave waiting for
# busy workers before it passes over the rest of that kind: a device that cannot finish such
# a task before the busy ones finish this many gets none from the pass (it would add under
# 1/LOOKAHEAD), and tasks of other kinds further back are still placed.
LOOKAHEAD = 256
MIN_SAMPLE_S = 0.2  # CPU rates are measured over at least this long
RISE, LOAD_HALF_LIFE_S = 0.6, 30.0  # how a node's other load follows what is measured
DEFAULT_MAX_TOKENS = 256  # a generation's limit when its request sets none (as workers do)
MAX_RESTART_BACKOFF_S = 30.0
STABLE_AFTER_S = 30.0  # a worker up this long has its restart backoff reset
CLIENT_SILENCE_FACTOR = 5  # missed keepalives before a client counts as gone
CLIENT_SILENCE_FLOOR_S = 2.0  # however often it promised to ping: a GC pause is not a death
# A worker's prefetch when its config sets none, per slot: enough tasks to cover a round trip
# to it and back (with margin) at its fastest model's pace (at most MAX_PIPELINE), or, for a
# model it batches, the next full batch while one runs.
PIPELINE_S = 0.002
MAX_PIPELINE = 32


# ---- events ------------------------------------------------------------------------------

@dataclass
class WorkerRegistered:
    device: str
    epoch: int
    pid: int
    node: str
    models: dict[str, ModelLoad]


@dataclass
class ModelStateChanged:
    device: str
    epoch: int
    model: str
    load: ModelLoad


@dataclass
class WorkerHeartbeat:
    device: str
    epoch: int
    peak_running: int = 0
    cpu_s: float | None = None  # the worker process's CPU seconds so far
    cores: int = 0  # cores the worker's node lets it use (0 = not said)
    node_cpu_s: float | None = None  # CPU seconds every process of its node has used so far


@dataclass
class WorkerExited:
    device: str
    epoch: int
    reason: str


@dataclass
class WorkerAdded:
    """A place was found for a worker: a per-node instance of ``template`` on a node that
    joined (``device`` = TEMPLATE@NODE), or ``device`` itself once a node can host it again."""

    device: str
    template: str
    node: str = ""
    capacity: int | None = None  # None: the template's


@dataclass
class WorkerGone:
    """A worker's node left (or no node can host it): its tasks are re-run, it is not restarted."""

    device: str
    reason: str


@dataclass
class TaskSubmitted:
    key: Any  # opaque to the state machine: (client identity, task id)
    model: str
    payload: Any
    timeout_s: float | None = None
    generate: bool = False  # a generation: tokens stream back and a failover continues them
    stream: bool = False  # the caller wants the tokens as they come, not only the completion
    client: Any = None  # who submitted it (opaque): its tasks end when it says bye or vanishes
    max_tokens: int | None = None  # a generation's limit, for its expected time
    nbytes: int = 0  # the size of its message: what holding it costs
    backlog: int = 0  # bytes of answers waiting for its client to read them


@dataclass
class TaskTokens:
    """New tokens of a running generation."""

    device: str
    epoch: int
    attempt: int
    ids: list[int]
    text: str
    tool_calls: list = field(default_factory=list)  # whole calls, opaque here
    logprobs: list = field(default_factory=list)  # one per id, opaque here


@dataclass
class TaskSucceeded:
    device: str
    epoch: int
    attempt: int
    payload: Any
    service_s: float
    batch: int = 1  # tasks of the engine call it ran in


@dataclass
class TaskFailed:
    device: str
    epoch: int
    attempt: int
    kind: ErrorKind
    message: str
    service_s: float = 0.0


@dataclass
class TaskCancelled:
    key: Any


@dataclass
class ClientHello:
    """A client connected; it promised to send something every ``keepalive_s`` (None: it
    promised nothing, so its silence is never held against it). A client connected again
    names its ``previous`` connection: what is left of that one is cancelled and forgotten
    (its calls failed when it was lost)."""

    client: Any
    keepalive_s: float | None = None
    previous: Any = None


@dataclass
class ClientHeard:
    """Any message from a client: it is still there."""

    client: Any


@dataclass
class ClientBye:
    """A client closed normally: its unfinished tasks are cancelled, quietly."""

    client: Any


@dataclass
class Tick:
    # When the shell last had read every worker message: silence after that is not the
    # workers' fault (a backlog or a stalled scheduler), so it does not count against them.
    heard_all_until: float | None = None


# ---- actions -----------------------------------------------------------------------------

@dataclass
class StartWorker:
    device: str
    epoch: int


@dataclass
class KillWorker:
    device: str
    epoch: int
    reason: str


@dataclass
class Dispatch:
    device: str
    epoch: int
    attempt: int
    model: str
    payload: Any
    timeout_s: float
    generation: Generation | None = None  # for generations: what was streamed already


@dataclass
class CancelAttempt:
    device: str
    epoch: int
    attempt: int


@dataclass
class Deliver:
    key: Any
    device: str
    payload: Any
    attempts: list[Attempt]
    service_s: float
    generation: Generation | None = None  # for generations: the whole completion
    # The scheduler's clock: when the task was accepted, its last attempt dispatched, answered.
    submitted_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class StreamChunk:
    key: Any
    text: str
    device: str
    previous_device: str | None  # set on the first chunk after the stream changed device
    tool_calls: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)


@dataclass
class Reject:
    key: Any
    error: FanoutError


@dataclass
class ForgetClient:
    """A client is gone (it said bye, or went silent); its unfinished tasks were cancelled.
    It must say hello again to be known."""

    client: Any
    reason: str
    cancelled: int  # how many of its tasks were still unanswered
    goodbye: bool = False  # it closed normally: nothing to warn about


# ---- state -------------------------------------------------------------------------------

@dataclass
class ModelSlot:
    """One model on one worker: load state, measured service time, counters, breaker."""

    load: ModelLoad = ModelLoad()
    estimate: Estimate = field(default_factory=Estimate)
    done: int = 0
    failed: int = 0
    consecutive_errors: int = 0
    open_until: float | None = None  # breaker open until then; then one probe is let through
    probing: bool = False
    failed_over: int = 0  # tries that failed here and went on to another device
    latency: Histogram = field(default_factory=Histogram)  # service time of a run here
    request: Histogram = field(default_factory=Histogram)  # submit to answer, answered here
    ttft: Histogram = field(default_factory=Histogram)  # submit to the first token, from here
    itl: Histogram = field(default_factory=lambda: Histogram(bounds=ITL_BUCKETS_S))
    queue_wait: Histogram = field(default_factory=Histogram)  # queued, until dispatched here
    prompt_tokens: int = 0  # of generations answered here
    completion_tokens: int = 0  # generated here, all time
    batches: collections.Counter[int] = field(default_factory=collections.Counter)  # size -> tasks

    @property
    def state(self) -> LoadState:
        return self.load.state

    def breaker(self, now: float) -> BreakerState:
        if self.open_until is None:
            return "closed"
        return "open" if now < self.open_until else "half-open"

    @property
    def expected_s(self) -> float | None:
        return self.estimate.service_s


@dataclass
class WorkerView:
    device: str
    kind: str
    capacity: int
    epoch: int = 0
    state: WorkerState = "starting"
    template: str = ""  # the config device this worker is (an instance of)
    pid: int | None = None
    node: str = ""
    started_at: float = 0.0
    up_since: float | None = None
    last_seen: float = 0.0
    restart_at: float | None = None
    restarts: int = 0
    backoff_s: float = 0.0
    last_exit: str = ""
    models: dict[str, ModelSlot] = field(default_factory=dict)
    in_flight: dict[int, Task] = field(default_factory=dict)  # attempt -> task
    done: int = 0
    failed: int = 0
    failed_over: int = 0
    lost: int = 0
    peak_running: int = 0  # as the worker measured it, over all its incarnations
    cores: int = 0  # usable cores of its node, as the worker reports them
    host_cores: float = 0.0  # host cores one of its runs keeps busy (CPU s per run s)
    busy_s: float = 0.0  # run time of its finished attempts, summed
    cpu_mark: tuple[float, float] | None = None  # (cpu_s, busy_s) when host_cores was sampled
    cpu_rate: float = 0.0  # cores its process used between its last two heartbeats
    beat: tuple[float, float] | None = None  # (time, cpu_s) of its last heartbeat
    prefetch_cfg: int | None = None  # the config's prefetch; None: worked out (``prefetch``)
    prefetch: int = 0  # tasks it may hold beyond its capacity now
    peak_prefetch: int = 0  # the most it was allowed since it started (for ``validate``)

    @property
    def free(self) -> int:
        """Tasks it may take now: its credits left."""
        return self.capacity + self.prefetch - len(self.in_flight) if self.state == "up" else 0


@dataclass
class ClientView:
    """A client that said hello."""

    silence_limit_s: float | None  # None: it promised no keepalives
    last_heard: float


@dataclass
class NodeLoad:
    """A node's cores kept busy by what is not one of its workers, as heartbeats measure it."""

    other_cores: float = 0.0
    sample: tuple[float, float] | None = None  # (time, the node's CPU seconds) last sampled


@dataclass
class Generation:
    """What a generation has produced so far, over all its attempts."""

    stream: bool  # forward tokens to the caller as they come
    ids: list[int] = field(default_factory=list)
    text: str = ""
    device: str | None = None  # the device the last tokens came from
    tool_calls: list = field(default_factory=list)  # whole tool calls, in order
    logprobs: list = field(default_factory=list)


@dataclass(eq=False)  # a task is itself: compared by identity, never field by field
class Task:
    key: Any
    model: str
    payload: Any = field(repr=False)  # what a peer sent: no repr() may walk it
    deadline: float
    timeout_s: float
    attempts: list[Attempt] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)  # devices this task failed on
    running: tuple[str, int] | None = None  # (device, attempt)
    finished: bool = False
    generation: Generation | None = None
    client: Any = None
    submitted_at: float = 0.0
    queued_at: float = 0.0  # when it (last) joined the queue
    tokens_at: float | None = None  # when the running attempt last streamed tokens
    max_tokens: int | None = None
    # The running attempt: when it was dispatched, its expected time, the batch it joined
    # and the tokens already generated before it (a generation's earlier attempts).
    started_at: float = 0.0
    expected_s: float = 0.0
    batch: int = 1
    tokens_before: int = 0
    # When the running attempt's run is taken to have begun: at dispatch when a slot was
    # free, else when one freed for it (a prefetched task waits at its worker first).
    ran_from: float | None = None
    nbytes: int = 0
    # Slots whose device errors on this task wait to count toward their breakers until
    # another device serves it: a task no device can run is the input's fault, not theirs.
    blamed: list[ModelSlot] = field(default_factory=list)

    def __repr__(self) -> str:  # never the payload: it may be huge, or nested past repr's limit
        return (f"Task(key={brief(self.key)}, model={self.model!r}, "
                f"attempts={len(self.attempts)}, running={self.running}, "
                f"finished={self.finished})")


Event = (WorkerRegistered | ModelStateChanged | WorkerHeartbeat | WorkerExited | WorkerAdded
         | WorkerGone | TaskSubmitted | TaskTokens | TaskSucceeded | TaskFailed | TaskCancelled
         | ClientHello | ClientHeard | ClientBye | Tick)


class SchedulerState:
    """The scheduler's decisions. Feed events to ``handle``; carry out what it returns."""

    def __init__(self, config: Config, clock: Callable[[], float],
                 policy: placement.Policy = placement.earliest_finish,
                 track_nodes: bool = False):
        """``track_nodes``: the launcher adds and removes workers as nodes come and go; a
        ``per_node`` device then has no worker of its own, only instances added later."""
        self.config = config
        self.sc = config.scheduler
        self.clock = clock
        self.policy = policy
        # A per_node device is a template whose instances stand where its name stands in
        # every model's order; without node tracking it runs as one worker of its name.
        self.instances: dict[str, list[str]] = {
            d.name: [] for d in config.devices if d.per_node and track_nodes}
        self._base_orders = {m.name: config.device_order(m.name) for m in config.models}
        self.orders: dict[str, list[str]] = {}
        self.workers: dict[str, WorkerView] = {}
        for d in config.devices:
            if d.name not in self.instances:
                self.workers[d.name] = self._view(d.name, d.name, d.capacity)
        self._expand_orders()
        self.queue: TaskQueue[Task] = TaskQueue()
        self.queued_models: collections.Counter[str] = collections.Counter()  # of self.queue
        self.queued_excluding: collections.Counter[str] = collections.Counter()  # ... that
        # failed somewhere already: they may have other workers to go to than the rest
        self.queued_clients: collections.Counter[Any] = collections.Counter()  # of self.queue
        self.tasks: dict[Any, Task] = {}  # every unanswered task
        self.clients: dict[Any, ClientView] = {}  # those that said hello
        self.client_tasks: dict[Any, dict[Any, Task]] = {}  # client -> its unanswered tasks
        self.held_bytes = 0  # input bytes of every unanswered task
        self.client_bytes: collections.Counter[Any] = collections.Counter()  # of each client
        self._attempt_ids = itertools.count(1)
        self.counters: collections.Counter[str] = collections.Counter()
        self.typical_tokens: dict[str, float] = {}  # model -> EWMA of completion tokens
        self.nodes: dict[str, NodeLoad] = {}  # what else keeps each node's cores busy

    def _view(self, device: str, template: str, capacity: int) -> WorkerView:
        dev = self.config.device(template)
        view = WorkerView(device, dev.kind, capacity, template=template,
                          prefetch_cfg=dev.prefetch)
        view.models = {m: ModelSlot() for m, order in self._base_orders.items()
                       if template in order}
        self._set_prefetch(view)
        return view

    @staticmethod
    def _set_prefetch(view: WorkerView) -> None:
        """The tasks ``view`` may hold beyond its slots: the config's, or per slot enough to
        hide a round trip at its fastest ready model's pace, or to have the next full batch
        waiting while one runs."""
        if view.prefetch_cfg is not None:
            view.prefetch = view.prefetch_cfg
        else:
            rows, fastest = 1, None
            for slot in view.models.values():
                if slot.state != "ready":
                    continue
                rows = max(rows, slot.load.max_batch)
                each = slot.estimate.expected(batched=slot.load.max_batch > 1)
                if each:
                    fastest = each if fastest is None else min(fastest, each)
            pipeline = min(MAX_PIPELINE, math.ceil(PIPELINE_S / fastest)) if fastest else 1
            view.prefetch = view.capacity * max(2 * rows if rows > 1 else 1, pipeline)
        view.peak_prefetch = max(view.peak_prefetch, view.prefetch)

    def _expand_orders(self) -> None:
        self.orders = {m: [name for t in order for name in self.instances.get(t, [t])]
                       for m, order in self._base_orders.items()}

    # -- entry points --

    def start(self) -> list:
        now = self.clock()
        actions: list = []
        for view in self.workers.values():
            actions.append(self._start_worker(view, now))
        return actions

    def handle(self, *events: Event) -> list:
        actions: list = []
        for event in events:
            self._handler(type(event))(self, event, actions)
        self._place(actions)
        return actions

    def handle_each(self, events: list[Event]) -> tuple[list, list[tuple[Event, Exception]]]:
        """``handle`` for many events at once (one placement pass), each on its own: an event
        whose handler raises is reported with its error, and the others still count."""
        actions: list = []
        failed: list[tuple[Event, Exception]] = []
        for event in events:
            try:
                self._handler(type(event))(self, event, actions)
            except Exception as exc:  # one bad event must not lose the others' answers
                failed.append((event, exc))
        self._place(actions)
        return actions, failed

    @functools.singledispatchmethod
    def _on(self, event: object, actions: list) -> None:
        raise TypeError(f"the scheduler has no handler for {type(event).__name__}: {event!r:.200}")

    # Looked up by type in a plain dict: self._on(...) builds a bound method per call, and
    # singledispatch's own cache is a WeakKeyDictionary read in Python (~1 us an event each).
    _handler_of = staticmethod(_on.dispatcher.dispatch)
    _handlers: ClassVar[dict[type, Callable]] = {}

    @classmethod
    def _handler(cls, kind: type) -> Callable:
        found = cls._handlers.get(kind)
        if found is None:
            found = cls._handlers[kind] = cls._handler_of(kind)
        return found

    # -- worker lifecycle --

    def _start_worker(self, view: WorkerView, now: float) -> StartWorker:
        view.epoch += 1
        view.state = "starting"
        view.started_at = view.last_seen = now
        view.restart_at = None
        view.pid = None
        view.cpu_mark = None  # a new process counts its CPU time from zero
        for slot in view.models.values():
            slot.load = ModelLoad("loading", detail="starting worker")
        view.peak_prefetch = 0
        self._set_prefetch(view)
        return StartWorker(view.device, view.epoch)

    def _current(self, device: str, epoch: int) -> WorkerView | None:
        view = self.workers.get(device)
        if view is None or view.epoch != epoch or view.state in ("lost", "gone"):
            return None  # a message from an old incarnation of the worker
        return view

    @_on.register
    def _on_WorkerRegistered(self, ev: WorkerRegistered, actions: list) -> None:
        view = self._current(ev.device, ev.epoch)
        if view is None:
            return
        # The entries are ModelLoad records the wire decoder checked whole: nothing here can
        # fail half-way through, with the worker half up.
        now = self.clock()
        view.state, view.pid, view.node = "up", ev.pid, ev.node
        view.up_since = view.last_seen = now
        for model, load in ev.models.items():
            if model in view.models:
                self._set_model(view, model, load, actions)

    @_on.register
    def _on_ModelStateChanged(self, ev: ModelStateChanged, actions: list) -> None:
        view = self._current(ev.device, ev.epoch)
        if view is None or ev.model not in view.models:
            return
        view.last_seen = self.clock()
        self._set_model(view, ev.model, ev.load, actions)

    def _set_model(self, view: WorkerView, model: str, load: ModelLoad, actions: list) -> None:
        slot = view.models[model]
        slot.load = load
        if load.state == "ready" and load.calibration is not None:
            self._calibrate(view, slot, load.calibration)
        self._set_prefetch(view)
        if load.state == "unavailable":
            self._reject_hopeless(model, actions)

    @staticmethod
    def _calibrate(view: WorkerView, slot: ModelSlot, c: Calibration) -> None:
        slot.estimate.calibrate(c)
        if c.host_cores is not None:
            view.host_cores = c.host_cores if not view.host_cores else (
                (1 - EWMA) * view.host_cores + EWMA * c.host_cores)

    @_on.register
    def _on_WorkerHeartbeat(self, ev: WorkerHeartbeat, actions: list) -> None:
        view = self._current(ev.device, ev.epoch)
        if view is not None:
            view.last_seen = self.clock()
            view.peak_running = max(view.peak_running, ev.peak_running)
            view.cores = ev.cores or view.cores
            if ev.cpu_s is not None:
                self._sample_host_cores(view, ev.cpu_s)
                self._sample_load(view, ev.cpu_s, ev.node_cpu_s)

    def _sample_load(self, view: WorkerView, cpu_s: float, node_cpu_s: float | None) -> None:
        """The cores of the worker's node kept busy by anything but its workers (this
        scheduler, clients, other programs), from the node's CPU time and the workers'."""
        now = self.clock()
        if view.beat is not None and now - view.beat[0] >= MIN_SAMPLE_S:
            view.cpu_rate = max(0.0, cpu_s - view.beat[1]) / (now - view.beat[0])
        view.beat = (now, cpu_s)
        if node_cpu_s is None:
            return
        load = self.nodes.setdefault(view.node, NodeLoad())
        if load.sample is not None and now - load.sample[0] >= MIN_SAMPLE_S:
            took = now - load.sample[0]
            busy = max(0.0, node_cpu_s - load.sample[1]) / took
            ours = sum(v.cpu_rate for v in self.workers.values()
                       if v.node == view.node and v.state == "up")
            other = max(0.0, busy - ours)
            # Quick to rise, slow to fall: the load a fan-out brings (this scheduler, its
            # clients) is there again from the first task of the next one.
            faded = load.other_cores * 0.5 ** (took / LOAD_HALF_LIFE_S)
            load.other_cores = max(faded, load.other_cores + RISE * (other - load.other_cores))
        if load.sample is None or now - load.sample[0] >= MIN_SAMPLE_S:
            load.sample = (now, node_cpu_s)

    @staticmethod
    def _sample_host_cores(view: WorkerView, cpu_s: float) -> None:
        """Host cores a run keeps busy: the process's CPU time over its runs' time, measured
        between heartbeats that saw runs (an idle spell starts the measure afresh)."""
        if view.cpu_mark is None or any(s.state == "loading" for s in view.models.values()):
            view.cpu_mark = (cpu_s, view.busy_s)
            return
        cpu0, busy0 = view.cpu_mark
        ran = view.busy_s - busy0
        if ran <= 0 and not view.in_flight:
            view.cpu_mark = (cpu_s, view.busy_s)
        elif ran >= 0.5:
            sample = max(0.0, cpu_s - cpu0) / ran
            view.host_cores = sample if not view.host_cores else (
                (1 - EWMA) * view.host_cores + EWMA * sample)
            view.cpu_mark = (cpu_s, view.busy_s)

    @_on.register
    def _on_WorkerExited(self, ev: WorkerExited, actions: list) -> None:
        view = self._current(ev.device, ev.epoch)
        if view is not None:
            self._lose_worker(view, f"worker process exited ({ev.reason})", actions, kill=False)

    @_on.register
    def _on_WorkerAdded(self, ev: WorkerAdded, actions: list) -> None:
        view = self.workers.get(ev.device)
        if view is None:
            if ev.template not in self.instances or ev.device == ev.template:
                return  # not a per-node device of this config: nothing to add
            capacity = ev.capacity or self.config.device(ev.template).capacity
            view = self.workers[ev.device] = self._view(ev.device, ev.template, capacity)
        elif view.state != "gone":
            return  # already there
        if view.template in self.instances and ev.device not in self.instances[view.template]:
            self.instances[view.template] = sorted(self.instances[view.template] + [ev.device])
            self._expand_orders()
        view.node = ev.node or view.node
        actions.append(self._start_worker(view, self.clock()))

    @_on.register
    def _on_WorkerGone(self, ev: WorkerGone, actions: list) -> None:
        view = self.workers.get(ev.device)
        if view is None or view.state == "gone":
            return
        if view.state in ("starting", "up"):
            self._lose_worker(view, ev.reason, actions, kill=True)
        view.state, view.last_exit, view.restart_at, view.pid = "gone", ev.reason, None, None
        for slot in view.models.values():
            slot.load, slot.probing = ModelLoad("gone", detail=ev.reason), False
        if ev.device in self.instances.get(view.template, ()):
            self.instances[view.template].remove(ev.device)  # out of placement; still in status
            self._expand_orders()
        for model in view.models:
            self._reject_hopeless(model, actions)

    def _lose_worker(self, view: WorkerView, reason: str, actions: list, kill: bool) -> None:
        now = self.clock()
        if kill:
            actions.append(KillWorker(view.device, view.epoch, reason))
        stable = view.up_since is not None and now - view.up_since >= STABLE_AFTER_S
        view.backoff_s = self.sc.restart_backoff_s if stable or not view.backoff_s else min(
            view.backoff_s * 2, MAX_RESTART_BACKOFF_S)
        view.state, view.last_exit, view.up_since = "lost", reason, None
        view.restart_at = now + view.backoff_s
        view.lost += 1
        for slot in view.models.values():
            slot.load, slot.probing = ModelLoad("loading", detail="worker restarting"), False
        in_flight, view.in_flight = view.in_flight, {}
        for task in reversed(in_flight.values()):  # each re-run goes to the front: keep their order
            if task.finished:
                continue
            task.running = None
            task.attempts.append(Attempt(view.device, "worker_lost", reason, task.started_at, now))
            self._retry_or_fail(task, actions)

    # -- tasks --

    @_on.register
    def _on_TaskSubmitted(self, ev: TaskSubmitted, actions: list) -> None:
        order = self.orders.get(ev.model)
        if order is None:
            known = ", ".join(sorted(self.orders)) or "none"
            actions.append(Reject(ev.key, InvalidInput(
                f"unknown model {ev.model!r}; this cluster serves: {known}")))
            return
        if ev.key in self.tasks:  # the key names the client: never said back to anyone
            actions.append(Reject(ev.key, InvalidInput(
                "task id already in use by another of this client's unanswered tasks")))
            return
        if ev.timeout_s and not 0 < ev.timeout_s <= self.sc.max_task_timeout_s:  # NaN too
            actions.append(Reject(ev.key, InvalidInput(
                f"timeout_s must be a positive number of seconds up to "
                f"{self.sc.max_task_timeout_s:g} (scheduler.max_task_timeout_s), got "
                f"{brief(ev.timeout_s, 40)}")))
            return
        timeout = ev.timeout_s or self.sc.task_timeout_s
        now = self.clock()
        task = Task(ev.key, ev.model, ev.payload, now + timeout, timeout,
                    generation=Generation(ev.stream) if ev.generate else None, client=ev.client,
                    submitted_at=now, queued_at=now, max_tokens=ev.max_tokens,
                    nbytes=ev.nbytes)
        if self._hopeless(task):  # says more than Overloaded would, so it is checked first
            self._accept(task)
            self._fail(task, actions)
            return
        crowded = self._crowded(task, ev.backlog)
        if crowded is not None and self.queue and any(v.free for v in self.workers.values()):
            # Events fed together place once, at the end: before refusing, let the workers
            # take what they would have taken had each event come alone.
            self._place(actions)
            crowded = self._crowded(task, ev.backlog)
        if crowded is not None:
            self.counters["overloaded"] += 1
            actions.append(Reject(ev.key, Overloaded(crowded)))
            return
        self._accept(task)
        self.counters["submitted"] += 1
        self.queue.append(task)
        self._enqueued(task)

    @_on.register
    def _on_TaskSucceeded(self, ev: TaskSucceeded, actions: list) -> None:
        view, task = self._finish_attempt(ev.device, ev.epoch, ev.attempt)
        if view is None:
            return
        slot = view.models.get(task.model) if task else None
        view.busy_s += ev.service_s
        if slot is not None and task is not None:
            self._observe(view, slot, task, ev.service_s, ev.batch)
            slot.consecutive_errors, slot.open_until, slot.probing = 0, None, False
            slot.done += 1
            slot.latency.observe(ev.service_s)
        view.done += 1
        if task is None or task.finished:
            return  # answered already (deadline, cancel): drop the late result
        for blamed in task.blamed:  # the input was fine: those errors were the devices'
            self._count_device_error(blamed)
        self._finish(task)
        self.counters["completed"] += 1
        if slot is not None:
            slot.request.observe(self.clock() - task.submitted_at)
            if task.generation is not None and isinstance(ev.payload, dict):
                slot.prompt_tokens += int(ev.payload.get("prompt_tokens") or 0)
        actions.append(Deliver(task.key, view.device, ev.payload,
                               self._with_skipped(task, before=view.device), ev.service_s,
                               task.generation, task.submitted_at, task.started_at,
                               self.clock()))

    def _observe(self, view: WorkerView, slot: ModelSlot, task: Task, service_s: float,
                 batch: int = 1) -> None:
        """Refine the estimate from a measured run: a tensor task's alone or as its share of
        a batch; a generation's per token, at its batch."""
        if task.generation is None:
            slot.estimate.observe_call(service_s, batch)
            slot.batches[batch] += 1
            if view.prefetch_cfg is None:
                self._set_prefetch(view)
            return
        made = len(task.generation.ids) - task.tokens_before
        mean = (task.batch + len(view.in_flight) + 1) / 2  # sequences at dispatch and at end
        slot.estimate.observe(service_s, made, mean)
        total = len(task.generation.ids)
        if total:
            old = self.typical_tokens.get(task.model)
            self.typical_tokens[task.model] = total if old is None else (
                (1 - EWMA) * old + EWMA * total)

    @_on.register
    def _on_TaskTokens(self, ev: TaskTokens, actions: list) -> None:
        view = self._current(ev.device, ev.epoch)
        if view is None:
            return
        view.last_seen = self.clock()
        task = view.in_flight.get(ev.attempt)
        if task is None or task.finished or task.generation is None:
            return  # tokens of a cancelled, re-run or answered task: drop them
        gen = task.generation
        moved = gen.device if gen.device is not None and gen.device != ev.device else None
        slot = view.models.get(task.model)
        if slot is not None and ev.ids:
            self._time_tokens(task, slot, len(ev.ids), not gen.ids)
        gen.ids.extend(ev.ids)
        gen.text += ev.text
        gen.tool_calls.extend(ev.tool_calls)
        gen.logprobs.extend(ev.logprobs)
        gen.device = ev.device
        if gen.stream and (ev.text or ev.tool_calls or ev.logprobs or moved):
            actions.append(StreamChunk(task.key, ev.text, ev.device, moved, ev.tool_calls,
                                       ev.logprobs))

    def _time_tokens(self, task: Task, slot: ModelSlot, n: int, first: bool) -> None:
        """TTFT at a task's very first token; else the gap since the attempt's last tokens,
        spread over the ``n`` tokens that came together (one engine step may yield several)."""
        now = self.clock()
        slot.completion_tokens += n
        if first:
            slot.ttft.observe(now - task.submitted_at)
        elif task.tokens_at is not None:
            slot.itl.observe((now - task.tokens_at) / n, times=n)
        task.tokens_at = now

    @_on.register
    def _on_TaskFailed(self, ev: TaskFailed, actions: list) -> None:
        view, task = self._finish_attempt(ev.device, ev.epoch, ev.attempt)
        if view is None or task is None:
            return
        slot = view.models.get(task.model)
        rule = error_class(ev.kind)  # what this kind of failure means: errors.py says
        view.failed += 1
        view.busy_s += ev.service_s
        if slot is not None:
            slot.failed += 1
            slot.probing = False
            if rule.opens_breaker:
                if slot.open_until is not None:
                    self._count_device_error(slot)  # a failed probe re-opens it at once
                elif not task.finished:  # an answered task can no longer tell whose fault
                    task.blamed.append(slot)
            elif issubclass(rule, ModelUnavailable):
                slot.load = dataclasses.replace(slot.load, state="unavailable", error=ev.message)
                self._reject_hopeless(task.model, actions)
        if task.finished:
            return
        task.attempts.append(Attempt(view.device, ev.kind, ev.message, task.started_at,
                                     self.clock()))
        if not rule.retry_elsewhere:  # the task is wrong, not the device: never re-run
            self._finish(task)
            actions.append(Reject(task.key, rule(ev.message, task.attempts[:-1])))
            return
        # Any other failure (device, unsupported input shape, model unavailable, a worker
        # that cancelled on its own) is the device's: another device may serve the task.
        task.excluded.add(view.device)
        view.failed_over += 1
        if slot is not None:
            slot.failed_over += 1
        self._retry_or_fail(task, actions)

    @_on.register
    def _on_TaskCancelled(self, ev: TaskCancelled, actions: list) -> None:
        task = self.tasks.get(ev.key)
        if task is None:
            return
        self._abandon(task, actions, Cancelled("cancelled by the caller", task.attempts))

    # -- clients --

    @_on.register
    def _on_ClientHello(self, ev: ClientHello, actions: list) -> None:
        limit = None
        if ev.keepalive_s is not None and ev.keepalive_s > 0:
            limit = max(CLIENT_SILENCE_FACTOR * ev.keepalive_s, CLIENT_SILENCE_FLOOR_S)
        self.clients[ev.client] = ClientView(limit, self.clock())
        if ev.previous is not None and ev.previous != ev.client:
            self._let_go(ev.previous, "the client lost that connection and connected again",
                         "connected again", actions)

    @_on.register
    def _on_ClientHeard(self, ev: ClientHeard, actions: list) -> None:
        view = self.clients.get(ev.client)
        if view is not None:
            view.last_heard = self.clock()

    @_on.register
    def _on_ClientBye(self, ev: ClientBye, actions: list) -> None:
        self._let_go(ev.client, "the client closed its connection", "said goodbye", actions)

    def _let_go(self, client: Any, why: str, reason: str, actions: list) -> None:
        """Forget a client that left knowingly (a goodbye, or a connection it replaced):
        its unfinished tasks are cancelled, quietly."""
        known = self.clients.pop(client, None) is not None
        cancelled = self._cancel_client(client, why, actions)
        if known or cancelled:
            actions.append(ForgetClient(client, reason, cancelled, goodbye=True))

    def _forget_silent_clients(self, now: float, actions: list) -> None:
        silent = [(c, v) for c, v in self.clients.items() if v.silence_limit_s is not None
                  and now - v.last_heard > v.silence_limit_s]
        for client, view in silent:
            del self.clients[client]
            why = (f"went silent for {now - view.last_heard:.1f} s (more than "
                   f"{view.silence_limit_s:g} s)")
            cancelled = self._cancel_client(client, f"the client {why}", actions)
            actions.append(ForgetClient(client, why, cancelled))

    def _cancel_client(self, client: Any, why: str, actions: list) -> int:
        tasks = list(self.client_tasks.get(client, {}).values())  # in the order submitted
        for task in tasks:
            self._abandon(task, actions, Cancelled(why, task.attempts))
        return len(tasks)

    # -- time --

    @_on.register
    def _on_Tick(self, ev: Tick, actions: list) -> None:
        now = self.clock()
        self._forget_silent_clients(now, actions)
        heard = now if ev.heard_all_until is None else min(now, ev.heard_all_until)
        for view in self.workers.values():
            if view.state == "lost" and view.restart_at is not None and now >= view.restart_at:
                view.restarts += 1
                actions.append(self._start_worker(view, now))
            elif view.state == "starting" and now - view.started_at > self.sc.load_timeout_s:
                self._lose_worker(view, f"did not register within {self.sc.load_timeout_s:g} s",
                                  actions, kill=True)
            elif view.state == "up" and heard - view.last_seen > self._silence_limit(view):
                self._lose_worker(view, f"no heartbeat for {heard - view.last_seen:.1f} s "
                                        f"(hung or stopped)", actions, kill=True)
        for task in [t for t in self.tasks.values() if now >= t.deadline]:
            self._abandon(task, actions, DeadlineExceeded(
                f"no result within {task.timeout_s:g} s", task.attempts))
        # A run still held long after its task's deadline means the worker ignores cancels.
        grace = self.sc.heartbeat_timeout_s
        for view in self.workers.values():
            stuck = [t for t in view.in_flight.values() if t.finished and now > t.deadline + grace]
            if view.state == "up" and stuck:
                self._lose_worker(view, "a run did not stop after its deadline and cancel",
                                  actions, kill=True)

    def _silence_limit(self, view: WorkerView) -> float:
        # An engine might hold the GIL while compiling (none measured here does): allow more
        # silence while a model loads, but not while tasks wait on this worker.
        loading = any(s.state == "loading" for s in view.models.values())
        return self.sc.load_timeout_s if loading and not view.in_flight else \
            self.sc.heartbeat_timeout_s

    # -- helpers --

    def _count_device_error(self, slot: ModelSlot) -> None:
        slot.consecutive_errors += 1
        if slot.consecutive_errors >= self.sc.breaker_threshold:
            slot.open_until = self.clock() + self.sc.breaker_cooldown_s

    def _finish_attempt(self, device: str, epoch: int, attempt: int):
        view = self._current(device, epoch)
        if view is None:
            return None, None
        view.last_seen = now = self.clock()
        task = view.in_flight.pop(attempt, None)
        if task is not None:
            if task.running == (device, attempt):
                task.running = None
            if len(view.in_flight) >= view.capacity:  # a slot freed: the next held task runs
                # (workers take held tasks in the order sent)
                nxt = next(itertools.islice(view.in_flight.values(), view.capacity - 1, None))
                if nxt.ran_from is None:
                    nxt.ran_from = now
        return view, task

    def _accept(self, task: Task) -> None:
        self.tasks[task.key] = task
        self.held_bytes += task.nbytes
        if task.client is not None:
            self.client_tasks.setdefault(task.client, {})[task.key] = task
            self.client_bytes[task.client] += task.nbytes

    def _finish(self, task: Task) -> None:
        task.finished = True
        if self.tasks.pop(task.key, None) is not None:
            self.held_bytes -= task.nbytes
            if task.client is not None:
                self.client_bytes[task.client] -= task.nbytes
                if not self.client_bytes[task.client]:
                    del self.client_bytes[task.client]
        own = self.client_tasks.get(task.client)
        if own is not None:
            own.pop(task.key, None)
            if not own:
                del self.client_tasks[task.client]

    def _abandon(self, task: Task, actions: list, error: FanoutError) -> None:
        """Answer a task that will not complete (cancel, deadline) and stop its run."""
        if task.running is not None:
            device, attempt = task.running
            view = self.workers[device]
            actions.append(CancelAttempt(device, view.epoch, attempt))
            # The slot stays held until the worker confirms: capacity is never exceeded.
        else:
            self._unqueue(task)
        self._finish(task)
        self.counters[error.kind] += 1
        actions.append(Reject(task.key, error))

    def _retry_or_fail(self, task: Task, actions: list) -> None:
        if len(task.attempts) >= self.sc.max_attempts or self._hopeless(task):
            self._fail(task, actions)
            return
        self.counters["retried"] += 1
        task.queued_at = self.clock()
        self.queue.appendleft(task)  # a re-run goes before new work: it has waited already
        self._enqueued(task)

    def _crowded(self, task: Task, backlog: int) -> str | None:
        """Why the scheduler cannot take ``task`` now (a bound it would cross), or None."""
        sc = self.sc
        if len(self.queue) >= sc.max_queue:
            return (f"queue is full ({sc.max_queue} tasks waiting); retry later or raise "
                    f"scheduler.max_queue")
        if task.client is not None:
            if backlog > sc.max_client_backlog_bytes:
                return (f"{backlog} bytes of this client's answers wait for it to read them "
                        f"(more than scheduler.max_client_backlog_bytes = "
                        f"{sc.max_client_backlog_bytes}); read them, then retry")
            share_tasks = max(1, int(sc.max_queue * sc.max_client_share))
            if self.queued_clients[task.client] >= share_tasks:
                return (f"this client has {share_tasks} tasks waiting, its share of the queue "
                        f"(scheduler.max_client_share = {sc.max_client_share:g} of max_queue "
                        f"= {sc.max_queue}); retry as they are answered")
            share_bytes = int(sc.max_queue_bytes * sc.max_client_share)
            if self.client_bytes[task.client] + task.nbytes > share_bytes:
                return (f"this client's unanswered tasks hold {self.client_bytes[task.client]} "
                        f"bytes; with {task.nbytes} more they would pass its share "
                        f"(scheduler.max_client_share = {sc.max_client_share:g} of "
                        f"max_queue_bytes = {sc.max_queue_bytes}); retry as they are answered")
        if self.held_bytes + task.nbytes > sc.max_queue_bytes:
            return (f"the scheduler holds {self.held_bytes} bytes of unanswered tasks; with "
                    f"{task.nbytes} more it would pass scheduler.max_queue_bytes = "
                    f"{sc.max_queue_bytes}; retry later")
        return None

    def _unqueue(self, task: Task) -> None:
        if not self.queue.discard(task):
            return  # not queued (running, or already taken off in _place)
        self._dequeued(task)

    def _enqueued(self, task: Task) -> None:
        self.queued_models[task.model] += 1
        self.queued_excluding[task.model] += bool(task.excluded)
        if task.client is not None:
            self.queued_clients[task.client] += 1

    def _dequeued(self, task: Task) -> None:
        self.queued_models[task.model] -= 1
        self.queued_excluding[task.model] -= bool(task.excluded)
        if task.client is not None:
            self.queued_clients[task.client] -= 1
            if not self.queued_clients[task.client]:
                del self.queued_clients[task.client]

    def _hopeless(self, task: Task) -> bool:
        """True when no device left in the task's order can ever serve it."""
        for device in self.orders[task.model]:
            if device in task.excluded:
                continue
            slot = self.workers[device].models.get(task.model)
            if slot is not None and slot.state not in ("unavailable", "gone"):
                return False
        return True

    def _with_skipped(self, task: Task, before: str | None = None) -> list[Attempt]:
        """The task's attempts plus the devices it skipped, up to ``before``, because the model
        is unavailable there or the device's node is gone: a result says why it did not run
        on a preferred device."""
        attempts = list(task.attempts)
        tried = {a.device for a in attempts}
        for device in self.orders[task.model]:
            if device == before:
                break
            slot = self.workers[device].models.get(task.model)
            if device in tried or slot is None:
                continue
            if slot.state == "unavailable":
                attempts.append(Attempt(device, "model_unavailable",
                                        slot.load.error or "unavailable"))
            elif slot.state == "gone":
                attempts.append(Attempt(device, "worker_gone", slot.load.detail))
        return attempts

    def _fail(self, task: Task, actions: list) -> None:
        attempts = self._with_skipped(task)
        self._unqueue(task)
        self._finish(task)
        self.counters["failed"] += 1
        if attempts and all(error_class(a.kind).input_fault for a in attempts):
            err: FanoutError = InvalidInput(
                f"no device of model {task.model!r} accepts this input", attempts)
        else:
            err = NoDeviceAvailable(
                f"no device could run model {task.model!r} "
                f"({len(task.attempts)} of at most {self.sc.max_attempts} tries made)", attempts)
        actions.append(Reject(task.key, err))

    def _reject_hopeless(self, model: str, actions: list) -> None:
        for task in [t for t in self.queue if t.model == model and self._hopeless(t)]:
            self._fail(task, actions)

    # -- placement --

    def _lanes(self, now: float) -> placement.Lanes:
        """Every up worker's slots, each free at once or when its running task should end,
        and then its prefetched tasks (beyond its slots, in the order sent) in turn."""
        lanes = placement.Lanes()
        for v in self.workers.values():
            if v.state == "up":
                held = list(v.in_flight.values())
                lanes.add(v.device, v.capacity,
                          [self._remaining(v, t, now) for t in held[:v.capacity]],
                          [t.expected_s for t in held[v.capacity:]])
        return lanes

    def _remaining(self, view: WorkerView, task: Task, now: float) -> float:
        gen, slot = task.generation, view.models.get(task.model)
        elapsed = now - (task.started_at if task.ran_from is None else task.ran_from)
        if gen is not None and slot is not None and slot.estimate.token_s is not None:
            if len(gen.ids) > task.tokens_before:  # under way: the tokens it has left to make
                left = max(0, self._tokens_total(task) - len(gen.ids))
                late = elapsed - task.expected_s  # ... or as long again as it is overdue
                return max(left * slot.estimate.step_s(len(view.in_flight)), late)
        return placement.remaining_s(task.expected_s, elapsed)

    def _tokens_total(self, task: Task) -> int:
        """The tokens a generation is expected to end with: its limit, or fewer if this
        model's completions usually stop sooner."""
        limit = task.max_tokens or DEFAULT_MAX_TOKENS
        typical = self.typical_tokens.get(task.model)
        total = limit if typical is None else min(limit, round(typical))
        return max(total, len(task.generation.ids) + 1 if task.generation else 1)

    def _expected(self, view: WorkerView, slot: ModelSlot, task: Task, booked: int) -> float:
        """The task's expected service time on ``view``, ``booked`` tasks already placed
        there by this pass; a device not measured yet counts as the slowest measured one."""
        if task.generation is not None:
            batch = min(view.capacity, len(view.in_flight) + booked + 1)
            left = self._tokens_total(task) - len(task.generation.ids)
            expected = slot.estimate.expected(max(1, left), batch)
        else:  # tasks ahead of it fill the slots: it will share an engine call, if it batches
            batched = slot.load.max_batch > 1 and len(view.in_flight) + booked >= view.capacity
            expected = slot.estimate.expected(batched=batched)
        if expected is not None:
            return expected
        known = [s.estimate.service_s for v in self.workers.values()
                 if (s := v.models.get(task.model)) is not None and s.estimate.service_s]
        return max(known, default=0.0)

    def _eligible(self, task: Task, lanes: placement.Lanes,
                  now: float) -> list[tuple[int, WorkerView, ModelSlot]]:
        """(rank, worker, slot) of each worker that may run the task in this pass: up, not
        failed on by the task, the model ready there, its breaker closed, and not a device
        that would cost its node's CPU workers more than it adds (while another can run it)."""
        out = []
        for rank, device in enumerate(self.orders[task.model]):
            if device in task.excluded or device not in lanes:
                continue
            view = self.workers[device]
            slot = view.models.get(task.model)
            if slot is None or slot.state != "ready":
                continue
            if slot.open_until is not None:
                if now < slot.open_until or slot.probing:
                    continue
            out.append((rank, view, slot))
        worth = [e for e in out if self._displaced(task, e, out) < 1.0]
        return worth or out

    def _displaced(self, task: Task, entry: tuple[int, WorkerView, ModelSlot],
                   eligible: list[tuple[int, WorkerView, ModelSlot]]) -> float:
        """How many tasks the other CPU workers of its node would not run while this task runs
        here: its runs keep host cores busy (an accelerator's simulator or spinning driver,
        a CPU worker's own compute), and while they run, CPU work on the node takes longer if
        its cores are then oversubscribed (by the workers' own demand and whatever else the
        node runs), the more so for a worker whose runs compute rather than wait."""
        _, view, slot = entry
        if view.host_cores <= 0 or view.cores <= 0:
            return 0.0
        mates = [(v, self._expected(v, s, task, 0)) for _, v, s in eligible
                 if v is not view and v.kind == "cpu" and v.node == view.node]
        if not mates:
            return 0.0
        load = self.nodes.get(view.node)
        demand = sum(v.capacity * v.host_cores for v, _ in mates) + (
            load.other_cores if load else 0.0)
        stretch = placement.cpu_stretch(view.cores, demand, view.host_cores)
        lost = sum(placement.throughput_lost(v.host_cores, stretch) * v.capacity / e
                   for v, e in mates if e > 0)  # tasks per second
        return lost * self._expected(view, slot, task, 0)

    def _candidates(self, task: Task, eligible: list[tuple[int, WorkerView, ModelSlot]],
                    lanes: placement.Lanes) -> list[placement.Candidate]:
        return [placement.Candidate(v.device, rank, lanes.start_s(v.device),
                                    self._expected(v, slot, task, lanes.booked[v.device]))
                for rank, v, slot in eligible]

    def _any_queued(self, models: set[str]) -> bool:
        return any(self.queued_models[m] > 0 for m in models)

    def _servable(self) -> set[str]:
        return {m for v in self.workers.values() if v.free > 0
                for m, slot in v.models.items() if slot.state == "ready"}

    def _place(self, actions: list) -> None:
        """One pass over the queue in FIFO order: each task is booked on the worker the policy
        expects to finish it first, counting the tasks booked before it; one with a free slot
        runs it now, a busy one leaves it queued, waiting for that worker."""
        if not self.queue:
            return
        now = self.clock()
        # Models some free slot has ready: a task of any other model is passed over at the
        # cost of a set lookup (an idle NPU must not make a CPU model's backlog expensive).
        free = sum(v.free for v in self.workers.values())
        servable = self._servable()
        if not self._any_queued(servable):
            return
        lanes = self._lanes(now)
        # Per kind of task (model, devices excluded): who may run it, how many wait in this
        # pass, and the kinds that none of their workers can start now (the rest of such a
        # kind waits too: booking it only makes the busy workers later).
        eligible: dict[tuple[str, frozenset], list] = {}
        waiting: collections.Counter[tuple] = collections.Counter()
        stuck: set[tuple[str, frozenset]] = set()
        kept: collections.deque[Task] = collections.deque()
        # Models whose queued tasks may still be placed by this pass, and how many of their
        # tasks the pass has yet to see (those with exclusions apart): once a model's plain
        # kind is stuck and none of its other kinds is left, the pass is done with it.
        live = {m for m in servable if self.queued_models[m] > 0}
        unseen = {m: [self.queued_models[m] - self.queued_excluding[m],
                      self.queued_excluding[m]] for m in live}
        while self.queue and free > 0 and live:
            task = self.queue.popleft()
            sig = (task.model, frozenset(task.excluded))
            if task.model in unseen:
                unseen[task.model][bool(task.excluded)] -= 1
            if now >= task.deadline:  # expired while queued: answer it, do not dispatch it
                self._dequeued(task)
                self._abandon(task, actions, DeadlineExceeded(
                    f"no result within {task.timeout_s:g} s", task.attempts))
                continue
            if task.model not in live or sig in stuck or waiting[sig] >= LOOKAHEAD:
                kept.append(task)
                self._done_with(task.model, live, unseen, stuck, waiting)
                continue
            if sig not in eligible:
                eligible[sig] = self._eligible(task, lanes, now)
            candidates = self._candidates(task, eligible[sig], lanes)
            choice = self.policy(candidates)
            if not any(self._takes(c, task) for c in candidates):
                stuck.add(sig)
            if choice is not None:
                lanes.commit(choice.device, choice.service_s)
            if choice is None or not self._takes(choice, task):  # none, or full: wait for it
                waiting[sig] += choice is not None
                kept.append(task)
                self._done_with(task.model, live, unseen, stuck, waiting)
                continue
            self._dispatch(task, choice, now, actions)
            free -= 1
            if self.workers[choice.device].free == 0:
                servable = self._servable()
                live &= servable  # nothing left for a model no free slot could take
        self.queue.extendleft(reversed(kept))  # the passed-over tasks, back in their order

    def _takes(self, candidate: placement.Candidate, task: Task) -> bool:
        """Whether the candidate's worker takes the task now: a slot free for a generation,
        a credit left (a slot, or room to prefetch) for a tensor task."""
        view = self.workers[candidate.device]
        if task.generation is not None:
            return candidate.free and len(view.in_flight) < view.capacity
        return view.free > 0

    @staticmethod
    def _done_with(model: str, live: set[str], unseen: dict[str, list[int]],
                   stuck: set[tuple[str, frozenset]], waiting: collections.Counter) -> None:
        """Drop ``model`` from the pass once nothing of it that is left could be placed."""
        left = unseen.get(model)
        if left is None or left[1] > 0:
            return
        plain: tuple[str, frozenset] = (model, frozenset())
        if left[0] <= 0 or plain in stuck or waiting[plain] >= LOOKAHEAD:
            live.discard(model)

    def _dispatch(self, task: Task, choice: placement.Candidate, now: float,
                  actions: list) -> None:
        view = self.workers[choice.device]
        slot = view.models[task.model]
        if slot.open_until is not None:
            slot.probing = True  # half-open: this task is the probe
        slot.queue_wait.observe(now - task.queued_at)
        task.tokens_at = None  # the gap to this attempt's first tokens is no token gap
        attempt = next(self._attempt_ids)
        self._dequeued(task)
        view.in_flight[attempt] = task
        task.running = (view.device, attempt)
        task.started_at, task.expected_s, task.batch = now, choice.service_s, len(view.in_flight)
        task.ran_from = now if len(view.in_flight) <= view.capacity else None
        task.tokens_before = len(task.generation.ids) if task.generation else 0
        actions.append(Dispatch(view.device, view.epoch, attempt, task.model, task.payload,
                                max(0.0, task.deadline - now), task.generation))

    # -- views --

    def snapshot(self, cluster: ClusterInfo | None = None) -> Status:
        """Status of every worker and model (for ``status`` replies); ``cluster``: the
        shell's own part."""
        now = self.clock()
        queued = collections.Counter(t.model for t in self.queue)
        workers = tuple(WorkerStatus(
            device=v.device, kind=v.kind, state=v.state, pid=v.pid, node=v.node,
            capacity=v.capacity, in_flight=len(v.in_flight), prefetch=v.prefetch,
            queued=sum(queued[m] for m in v.models), done=v.done, failed=v.failed,
            failed_over=v.failed_over, lost=v.lost, restarts=v.restarts,
            peak_running=v.peak_running, last_exit=v.last_exit, template=v.template,
            epoch=v.epoch, cores=v.cores, host_cores=round(v.host_cores, 3),
            models={name: self._model_status(s, now) for name, s in v.models.items()})
            for v in self.workers.values())
        return Status(workers=workers, queued=len(self.queue), unanswered=len(self.tasks),
                      counters=Counters(**self.counters), max_queue=self.sc.max_queue,
                      queued_by_model=dict(queued), cluster=cluster,
                      other_cores={n: round(load.other_cores, 3)
                                   for n, load in self.nodes.items()},
                      held_bytes=self.held_bytes, max_queue_bytes=self.sc.max_queue_bytes)

    @staticmethod
    def _model_status(s: ModelSlot, now: float) -> ModelStatus:
        return ModelStatus(**{f.name: getattr(s.load, f.name)
                              for f in dataclasses.fields(s.load)},
                           done=s.done, failed=s.failed,
                           failed_over=s.failed_over, expected_s=s.expected_s,
                           breaker=s.breaker(now), latency=s.latency.copy(),
                           request=s.request.copy(), ttft=s.ttft.copy(), itl=s.itl.copy(),
                           queue_wait=s.queue_wait.copy(), prompt_tokens=s.prompt_tokens,
                           completion_tokens=s.completion_tokens,
                           batches={str(k): n for k, n in sorted(s.batches.items())})

    def ready(self) -> bool:
        """Every worker is up (or gone with its node) and no model is still loading."""
        return all(v.state == "gone" or v.state == "up" and all(
            s.state != "loading" for s in v.models.values()) for v in self.workers.values())

    def validate(self) -> None:
        """Invariants, for tests: capacity honoured, no task both queued and running, every
        client's tasks indexed under it."""
        for v in self.workers.values():
            held = len(v.in_flight)
            assert held <= v.capacity + v.peak_prefetch, (v.device, held, v.capacity)
            gens = sum(t.generation is not None for t in v.in_flight.values())
            assert gens <= v.capacity, (v.device, gens, v.capacity)
        for t in self.queue:
            assert t.running is None and not t.finished, t
        counted = collections.Counter(t.model for t in self.queue)
        nonzero = {m: n for m, n in self.queued_models.items() if n}
        assert nonzero == dict(counted), (self.queued_models, counted)
        excluding = collections.Counter(t.model for t in self.queue if t.excluded)
        nonzero = {m: n for m, n in self.queued_excluding.items() if n}
        assert nonzero == dict(excluding), (self.queued_excluding, excluding)
        by_client = collections.Counter(t.client for t in self.queue if t.client is not None)
        assert self.queued_clients == by_client, (self.queued_clients, by_client)
        for t in self.tasks.values():
            assert not t.finished
        indexed = {k: t for own in self.client_tasks.values() for k, t in own.items()}
        assert indexed == {k: t for k, t in self.tasks.items() if t.client is not None}
        assert all(self.client_tasks.values()), "a client with no tasks is left indexed"
        assert self.held_bytes == sum(t.nbytes for t in self.tasks.values())
        assert self.client_bytes == collections.Counter(
            {c: sum(t.nbytes for t in own.values()) for c, own in self.client_tasks.items()
             if sum(t.nbytes for t in own.values())})
