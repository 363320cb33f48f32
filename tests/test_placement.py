"""Placement (runtime/core/placement.py, estimates.py and the scheduler's use of them), pure.

Backlog-aware earliest expected finish: workers report a calibrated service time when a model
is ready, a task waits for a busy faster worker while that still finishes it sooner, and a
slower one takes it only when it finishes it sooner. A fake clock; no processes. The
fan-outs here are simulated: each dispatched task finishes after its device's true time.
"""
from __future__ import annotations

import heapq
import math
from typing import Any

import pytest

from runtime.config.schema import Config, DeviceConfig, SchedulerConfig
from runtime.core import placement
from runtime.core.estimates import Estimate
from runtime.core.placement import Candidate, Lanes, earliest_finish, earliest_free_finish
from runtime.core.scheduler import (
    LOOKAHEAD,
    Deliver,
    Dispatch,
    ModelStateChanged,
    TaskSubmitted,
    TaskTokens,
    WorkerExited,
    WorkerHeartbeat,
)
from runtime.errors import ProtocolError
from runtime.wire.status import Calibration, ModelLoad

from .test_scheduler_state import Harness, checked, dispatches, model

# ---- the policy, alone ----------------------------------------------------------------------


def test_the_policy_picks_the_earliest_expected_finish_even_on_a_busy_worker():
    busy_fast = Candidate("cpu0", rank=1, start_s=0.004, service_s=0.002)
    free_slow = Candidate("npu0", rank=0, start_s=0.0, service_s=0.050)
    assert earliest_finish([free_slow, busy_fast]) is busy_fast  # finishes at 6 ms, not 50


def test_at_an_equal_finish_a_free_slot_beats_waiting_then_the_device_order_decides():
    waiting = Candidate("npu0", rank=0, start_s=0.01, service_s=0.01)
    free = Candidate("cpu0", rank=1, start_s=0.0, service_s=0.02)
    assert earliest_finish([waiting, free]) is free
    first = Candidate("npu0", rank=0, start_s=0.0, service_s=0.02)
    assert earliest_finish([free, first]) is first


def test_no_candidate_no_choice():
    assert earliest_finish([]) is None


def test_the_old_free_slot_policy_never_waits_for_a_busy_worker():
    busy_fast = Candidate("cpu0", rank=1, start_s=0.004, service_s=0.002)
    free_slow = Candidate("npu0", rank=0, start_s=0.0, service_s=0.050)
    assert earliest_free_finish([free_slow, busy_fast]) is free_slow
    assert earliest_free_finish([busy_fast]) is None


def test_lanes_book_each_task_on_the_workers_earliest_slot():
    lanes = Lanes()
    lanes.add("cpu0", capacity=2, remaining_s=[0.03])
    assert lanes.start_s("cpu0") == 0.0  # one slot is free
    assert lanes.commit("cpu0", 0.01) == pytest.approx(0.01)
    assert lanes.start_s("cpu0") == pytest.approx(0.01)  # the booked task ends first
    assert lanes.commit("cpu0", 0.01) == pytest.approx(0.02)
    assert lanes.start_s("cpu0") == pytest.approx(0.02)
    assert lanes.booked["cpu0"] == 2


def test_a_running_task_holds_its_slot_even_when_it_is_due_now():
    lanes = Lanes()
    lanes.add("cpu0", capacity=1, remaining_s=[0.0])
    assert lanes.start_s("cpu0") > 0  # not free: the worker has not answered yet


def test_an_overdue_run_is_expected_to_need_as_long_again_as_it_is_overdue():
    assert placement.remaining_s(0.05, 0.02) == pytest.approx(0.03)
    assert placement.remaining_s(0.05, 0.05) == 0.0
    assert placement.remaining_s(0.05, 0.25) == pytest.approx(0.20)


# ---- estimates --------------------------------------------------------------------------------

def test_a_calibration_seeds_the_estimate_and_each_run_moves_it_by_the_ewma():
    est = Estimate()
    est.calibrate(Calibration(service_s=0.010))
    assert est.expected() == pytest.approx(0.010)
    est.observe(0.020)
    assert est.expected() == pytest.approx(0.013)  # 0.7 * 10 ms + 0.3 * 20 ms


def test_an_llm_estimate_is_per_token_and_knows_a_fuller_batch_costs_less_than_its_size():
    est = Estimate()
    est.calibrate(Calibration(service_s=0.2, ttft_s=0.05, token_s=0.02, batch=8,
                              batch_token_s=0.04))
    alone, full = est.expected(tokens=65, batch=1), est.expected(tokens=65, batch=8)
    assert alone == pytest.approx(0.05 + 64 * 0.02)
    assert full == pytest.approx(0.05 + 64 * 0.04)  # twice as long per request, not 8 times


def test_an_llm_estimate_learns_the_per_token_time_of_a_run_in_a_batch():
    est = Estimate()
    est.calibrate(Calibration(ttft_s=0.0, token_s=0.02, batch=8, batch_token_s=0.04))
    for _ in range(30):  # measured: 0.06 s a token while 8 sequences decode together
        est.observe(service_s=0.06 * 10, tokens=11, batch=8)
    assert est.step_s(8) == pytest.approx(0.06, rel=0.01)
    assert est.step_s(1) == pytest.approx(0.03, rel=0.01)


def test_a_calibration_travels_with_the_models_ready_state_and_is_checked_at_decode():
    load = ModelLoad("ready", calibration=Calibration(service_s=0.4, cpu_s=0.8))
    wire = load.to_wire()
    assert ModelLoad.from_wire(wire) == load
    assert ModelLoad.from_wire(wire).calibration.host_cores == pytest.approx(2.0)
    newer = {**wire, "calibration": {**wire["calibration"], "later": 1}}
    assert ModelLoad.from_wire(newer) == load  # a newer worker's extra field is ignored
    with pytest.raises(ProtocolError, match="calibration.token_s"):
        ModelLoad.from_wire({**wire, "calibration": {"token_s": "fast"}})


# ---- the scheduler's placement ------------------------------------------------------------

def two_devices(slow: str = "npu0", fast: str = "cpu0", *, slow_capacity: int = 1,
                fast_capacity: int = 2, order: tuple[str, ...] | None = None,
                **scheduler: Any) -> Config:
    """A slow and a fast device; model ``m`` prefers the slow one unless ``order`` says."""
    return Config(devices=[DeviceConfig(slow, "npu", "qnn", capacity=slow_capacity, prefetch=0),
                           DeviceConfig(fast, "cpu", "onnxruntime", capacity=fast_capacity,
                                        prefetch=0)],
                  models=[model("m", *(order or (slow, fast)))],
                  scheduler=SchedulerConfig(**scheduler))


class Placed(Harness):
    """The scheduler harness, with workers that calibrate at load and a fan-out simulator."""

    def calibrate(self, device: str, service_s: float, name: str = "m", **more: Any) -> list:
        cal = Calibration(service_s=service_s, **more)
        return self.handle(ModelStateChanged(device, self.epochs[device], name,
                                             ModelLoad("ready", calibration=cal)))

    def ready(self, **service_s: float) -> None:
        """Every worker up, each model calibrated at ``service_s[device]``."""
        self.up()
        for device, seconds in service_s.items():
            for name in self.state.workers[device].models:
                self.calibrate(device, seconds, name)

    def fan_out(self, n: int, true_s: dict[str, float], name: str = "m",
                until: float | None = None) -> float:
        """Submit ``n`` tasks at once; each dispatched one succeeds after its device's true
        time (the clock jumps from one completion to the next). Returns the makespan."""
        start = self.clock.now
        running: list[tuple[float, int, Dispatch]] = []
        order = 0

        def track(actions: list) -> None:
            nonlocal order
            for d in dispatches(actions):
                order += 1
                heapq.heappush(running, (self.clock.now + true_s[d.device], order, d))

        for i in range(n):
            track(self.submit((name, i), name))
        while running and (until is None or running[0][0] <= start + until):
            at, _, d = heapq.heappop(running)
            self.clock.now = at
            track(self.succeed(d.payload, true_s[d.device], dispatch=d))
        return self.clock.now - start


@pytest.fixture
def make():
    with checked(Placed) as factory:
        yield factory


def test_calibrated_at_load_the_first_task_goes_to_the_faster_device_not_the_preferred(make):
    h = make(two_devices())
    h.ready(npu0=0.05, cpu0=0.01)
    (d,) = dispatches(h.submit("t1"))
    assert d.device == "cpu0"  # no exploration run on the slow preferred device first


def test_with_equal_calibrations_the_models_device_order_breaks_the_tie(make):
    h = make(two_devices())
    h.ready(npu0=0.02, cpu0=0.02)
    assert dispatches(h.submit("t1"))[0].device == "npu0"


def test_a_task_waits_for_a_busy_faster_worker_while_that_still_finishes_it_sooner(make):
    h = make(two_devices())
    h.ready(npu0=0.05, cpu0=0.01)
    placed = [d.device for i in range(6) for d in dispatches(h.submit(i))]
    assert placed == ["cpu0", "cpu0"]  # the other four wait for cpu0's two 10 ms slots
    assert h.in_flight("npu0") == 0 and len(h.state.queue) == 4


def test_a_slower_worker_takes_a_task_once_that_finishes_it_sooner(make):
    h = make(two_devices())
    h.ready(npu0=0.045, cpu0=0.01)
    placed = [(i, d.device) for i in range(11) for d in dispatches(h.submit(i))]
    # cpu0 would end its 9th task at 50 ms (2 slots, 10 ms each): npu0 ends it at 45 ms
    assert placed == [(0, "cpu0"), (1, "cpu0"), (8, "npu0")]


def test_a_fanout_over_a_slow_preferred_and_a_fast_device_ends_near_the_fluid_bound(make):
    true_s = {"npu0": 0.05, "cpu0": 0.01}
    h = make(two_devices())
    h.ready(**true_s)
    n = 200
    makespan = h.fan_out(n, true_s)
    fluid = n / (1 / 0.05 + 2 / 0.01)  # N over the sum of the devices' rates
    fast_alone = n / (2 / 0.01)
    assert makespan <= 1.05 * fluid
    assert makespan < fast_alone
    served = sum(1 for a in h.answers.values() if a.device == "npu0")
    assert 0 < served <= round(n * 20 / 220) + 1


def test_a_fanout_never_ends_later_than_the_faster_device_alone_at_any_size(make):
    true_s = {"npu0": 0.04, "cpu0": 0.01}
    for n in (3, 20, 200):
        h = make(two_devices(order=("cpu0", "npu0")))
        h.ready(**true_s)
        assert h.fan_out(n, true_s) <= math.ceil(n / 2) * 0.01 + 1e-9


def test_the_old_free_slot_policy_loses_time_to_the_slower_device(make):
    true_s = {"npu0": 0.08, "cpu0": 0.01}
    h = make(two_devices())
    h.state.policy = earliest_free_finish
    h.ready(**true_s)
    assert h.fan_out(20, true_s) > 20 / (2 / 0.01)  # the slow device stretched the tail


def test_when_the_fast_worker_dies_the_tasks_waiting_for_it_go_to_the_others_at_once(make):
    h = make(two_devices(slow_capacity=4))
    h.ready(npu0=0.05, cpu0=0.01)
    for i in range(8):
        h.submit(i)
    waiting = [t.key for t in h.state.queue]
    assert h.in_flight("npu0") == 0 and len(waiting) == 6
    actions = h.handle(WorkerExited("cpu0", h.epochs["cpu0"], "SIGKILL"))
    moved = [d.payload for d in dispatches(actions)]
    assert moved[:4] == [0, 1, 2, 3]  # the two it was running first, then the waiting ones
    assert {d.device for d in dispatches(actions)} == {"npu0"}


def test_when_the_fast_workers_breaker_opens_its_queued_share_moves_at_once(make):
    h = make(two_devices(slow_capacity=4, breaker_threshold=2, breaker_cooldown_s=60))
    h.ready(npu0=0.05, cpu0=0.01)
    for i in range(8):
        h.submit(i)
    # The failed task re-runs on npu0, the next waiting one takes cpu0's freed slot
    assert [(d.device, d.payload) for d in dispatches(h.fail(0))] == [("npu0", 0), ("cpu0", 2)]
    assert [(d.device, d.payload) for d in dispatches(h.fail(1))] == [("npu0", 1), ("cpu0", 3)]
    # cpu0's errors count once another device has served those tasks (else the input may be
    # at fault, issue 11 item 7); the second one served opens its breaker
    h.succeed(0)
    assert h.breaker("cpu0") == "closed"
    actions = h.succeed(1)
    assert h.breaker("cpu0") == "open"
    assert [(d.device, d.payload) for d in dispatches(actions)] == [
        ("npu0", 4), ("npu0", 5), ("npu0", 6), ("npu0", 7)]
    assert list(h.state.queue) == []


def test_a_fast_worker_that_stays_overdue_lets_the_slower_one_take_tasks(make):
    h = make(two_devices())
    h.ready(npu0=0.05, cpu0=0.01)
    for i in range(3):
        h.submit(i)
    assert h.in_flight("npu0") == 0
    h.clock.advance(0.03)  # cpu0's runs are 20 ms overdue: it may be stuck
    assert dispatches(h.tick()) == []
    h.heartbeat("npu0", "cpu0")
    h.clock.advance(0.03)  # 50 ms overdue now: npu0 finishes the waiting task sooner
    assert [(d.device, d.payload) for d in dispatches(h.tick())] == [("npu0", 2)]


def test_a_model_whose_only_device_is_slow_is_not_starved_by_tasks_waiting_for_a_fast_one(make):
    config = two_devices()
    config.models.append(model("only-slow", "npu0"))
    h = make(config)
    h.ready(npu0=0.05, cpu0=0.01)
    for i in range(6):
        h.submit(("m", i))
    assert [d.payload for d in dispatches(h.submit("s", "only-slow"))] == ["s"]


def test_tasks_waiting_for_a_busy_worker_are_dispatched_in_their_fifo_order(make):
    h = make(two_devices())
    h.ready(npu0=0.05, cpu0=0.01)
    for i in range(6):
        h.submit(i)
    order = []
    for i in range(6):
        order += [d.payload for d in dispatches(h.succeed(i, 0.01))]
    assert order == [2, 3, 4, 5]


def test_a_task_is_never_sent_back_to_the_faster_device_it_failed_on(make):
    h = make(two_devices())
    h.ready(npu0=0.05, cpu0=0.01)
    h.submit("t1")
    (d,) = dispatches(h.fail("t1"))
    assert d.device == "npu0"


def test_the_queue_bound_counts_tasks_waiting_for_a_busy_worker(make):
    h = make(two_devices(max_queue=3))
    h.ready(npu0=0.05, cpu0=0.01)
    for i in range(5):  # two run, three wait for cpu0
        h.submit(i)
    (reject,) = h.submit(5)
    assert reject.error.kind == "overloaded"


def test_a_device_that_pays_off_only_past_the_lookahead_gets_nothing_from_one_pass(make):
    h = make(two_devices(fast_capacity=1))
    h.ready(npu0=1.0, cpu0=0.001)  # npu0 pays off only for a task behind 1000 on cpu0
    for i in range(LOOKAHEAD + 600):
        h.submit(i)
    assert h.in_flight("npu0") == 0 and h.in_flight("cpu0") == 1


def test_an_uncalibrated_device_counts_as_the_slowest_calibrated_one(make):
    h = make(two_devices(order=("cpu0", "npu0")))
    h.up()
    h.calibrate("cpu0", 0.01)  # npu0 reported ready without a warm-up
    placed = [d.device for i in range(3) for d in dispatches(h.submit(i))]
    assert placed == ["cpu0", "cpu0", "npu0"]  # a tie with cpu0's next slot: free wins


# ---- host cores: an accelerator that burns the CPU ----------------------------------------

def simulator_cluster(**scheduler: Any) -> Config:
    config = two_devices(**scheduler)
    config.models.append(model("npu-only", "npu0"))
    return config


def test_an_accelerator_that_burns_the_hosts_cores_is_left_idle_while_the_cpu_serves(make):
    h = make(simulator_cluster())
    h.up()
    h.calibrate("npu0", 0.4, cpu_s=0.8)  # the HTP simulator: 2 cores busy for 0.4 s
    h.calibrate("npu0", 0.4, "npu-only", cpu_s=0.8)
    h.calibrate("cpu0", 0.003, cpu_s=0.003)  # one core a run, two runs at once
    h.handle(WorkerHeartbeat("npu0", h.epochs["npu0"], cores=2),
             WorkerHeartbeat("cpu0", h.epochs["cpu0"], cores=2))
    placed = [d.device for i in range(400) for d in dispatches(h.submit(i))]
    assert placed == ["cpu0", "cpu0"] and h.in_flight("npu0") == 0
    # ... but a model only it serves still runs there
    assert dispatches(h.submit("x", "npu-only"))[0].device == "npu0"


def test_a_task_that_failed_on_the_cpu_may_still_run_on_an_accelerator_that_burns_cores(make):
    h = make(simulator_cluster())
    h.up()
    h.calibrate("npu0", 0.4, cpu_s=0.8)
    h.calibrate("cpu0", 0.003, cpu_s=0.003)
    h.handle(WorkerHeartbeat("npu0", h.epochs["npu0"], cores=2))
    for i in range(400):
        h.submit(i)
    (rerun, refill) = dispatches(h.fail(0))  # behind 398 tasks waiting for cpu0
    assert (rerun.device, rerun.payload) == ("npu0", 0)  # the only device left to it
    assert (refill.device, refill.payload) == ("cpu0", 2)


def test_an_accelerator_that_spares_the_hosts_cores_takes_its_share(make):
    h = make(simulator_cluster())
    h.up()
    h.calibrate("npu0", 0.004, cpu_s=0.00004)  # a real NPU: the host barely works meanwhile
    h.calibrate("cpu0", 0.003, cpu_s=0.003)
    h.handle(WorkerHeartbeat("npu0", h.epochs["npu0"], cores=2))
    placed = [d.device for i in range(4) for d in dispatches(h.submit(i))]
    assert placed == ["cpu0", "cpu0", "npu0"]  # 4 ms on npu0 beat 6 ms waiting for cpu0


def test_an_accelerator_that_burns_cores_a_sleeping_cpu_worker_does_not_need_takes_tasks(make):
    h = make(simulator_cluster())
    h.up()
    h.calibrate("npu0", 0.4, cpu_s=0.8)
    h.calibrate("cpu0", 0.15, cpu_s=0.003)  # a CPU worker slowed by waiting, not computing
    h.handle(WorkerHeartbeat("npu0", h.epochs["npu0"], cores=2))
    placed = [(i, d.device) for i in range(5) for d in dispatches(h.submit(i))]
    assert placed == [(0, "cpu0"), (1, "cpu0"), (4, "npu0")]  # cpu0 would end it at 0.45 s


def two_cpu_workers() -> Config:
    return Config(devices=[DeviceConfig("slow", "cpu", "onnxruntime", capacity=2, prefetch=0),
                           DeviceConfig("fast", "cpu", "onnxruntime", capacity=2, prefetch=0)],
                  models=[model("m", "slow", "fast")])


def busy_node(h: Placed, other_cores: float, seconds: int = 20) -> None:
    """Heartbeats in which the node's CPU time grows by the workers' own plus ``other_cores``."""
    cpu = {d: 0.0 for d in h.state.workers}
    node = 0.0
    for _ in range(seconds):
        h.clock.advance(1.0)
        node += other_cores
        h.handle(*(WorkerHeartbeat(d, h.epochs[d], cpu_s=cpu[d], cores=2, node_cpu_s=node)
                   for d in cpu))


@pytest.mark.parametrize("other_cores, slow_share", [(0.0, True), (0.6, False)])
def test_a_slow_cpu_worker_takes_tasks_unless_its_runs_cost_the_fast_one_more_than_it_adds(
        make, other_cores, slow_share):
    h = make(two_cpu_workers())
    h.up()
    h.calibrate("slow", 0.056, cpu_s=0.004)  # sleeps mostly: 4 ms of CPU in a 56 ms run
    h.calibrate("fast", 0.002, cpu_s=0.0015)  # 0.75 of a core a run, two at once
    busy_node(h, other_cores)  # the scheduler, clients, other programs on the node
    placed = [d.device for i in range(200) for d in dispatches(h.submit(i))]
    # With 0.6 cores busy elsewhere, the fast worker's 1.5 and the slow one's runs
    # oversubscribe the 2 cores: each slow run would cost the fast worker more than one task.
    assert ("slow" in placed) is slow_share


def test_cpu_work_stretches_only_when_the_cores_are_oversubscribed():
    assert placement.cpu_stretch(cores=2, demand=1, extra=1) == 1.0  # both fit
    assert placement.cpu_stretch(cores=2, demand=2, extra=2) == pytest.approx(2.0)
    assert placement.cpu_stretch(cores=2, demand=4, extra=2) == pytest.approx(1.5)


def test_a_worker_that_mostly_waits_loses_little_when_cpu_work_stretches():
    assert placement.throughput_lost(cpu_share=1.0, stretch=2.0) == pytest.approx(0.5)
    assert placement.throughput_lost(cpu_share=0.02, stretch=2.0) == pytest.approx(0.0196, 1e-2)
    assert placement.throughput_lost(cpu_share=1.0, stretch=1.0) == 0.0


def test_host_cores_are_measured_from_cpu_time_over_run_time_between_heartbeats(make):
    h = make(two_devices())
    h.ready(npu0=0.05, cpu0=0.01)
    npu = h.state.workers["npu0"]
    h.handle(WorkerHeartbeat("npu0", h.epochs["npu0"], cpu_s=10.0, cores=2))
    h.state.policy = lambda cands: next(c for c in cands if c.device == "npu0")
    for i in range(10):
        h.submit(i)
        h.succeed(i, service_s=0.1)  # one second of runs ...
    h.handle(WorkerHeartbeat("npu0", h.epochs["npu0"], cpu_s=12.0, cores=2))
    assert npu.host_cores == pytest.approx(2.0)  # ... that burned two CPU seconds


# ---- LLMs -----------------------------------------------------------------------------------

def llm_cluster() -> Config:
    return Config(devices=[DeviceConfig("llmnpu", "npu", "openvino-genai", capacity=1),
                           DeviceConfig("llmcpu", "cpu", "openvino-genai", capacity=8)],
                  models=[model("chat", "llmnpu", "llmcpu")])


def generate(h: Placed, key: Any, max_tokens: int) -> list:
    h.pending.add(key)
    return h.handle(TaskSubmitted(key, "chat", payload=key, generate=True,
                                  max_tokens=max_tokens))


def test_an_llm_request_is_placed_by_its_tokens_and_the_batch_it_would_join(make):
    h = make(llm_cluster())
    h.up()
    h.calibrate("llmnpu", 1.0, "chat", ttft_s=0.0, token_s=0.012)  # serial: one at a time
    h.calibrate("llmcpu", 1.0, "chat", ttft_s=0.0, token_s=0.020, batch=8,
                batch_token_s=0.040)  # each extra sequence: +1/7 per token
    placed = [(i, d.device) for i in range(4) for d in dispatches(generate(h, i, 65))]
    # npu 0.77 s; cpu alone 1.28 s, with 2 decoding 1.46 s: both before npu's second (1.54 s);
    # with 3 decoding 1.65 s: the fourth waits for the npu
    assert placed == [(0, "llmnpu"), (1, "llmcpu"), (2, "llmcpu")]
    assert [t.key for t in h.state.queue] == [3]


def test_a_generation_under_way_counts_the_tokens_it_has_left_or_how_overdue_it_is(make):
    h = make(llm_cluster())
    h.up()
    h.calibrate("llmnpu", 1.0, "chat", ttft_s=0.0, token_s=0.010)
    h.calibrate("llmcpu", 1.0, "chat", ttft_s=0.0, token_s=0.030, batch=8,
                batch_token_s=0.030)
    (d,) = dispatches(generate(h, "a", 101))
    assert d.device == "llmnpu"
    # "b" waits for the npu (1 s + 1 s) rather than take the cpu (3 s) ...
    assert dispatches(generate(h, "b", 101)) == []
    h.clock.advance(0.9)
    tokens = TaskTokens("llmnpu", h.epochs["llmnpu"], d.attempt, list(range(90)), "")
    assert dispatches(h.handle(tokens)) == []  # 11 tokens left: 0.11 s
    h.heartbeat("llmnpu", "llmcpu")
    h.clock.advance(2.2)  # no token since: 2.1 s overdue, more than the cpu would take
    assert [x.device for x in dispatches(h.tick())] == ["llmcpu"]


# ---- timing for the timeline ------------------------------------------------------------

def test_a_delivery_says_when_the_task_was_accepted_dispatched_and_answered(make):
    h = make(two_devices())
    h.ready(npu0=0.05, cpu0=0.01)
    for i in range(3):
        h.submit(i)
    h.clock.advance(0.01)
    h.succeed(0)
    h.clock.advance(0.01)
    h.fail(2)  # it had waited for cpu0, ran there, failed, and moves to npu0
    h.clock.advance(0.05)
    (deliver,) = [a for a in h.succeed(2) if isinstance(a, Deliver)]
    t0 = 1000.0
    assert (deliver.submitted_at, deliver.finished_at) == pytest.approx((t0, t0 + 0.07))
    assert deliver.started_at == pytest.approx(t0 + 0.02)
    (attempt,) = deliver.attempts
    assert (attempt.device, attempt.started_at, attempt.ended_at) == pytest.approx(
        ("cpu0", t0 + 0.01, t0 + 0.02))


def test_a_swapped_in_policy_decides_every_placement(make):
    h = make(two_devices())
    h.state.policy = lambda candidates: max(candidates, key=lambda c: c.finish_s)
    h.ready(npu0=0.01, cpu0=0.05)
    assert dispatches(h.submit("t1"))[0].device == "cpu0"  # the slowest, as this one says
