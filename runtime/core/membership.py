"""Node membership under a launcher that tracks nodes (Ray), as a pure state machine.

Events in: the live nodes as the launcher's node table lists them (``NodesSeen``), a device
discovery probe done or failed, ``Tick``. Actions out: ``StartProbe``/``CancelProbe``
(discovery pinned to a node) and the scheduler's own events ``WorkerAdded``/``WorkerGone``.
No Ray here: the launcher turns its calls into these events and carries out the actions;
the clock is injected.

Rules:
- nodes on one host share its IP and its devices: discovery runs once per host, on the first
  of its nodes to join; the others wait for that answer, later ones use it;
- a node gets an instance ``DEVICE@NODEID`` of each per-node device (one a model names) that
  it can host: its resources fit, and discovery found a device it needs, whose capacity the
  instance takes;
- a probe that fails, or has no answer within ``probe_timeout_s``, leaves its host only what
  needs no discovery (a CPU device on onnxruntime or OpenVINO); a probe whose node leaves is
  asked again of another waiting node of that host, else forgotten with the host;
- a node that leaves takes its instances with it (``WorkerGone``);
- a fixed device is gone while no live node has its resources, and added back when one joins.
"""
from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config.schema import Config, DeviceConfig
from .scheduler import WorkerAdded, WorkerGone

log = logging.getLogger("fanout.membership")
PROBE_TIMEOUT_S = 120.0


def label_of(ip: str, node_id: str) -> str:
    """A node as status shows it: its host's IP (shared by nodes on one host) and its id."""
    return f"{bracket(ip)}/{node_id[:8]}"


def bracket(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


@dataclass
class Node:
    id: str
    ip: str
    resources: dict[str, float] = field(default_factory=dict)  # its totals (CPU, GPU, NPU...)

    @property
    def label(self) -> str:
        return label_of(self.ip, self.id)


# ---- events ------------------------------------------------------------------------------

@dataclass
class NodesSeen:
    """Every live node, as the launcher lists them now."""

    nodes: list[Node]


@dataclass
class ProbeDone:
    probe: int
    found: list[dict]  # the devices discovery found on the probe's host


@dataclass
class ProbeFailed:
    probe: int
    error: str


@dataclass
class Tick:
    pass


Event = NodesSeen | ProbeDone | ProbeFailed | Tick


# ---- actions -----------------------------------------------------------------------------

@dataclass
class StartProbe:
    """Run device discovery on node ``node``; answer with ``ProbeDone``/``ProbeFailed``."""

    probe: int
    node: str


@dataclass
class CancelProbe:
    """Stop a probe whose answer is no longer wanted (and forget it: no answer expected)."""

    probe: int


# ---- state -------------------------------------------------------------------------------

@dataclass
class Instance:
    """A per-node device's worker on one node."""

    template: str
    node: str  # node id
    capacity: int | None  # None: the device's


@dataclass
class Probe:
    ip: str
    node: str
    started: float


class Membership:
    """Which nodes are live, what each host has, and which workers that makes."""

    def __init__(self, config: Config, clock: Callable[[], float],
                 probe_timeout_s: float = PROBE_TIMEOUT_S):
        self.clock = clock
        self.probe_timeout_s = probe_timeout_s
        used = {d for m in config.models for d in config.device_order(m.name)}
        # Per-node devices no model names would be idle workers on every node: left out.
        self.templates = {d.name: d for d in config.devices if d.per_node and d.name in used}
        self.fixed = {d.name: d for d in config.devices if not d.per_node}
        self.nodes: dict[str, Node] = {}  # live node id -> node
        self.instances: dict[str, Instance] = {}  # instance name -> where it runs
        self.found: dict[str, list[dict]] = {}  # host IP -> what discovery found there
        self.probes: dict[int, Probe] = {}  # running
        self.unprobed: dict[str, str] = {}  # node id -> IP, waiting for that IP's discovery
        self.waiting: dict[str, str] = {}  # fixed device gone for want of a node -> why
        self._seen = False  # a node table has been seen
        self._ids = itertools.count(1)

    def handle(self, *events: Event) -> list:
        actions: list = []
        for event in events:
            self._on(event, actions)
        return actions

    @functools.singledispatchmethod
    def _on(self, event: object, actions: list) -> None:
        raise TypeError(f"membership has no handler for {type(event).__name__}: "
                        f"{event!r:.200}")

    # -- views --

    @property
    def settled(self) -> bool:
        """No node waits for its host's discovery (until then the cluster is not ready)."""
        return not self.probes and not self.unprobed

    def can_start(self, device: str) -> bool:
        """Whether ``device``'s worker may start now: an instance on a live node, or a fixed
        device some live node has the resources for."""
        if device in self.fixed:
            return device not in self.waiting
        instance = self.instances.get(device)
        return instance is not None and instance.node in self.nodes

    def validate(self) -> None:
        """Invariants, for tests: everything points at live nodes, and no node waits for a
        probe that nobody runs."""
        for name, inst in self.instances.items():
            assert inst.node in self.nodes and inst.template in self.templates, (name, inst)
        for probe in self.probes.values():
            assert probe.node in self.nodes and probe.ip not in self.found, probe
        probed = {probe.ip for probe in self.probes.values()}
        for node_id, ip in self.unprobed.items():
            assert node_id in self.nodes and ip in probed, (node_id, ip)
        assert set(self.waiting) <= set(self.fixed), self.waiting

    # -- nodes --

    @_on.register
    def _on_NodesSeen(self, ev: NodesSeen, actions: list) -> None:
        alive = {n.id: n for n in ev.nodes}
        left = [n for nid, n in self.nodes.items() if nid not in alive]
        joined = [n for nid, n in alive.items() if nid not in self.nodes]
        self.nodes = alive
        for node in left:
            self._node_left(node, actions)
        for probe_id in [i for i, pr in self.probes.items() if pr.node not in alive]:
            self._probe_lost(probe_id, actions)
        for node in joined:
            self._node_joined(node, actions)
        self._check_fixed(actions)
        self._seen = True

    def _node_left(self, node: Node, actions: list) -> None:
        log.warning("node %s left the Ray cluster", node.label)
        self.unprobed.pop(node.id, None)
        for name in [n for n, inst in self.instances.items() if inst.node == node.id]:
            del self.instances[name]
            actions.append(WorkerGone(name, f"node {node.label} left the Ray cluster"))
        if all(n.ip != node.ip for n in self.nodes.values()):
            self.found.pop(node.ip, None)  # the host is gone: ask it again if it comes back

    def _node_joined(self, node: Node, actions: list) -> None:
        log.info("node %s joined", node.label)
        if not self.templates:
            return
        if node.ip in self.found:
            self._place_templates(node, actions)
            return
        self.unprobed[node.id] = node.ip
        if all(pr.ip != node.ip for pr in self.probes.values()):
            self._start_probe(node, actions)

    def _place_templates(self, node: Node, actions: list) -> None:
        found = self.found.get(node.ip, [])
        for name, template in self.templates.items():
            instance = f"{name}@{node.id[:8]}"
            hosted = _hosted(template, found)
            if instance in self.instances or hosted is None \
                    or not _fits(template.resources, node):
                continue
            capacity = hosted.get("capacity")
            self.instances[instance] = Instance(name, node.id, capacity)
            log.info("node %s hosts %s", node.label, instance)
            actions.append(WorkerAdded(instance, name, node.label, capacity))

    def _check_fixed(self, actions: list) -> None:
        for name, device in self.fixed.items():
            hostable = any(_fits(device.resources, n) for n in self.nodes.values())
            if hostable and name in self.waiting:
                log.info("a node can host %s again (%s): restarting it", name,
                         self.waiting.pop(name))
                actions.append(WorkerAdded(name, name))
            elif not hostable and name not in self.waiting:
                who = "its node left and no live Ray node" if self._seen else "no live Ray node"
                why = f"{who} has the resources {device.resources}; waiting for one to join"
                self.waiting[name] = why
                actions.append(WorkerGone(name, why))

    # -- probes --

    def _start_probe(self, node: Node, actions: list) -> None:
        probe_id = next(self._ids)
        self.probes[probe_id] = Probe(node.ip, node.id, self.clock())
        actions.append(StartProbe(probe_id, node.id))

    def _probe_lost(self, probe_id: int, actions: list) -> None:
        """The probe's node left: ask another node of that host that waits, if one does."""
        probe = self.probes.pop(probe_id)
        actions.append(CancelProbe(probe_id))
        waiting = [self.nodes[nid] for nid, ip in self.unprobed.items() if ip == probe.ip]
        if waiting:
            self._start_probe(waiting[0], actions)

    @_on.register
    def _on_ProbeDone(self, ev: ProbeDone, actions: list) -> None:
        probe = self.probes.pop(ev.probe, None)
        if probe is not None:  # else cancelled already: its answer is not wanted
            self._discovered(probe.ip, ev.found, actions)

    @_on.register
    def _on_ProbeFailed(self, ev: ProbeFailed, actions: list) -> None:
        probe = self.probes.pop(ev.probe, None)
        if probe is not None:
            self._failed(probe, ev.error, actions)

    @_on.register
    def _on_Tick(self, ev: Tick, actions: list) -> None:
        now = self.clock()
        late = [i for i, pr in self.probes.items() if now - pr.started >= self.probe_timeout_s]
        for probe_id in late:
            probe = self.probes.pop(probe_id)
            actions.append(CancelProbe(probe_id))
            self._failed(probe, f"no answer in {now - probe.started:.0f} s", actions)

    def _failed(self, probe: Probe, error: str, actions: list) -> None:
        log.warning("device discovery on %s failed (%s); its nodes get only the CPU devices "
                    "that need nothing else", probe.ip, error)
        self._discovered(probe.ip, [], actions)

    def _discovered(self, ip: str, found: list[dict], actions: list) -> None:
        self.found[ip] = found
        for node_id in [n for n, i in self.unprobed.items() if i == ip]:
            del self.unprobed[node_id]
            self._place_templates(self.nodes[node_id], actions)


def _fits(resources: dict[str, float], node: Node) -> bool:
    """Whether a node's total resources cover a device's (CPU/GPU are Ray's own names)."""
    return all(node.resources.get(k, 0.0) >= v for k, v in resources.items())


def _hosted(device: DeviceConfig, found: list[dict]) -> dict | None:
    """The discovered device of a host that lets it host a per-node ``device``, or None.

    A device named as discovery names it (``devices: auto``) needs that device; one listed by
    hand needs a discovered device of its kind and backend (and OpenVINO device). A CPU device
    on onnxruntime or OpenVINO needs nothing more than a node.
    """
    for d in found:
        if d.get("name") == device.name and d.get("backend") == device.backend:
            return d
    for d in found:
        if d.get("kind") != device.kind or d.get("backend") != device.backend:
            continue
        want = device.options.get("device")
        if want is None or (d.get("options") or {}).get("device") == want:
            return {}
    if device.kind == "cpu" and device.backend in ("onnxruntime", "openvino"):
        return {}
    return None
