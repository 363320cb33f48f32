"""The scheduler's placement and failover rules (runtime/core/scheduler.py) as a pure state machine.

No processes, sockets or sleeps: events go in, actions come out, and a fake clock is advanced
by hand. Every ``handle`` is followed by ``state.validate()``; at teardown the tasks the state
still owes must be exactly those the test never saw answered, and none was answered twice.
"""
from __future__ import annotations

import contextlib
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from runtime.config.schema import Config, DeviceConfig, ModelConfig, SchedulerConfig
from runtime.core.scheduler import (
    CancelAttempt,
    ClientBye,
    ClientHeard,
    ClientHello,
    Deliver,
    Dispatch,
    Event,
    ForgetClient,
    KillWorker,
    ModelStateChanged,
    Reject,
    SchedulerState,
    StartWorker,
    TaskCancelled,
    TaskFailed,
    TaskSubmitted,
    TaskSucceeded,
    Tick,
    WorkerAdded,
    WorkerExited,
    WorkerGone,
    WorkerHeartbeat,
    WorkerRegistered,
)
from runtime.core.task_queue import TaskQueue
from runtime.errors import (
    ERROR_KINDS,
    Attempt,
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    NoDeviceAvailable,
    Overloaded,
)
from runtime.wire.status import ModelLoad

# ---- the driver --------------------------------------------------------------------------

@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def model(name: str, *devices: str) -> ModelConfig:
    return ModelConfig(name=name, source=f"packaged:{name}", devices=list(devices))


def cluster(*, npu: int = 1, cpu: int = 2, models: list[ModelConfig] | None = None,
            prefetch: int | None = 0, **scheduler: Any) -> Config:
    """npu0 (capacity ``npu``) and cpu0 (capacity ``cpu``); model ``m`` prefers npu0. No
    prefetch unless asked: these rules are about slots (prefetch has tests of its own)."""
    return Config(
        devices=[DeviceConfig("npu0", "npu", "qnn", capacity=npu, prefetch=prefetch),
                 DeviceConfig("cpu0", "cpu", "onnxruntime", capacity=cpu, prefetch=prefetch)],
        models=models if models is not None else [model("m", "npu0", "cpu0")],
        scheduler=SchedulerConfig(**scheduler))


class Harness:
    """Holds the state and its clock, speaks for the workers, and records every answer.

    A task's payload is its key, so a Dispatch names the task it carries.
    """

    def __init__(self, config: Config, track_nodes: bool = False) -> None:
        self.clock = FakeClock()
        self.state = SchedulerState(config, self.clock, track_nodes=track_nodes)
        self.epochs: dict[str, int] = {}
        self.log: list = []
        self.pending: set[Any] = set()  # accepted, not yet answered
        self.answers: dict[Any, Deliver | Reject] = {}
        self.refused: list[Reject] = []  # submits refused because the key was in use
        self._refusing: Any = None
        self._record(self.state.start())

    # -- events in --

    def handle(self, *events) -> list:
        actions = self.state.handle(*events)
        self.state.validate()
        self._record(actions)
        return actions

    def _record(self, actions: list) -> None:
        for a in actions:
            if isinstance(a, StartWorker):
                self.epochs[a.device] = a.epoch
            elif isinstance(a, (Deliver, Reject)):
                if self._refusing is not None and a.key == self._refusing:
                    self.refused.append(a)
                    continue
                assert a.key in self.pending, f"{a.key!r} answered twice or never accepted: {a}"
                self.pending.remove(a.key)
                self.answers[a.key] = a
        self.log += actions

    def up(self, *devices: str, **states: str) -> list:
        """Register the current incarnation of each device; every model ready unless given."""
        actions = []
        for device in devices or tuple(self.state.workers):
            models = {name: ModelLoad(states.get(name, "ready"))
                      for name in self.state.workers[device].models}
            actions += self.handle(WorkerRegistered(device, self.epochs[device], pid=1,
                                                    node="test", models=models))
        return actions

    def model_state(self, device: str, name: str, state: str, error: str | None = None) -> list:
        return self.handle(ModelStateChanged(device, self.epochs[device], name,
                                             ModelLoad(state, error)))

    def heartbeat(self, *devices: str) -> list:
        return self.handle(*(WorkerHeartbeat(d, self.epochs[d]) for d in devices))

    def tick(self, advance: float = 0.0) -> list:
        self.clock.advance(advance)
        return self.handle(Tick())

    def submit(self, key: Any, name: str = "m", timeout_s: float | None = None,
               client: Any = None, nbytes: int = 0, backlog: int = 0,
               payload: Any = None) -> list:
        duplicate = key in self.pending
        self.pending.add(key)
        self._refusing = key if duplicate else None
        try:
            return self.handle(TaskSubmitted(key, name, payload=key if payload is None
                                             else payload, timeout_s=timeout_s, client=client,
                                             nbytes=nbytes, backlog=backlog))
        finally:
            self._refusing = None

    def cancel(self, key: Any) -> list:
        return self.handle(TaskCancelled(key))

    # -- worker answers, addressed by task key (its latest dispatch) --

    def dispatch_of(self, key: Any) -> Dispatch:
        found = [a for a in self.log if isinstance(a, Dispatch) and a.payload == key]
        assert found, f"{key!r} was never dispatched"
        return found[-1]

    def succeed(self, key: Any, service_s: float = 0.01, *, epoch: int | None = None,
                dispatch: Dispatch | None = None) -> list:
        d = dispatch or self.dispatch_of(key)
        return self.handle(TaskSucceeded(d.device, d.epoch if epoch is None else epoch,
                                         d.attempt, f"out:{key}", service_s))

    def fail(self, key: Any, kind: str = "device", message: str = "boom", *,
             dispatch: Dispatch | None = None) -> list:
        d = dispatch or self.dispatch_of(key)
        return self.handle(TaskFailed(d.device, d.epoch, d.attempt, kind, message))

    # -- reading --

    def where(self, key: Any) -> str:
        return self.dispatch_of(key).device

    def in_flight(self, device: str) -> int:
        return len(self.state.workers[device].in_flight)

    def breaker(self, device: str, name: str = "m") -> str:
        return self.state.snapshot().worker(device).models[name].breaker


def dispatches(actions: list) -> list[Dispatch]:
    return [a for a in actions if isinstance(a, Dispatch)]


def of(kind: type, actions: list) -> list:
    return [a for a in actions if isinstance(a, kind)]


H = TypeVar("H", bound="Harness")


@contextlib.contextmanager
def checked(build: Callable[..., H]) -> Iterator[Callable[..., H]]:
    """A factory of harnesses made by ``build``; on leaving, checks each one's invariants
    and that state and test agree (the ``make`` fixtures of the scheduler's test files)."""
    made: list[H] = []

    def factory(*args: Any, **kw: Any) -> H:
        made.append(harness := build(*args, **kw))
        return harness

    yield factory
    for h in made:
        h.state.validate()
        assert set(h.state.tasks) == h.pending, "the state owes answers the test did not expect"
        for task in h.state.queue:
            assert task.key in h.state.tasks


@pytest.fixture
def make():
    """Builds harnesses; at teardown checks the invariants and that state and test agree."""
    def build(config: Config | None = None, track_nodes: bool = False, **kw: Any) -> Harness:
        return Harness(config if config is not None else cluster(**kw), track_nodes)

    with checked(build) as factory:
        yield factory


@pytest.fixture
def h(make) -> Harness:
    """The default cluster, both workers up with ``m`` ready."""
    harness = make()
    harness.up()
    return harness


# ---- placement ---------------------------------------------------------------------------

def test_start_asks_for_every_worker_at_epoch_one(make):
    h = make()
    assert h.log == [StartWorker("npu0", 1), StartWorker("cpu0", 1)]
    assert not h.state.ready()


def test_tasks_wait_until_a_model_is_ready_and_then_run(make):
    h = make()
    h.up("npu0", m="loading")
    assert dispatches(h.submit("t1")) == []
    assert not h.state.ready()
    assert [d.device for d in dispatches(h.model_state("npu0", "m", "ready"))] == ["npu0"]


def test_first_task_goes_to_the_preferred_device_while_times_are_unmeasured(h):
    (d,) = dispatches(h.submit("t1"))
    assert (d.device, d.epoch, d.model, d.payload) == ("npu0", 1, "m", "t1")
    assert d.timeout_s == pytest.approx(120.0)


def test_an_unmeasured_device_counts_as_the_slowest_measured_one_not_as_instant(h):
    h.submit("t1")
    h.succeed("t1", service_s=0.05)
    h.submit("t2")
    assert h.where("t2") == "npu0"  # cpu0 is taken for as slow: a tie, the order decides
    h.submit("t3")
    assert h.where("t3") == "cpu0"  # npu0 busy: cpu0 finishes it 0.05 s sooner


def test_once_measured_the_worker_expected_to_finish_first_wins(h):
    h.submit("t1")
    h.submit("t2")
    h.succeed("t1", service_s=0.05)
    h.succeed("t2", service_s=0.01)
    assert (h.where("t1"), h.where("t2")) == ("npu0", "cpu0")
    h.submit("t3")
    assert h.where("t3") == "cpu0"


def test_a_busy_faster_worker_is_waited_for_while_it_still_finishes_sooner(h):
    h.submit("t1")
    h.submit("t2")
    h.succeed("t1", service_s=0.05)
    h.succeed("t2", service_s=0.01)
    for key in ("t3", "t4", "t5", "t6", "t7", "t8"):
        h.submit(key)
    # cpu0 (2 slots, 10 ms) ends its fourth waiting task at 30 ms, before npu0 would end one
    assert [d.payload for d in dispatches(h.log)][-2:] == ["t3", "t4"]
    assert {h.where(k) for k in ("t3", "t4")} == {"cpu0"} and h.in_flight("npu0") == 0
    assert [t.key for t in h.state.queue] == ["t5", "t6", "t7", "t8"]
    (d,) = dispatches(h.succeed("t3", service_s=0.01))
    assert (d.device, d.payload) == ("cpu0", "t5")


def test_the_models_device_order_breaks_ties(h):
    h.submit("t1")
    h.succeed("t1", service_s=0.02)
    h.submit("t2")
    h.succeed("t2", service_s=0.02)
    h.submit("t3")
    assert h.where("t3") == "npu0"


def test_a_worker_never_holds_more_tasks_than_its_capacity(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    for i in range(64):
        h.submit(i)
    assert h.in_flight("npu0") == 1
    for i in range(64):
        assert h.in_flight("npu0") == 1
        h.succeed(i)
    assert h.in_flight("npu0") == 0
    assert len(of(Dispatch, h.log)) == 64
    assert sorted(h.answers) == list(range(64))


def test_capacity_holds_on_every_device_while_64_tasks_fan_out(h):
    for i in range(64):
        h.submit(i)
    assert (h.in_flight("npu0"), h.in_flight("cpu0")) == (1, 2)
    while h.pending:
        key = min(h.pending)
        h.succeed(key)
        assert h.in_flight("npu0") <= 1 and h.in_flight("cpu0") <= 2
    assert all(isinstance(a, Deliver) for a in h.answers.values())


def test_queued_tasks_are_placed_in_fifo_order_as_slots_free_up(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    for i in range(5):
        h.submit(i)
    placed = []
    for i in range(5):
        placed += [d.payload for d in dispatches(h.succeed(i))]
    assert placed == [1, 2, 3, 4]


def test_a_task_for_a_busy_device_does_not_block_a_later_task_for_a_free_one(make):
    h = make(models=[model("a", "npu0"), model("b", "cpu0")])
    h.up()
    h.submit("a1", "a")
    assert dispatches(h.submit("a2", "a")) == []
    (d,) = dispatches(h.submit("b1", "b"))
    assert d.device == "cpu0" and d.payload == "b1"
    assert [t.key for t in h.state.queue] == ["a2"]


# ---- the queue bound -----------------------------------------------------------------------

def test_a_submit_past_max_queue_is_rejected_overloaded_at_once(make):
    h = make(models=[model("m", "npu0")], max_queue=3)
    h.up()
    for i in range(4):  # one runs, three wait
        h.submit(i)
    (reject,) = h.submit(4)
    assert isinstance(reject.error, Overloaded)
    assert "3 tasks waiting" in reject.error.message


def test_every_accepted_task_is_answered_once_when_the_queue_overflows(make):
    h = make(max_queue=2)
    h.up()
    for i in range(10):
        h.submit(i)
    overloaded = {k for k, a in h.answers.items() if isinstance(a, Reject)}
    assert overloaded == {5, 6, 7, 8, 9}  # 3 slots + 2 waiting accepted
    while h.pending:
        h.succeed(min(h.pending))
    assert {k for k, a in h.answers.items() if isinstance(a, Deliver)} == {0, 1, 2, 3, 4}


# ---- bounded in bytes and per client ------------------------------------------------------

MiB = 1024 ** 2


def overloaded(actions: list) -> str:
    (reject,) = of(Reject, actions)
    assert isinstance(reject.error, Overloaded), reject
    return reject.error.message


def test_a_submit_that_would_pass_max_queue_bytes_is_overloaded_until_bytes_are_answered(make):
    h = make(models=[model("m", "npu0")], max_queue_bytes=4 * MiB, max_message_bytes=MiB)
    h.up()
    for i in range(4):
        h.submit(i, nbytes=MiB)
    assert h.state.held_bytes == 4 * MiB
    assert "scheduler.max_queue_bytes" in overloaded(h.submit(4, nbytes=1))
    h.succeed(0)  # the running one answered: its bytes are free again
    assert of(Reject, h.submit(5, nbytes=MiB)) == []
    assert h.state.snapshot().held_bytes == 4 * MiB


def test_a_client_past_its_share_of_bytes_is_overloaded_while_another_is_served(make):
    h = make(models=[model("m", "npu0")], max_queue_bytes=10 * MiB, max_message_bytes=MiB,
             max_client_share=0.3)
    h.up()
    for i in range(3):
        h.submit(("a", i), client="a", nbytes=MiB)
    assert "max_client_share" in overloaded(h.submit(("a", 3), client="a", nbytes=MiB))
    assert of(Reject, h.submit(("b", 0), client="b", nbytes=MiB)) == []
    assert h.state.client_bytes == {"a": 3 * MiB, "b": MiB}


def test_a_client_past_its_share_of_waiting_tasks_is_overloaded_while_another_is_served(make):
    h = make(models=[model("m", "npu0")], max_queue=10, max_client_share=0.2)
    h.up()
    for i in range(3):  # one runs, two wait: its share of ten
        h.submit(("a", i), client="a")
    assert "2 tasks waiting, its share" in overloaded(h.submit(("a", 3), client="a"))
    assert of(Reject, h.submit(("b", 0), client="b")) == []
    h.succeed(("a", 0))  # one of a's starts running: a waits with one now
    assert of(Reject, h.submit(("a", 4), client="a")) == []


def test_a_client_whose_answers_wait_unread_is_overloaded_and_others_are_not(make):
    h = make(max_client_backlog_bytes=MiB)
    h.up()
    message = overloaded(h.submit(("a", 0), client="a", backlog=MiB + 1))
    assert "max_client_backlog_bytes" in message and "read them" in message
    assert of(Reject, h.submit(("b", 0), client="b", backlog=MiB)) == []


def test_the_task_id_in_use_error_does_not_name_the_client(h):
    key = (b"routing-id-of-the-caller", "t1")
    h.submit(key, client=key[0])
    (reject,) = h.submit(key, client=key[0])
    assert "already in use" in reject.error.message
    assert "routing-id" not in reject.error.message and "t1" not in reject.error.message


def test_a_task_nested_a_thousand_deep_fails_over_and_is_answered_without_a_crash(make):
    deep: list = []
    for _ in range(1200):  # deeper than repr() can walk
        deep = [deep]
    h = make(models=[model("m", "npu0")], max_attempts=1)
    h.up()
    h.submit("deep", payload={"messages": deep})
    (d,) = of(Dispatch, h.log)
    h.handle(WorkerExited("npu0", d.epoch, "killed"))  # its one try lost: answered as failed
    assert isinstance(h.answers["deep"].error, NoDeviceAvailable)


# ---- failover ------------------------------------------------------------------------------

def test_a_device_error_on_npu0_reruns_on_cpu0_and_the_delivery_carries_the_npu0_attempt(h):
    h.submit("t1")
    (d,) = dispatches(h.fail("t1", "device", "HTP timed out"))
    assert d.device == "cpu0"
    (deliver,) = h.succeed("t1")
    assert deliver.device == "cpu0" and deliver.payload == "out:t1"
    assert deliver.attempts == [Attempt("npu0", "device", "HTP timed out")]


def test_an_invalid_input_failure_is_rejected_and_never_rerun(h):
    h.submit("t1")
    actions = h.fail("t1", "invalid_input", "input_ids must be int64")
    assert dispatches(actions) == []
    (reject,) = of(Reject, actions)
    assert isinstance(reject.error, InvalidInput)
    assert reject.error.message == "input_ids must be int64"
    assert h.in_flight("npu0") == 0


def test_when_every_device_failed_the_reject_lists_every_attempt(h):
    h.submit("t1")
    h.fail("t1", "device", "npu exploded")
    (reject,) = of(Reject, h.fail("t1", "device", "cpu exploded"))
    assert isinstance(reject.error, NoDeviceAvailable)
    assert reject.error.attempts == [Attempt("npu0", "device", "npu exploded"),
                                     Attempt("cpu0", "device", "cpu exploded")]
    assert "npu exploded" in str(reject.error) and "cpu exploded" in str(reject.error)


def test_a_model_unavailable_everywhere_is_rejected_at_submit_listing_each_load_error(make):
    h = make()
    h.handle(WorkerRegistered("npu0", 1, 1, "test",
                              {"m": ModelLoad("unavailable", "QNN compile failed")}))
    h.handle(WorkerRegistered("cpu0", 1, 2, "test",
                              {"m": ModelLoad("unavailable", "ORT cannot read file")}))
    (reject,) = h.submit("t1")
    assert isinstance(reject.error, NoDeviceAvailable)
    assert reject.error.attempts == [
        Attempt("npu0", "model_unavailable", "QNN compile failed"),
        Attempt("cpu0", "model_unavailable", "ORT cannot read file")]


def test_queued_tasks_are_rejected_when_the_last_device_reports_the_model_unavailable(make):
    h = make()
    h.up("npu0", m="unavailable")
    h.up("cpu0", m="loading")
    assert h.submit("t1") == []
    (reject,) = h.model_state("cpu0", "m", "unavailable", "out of memory")
    assert isinstance(reject.error, NoDeviceAvailable)
    assert [a.device for a in reject.error.attempts] == ["npu0", "cpu0"]


def test_queued_tasks_are_rejected_when_a_run_finds_the_model_gone_on_its_last_device(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.submit("t1")
    h.submit("t2")
    actions = h.fail("t1", "model_unavailable", "context binary was evicted")
    assert {a.key for a in of(Reject, actions)} == {"t1", "t2"}
    assert isinstance(h.answers["t2"].error, NoDeviceAvailable)
    assert h.answers["t2"].error.attempts == [
        Attempt("npu0", "model_unavailable", "context binary was evicted")]


def test_a_model_unavailable_on_npu0_runs_on_cpu0_and_the_result_says_why(make):
    h = make()
    h.up("npu0", m="unavailable")
    h.model_state("npu0", "m", "unavailable", error="QNN_COMMON_ERROR_MEM_ALLOC")
    h.up("cpu0")
    (d,) = dispatches(h.submit("t1"))
    assert d.device == "cpu0"
    (deliver,) = h.succeed("t1")
    assert deliver.attempts == [Attempt("npu0", "model_unavailable",
                                        "QNN_COMMON_ERROR_MEM_ALLOC")]


def test_a_device_after_the_serving_one_is_not_listed_as_skipped(make):
    h = make(models=[model("m", "cpu0", "npu0")])
    h.up("npu0", m="unavailable")
    h.up("cpu0")
    h.submit("t1")
    (deliver,) = h.succeed("t1")
    assert deliver.device == "cpu0" and deliver.attempts == []


def test_unsupported_on_every_device_is_invalid_input(h):
    h.submit("t1")
    h.fail("t1", "unsupported", "sequence longer than the static shape 32")
    (reject,) = of(Reject, h.fail("t1", "unsupported", "rank 3 input"))
    assert isinstance(reject.error, InvalidInput)
    assert [a.kind for a in reject.error.attempts] == ["unsupported", "unsupported"]


def test_unsupported_on_one_device_and_a_device_error_on_the_other_is_no_device(h):
    h.submit("t1")
    h.fail("t1", "unsupported", "too long")
    (reject,) = of(Reject, h.fail("t1", "device", "boom"))
    assert isinstance(reject.error, NoDeviceAvailable)


# ---- what each kind of failure means (the rules live on the error tree) -------------------

RUN_FAILURE_KINDS = sorted(ERROR_KINDS)  # a worker may report any kind; each has a rule


@pytest.mark.parametrize("kind", RUN_FAILURE_KINDS)
def test_a_failed_run_is_rerun_on_another_device_unless_the_input_is_wrong(h, kind):
    h.submit("t1")
    h.fail("t1", kind, "it broke")
    if kind == "invalid_input":  # the task is wrong, not the device: answered, never re-run
        assert isinstance(h.answers["t1"].error, InvalidInput)
        assert h.answers["t1"].error.attempts == []
        return
    assert "t1" not in h.answers and h.where("t1") == "cpu0"
    h.succeed("t1")
    assert h.answers["t1"].attempts == [Attempt("npu0", kind, "it broke")]


@pytest.mark.parametrize("kind", RUN_FAILURE_KINDS)
def test_only_device_errors_open_the_breaker(make, kind):
    h = make(npu=1, cpu=2, breaker_threshold=2)
    h.up()
    for i in range(3):
        h.submit(i)
        if h.where(i) == "npu0":  # a model_unavailable leaves npu0 out of later placements
            h.fail(i, kind)
        if i not in h.answers:
            h.succeed(i)
    assert h.breaker("npu0") == ("open" if kind == "device" else "closed")


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS - {"invalid_input"}))
def test_a_task_every_device_refuses_for_its_input_is_invalid_input(h, kind):
    h.submit("t1")
    h.fail("t1", kind, "on npu0")
    h.fail("t1", kind, "on cpu0")
    error = h.answers["t1"].error
    expected = InvalidInput if kind == "unsupported" else NoDeviceAvailable
    assert type(error) is expected and [a.device for a in error.attempts] == ["npu0", "cpu0"]


def test_a_model_unavailable_failure_marks_the_model_unavailable_on_that_worker(h):
    h.submit("t1")
    h.fail("t1", "model_unavailable", "context lost")
    slot = h.state.workers["npu0"].models["m"]
    assert (slot.state, slot.load.error) == ("unavailable", "context lost")


# ---- bad submits ---------------------------------------------------------------------------

def test_an_unknown_model_is_invalid_input_naming_the_known_models(make):
    h = make(models=[model("minilm", "npu0"), model("resnet", "cpu0")])
    h.up()
    (reject,) = h.submit("t1", "bert")
    assert isinstance(reject.error, InvalidInput)
    assert "'bert'" in reject.error.message and "minilm, resnet" in reject.error.message


def test_a_duplicate_task_key_is_invalid_input_and_the_first_task_still_runs(h):
    h.submit("t1")
    assert dispatches(h.submit("t1")) == []
    (refusal,) = h.refused
    assert isinstance(refusal.error, InvalidInput) and "already in use" in refusal.error.message
    (deliver,) = h.succeed("t1")
    assert deliver.key == "t1"


def test_a_key_may_be_used_again_once_its_task_was_answered(h):
    h.submit("t1")
    h.succeed("t1")
    (d,) = dispatches(h.submit("t1"))
    assert d.payload == "t1"
    h.succeed("t1", dispatch=d)


# ---- lost workers --------------------------------------------------------------------------

def test_a_worker_exit_reruns_its_tasks_elsewhere_as_worker_lost(h):
    h.submit("t1")
    (d,) = dispatches(h.handle(WorkerExited("npu0", 1, "exit code -9")))
    assert d.device == "cpu0" and d.payload == "t1"
    (deliver,) = h.succeed("t1")
    (attempt,) = deliver.attempts
    assert (attempt.device, attempt.kind) == ("npu0", "worker_lost")
    assert "exit code -9" in attempt.message


def test_a_lost_worker_is_restarted_with_a_higher_epoch_after_the_backoff(make):
    h = make(restart_backoff_s=0.5)
    h.up()
    h.handle(WorkerExited("npu0", 1, "crash"))
    assert of(StartWorker, h.tick(0.49)) == []
    assert of(StartWorker, h.tick(0.01)) == [StartWorker("npu0", 2)]
    assert h.state.snapshot().workers[0].restarts == 1


def test_the_restart_backoff_doubles_on_repeated_crashes_up_to_30_s(make):
    h = make(Config(devices=[DeviceConfig("npu0", "npu", "qnn", prefetch=0)], models=[model("m", "npu0")],
                    scheduler=SchedulerConfig(restart_backoff_s=0.5)))
    h.up()
    for epoch, backoff in enumerate((0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0), start=1):
        h.handle(WorkerExited("npu0", epoch, "crash"))
        assert h.tick(backoff - 0.01) == []
        assert h.tick(0.02) == [StartWorker("npu0", epoch + 1)]
        h.up("npu0")


def test_the_restart_backoff_resets_once_a_worker_stayed_up(make):
    h = make(restart_backoff_s=0.5)
    h.up()
    h.handle(WorkerExited("npu0", 1, "crash"))
    h.tick(0.5)
    h.up("npu0")
    h.clock.advance(31.0)
    h.handle(WorkerExited("npu0", 2, "crash"))
    assert of(StartWorker, h.tick(0.5)) == [StartWorker("npu0", 3)]


def test_a_worker_that_never_registers_is_killed_after_the_load_timeout(make):
    h = make(load_timeout_s=60.0)
    assert h.tick(60.0) == []
    kills = of(KillWorker, h.tick(0.1))
    assert [(k.device, k.epoch) for k in kills] == [("npu0", 1), ("cpu0", 1)]
    assert "did not register within 60 s" in kills[0].reason


def test_messages_from_an_old_epoch_are_ignored(h):
    h.handle(WorkerExited("npu0", 1, "crash"))
    h.tick(1.0)
    h.up("npu0")
    h.submit("t1")
    assert h.where("t1") == "npu0"
    stale = [WorkerRegistered("npu0", 1, 9, "test", {"m": ModelLoad("unavailable")}),
             ModelStateChanged("npu0", 1, "m", ModelLoad("unavailable", "old")),
             WorkerHeartbeat("npu0", 1),
             TaskFailed("npu0", 1, h.dispatch_of("t1").attempt, "device", "old"),
             WorkerExited("npu0", 1, "old exit")]
    assert h.handle(*stale) == []
    view = h.state.workers["npu0"]
    assert (view.state, view.epoch, view.models["m"].state) == ("up", 2, "ready")
    assert h.in_flight("npu0") == 1


def test_a_silent_worker_is_killed_and_its_tasks_rerun(make):
    h = make(heartbeat_timeout_s=5.0)
    h.up()
    h.submit("t1")
    h.clock.advance(5.0)
    h.heartbeat("cpu0")
    assert h.tick() == []
    h.clock.advance(0.1)
    h.heartbeat("cpu0")
    actions = h.tick()
    (kill,) = of(KillWorker, actions)
    assert (kill.device, kill.epoch) == ("npu0", 1) and "no heartbeat" in kill.reason
    (d,) = dispatches(actions)
    assert (d.device, d.payload) == ("cpu0", "t1")
    (deliver,) = h.succeed("t1")
    assert [a.kind for a in deliver.attempts] == ["worker_lost"]


def test_heartbeats_keep_a_busy_worker_alive(make):
    h = make(heartbeat_timeout_s=5.0)
    h.up()
    h.submit("t1", timeout_s=100.0)
    for _ in range(20):
        h.clock.advance(1.0)
        h.heartbeat("npu0", "cpu0")
        assert of(KillWorker, h.tick()) == []


def test_while_a_model_loads_the_silence_limit_is_the_load_timeout(make):
    h = make(heartbeat_timeout_s=5.0, load_timeout_s=60.0)
    h.up("npu0", m="loading")
    h.up("cpu0")
    h.clock.advance(59.0)
    h.heartbeat("cpu0")
    assert h.tick() == []
    h.clock.advance(1.1)
    h.heartbeat("cpu0")
    (kill,) = of(KillWorker, h.tick())
    assert kill.device == "npu0"


def test_once_the_model_is_ready_the_silence_limit_is_the_heartbeat_timeout_again(make):
    h = make(heartbeat_timeout_s=5.0, load_timeout_s=60.0)
    h.up("npu0", m="loading")
    h.up("cpu0")
    h.clock.advance(30.0)
    h.heartbeat("cpu0")
    h.model_state("npu0", "m", "ready")
    h.clock.advance(5.1)
    h.heartbeat("cpu0")
    (kill,) = of(KillWorker, h.tick())
    assert kill.device == "npu0"


# ---- circuit breaker -----------------------------------------------------------------------

@pytest.fixture
def tripped(make) -> Harness:
    """npu0 (capacity 2) has had two device errors on ``m`` in a row; threshold 2, cooldown 10 s.

    Both tasks re-ran on cpu0 and were delivered (cpu0 is measured at 10 ms).
    """
    h = make(npu=2, cpu=2, breaker_threshold=2, breaker_cooldown_s=10.0)
    h.up()
    h.submit("f1")
    h.submit("f2")
    assert h.where("f1") == h.where("f2") == "npu0"
    h.fail("f1")
    assert h.breaker("npu0") == "closed"
    h.fail("f2")
    h.succeed("f1")
    h.succeed("f2")
    return h


def test_consecutive_device_errors_open_the_breaker_and_stop_placement_there(tripped):
    h = tripped
    assert h.breaker("npu0") == "open"
    h.submit("t1")
    h.submit("t2")
    assert h.where("t1") == h.where("t2") == "cpu0"
    h.submit("t3")
    assert h.in_flight("npu0") == 0 and [t.key for t in h.state.queue] == ["t3"]


def test_after_the_cooldown_exactly_one_probe_is_let_through(tripped):
    h = tripped
    h.clock.advance(9.9)
    h.submit("early")
    assert h.where("early") == "cpu0"
    h.clock.advance(0.1)
    assert h.breaker("npu0") == "half-open"
    h.submit("probe")
    h.submit("t2")
    h.submit("t3")
    assert (h.where("probe"), h.where("t2")) == ("npu0", "cpu0")
    assert h.in_flight("npu0") == 1  # a second slot is free, but the probe is out
    assert [t.key for t in h.state.queue] == ["t3"]


def test_a_successful_probe_closes_the_breaker(tripped):
    h = tripped
    h.clock.advance(10.0)
    h.submit("probe")
    h.succeed("probe", service_s=0.005)
    assert h.breaker("npu0") == "closed"
    h.submit("t1")
    h.submit("t2")
    assert h.where("t1") == h.where("t2") == "npu0"  # both slots again, and now the faster one


def test_a_failed_probe_reopens_the_breaker_for_another_cooldown(tripped):
    h = tripped
    h.clock.advance(10.0)
    h.submit("probe")
    (rerun,) = dispatches(h.fail("probe", "device", "still broken"))
    assert rerun.device == "cpu0"
    assert h.breaker("npu0") == "open"
    h.clock.advance(9.9)
    h.submit("t1")
    assert h.where("t1") == "cpu0"
    h.clock.advance(0.1)
    h.submit("probe2")
    assert h.where("probe2") == "npu0"


def test_a_success_between_device_errors_keeps_the_breaker_closed(make):
    h = make(npu=1, cpu=2, breaker_threshold=2)
    h.up()
    for key in ("f1", "ok", "f2"):
        h.submit(key)
        assert h.where(key) == "npu0"
        if key == "ok":
            h.succeed(key)
        else:
            h.fail(key)
            h.succeed(key)
    assert h.breaker("npu0") == "closed"


def test_errors_that_are_not_the_devices_do_not_open_the_breaker(make):
    h = make(breaker_threshold=1)
    h.up()
    h.submit("bad")
    h.fail("bad", "invalid_input", "wrong dtype")
    h.submit("long")
    h.fail("long", "unsupported", "too long for the static shape")
    h.succeed("long")
    assert h.breaker("npu0") == "closed"


def test_device_errors_of_a_task_no_device_can_run_do_not_open_the_breakers(make):
    # A bad input the engine alone notices fails as a device error everywhere: it is the
    # task's fault, and six of them must not shut two healthy devices out (issue 11, item 7).
    h = make(npu=1, cpu=1, breaker_threshold=3)
    h.up()
    for i in range(6):
        h.submit(("bad", i))
        h.fail(("bad", i), "device", "broadcast failed")
        h.fail(("bad", i), "device", "broadcast failed")
        assert isinstance(h.answers[("bad", i)].error, NoDeviceAvailable)
    assert (h.breaker("npu0"), h.breaker("cpu0")) == ("closed", "closed")
    h.submit("good")
    assert h.where("good") == "npu0"
    h.succeed("good")


def test_a_device_error_counts_toward_the_breaker_once_another_device_serves_the_task(make):
    h = make(npu=2, cpu=2, breaker_threshold=2)
    h.up()
    for key in ("f1", "f2"):
        h.submit(key)
        h.fail(key)
    assert h.breaker("npu0") == "closed"  # not yet known to be the device's fault
    h.succeed("f1")
    assert h.breaker("npu0") == "closed"
    h.succeed("f2")
    assert h.breaker("npu0") == "open"


# ---- exactly once --------------------------------------------------------------------------

def test_a_late_success_from_a_lost_workers_old_epoch_is_not_delivered(h):
    h.submit("t1")
    old = h.dispatch_of("t1")
    h.handle(WorkerExited("npu0", 1, "crash"))
    assert h.succeed("t1", dispatch=old) == []  # the re-run on cpu0 is still out
    h.tick(1.0)
    h.up("npu0")
    assert h.succeed("t1", dispatch=old) == []  # and the worker is back at epoch 2
    (deliver,) = h.succeed("t1")
    assert deliver.device == "cpu0"


def test_a_result_sent_after_the_worker_was_declared_hung_is_not_delivered(make):
    h = make(heartbeat_timeout_s=5.0)
    h.up()
    h.submit("t1")
    old = h.dispatch_of("t1")
    h.clock.advance(5.1)
    h.heartbeat("cpu0")
    assert of(KillWorker, h.tick())
    assert h.succeed("t1", dispatch=old) == []  # same epoch, but the worker is lost
    (deliver,) = h.succeed("t1")
    assert deliver.device == "cpu0"


def test_a_late_success_after_the_deadline_is_not_delivered(h):
    h.submit("t1", timeout_s=1.0)
    h.tick(1.0)
    assert isinstance(h.answers["t1"].error, DeadlineExceeded)
    assert h.succeed("t1") == []
    assert h.in_flight("npu0") == 0


def test_a_failed_attempt_whose_late_result_follows_the_reruns_delivery_is_dropped(h):
    h.submit("t1")
    first = h.dispatch_of("t1")
    h.fail("t1", "device", "timeout on the HTP")
    (deliver,) = h.succeed("t1")
    assert deliver.device == "cpu0"
    assert h.succeed("t1", dispatch=first) == []
    assert h.fail("t1", dispatch=first) == []


# ---- deadlines -----------------------------------------------------------------------------

def test_a_queued_task_past_its_deadline_gets_deadline_exceeded(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.submit("busy", timeout_s=100.0)
    h.submit("t1", timeout_s=1.0)
    assert h.tick(0.99) == []
    (reject,) = h.tick(0.01)
    assert reject.key == "t1" and isinstance(reject.error, DeadlineExceeded)
    assert dispatches(h.succeed("busy")) == []


def test_a_queued_task_is_dispatched_with_the_time_left_to_its_deadline(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.submit("busy")
    h.submit("t1", timeout_s=10.0)
    h.clock.advance(3.0)
    (d,) = dispatches(h.succeed("busy"))
    assert d.payload == "t1" and d.timeout_s == pytest.approx(7.0)


def test_a_running_task_past_its_deadline_is_cancelled_and_keeps_its_slot_until_answered(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.submit("t1", timeout_s=1.0)
    h.submit("t2", timeout_s=100.0)
    d = h.dispatch_of("t1")
    actions = h.tick(1.0)
    assert CancelAttempt("npu0", 1, d.attempt) in actions
    assert isinstance(h.answers["t1"].error, DeadlineExceeded)
    assert dispatches(actions) == [] and h.in_flight("npu0") == 1
    (d2,) = dispatches(h.fail("t1", "cancelled", "cancelled"))
    assert d2.payload == "t2"


def test_a_worker_holding_a_cancelled_run_far_past_its_deadline_is_killed(make):
    h = make(heartbeat_timeout_s=5.0)
    h.up()
    h.submit("t1", timeout_s=1.0)
    h.tick(1.0)
    for _ in range(5):  # the worker keeps answering pings but never gives up the run
        h.clock.advance(1.0)
        h.heartbeat("npu0", "cpu0")
        assert of(KillWorker, h.tick()) == []
    h.clock.advance(0.1)
    h.heartbeat("npu0", "cpu0")
    (kill,) = of(KillWorker, h.tick())
    assert kill.device == "npu0" and "did not stop" in kill.reason
    assert h.in_flight("npu0") == 0


# ---- cancel --------------------------------------------------------------------------------

def test_cancelling_a_queued_task_removes_it(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.submit("busy")
    h.submit("t1")
    (reject,) = h.cancel("t1")
    assert isinstance(reject.error, Cancelled)
    assert not h.state.queue
    assert dispatches(h.succeed("busy")) == []


def test_cancelling_a_running_task_cancels_its_attempt(h):
    h.submit("t1")
    d = h.dispatch_of("t1")
    actions = h.cancel("t1")
    assert actions[0] == CancelAttempt("npu0", 1, d.attempt)
    assert isinstance(actions[1], Reject) and isinstance(actions[1].error, Cancelled)
    assert h.in_flight("npu0") == 1
    assert h.fail("t1", "cancelled", "cancelled") == []
    assert h.in_flight("npu0") == 0


def test_cancelling_an_unknown_or_answered_task_does_nothing(h):
    h.submit("t1")
    h.succeed("t1")
    assert h.cancel("t1") == []
    assert h.cancel("never") == []


class CountingQueue(TaskQueue):
    """The scheduler's queue, counting the entries any scan of it walks past."""

    def __init__(self):
        super().__init__()
        self.walked = 0

    def __iter__(self):
        for item in super().__iter__():
            self.walked += 1
            yield item


def test_cancelling_ten_thousand_queued_tasks_walks_the_queue_no_more_than_once():
    # Cost counted, not timed: a cancel that scans the queue for its task (as the deque did,
    # 10,000 cancels taking seconds of scheduler time) walks ~50 million entries here.
    clock = FakeClock()
    state = SchedulerState(cluster(models=[model("m", "npu0")], max_queue=20_000,
                                   max_client_share=1.0), clock)
    state.queue = CountingQueue()
    state.start()
    state.handle(WorkerRegistered("npu0", 1, 1, "test", {"m": ModelLoad("ready")}),
                 WorkerRegistered("cpu0", 1, 1, "test", {}), ClientHello("c1", 1.0))
    state.handle(*(TaskSubmitted(i, "m", i, client="c1") for i in range(10_001)))
    assert len(state.queue) == 10_000  # one runs, the rest wait
    state.queue.walked = 0
    # The way a caller's gather cancels them: one Cancel each, last submitted first.
    actions = state.handle(*(TaskCancelled(i) for i in reversed(range(1, 10_001))))
    assert len(of(Reject, actions)) == 10_000 and not state.queue
    assert state.queue.walked <= 10_000, f"the cancels walked {state.queue.walked} queue entries"
    state.handle(ClientBye("c1"))
    assert not state.tasks
    state.validate()


def test_a_task_whose_payload_nests_past_the_recursion_limit_is_cancelled_and_failed_cleanly(h):
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    h.submit("busy")
    h.submit("busy2")
    h.submit("busy3")
    h.submit("deep")  # queued: both workers are full
    (reject,) = of(Reject, h.cancel("deep"))
    assert isinstance(reject.error, Cancelled)
    h.state.handle(TaskSubmitted("deep2", "m", deep))
    h.pending.add("deep2")
    assert "deep2" in repr(h.state.tasks["deep2"])[:200]  # a bounded repr, no RecursionError
    h.handle(WorkerExited("npu0", 1, "crash"))
    h.handle(WorkerExited("cpu0", 1, "crash"))
    for key in ("busy", "busy2", "busy3", "deep2"):
        h.cancel(key)
    assert not h.state.queue and not h.state.tasks


# ---- clients -------------------------------------------------------------------------------

def test_a_client_silent_past_five_keepalives_has_its_tasks_cancelled_and_is_forgotten(h):
    h.handle(ClientHello("c1", keepalive_s=1.0))
    h.submit("running", client="c1", timeout_s=100.0)
    h.submit("queued", client="c1", timeout_s=100.0)
    h.submit("waiting", client="c1", timeout_s=100.0)
    h.heartbeat("npu0", "cpu0")
    h.clock.advance(5.0)
    h.heartbeat("npu0", "cpu0")
    assert h.tick() == []  # five keepalives missed: not yet more than five
    h.clock.advance(0.1)
    actions = h.tick()
    assert actions[-1] == ForgetClient("c1", "went silent for 5.1 s (more than 5 s)", 3)
    rejects = of(Reject, actions)
    assert [r.key for r in rejects] == ["running", "queued", "waiting"]  # in submission order
    assert all(isinstance(r.error, Cancelled) and "went silent" in r.error.message
               for r in rejects)
    assert len(of(CancelAttempt, actions)) == 3  # all three ran (npu0: 1 slot, cpu0: 2)
    assert "c1" not in h.state.clients and h.state.client_tasks == {}
    assert of(ForgetClient, h.tick(10.0)) == []  # forgotten once


def test_a_client_heard_within_its_limit_keeps_its_tasks(h):
    h.handle(ClientHello("c1", keepalive_s=1.0))
    h.submit("t1", client="c1", timeout_s=100.0)
    for _ in range(20):
        h.clock.advance(1.0)
        h.heartbeat("npu0", "cpu0")
        h.handle(ClientHeard("c1"))
        assert of(ForgetClient, h.tick()) == []
    h.succeed("t1")


def test_the_silence_limit_is_at_least_the_floor_however_often_a_client_pings(make):
    h = make()
    h.handle(ClientHello("fast", keepalive_s=0.01))  # five of them: 0.05 s
    assert h.tick(1.9) == []
    (forget,) = h.tick(0.2)
    assert forget.client == "fast" and "more than 2 s" in forget.reason


def test_a_client_that_promised_no_keepalives_is_never_forgotten_for_silence(make):
    h = make()
    h.up()
    h.handle(ClientHello("quiet", keepalive_s=None), ClientHello("zero", keepalive_s=0))
    h.submit("t1", client="quiet", timeout_s=7200.0)
    h.heartbeat("npu0", "cpu0")
    h.clock.advance(3600.0)
    h.heartbeat("npu0", "cpu0")
    assert h.tick() == []
    assert set(h.state.clients) == {"quiet", "zero"}
    h.succeed("t1")


def test_a_goodbye_cancels_the_clients_unfinished_tasks_at_once_and_quietly(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.handle(ClientHello("c1", keepalive_s=1.0))
    h.submit("running", client="c1")
    h.submit("queued", client="c1")
    run = h.dispatch_of("running")
    actions = h.handle(ClientBye("c1"))
    assert actions[0] == CancelAttempt("npu0", 1, run.attempt)
    assert [r.key for r in of(Reject, actions)] == ["running", "queued"]
    assert all(isinstance(r.error, Cancelled) for r in of(Reject, actions))
    assert actions[-1] == ForgetClient("c1", "said goodbye", 2, goodbye=True)
    assert h.in_flight("npu0") == 1  # the slot stays held until the worker confirms
    assert h.fail("running", "cancelled", "cancelled") == []
    assert h.in_flight("npu0") == 0 and not h.state.queue
    assert of(ForgetClient, h.tick(60.0)) == []  # no silence to notice later


def test_a_hello_naming_the_clients_lost_connection_cancels_what_is_left_of_it(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.handle(ClientHello("old", keepalive_s=1.0), ClientHello("other", keepalive_s=1.0))
    h.submit("running", client="old")
    h.submit("queued", client="old")
    h.submit("theirs", client="other")
    actions = h.handle(ClientHello("new", keepalive_s=1.0, previous="old"))
    assert [r.key for r in of(Reject, actions)] == ["running", "queued"]
    assert all(isinstance(r.error, Cancelled) and "connected again" in r.error.message
               for r in of(Reject, actions))
    assert actions[-1] == ForgetClient("old", "connected again", 2, goodbye=True)
    assert set(h.state.clients) == {"new", "other"} and "theirs" in h.state.tasks
    # A lost connection the scheduler never knew (it restarted), or the same one: nothing.
    assert h.handle(ClientHello("newer", keepalive_s=1.0, previous="never-seen")) == []
    assert h.handle(ClientHello("new", keepalive_s=1.0, previous="new")) == []
    assert set(h.state.clients) == {"new", "newer", "other"}


def test_one_clients_goodbye_leaves_the_other_clients_tasks_running(h):
    h.handle(ClientHello("c1", 1.0), ClientHello("c2", 1.0))
    h.submit("mine", client="c1")
    h.submit("theirs", client="c2")
    h.submit("anonymous")  # a client that never said hello: indexed all the same
    assert [r.key for r in of(Reject, h.handle(ClientBye("c1")))] == ["mine"]
    assert set(h.state.tasks) == {"theirs", "anonymous"}
    assert set(h.state.clients) == {"c2"}
    h.succeed("theirs")
    h.succeed("anonymous")


def test_a_goodbye_from_a_client_that_never_said_hello_cancels_its_tasks(h):
    h.submit("t1", client="raw")
    actions = h.handle(ClientBye("raw"))
    assert [r.key for r in of(Reject, actions)] == ["t1"]
    assert actions[-1] == ForgetClient("raw", "said goodbye", 1, goodbye=True)
    assert h.handle(ClientBye("raw"), ClientBye("stranger")) == []  # nothing left to end


def test_a_forgotten_client_is_not_watched_again_until_it_says_hello(make):
    h = make()
    h.handle(ClientHello("c1", 1.0))
    assert of(ForgetClient, h.tick(6.0))
    h.handle(ClientHeard("c1"))  # it was only stalled, but it is a stranger now
    assert "c1" not in h.state.clients
    h.handle(ClientHello("c1", 1.0))
    assert h.tick(5.0) == [] and of(ForgetClient, h.tick(0.1))


def test_a_task_answered_normally_leaves_its_clients_index(h):
    h.handle(ClientHello("c1", 1.0))
    h.submit("t1", client="c1")
    h.submit("t2", client="c1")
    h.succeed("t1")
    assert list(h.state.client_tasks["c1"]) == ["t2"]
    h.cancel("t2")
    assert h.state.client_tasks == {}
    assert h.handle(ClientBye("c1")) == [ForgetClient("c1", "said goodbye", 0, goodbye=True)]


# ---- events --------------------------------------------------------------------------------

def test_an_event_the_scheduler_has_no_handler_for_fails_loudly(h):
    @dataclass
    class WorkerRegistred:  # a misspelt event
        device: str

    with pytest.raises(TypeError, match="no handler for WorkerRegistred"):
        h.state.handle(WorkerRegistred("npu0"))


def test_every_event_type_has_its_own_handler():
    """``Event`` is what ``handle`` accepts (mypy holds the shells to it); each has a handler."""
    registry = vars(SchedulerState)["_on"].dispatcher.registry
    events = typing.get_args(Event)
    missing = [event.__name__ for event in events if event not in registry]
    assert not missing, f"events without a handler: {missing}"


# ---- max_attempts --------------------------------------------------------------------------

def test_max_attempts_bounds_reruns_across_lost_workers(make):
    h = make(models=[model("m", "npu0")], max_attempts=3, restart_backoff_s=0.5)
    h.up()
    h.submit("t1")
    for _ in range(2):
        h.handle(WorkerExited("npu0", h.epochs["npu0"], "segfault"))
        h.tick(5.0)
        (d,) = dispatches(h.up("npu0"))  # the same device again: a lost worker is no verdict
        assert d.payload == "t1"
    (reject,) = of(Reject, h.handle(WorkerExited("npu0", h.epochs["npu0"], "segfault")))
    assert isinstance(reject.error, NoDeviceAvailable)
    assert [a.kind for a in reject.error.attempts] == ["worker_lost"] * 3
    assert "3 of at most 3" in reject.error.message


def test_max_attempts_bounds_reruns_across_devices(make):
    h = make(max_attempts=1)
    h.up()
    h.submit("t1")
    (reject,) = of(Reject, h.fail("t1", "device", "boom"))
    assert isinstance(reject.error, NoDeviceAvailable)
    assert reject.error.attempts == [Attempt("npu0", "device", "boom")]


# ---- device order and fallbacks ------------------------------------------------------------

def three_devices(npu_fallback=(), gpu_fallback=(), models=()) -> Config:
    return Config(
        devices=[DeviceConfig("cpu0", "cpu", "onnxruntime"),
                 DeviceConfig("gpu0", "gpu", "qnn", fallback=list(gpu_fallback)),
                 DeviceConfig("npu0", "npu", "qnn", fallback=list(npu_fallback))],
        models=list(models))


def test_device_order_defaults_to_npu_then_gpu_then_cpu():
    cfg = three_devices(models=[model("m")])
    assert cfg.device_order("m") == ["npu0", "gpu0", "cpu0"]


def test_device_order_appends_fallbacks_and_fallbacks_of_fallbacks():
    cfg = three_devices(npu_fallback=["gpu0"], gpu_fallback=["cpu0"], models=[model("m", "npu0")])
    assert cfg.device_order("m") == ["npu0", "gpu0", "cpu0"]


def test_device_order_lists_each_device_once():
    cfg = three_devices(npu_fallback=["cpu0", "gpu0"], gpu_fallback=["npu0"],
                        models=[model("m", "gpu0", "npu0", "gpu0")])
    assert cfg.device_order("m") == ["gpu0", "npu0", "cpu0"]


def test_a_device_fallback_carries_a_failed_task_to_the_next_device(make):
    h = make(three_devices(npu_fallback=["cpu0"], models=[model("m", "npu0")]))
    assert "m" not in h.state.workers["gpu0"].models
    h.up()
    h.submit("t1")
    (d,) = dispatches(h.fail("t1"))
    assert d.device == "cpu0"
    h.succeed("t1")


def test_tasks_rerun_after_a_lost_worker_keep_their_order_ahead_of_new_work(make):
    h = make(npu=2, cpu=1)
    h.up()
    for key in ("a", "b", "c", "new"):
        h.submit(key)
    assert [h.where(k) for k in ("a", "b", "c")] == ["npu0", "npu0", "cpu0"]
    h.handle(WorkerExited("npu0", 1, "crash"))
    assert [t.key for t in h.state.queue] == ["a", "b", "new"]


def test_a_loading_worker_holding_tasks_gets_only_the_heartbeat_timeout(make):
    h = make(heartbeat_timeout_s=5.0, load_timeout_s=60.0,
             models=[model("m", "npu0"), model("slow", "npu0")])
    h.up("npu0", m="ready", slow="loading")
    h.up("cpu0")
    h.submit("t1", timeout_s=100.0)
    assert h.where("t1") == "npu0"
    h.clock.advance(5.1)
    h.heartbeat("cpu0")
    (kill,) = of(KillWorker, h.tick())
    assert kill.device == "npu0"


def test_a_task_that_expires_before_a_slot_frees_is_answered_not_dispatched(make):
    h = make(models=[model("m", "npu0")])
    h.up()
    h.submit("busy", timeout_s=100.0)
    h.submit("t1", timeout_s=1.0)
    h.clock.advance(1.5)  # no Tick yet: the slot frees first
    actions = h.succeed("busy")
    assert dispatches(actions) == []
    (reject,) = of(Reject, actions)
    assert reject.key == "t1" and isinstance(reject.error, DeadlineExceeded)


def test_a_task_no_device_can_run_says_so_even_when_the_queue_is_full(make):
    h = make(max_queue=1, models=[model("m", "npu0"), model("gone", "cpu0")])
    h.up("npu0")
    h.up("cpu0", gone="unavailable")
    h.submit("busy")
    h.submit("waiting")
    (reject,) = of(Reject, h.submit("t1", name="gone"))
    assert isinstance(reject.error, NoDeviceAvailable)
    (overloaded,) = of(Reject, h.submit("t2"))
    assert isinstance(overloaded.error, Overloaded)


def test_snapshot_has_latency_histograms_failovers_and_queue_depth_per_model(h):
    h.submit("t1", name="m")
    h.fail("t1")  # npu0 -> cpu0
    h.succeed("t1", service_s=0.02)
    h.submit("t2")
    h.submit("t3")
    snap = {w["device"]: w for w in h.state.snapshot().to_wire()["workers"]}
    assert snap["npu0"]["models"]["m"]["failed_over"] == 1
    latency = snap["cpu0"]["models"]["m"]["latency"]
    assert latency["count"] == 1 and latency["sum"] == pytest.approx(0.02)
    assert [b for b, n in latency["buckets"] if n == 1][0] == 0.025  # cumulative from 0.025
    assert latency["buckets"][-1] == ["+Inf", 1]
    for key in ("t4", "t5"):  # three slots (npu0 1, cpu0 2): t2, t3, t4 run, t5 waits
        h.submit(key)
    assert h.state.snapshot().queued_by_model == {"m": 1}


def test_generated_tokens_are_counted_per_device_and_model(make):
    from runtime.core.scheduler import TaskTokens
    h = make()
    h.up()
    h.handle(TaskSubmitted("g1", "m", payload="g1", generate=True, stream=True))
    h.pending.add("g1")
    d = h.dispatch_of("g1")
    actions = h.handle(TaskTokens(d.device, d.epoch, d.attempt, [1, 2, 3], "abc"))
    (chunk,) = [a for a in actions if type(a).__name__ == "StreamChunk"]
    assert chunk.text == "abc" and chunk.previous_device is None
    model = h.state.snapshot().worker(d.device).models["m"]
    assert model.completion_tokens == 3 and model.prompt_tokens == 0
    h.handle(TaskSucceeded(d.device, d.epoch, d.attempt,
                           {"finish_reason": "stop", "prompt_tokens": 11}, 0.1))
    h.pending.discard("g1")
    model = h.state.snapshot().worker(d.device).models["m"]
    assert (model.prompt_tokens, model.completion_tokens) == (11, 3)


def test_a_generation_is_timed_from_submit_queue_first_token_gaps_and_answer(make):
    """Queue wait until each dispatch; TTFT at the task's first tokens; each later batch of n
    tokens is n gaps of (its wait / n); the request at the answer. After a failover the next
    device's first tokens are no gap, and TTFT is counted once per task."""
    from runtime.core.scheduler import TaskTokens
    h = make()
    h.up()
    h.handle(TaskSubmitted("g", "m", payload="g", generate=True, stream=True))
    h.pending.add("g")
    d = h.dispatch_of("g")
    assert d.device == "npu0"
    h.clock.advance(0.5)
    h.handle(TaskTokens(d.device, d.epoch, d.attempt, [1], "a"))  # TTFT 0.5
    h.clock.advance(0.03)
    h.handle(TaskTokens(d.device, d.epoch, d.attempt, [2, 3, 4], "bcd"))  # 3 gaps of 0.01
    h.handle(TaskFailed(d.device, d.epoch, d.attempt, "device", "boom"))
    d2 = h.dispatch_of("g")
    assert d2.device == "cpu0"
    h.clock.advance(0.2)
    h.handle(TaskTokens(d2.device, d2.epoch, d2.attempt, [5], "e"))  # neither a gap nor TTFT
    h.clock.advance(0.02)
    h.handle(TaskTokens(d2.device, d2.epoch, d2.attempt, [6], "f"))  # one gap of 0.02
    h.handle(TaskSucceeded(d2.device, d2.epoch, d2.attempt,
                           {"finish_reason": "stop", "prompt_tokens": 4}, 0.3))
    h.pending.discard("g")
    npu = h.state.snapshot().worker("npu0").models["m"]
    cpu = h.state.snapshot().worker("cpu0").models["m"]
    assert (npu.ttft.count, npu.ttft.total, cpu.ttft.count) == (1, pytest.approx(0.5), 0)
    assert (npu.itl.count, npu.itl.total) == (3, pytest.approx(0.03))
    assert (cpu.itl.count, cpu.itl.total) == (1, pytest.approx(0.02))
    assert (cpu.request.count, cpu.request.total, npu.request.count) == (
        1, pytest.approx(0.75), 0)
    assert (npu.completion_tokens, cpu.completion_tokens, cpu.prompt_tokens) == (4, 2, 4)
    assert (npu.queue_wait.count, cpu.queue_wait.count) == (1, 1)


def test_silence_while_the_scheduler_had_messages_unread_does_not_count_against_a_worker(make):
    h = make(heartbeat_timeout_s=5.0)
    h.up()
    h.submit("t1", timeout_s=100.0)
    h.clock.advance(6.0)  # the shell was backlogged: it last read everything 6 s ago
    assert of(KillWorker, h.handle(Tick(heard_all_until=h.clock.now - 6.0))) == []
    h.heartbeat("npu0", "cpu0")  # the backlog, read now, held their heartbeats
    h.clock.advance(5.1)
    kills = of(KillWorker, h.handle(Tick(heard_all_until=h.clock.now)))
    assert {k.device for k in kills} == {"npu0", "cpu0"}  # real silence still counts


# ---- node membership (a launcher that tracks nodes) ---------------------------------------

def per_node_cluster() -> Config:
    """npu0 (fixed) then ``cpu``, one worker per node; model ``m`` prefers npu0."""
    return Config(devices=[DeviceConfig("npu0", "npu", "qnn", capacity=1, prefetch=0),
                           DeviceConfig("cpu", "cpu", "onnxruntime", capacity=2, per_node=True,
                                        prefetch=0)],
                  models=[model("m", "npu0", "cpu")])


def test_without_node_tracking_a_per_node_device_is_one_worker_of_its_name(make):
    h = make(per_node_cluster())
    assert h.log == [StartWorker("npu0", 1), StartWorker("cpu", 1)]
    assert h.state.orders["m"] == ["npu0", "cpu"]


def test_per_node_instances_join_the_models_order_where_their_device_stands(make):
    h = make(per_node_cluster(), track_nodes=True)
    assert h.log == [StartWorker("npu0", 1)] and h.state.orders["m"] == ["npu0"]
    actions = h.handle(WorkerAdded("cpu@bbbb", "cpu", "10.0.0.2/bbbb"),
                       WorkerAdded("cpu@aaaa", "cpu", "10.0.0.1/aaaa", capacity=4))
    h._record([])
    assert of(StartWorker, actions) == [StartWorker("cpu@bbbb", 1), StartWorker("cpu@aaaa", 1)]
    assert h.state.orders["m"] == ["npu0", "cpu@aaaa", "cpu@bbbb"]
    assert h.state.workers["cpu@aaaa"].capacity == 4  # the node's, when the launcher says so
    assert h.state.workers["cpu@bbbb"].capacity == 2  # else the device's
    assert h.state.workers["cpu@aaaa"].template == "cpu"
    h.up()
    assert h.state.ready()
    # npu0 takes one, then the instances share the rest by capacity
    placed = [h.where(k) for k in range(7) if dispatches(h.submit(k))]
    assert placed.count("npu0") == 1 and placed.count("cpu@aaaa") == 4
    assert placed.count("cpu@bbbb") == 2
    for k in range(7):
        h.succeed(k)


def test_adding_an_instance_twice_or_one_of_an_unknown_device_does_nothing(make):
    h = make(per_node_cluster(), track_nodes=True)
    h.handle(WorkerAdded("cpu@aaaa", "cpu", "n1"))
    assert of(StartWorker, h.handle(WorkerAdded("cpu@aaaa", "cpu", "n1"))) == []
    assert of(StartWorker, h.handle(WorkerAdded("gpu@aaaa", "gpu", "n1"))) == []
    assert of(StartWorker, h.handle(WorkerAdded("npu0", "npu0"))) == []  # up, not gone
    assert set(h.state.workers) == {"npu0", "cpu@aaaa"}


def test_a_gone_instance_has_its_tasks_re_run_elsewhere_and_is_never_restarted(make):
    h = make(per_node_cluster(), track_nodes=True)
    h.handle(WorkerAdded("cpu@aaaa", "cpu", "n1"), WorkerAdded("cpu@bbbb", "cpu", "n2"))
    h.up("cpu@aaaa", "cpu@bbbb")  # npu0 still starting
    for k in range(4):
        h.submit(k)
    on_a = [k for k in range(4) if h.where(k) == "cpu@aaaa"]
    assert len(on_a) == 2
    actions = h.handle(WorkerGone("cpu@aaaa", "node n1 left the Ray cluster"))
    assert of(KillWorker, actions) == [KillWorker("cpu@aaaa", 1, "node n1 left the Ray cluster")]
    assert h.state.orders["m"] == ["npu0", "cpu@bbbb"]
    view = h.state.workers["cpu@aaaa"]
    assert view.state == "gone" and view.in_flight == {}
    for k in range(4):  # the two re-runs wait for cpu@bbbb's slots
        if k not in on_a:
            h.succeed(k)
    for k in on_a:
        assert h.where(k) == "cpu@bbbb"
        h.succeed(k)
        (attempt,) = h.answers[k].attempts
        assert attempt == Attempt("cpu@aaaa", "worker_lost", "node n1 left the Ray cluster")
    assert of(StartWorker, h.tick(3600)) == []  # gone is not lost: no restart
    gone = h.state.snapshot().worker("cpu@aaaa")
    assert gone.state == "gone"
    assert gone.last_exit == "node n1 left the Ray cluster"
    # a late answer from the gone worker is dropped
    assert h.handle(TaskSucceeded("cpu@aaaa", 1, 999, "late", 0.1)) == []


def test_a_gone_device_does_not_hold_readiness_and_comes_back_when_a_node_can_host_it(make):
    h = make(per_node_cluster(), track_nodes=True)
    h.handle(WorkerAdded("cpu@aaaa", "cpu", "n1"))
    h.up("cpu@aaaa")
    assert not h.state.ready()  # npu0 is still starting
    h.handle(WorkerGone("npu0", "no live Ray node has the resources {'NPU': 1.0}"))
    assert h.state.ready() and h.state.workers["npu0"].state == "gone"
    assert [d.device for d in dispatches(h.submit("t1"))] == ["cpu@aaaa"]
    h.succeed("t1")
    assert h.answers["t1"].attempts == [Attempt(
        "npu0", "worker_gone", "no live Ray node has the resources {'NPU': 1.0}")]
    actions = h.handle(WorkerAdded("npu0", "npu0"))
    assert of(StartWorker, actions) == [StartWorker("npu0", 2)]
    h.up("npu0")
    assert [d.device for d in dispatches(h.submit("t2"))] == ["npu0"]
    h.succeed("t2")


def test_queued_tasks_that_only_a_gone_device_could_run_are_answered_with_why(make):
    h = make(per_node_cluster(), track_nodes=True)
    h.handle(WorkerAdded("cpu@aaaa", "cpu", "n1"))
    h.up("npu0", "cpu@aaaa")
    h.handle(WorkerGone("cpu@aaaa", "node n1 left"))
    h.submit("a")  # runs on npu0
    h.submit("b")  # waits for npu0
    assert h.where("a") == "npu0"
    h.handle(WorkerGone("npu0", "node n0 left"))
    for key in ("a", "b"):
        answer = h.answers[key]
        assert isinstance(answer, Reject) and isinstance(answer.error, NoDeviceAvailable)
    # "a" was running on npu0 when it went; "b" never ran: it says why npu0 was skipped
    assert h.answers["a"].error.attempts == [Attempt("npu0", "worker_lost", "node n0 left")]
    assert h.answers["b"].error.attempts == [Attempt("npu0", "worker_gone", "node n0 left")]
    assert h.state.tasks == {} and not h.state.queue


def test_a_task_behind_a_backlog_another_device_cannot_serve_runs_at_once_and_order_is_kept(make):
    h = make(cluster(npu=1, cpu=1, models=[model("a", "cpu0"), model("b", "npu0", "cpu0")]))
    h.up()
    for i in range(5):
        h.submit(("a", i), "a")  # the first runs on cpu0, four wait: only cpu0 serves "a"
    assert [d.device for d in dispatches(h.submit("b", "b"))] == ["npu0"]
    assert h.state.queued_models == {"a": 4, "b": 0}
    order = []
    for i in range(5):
        order.append(h.dispatch_of(("a", i)).payload)
        follow = dispatches(h.succeed(("a", i)))
        assert [d.device for d in follow] == (["cpu0"] if i < 4 else [])
    assert order == [("a", i) for i in range(5)]  # FIFO among the passed-over tasks
    h.succeed("b")
