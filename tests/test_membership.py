"""Node membership (runtime/core/membership.py) as a pure state machine, without Ray.

A node table goes in as the launcher would read it, discovery answers come back by hand, and
a fake clock stands in for time. Every ``handle`` is followed by ``validate()``; at teardown
every probe started was answered or cancelled exactly once, and the rest are still running.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from runtime.config.schema import Config, DeviceConfig, ModelConfig
from runtime.core.membership import (
    CancelProbe,
    Membership,
    Node,
    NodesSeen,
    ProbeDone,
    ProbeFailed,
    StartProbe,
    Tick,
)
from runtime.core.scheduler import WorkerAdded, WorkerGone

TIMEOUT_S = 120.0
CPU = DeviceConfig("cpu", "cpu", "onnxruntime", capacity=2, per_node=True)
NPU = DeviceConfig("npu", "npu", "qnn", capacity=1, per_node=True)
FOUND_NPU = {"name": "npu0", "kind": "npu", "backend": "qnn", "capacity": 1}


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def config(*devices: DeviceConfig, served: list[str] | None = None) -> Config:
    """Model ``m`` served by ``served`` (default: every device given)."""
    names = served if served is not None else [d.name for d in devices]
    return Config(devices=list(devices),
                  models=[ModelConfig(name="m", source="packaged:m", devices=names)])


def node(node_id: str, ip: str = "10.0.0.1", **resources: float) -> Node:
    return Node(node_id, ip, {"CPU": 1.0, **resources})


class Driver:
    """Holds the state machine and its node table; answers for the probes it starts."""

    def __init__(self, cfg: Config) -> None:
        self.clock = FakeClock()
        self.members = Membership(cfg, self.clock, probe_timeout_s=TIMEOUT_S)
        self.table: dict[str, Node] = {}
        self.log: list = []
        self.running: dict[int, str] = {}  # probe id -> node, started and not yet ended

    def handle(self, *events) -> list:
        actions = self.members.handle(*events)
        self.members.validate()
        for a in actions:
            if isinstance(a, StartProbe):
                assert a.probe not in self.running
                self.running[a.probe] = a.node
            elif isinstance(a, CancelProbe):
                assert self.running.pop(a.probe, None) is not None, f"{a} of no running probe"
        self.log += actions
        return actions

    def see(self) -> list:
        return self.handle(NodesSeen(list(self.table.values())))

    def join(self, *nodes: Node) -> list:
        self.table.update({n.id: n for n in nodes})
        return self.see()

    def leave(self, *node_ids: str) -> list:
        for node_id in node_ids:
            del self.table[node_id]
        return self.see()

    def probe_on(self, node_id: str) -> int:
        (probe,) = [p for p, n in self.running.items() if n == node_id]
        return probe

    def answer(self, node_id: str, found: list[dict[str, Any]]) -> list:
        probe = self.probe_on(node_id)
        del self.running[probe]
        return self.handle(ProbeDone(probe, found))

    def fail(self, node_id: str, error: str = "RayTaskError: boom") -> list:
        probe = self.probe_on(node_id)
        del self.running[probe]
        return self.handle(ProbeFailed(probe, error))

    def tick(self, advance: float = 0.0) -> list:
        self.clock.now += advance
        return self.handle(Tick())


def of(kind: type, actions: list) -> list:
    return [a for a in actions if isinstance(a, kind)]


def added(actions: list) -> dict[str, WorkerAdded]:
    return {a.device: a for a in of(WorkerAdded, actions)}


@pytest.fixture
def make():
    made: list[Driver] = []

    def factory(*devices: DeviceConfig, served: list[str] | None = None) -> Driver:
        d = Driver(config(*devices, served=served))
        made.append(d)
        return d

    yield factory
    for d in made:
        d.members.validate()
        assert set(d.running) == set(d.members.probes), "probes started but never ended"


# ---- nodes joining -------------------------------------------------------------------------

def test_a_joining_node_is_probed_and_then_gets_an_instance_of_each_device_it_can_host(make):
    d = make(CPU, NPU)
    assert d.join(node("aaaa1111")) == [StartProbe(1, "aaaa1111")]
    assert not d.members.settled  # the node waits for its discovery
    actions = d.answer("aaaa1111", [FOUND_NPU])
    # listed by hand, not named as discovery names them: each keeps its configured capacity
    assert actions == [WorkerAdded("cpu@aaaa1111", "cpu", "10.0.0.1/aaaa1111", None),
                       WorkerAdded("npu@aaaa1111", "npu", "10.0.0.1/aaaa1111", None)]
    assert d.members.settled
    assert d.members.can_start("cpu@aaaa1111") and d.members.can_start("npu@aaaa1111")


def test_an_instance_takes_the_capacity_discovery_found_on_its_node(make):
    auto = DeviceConfig("llmcpu", "cpu", "openvino-genai", capacity=1, per_node=True)
    d = make(auto)
    d.join(node("aaaa1111"))
    found = [{"name": "llmcpu", "kind": "cpu", "backend": "openvino-genai", "capacity": 6}]
    (worker,) = d.answer("aaaa1111", found)
    assert worker == WorkerAdded("llmcpu@aaaa1111", "llmcpu", "10.0.0.1/aaaa1111", 6)
    assert d.members.instances["llmcpu@aaaa1111"].capacity == 6


def test_a_node_without_the_device_its_discovery_would_need_gets_no_instance_of_it(make):
    d = make(CPU, NPU)
    d.join(node("aaaa1111"))
    assert list(added(d.answer("aaaa1111", []))) == ["cpu@aaaa1111"]  # plain CPU needs nothing


def test_a_hand_listed_openvino_device_needs_discovery_to_find_its_openvino_device(make):
    ov_npu = DeviceConfig("ovnpu", "npu", "openvino", per_node=True, options={"device": "NPU"})
    d = make(ov_npu)
    d.join(node("aaaa1111"), node("bbbb2222", ip="10.0.0.2"))
    gpu_only = [{"name": "ovgpu", "kind": "npu", "backend": "openvino",
                 "options": {"device": "GPU"}}]
    with_npu = [{"name": "ovnpu0", "kind": "npu", "backend": "openvino",
                 "options": {"device": "NPU"}}]
    assert d.answer("aaaa1111", gpu_only) == []
    assert list(added(d.answer("bbbb2222", with_npu))) == ["ovnpu@bbbb2222"]


def test_a_node_without_a_devices_resources_gets_no_instance_of_it(make):
    gpu = DeviceConfig("gpu", "cpu", "onnxruntime", per_node=True, resources={"GPU": 1.0})
    d = make(CPU, gpu)
    d.join(node("aaaa1111"), node("bbbb2222", ip="10.0.0.2", GPU=1.0))
    assert list(added(d.answer("aaaa1111", []))) == ["cpu@aaaa1111"]
    assert list(added(d.answer("bbbb2222", []))) == ["cpu@bbbb2222", "gpu@bbbb2222"]


def test_a_per_node_device_no_model_names_gets_no_instances_and_no_probe(make):
    d = make(CPU, NPU, DeviceConfig("cpu0", "cpu", "onnxruntime"), served=["cpu0"])
    assert d.join(node("aaaa1111")) == []
    assert d.members.settled and d.members.instances == {}


def test_two_nodes_on_one_host_share_one_probe_and_a_later_one_uses_its_answer(make):
    d = make(CPU, NPU)
    assert d.join(node("aaaa1111"), node("bbbb2222")) == [StartProbe(1, "aaaa1111")]
    actions = d.answer("aaaa1111", [FOUND_NPU])
    assert set(added(actions)) == {"cpu@aaaa1111", "npu@aaaa1111",
                                   "cpu@bbbb2222", "npu@bbbb2222"}
    later = d.join(node("cccc3333"))
    assert of(StartProbe, later) == []  # the host answered already
    assert set(added(later)) == {"cpu@cccc3333", "npu@cccc3333"}


def test_nodes_on_different_hosts_are_probed_each(make):
    d = make(CPU)
    actions = d.join(node("aaaa1111"), node("bbbb2222", ip="10.0.0.2"))
    assert actions == [StartProbe(1, "aaaa1111"), StartProbe(2, "bbbb2222")]
    d.answer("bbbb2222", [])
    assert not d.members.settled  # the first host has not answered yet
    d.answer("aaaa1111", [])
    assert d.members.settled


# ---- nodes leaving -------------------------------------------------------------------------

def test_a_node_that_leaves_takes_its_instances_with_it(make):
    d = make(CPU, NPU)
    d.join(node("aaaa1111"), node("bbbb2222", ip="10.0.0.2"))
    d.answer("aaaa1111", [FOUND_NPU])
    d.answer("bbbb2222", [])
    actions = d.leave("aaaa1111")
    assert actions == [WorkerGone("cpu@aaaa1111", "node 10.0.0.1/aaaa1111 left the Ray cluster"),
                       WorkerGone("npu@aaaa1111", "node 10.0.0.1/aaaa1111 left the Ray cluster")]
    assert not d.members.can_start("cpu@aaaa1111")
    assert set(d.members.instances) == {"cpu@bbbb2222"}
    assert d.leave() == []  # told once


def test_a_node_leaving_mid_probe_hands_its_probe_to_another_node_of_its_host(make):
    d = make(CPU, NPU)
    d.join(node("aaaa1111"), node("bbbb2222"))
    actions = d.leave("aaaa1111")
    assert actions == [CancelProbe(1), StartProbe(2, "bbbb2222")]
    assert not d.members.settled
    assert set(added(d.answer("bbbb2222", [FOUND_NPU]))) == {"cpu@bbbb2222", "npu@bbbb2222"}


def test_a_host_whose_only_node_left_mid_probe_is_probed_afresh_when_it_returns(make):
    d = make(CPU, NPU)
    d.join(node("aaaa1111"))
    assert d.leave("aaaa1111") == [CancelProbe(1)]
    assert d.members.settled and d.members.found == {}  # nothing learnt, nothing assumed
    assert d.join(node("bbbb2222")) == [StartProbe(2, "bbbb2222")]
    assert set(added(d.answer("bbbb2222", [FOUND_NPU]))) == {"cpu@bbbb2222", "npu@bbbb2222"}


def test_a_host_that_left_entirely_is_probed_again_when_a_node_of_it_joins(make):
    d = make(CPU, NPU)
    d.join(node("aaaa1111"))
    d.answer("aaaa1111", [FOUND_NPU])
    d.leave("aaaa1111")
    assert d.join(node("bbbb2222")) == [StartProbe(2, "bbbb2222")]  # its devices may differ
    assert list(added(d.answer("bbbb2222", []))) == ["cpu@bbbb2222"]


def test_a_late_answer_from_a_cancelled_probe_is_ignored(make):
    d = make(CPU)
    d.join(node("aaaa1111"))
    d.leave("aaaa1111")
    assert d.handle(ProbeDone(1, [FOUND_NPU]), ProbeFailed(1, "node died")) == []
    assert d.members.found == {}


# ---- failed and hung probes ----------------------------------------------------------------

def test_a_failed_probe_leaves_its_host_only_the_cpu_devices_that_need_nothing_else(make):
    d = make(CPU, NPU)
    d.join(node("aaaa1111"), node("bbbb2222"))
    assert list(added(d.fail("aaaa1111"))) == ["cpu@aaaa1111", "cpu@bbbb2222"]
    assert d.members.settled
    assert of(StartProbe, d.join(node("cccc3333"))) == []  # the host's answer stands


def test_a_probe_that_hangs_past_the_timeout_is_cancelled_and_its_host_gets_plain_cpu(make):
    d = make(CPU, NPU)
    d.join(node("aaaa1111"))
    assert d.tick(TIMEOUT_S - 1) == []
    actions = d.tick(1.0)
    assert actions == [CancelProbe(1),
                       WorkerAdded("cpu@aaaa1111", "cpu", "10.0.0.1/aaaa1111", None)]
    assert d.members.settled
    assert d.handle(ProbeDone(1, [FOUND_NPU])) == []  # its answer, too late, changes nothing


# ---- fixed devices -------------------------------------------------------------------------

def test_a_fixed_device_no_live_node_has_the_resources_for_is_gone_until_one_joins(make):
    late = DeviceConfig("late0", "cpu", "onnxruntime", resources={"late": 1.0})
    d = make(late)
    (gone,) = d.join(node("aaaa1111"))
    assert gone == WorkerGone("late0", "no live Ray node has the resources {'late': 1.0}; "
                                       "waiting for one to join")
    assert not d.members.can_start("late0")
    assert d.join(node("bbbb2222")) == []  # still none: told once
    assert d.join(node("cccc3333", ip="10.0.0.3", late=1.0)) == [WorkerAdded("late0", "late0")]
    assert d.members.can_start("late0")


def test_a_fixed_device_whose_node_leaves_is_gone_and_back_when_another_can_host_it(make):
    npu0 = DeviceConfig("npu0", "npu", "qnn", resources={"NPU": 1.0})
    d = make(npu0)
    assert d.join(node("aaaa1111"), node("bbbb2222", ip="10.0.0.2", NPU=1.0)) == []
    assert d.members.can_start("npu0")
    (gone,) = d.leave("bbbb2222")
    assert gone.device == "npu0" and gone.reason.startswith("its node left and no live Ray node")
    assert d.join(node("cccc3333", ip="10.0.0.3", NPU=2.0)) == [WorkerAdded("npu0", "npu0")]


def test_a_fixed_device_without_resources_fits_any_node(make):
    d = make(DeviceConfig("cpu0", "cpu", "onnxruntime"))
    assert d.join(node("aaaa1111")) == []
    assert d.members.can_start("cpu0")


# ---- events --------------------------------------------------------------------------------

def test_an_event_membership_has_no_handler_for_fails_loudly(make):
    d = make(CPU)
    with pytest.raises(TypeError, match="no handler for dict"):
        d.handle({"NodeID": "aaaa1111", "Alive": True})
