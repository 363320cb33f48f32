"""Pipelined dispatch as the scheduler decides it (pure, fake clock): a worker holds up to
``capacity + prefetch`` tensor tasks; those beyond its slots are attempts like any other."""
from __future__ import annotations

from typing import Any

import pytest

from runtime.config.schema import Config, DeviceConfig, SchedulerConfig
from runtime.core.scheduler import (
    MAX_PIPELINE,
    CancelAttempt,
    Deliver,
    ModelStateChanged,
    Reject,
    TaskFailed,
    TaskSubmitted,
    TaskSucceeded,
    WorkerExited,
)
from runtime.errors import Cancelled
from runtime.wire.status import Calibration, ModelLoad

from .test_scheduler_state import Harness, checked, dispatches, model, of


def one_cpu(capacity: int = 2, prefetch: int | None = 2, **scheduler: Any) -> Config:
    return Config(devices=[DeviceConfig("cpu0", "cpu", "onnxruntime", capacity=capacity,
                                        prefetch=prefetch)],
                  models=[model("m", "cpu0")], scheduler=SchedulerConfig(**scheduler))


@pytest.fixture
def make():
    with checked(Harness) as factory:
        yield factory


def submit_all(h: Harness, keys: list[str]) -> list[str]:
    """Submit each key; the keys dispatched, in order."""
    sent = []
    for key in keys:
        sent += [d.payload for d in dispatches(h.submit(key))]
    return sent


def test_a_worker_takes_its_capacity_plus_prefetch_and_the_rest_wait_in_the_queue(make):
    h = make(one_cpu(capacity=2, prefetch=3))
    h.up()
    sent = submit_all(h, [f"t{i}" for i in range(8)])
    assert sent == ["t0", "t1", "t2", "t3", "t4"]
    assert h.in_flight("cpu0") == 5 and len(h.state.queue) == 3
    assert h.state.snapshot().worker("cpu0").prefetch == 3


def test_each_answer_frees_a_credit_that_the_next_queued_task_takes(make):
    h = make(one_cpu(capacity=1, prefetch=1))
    h.up()
    submit_all(h, ["a", "b", "c"])
    assert [d.payload for d in dispatches(h.succeed("a"))] == ["c"]
    assert h.in_flight("cpu0") == 2


def test_a_lost_worker_re_runs_its_prefetched_tasks_and_answers_each_once(make):
    h = make(one_cpu(capacity=1, prefetch=3, restart_backoff_s=0.01))
    h.up()
    submit_all(h, ["a", "b", "c", "d"])
    actions = h.handle(WorkerExited("cpu0", h.epochs["cpu0"], "SIGKILL"))
    assert not of(Deliver, actions) and len(h.state.queue) == 4  # all four back, in order
    assert [t.key for t in h.state.queue] == ["a", "b", "c", "d"]
    assert all(t.attempts[-1].kind == "worker_lost" for t in h.state.queue)
    h.tick(1.0)
    h.up()
    for key in ["a", "b", "c", "d"]:
        h.succeed(key)
    assert set(h.answers) == {"a", "b", "c", "d"} and not h.pending


def test_a_cancel_of_a_prefetched_task_reaches_the_worker_and_its_answer_frees_the_credit(make):
    h = make(one_cpu(capacity=1, prefetch=1))
    h.up()
    submit_all(h, ["a", "b", "c"])
    b = h.dispatch_of("b")
    actions = h.cancel("b")
    assert CancelAttempt("cpu0", b.epoch, b.attempt) in actions
    assert isinstance(h.answers["b"].error, Cancelled)
    assert not dispatches(actions)  # the credit is held until the worker confirms
    actions = h.handle(TaskFailed("cpu0", b.epoch, b.attempt, "cancelled", "cancelled"))
    assert [d.payload for d in dispatches(actions)] == ["c"]


def test_generations_are_never_prefetched(make):
    h = make(one_cpu(capacity=1, prefetch=4))
    h.up()
    for key in ("g1", "g2"):
        h.pending.add(key)
        h.handle(TaskSubmitted(key, "m", payload=key, generate=True))
    assert [d.payload for d in dispatches(h.log)] == ["g1"]
    assert len(h.state.queue) == 1


def test_unset_prefetch_covers_a_round_trip_at_the_models_pace_and_is_bounded(make):
    h = make(one_cpu(capacity=2, prefetch=None))
    h.up()
    assert h.state.workers["cpu0"].prefetch == 2  # nothing measured yet: one per slot
    h.handle(ModelStateChanged("cpu0", h.epochs["cpu0"], "m", ModelLoad(
        "ready", calibration=Calibration(service_s=0.5))))
    assert h.state.workers["cpu0"].prefetch == 2  # a round trip is nothing to a 0.5 s task
    h.handle(ModelStateChanged("cpu0", h.epochs["cpu0"], "m", ModelLoad(
        "ready", calibration=Calibration(service_s=0.0005))))
    assert h.state.workers["cpu0"].prefetch == 2 * 4  # 2 ms of 0.5 ms tasks per slot
    h.handle(ModelStateChanged("cpu0", h.epochs["cpu0"], "m", ModelLoad(
        "ready", calibration=Calibration(service_s=1e-6))))
    assert h.state.workers["cpu0"].prefetch == 2 * MAX_PIPELINE


def test_unset_prefetch_lets_every_slot_fill_a_batch_of_a_model_that_batches(make):
    h = make(one_cpu(capacity=2, prefetch=None))
    h.up()
    h.handle(ModelStateChanged("cpu0", h.epochs["cpu0"], "m", ModelLoad(
        "ready", max_batch=16, calibration=Calibration(service_s=0.5))))
    assert h.state.workers["cpu0"].prefetch == 2 * 2 * 16  # one batch waiting per slot


def test_a_batched_run_refines_the_per_task_share_not_the_time_alone(make):
    h = make(one_cpu(capacity=1, prefetch=8))
    h.up()
    h.handle(ModelStateChanged("cpu0", h.epochs["cpu0"], "m", ModelLoad(
        "ready", max_batch=4, calibration=Calibration(service_s=0.010, batch=4,
                                                      batch_service_s=0.020))))
    estimate = h.state.workers["cpu0"].models["m"].estimate
    assert estimate.service_s == pytest.approx(0.010) and estimate.share_s == pytest.approx(0.005)
    submit_all(h, ["a", "b", "c", "d"])
    for key in "abcd":
        d = h.dispatch_of(key)
        h.handle(TaskSucceeded("cpu0", d.epoch, d.attempt, key, 0.024, batch=4))
    assert estimate.service_s == pytest.approx(0.010)  # a lone task still takes 10 ms
    assert 0.005 < estimate.share_s < 0.006  # moved towards 24 ms / 4
    status = h.state.snapshot().worker("cpu0").models["m"]
    assert status.batches == {"4": 4} and status.max_batch == 4


def test_prefetched_tasks_are_committed_work_on_the_lanes_of_their_worker(make):
    """Two workers: the one holding prefetched work is expected to start later."""
    config = Config(devices=[DeviceConfig("a", "cpu", "onnxruntime", capacity=1, prefetch=4),
                             DeviceConfig("b", "cpu", "onnxruntime", capacity=1, prefetch=4)],
                    models=[model("m", "a", "b")])
    h = make(config)
    h.up()
    for device in ("a", "b"):
        h.handle(ModelStateChanged(device, h.epochs[device], "m", ModelLoad(
            "ready", calibration=Calibration(service_s=0.1))))
    keys = [f"t{i}" for i in range(6)]
    for key in keys:
        h.submit(key)
    sent = [h.where(key) for key in keys]
    assert sent.count("a") == 3 and sent.count("b") == 3  # spread by projected finish


def test_submits_fed_together_are_refused_only_past_what_the_workers_take_at_once(make):
    # Given one slot, no prefetch and room for 4 waiting tasks,
    h = make(one_cpu(capacity=1, prefetch=0, max_queue=4))
    h.up()
    keys = [f"t{i}" for i in range(10)]
    h.pending |= set(keys)
    # when ten submits of one socket drain are fed together (one placement pass),
    actions = h.handle(*(TaskSubmitted(k, "m", payload=k) for k in keys))
    # then, as had they come one at a time, one runs, four wait and the rest are refused.
    assert [d.payload for d in dispatches(actions)] == ["t0"]
    assert [t.key for t in h.state.queue] == keys[1:5]
    assert [a.key for a in actions if isinstance(a, Reject)] == keys[5:]


def test_a_prefetched_task_is_expected_to_run_from_when_a_slot_freed_not_from_its_dispatch(make):
    """A held task that waited at its worker is not overdue for that wait: were its run taken
    to begin at dispatch, the worker would look free too soon and a slower one would be
    booked behind it, ending the fan-out late."""
    h = make(one_cpu(capacity=1, prefetch=1))
    h.up()
    h.handle(ModelStateChanged("cpu0", h.epochs["cpu0"], "m", ModelLoad(
        "ready", calibration=Calibration(service_s=0.05))))
    h.submit("a")
    h.submit("b")  # held at the worker behind "a"
    h.clock.advance(0.05)
    h.succeed("a", 0.05)  # "b" runs from now
    h.clock.advance(0.02)
    lanes = h.state._lanes(h.clock.now)
    assert lanes.start_s("cpu0") == pytest.approx(0.03)  # not 0.02: "b" is 20 ms into 50
