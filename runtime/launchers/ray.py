"""The Ray launcher: the same scheduler and workers as Ray actors, on the nodes that have the
devices.

The scheduler runs as a named, detached actor around the same ``SchedulerProcess``; its
``RaySupervisor`` starts each device's worker as an actor placed by the device's ``resources``
(e.g. ``{NPU: 1}``). The data path stays ZMQ over TCP: both scheduler sockets bind the
scheduler node's IP, so a token and keys are always set (generated here if the config has
none). Clients get the token and the client keys through Ray; workers get only their own part
(the worker keys), in the config the scheduler hands their actors, never a file or argv.

Ray restarts no actor itself (``max_restarts=0``): the scheduler already restarts a lost worker
with a new epoch and a backoff, and Ray re-running the same incarnation would bypass both.

Node membership: the supervisor feeds Ray's node table and the answers of device discovery
(a Ray task pinned to a node) to the pure ``core.membership.Membership``, and carries out what
it decides: probes started and cancelled, workers added (an instance of every ``per_node``
device a joining node can host) and gone (a node that left; a device whose resources no live
node has, until one that has them joins).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .. import env
from ..config.loader import config_from_dict, load_cluster_section, load_config
from ..config.schema import Config, CurveKeys, DeviceConfig, config_to_dict, instantiate
from ..core import membership
from ..core import scheduler as s
from ..env import setup_logging
from ..errors import ClusterUnavailable
from ..frontdoors.client import Client
from ..shells.scheduler_process import SchedulerProcess
from ..shells.supervisor import Supervisor
from ..shells.worker_process import WorkerProcess
from ..wire.security import generate_keys
from ..wire.status import ClusterInfo, Status
from .handle import ClusterHandle
from .models import resolve_source

log = logging.getLogger("fanout.ray")
NAMESPACE = "fanout"
SCHEDULER_NAME = "fanout-scheduler"
NODE_POLL_S = 1.0  # how often the supervisor reads Ray's node table
DISCOVERY_TIMEOUT_S = membership.PROBE_TIMEOUT_S


def node_label() -> str:
    """This Ray node as status shows it: its IP (shared by nodes on one host) and node id."""
    return membership.label_of(ray.util.get_node_ip_address(),
                               ray.get_runtime_context().get_node_id())


def _ip() -> str:
    return membership.bracket(ray.util.get_node_ip_address())


@ray.remote(num_cpus=0, max_retries=0)
def _discover_here() -> list[dict]:
    """This node's devices, as ``devices: auto`` would find them here."""
    from ..backends.discovery import discover
    return discover()


def _pinned(node_id: str) -> NodeAffinitySchedulingStrategy:
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


def discover_cluster(timeout: float = DISCOVERY_TIMEOUT_S) -> list[dict]:
    """``devices: auto`` under Ray: discovery on every live node (once per host); the union,
    each device ``per_node`` so that every node gets workers for what it has."""
    by_ip = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    refs = [_discover_here.options(scheduling_strategy=_pinned(nid)).remote()
            for nid in by_ip.values()]
    union: dict[str, dict] = {}
    for found in ray.get(refs, timeout=timeout):
        for d in found:
            if d["name"] in union:
                union[d["name"]]["capacity"] = max(union[d["name"]].get("capacity", 1),
                                                   d.get("capacity", 1))
            else:
                union[d["name"]] = dict(d, per_node=True)
    return list(union.values())


def actor_options(device: DeviceConfig) -> dict[str, Any]:
    """Where a device's worker may run: on a node with its resources, else spread over nodes."""
    custom = dict(device.resources)
    options: dict[str, Any] = {"num_cpus": custom.pop("CPU", 0), "num_gpus": custom.pop("GPU", 0)}
    if custom:
        options["resources"] = custom
    elif not options["num_gpus"]:
        options["scheduling_strategy"] = "SPREAD"
    return options


def _resolve_for_device(config: Config, device: str) -> Config:
    """The config with this device's models fetched on this node (paths must exist on every
    node)."""
    home = env.home(config.model_cache)
    models = []
    for m in config.models:
        if device in config.device_order(m.name):
            m = dataclasses.replace(m, source=str(resolve_source(m.source, None, home)))
        models.append(m)
    return dataclasses.replace(config, models=models, model_cache=str(home))


ACTOR_OUTLIVES_RUN_S = 10.0  # how long a worker actor's process waits to be killed, once its
# run has returned the exit code (time for Ray to hand the code to the supervisor)


@ray.remote(max_restarts=0)
class DeviceWorker:
    """One device's worker; ``run`` returns when the worker exits, so its ref marks the exit.

    ``template``/``capacity``: a per-node instance named ``device`` of that config device."""

    def run(self, config: dict, device: str, epoch: int, scheduler: str,
            template: str | None = None, capacity: int | None = None) -> int:
        setup_logging(device)
        cfg = config_from_dict(config)
        if template is not None:
            cfg = instantiate(cfg, template, device, capacity)
        cfg = _resolve_for_device(cfg, device)
        _watch_raylet(lambda: None)  # nothing to hand back: its tasks are re-run elsewhere
        code = WorkerProcess(cfg, device, epoch, scheduler, node=node_label()).run()
        # The supervisor kills this actor once it reads the code. One that cannot (this host
        # cut off from it: the worker exited because the scheduler went silent) never will,
        # and Ray's raylet here may wait for its head for ever: the process ends itself.
        ending = threading.Timer(ACTOR_OUTLIVES_RUN_S, os._exit, args=(code,))
        ending.daemon = True
        ending.start()
        return code


class RaySupervisor(Supervisor):
    """Worker actors, one per device, owned by the scheduler; and node membership: Ray's node
    table and discovery answers fed to ``Membership``, its decisions carried out."""

    tracks_nodes = True

    def __init__(self, worker_address: str, config_file: str, prefix: str = SCHEDULER_NAME):
        self.worker_address = worker_address
        self.config = json.loads(Path(config_file).read_text())
        cfg = config_from_dict(self.config)
        self.devices = {d.name: d for d in cfg.devices}
        self.prefix = prefix
        self.actors: dict[str, tuple[int, Any, ray.ObjectRef]] = {}  # device -> (epoch, actor, run)
        self._exited: list[tuple[str, int, str]] = []
        self.members = membership.Membership(cfg, time.monotonic, DISCOVERY_TIMEOUT_S)
        self._probes: dict[int, ray.ObjectRef] = {}  # discovery in flight, by probe id
        self._events: list = []  # WorkerAdded/WorkerGone for the scheduler
        self._last_nodes = 0.0
        self._refresh_nodes()

    # -- workers --

    def start(self, device: str, epoch: int) -> None:
        self._reap(device)
        self._refresh_nodes()  # a restart often follows a node's death: act on the latest table
        if not self.members.can_start(device):
            return  # membership has told the scheduler it is gone
        instance = self.members.instances.get(device)
        options = actor_options(self.devices[instance.template if instance else device])
        args: tuple = ()
        if instance is not None:
            options = {k: v for k, v in options.items() if k != "scheduling_strategy"}
            options["scheduling_strategy"] = _pinned(instance.node)
            args = (instance.template, instance.capacity)
        actor = DeviceWorker.options(  # type: ignore[attr-defined]
            name=f"{self.prefix}-{device}-{epoch}", namespace=NAMESPACE, **options).remote()
        self.actors[device] = (epoch, actor, actor.run.remote(self.config, device, epoch,
                                                              self.worker_address, *args))
        log.info("started worker %s (epoch %d) as a Ray actor", device, epoch)

    def kill(self, device: str, epoch: int) -> None:
        entry = self.actors.get(device)
        if entry and entry[0] == epoch:
            ray.kill(entry[1], no_restart=True)  # poll() then reports it, as for a process

    def poll(self) -> list[tuple[str, int, str]]:
        """Workers whose actor died or whose run ended since the last call: (device, epoch,
        reason)."""
        runs = {entry[2]: device for device, entry in self.actors.items()}
        if runs:
            ended, _ = ray.wait(list(runs), num_returns=len(runs), timeout=0)
            for ref in ended:
                device = runs[ref]
                epoch, actor, _ = self.actors.pop(device)
                self._exited.append((device, epoch, _exit_reason(ref)))
                ray.kill(actor, no_restart=True)  # the actor's process outlives its run
        out, self._exited = self._exited, []
        return out

    def _reap(self, device: str) -> None:
        entry = self.actors.pop(device, None)
        if entry:
            ray.kill(entry[1], no_restart=True)

    # -- membership --

    @property
    def settled(self) -> bool:
        return self.members.settled

    def node_events(self) -> list:
        if time.monotonic() - self._last_nodes >= NODE_POLL_S:
            self._refresh_nodes()
        self._feed(*self._probe_answers(), membership.Tick())  # after the refresh, on purpose
        out, self._events = self._events, []
        return out

    def _refresh_nodes(self) -> None:
        self._last_nodes = time.monotonic()
        self._feed(membership.NodesSeen([
            membership.Node(n["NodeID"], n["NodeManagerAddress"], n.get("Resources") or {})
            for n in ray.nodes() if n.get("Alive")]))

    def _probe_answers(self) -> list:
        """Answers of the probes that ended. A probe whose node left was cancelled by the
        refresh before: its failure is not mistaken for its host's."""
        if not self._probes:
            return []
        ids = {ref: probe for probe, ref in self._probes.items()}
        done, _ = ray.wait(list(ids), num_returns=len(ids), timeout=0)
        answers: list = []
        for ref in done:
            probe = ids[ref]
            del self._probes[probe]
            try:
                answers.append(membership.ProbeDone(probe, ray.get(ref)))
            except ray.exceptions.RayError as exc:
                answers.append(membership.ProbeFailed(probe, _last_line(exc)))
        return answers

    def _feed(self, *events: membership.Event) -> None:
        for action in self.members.handle(*events):
            match action:
                case membership.StartProbe():
                    self._probes[action.probe] = _discover_here.options(
                        scheduling_strategy=_pinned(action.node)).remote()
                case membership.CancelProbe():
                    ref = self._probes.pop(action.probe, None)
                    try:
                        if ref is not None:
                            ray.cancel(ref, force=True)
                    except Exception:  # already finished or its node gone: nothing to stop
                        pass
                case s.WorkerAdded() | s.WorkerGone():
                    self._events.append(action)

    def stop_all(self, timeout: float = 5.0) -> None:
        """Wait for workers told to stop; then kill every actor, done or not."""
        runs = [entry[2] for entry in self.actors.values()]
        if runs:
            ray.wait(runs, num_returns=len(runs), timeout=timeout)
        for _, actor, _ in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()


def _last_line(exc: BaseException) -> str:
    """Ray's errors embed the remote traceback: its last line is the error itself."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _exit_reason(ref: ray.ObjectRef) -> str:
    try:
        return f"exit code {ray.get(ref, timeout=5)}"
    except ray.exceptions.RayActorError as exc:
        # Ray's message ends with the cause, e.g. "killed by `ray.kill`" or the node's death.
        return f"Ray actor died: {_last_line(exc)}"
    except ray.exceptions.RayError as exc:
        return f"worker failed: {_last_line(exc)}"


class RaySchedulerProcess(SchedulerProcess):
    """The scheduler shell as it runs inside the Ray actor: says so, and which node it is on."""

    def __init__(self, config: Config, node: str, **kw):
        super().__init__(config, **kw)
        self.node = node

    def info(self) -> ClusterInfo:
        return dataclasses.replace(super().info(), launcher="ray", node=self.node)


@ray.remote(max_restarts=0)
class SchedulerActor:
    """Runs ``SchedulerProcess.serve`` in a thread; its methods answer from the actor's own."""

    def __init__(self, config: dict, name: str, port: int):
        setup_logging("scheduler")
        cfg = config_from_dict(config)
        ip = _ip()
        # Both sockets on this node's IP: workers and clients on other nodes reach them there.
        # The configured worker port is kept (a firewall may name it); 0 = a free one.
        worker_port = cfg.scheduler.worker_address.rsplit(":", 1)[1] \
            if cfg.scheduler.worker_address.startswith("tcp://") else "0"
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(
            cfg.scheduler, address=f"tcp://{ip}:{port}",
            worker_address=f"tcp://{ip}:{worker_port}"))
        self.proc = RaySchedulerProcess(
            cfg, node_label(), supervisor_factory=functools.partial(RaySupervisor, prefix=name))
        self.thread = threading.Thread(target=self.proc.serve, name="fanout-scheduler",
                                       daemon=True)
        self.thread.start()
        _watch_raylet(self._orphaned)

    def _orphaned(self) -> None:
        self.proc.stop()  # answers what it still owes, while clients can still hear it
        self.thread.join(5)

    def info(self) -> dict:
        """Where clients connect, with the token and the client keys they need (never the
        scheduler's or the workers' keys: a client must not be able to pose as either); sent
        only over Ray's channel (which Ray's token authentication guards)."""
        keys = self.proc.config.cluster.keys
        return {"address": self.proc.address, "worker_address": self.proc.worker_address,
                "token": self.proc.config.scheduler.token, "node": self.proc.node,
                "keys": dataclasses.asdict(keys.for_clients()) if keys else None,
                "pid": os.getpid()}

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 15.0) -> bool:
        """Answer open tasks, stop the workers, close the sockets; True once all is done."""
        self.proc.stop()
        self.thread.join(timeout)
        return not self.thread.is_alive()


class RayCluster(ClusterHandle):
    """A scheduler running as a detached Ray actor. Use as a context manager, or ``shutdown()``."""

    def __init__(self, actor, info: dict, name: str, owns_ray: bool):
        super().__init__(info["address"], info["token"], _keys(info))
        self.actor = actor
        self.name = name
        self.node: str = info["node"]
        self.config: Config | None = None  # as the scheduler runs it (token, keys included)
        self.pid: int = info["pid"]  # of the scheduler actor's process
        self._finalizer = weakref.finalize(self, _release, actor, owns_ray)

    def _check_alive(self) -> None:
        try:
            alive = ray.get(self.actor.alive.remote(), timeout=30)
        except ray.exceptions.RayError as exc:
            raise ClusterUnavailable(f"the scheduler actor died while starting: {exc}") from exc
        if not alive:
            raise ClusterUnavailable("the scheduler stopped while starting; see its log "
                                     "in the Ray session's logs")

    def serving(self, timeout: float = 10.0) -> bool:
        """``ClusterHandle.serving``: asks the actor (``fanout down`` stops its scheduler
        but not the actor); a slow answer is no answer."""
        try:
            return bool(ray.get(self.actor.alive.remote(), timeout=timeout))
        except ray.exceptions.GetTimeoutError:
            return True
        except ray.exceptions.RayError:  # the actor is gone
            return False

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the scheduler and every worker actor, then kill the detached actor; idempotent."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        if self._finalizer.alive and ray.is_initialized():
            # Already dead or stuck: the kill below ends it and its workers.
            _bounded(lambda: ray.get(self.actor.stop.remote(timeout), timeout=timeout + 5),
                     "stop the scheduler actor", timeout + 5)
        self._finalizer()


RELEASE_TIMEOUT_S = 10.0


def _release(actor, owns_ray: bool) -> None:
    """Kill the detached scheduler actor (its worker actors share its fate); end our Ray.

    Each Ray call gets a bounded wait: after a SIGTERM to the whole process group (``kill --
    -PGID``, ``timeout``, a service manager) the local raylet is already dead and Ray's calls
    would wait for it forever. The actors' processes then end on their own (``_watch_raylet``).
    """
    if not ray.is_initialized():
        return
    _bounded(lambda: ray.kill(actor, no_restart=True), "kill the scheduler actor")
    if owns_ray:
        _bounded(ray.shutdown, "shut down the local Ray cluster")


def _bounded(call: Callable[[], Any], what: str, wait: float = RELEASE_TIMEOUT_S) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except Exception as exc:  # already gone, or Ray is: nothing more to do here
            errors.append(exc)

    thread = threading.Thread(target=run, name="fanout-release", daemon=True)
    thread.start()
    thread.join(wait)
    if thread.is_alive():
        log.warning("could not %s within %g s (is the local raylet gone?)", what, wait)
    elif errors:
        log.debug("%s: %s", what, errors[0])


def _watch_raylet(on_orphaned: Callable[[], None]) -> None:
    """In an actor's process: once its raylet (the parent) is gone, Ray can no longer stop
    this process, so it stops itself: ``on_orphaned`` cleans up, then the process exits."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the Ray node's raylet is gone; this actor's process exits")
        try:
            on_orphaned()
        finally:
            os._exit(1)

    threading.Thread(target=watch, name="fanout-raylet-watch", daemon=True).start()


def start(config: Config | str | os.PathLike | None = None, *, address: str | None = None,
          name: str | None = None, port: int | None = 0, wait: bool = True,
          timeout: float = 600.0, progress: Callable[[str], None] | None = None,
          on_status: Callable[[Status], None] | None = None) -> RayCluster:
    """Start the scheduler as a detached Ray actor and return its handle.

    ``address``: the Ray cluster (default: the config's ``cluster.address``; unset: the one
    this process is connected to, else Ray's own default: ``RAY_ADDRESS``, the latest local
    cluster, or a new local one; "auto" or "ray://HOST:PORT" join one). ``name``: the
    scheduler actor's name in the "fanout" Ray namespace (default: ``cluster.name``).
    ``port``: where clients connect on the scheduler's node (0: a free one; None: the port of
    the config's ``scheduler.address``).
    ``devices: auto`` is discovered on every node, each device a per-node one. Packaged
    models are fetched by each worker on its node, not here.
    """
    section = config.cluster if isinstance(config, Config) else load_cluster_section(config)
    address = address if address is not None else section.address
    name = name or section.name
    owns_ray = not ray.is_initialized()
    if owns_ray:
        _token_mode_if_token(address)
        ray.init(address=address, namespace=NAMESPACE)
    try:
        cfg = config if isinstance(config, Config) else load_config(
            config, discover=discover_cluster)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
    if cfg.scheduler.token is None:  # the sockets bind a node IP: never without a token
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(
            cfg.scheduler, token=secrets.token_urlsafe(32)))
    if cfg.cluster.keys is None:  # nor unencrypted: traffic crosses hosts
        cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(
            cfg.cluster, keys=generate_keys()))
    if port is None:
        port = int(cfg.scheduler.address.rsplit(":", 1)[1]) \
            if cfg.scheduler.address.startswith("tcp://") else 0
    say = progress or (lambda line: None)
    here = ray.get_runtime_context().get_node_id()
    try:
        actor = SchedulerActor.options(  # type: ignore[attr-defined]
            name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0,
            # On the caller's node: Ray's soft affinity still put it elsewhere, and the node
            # that hosts the scheduler is the one whose loss the cluster cannot survive.
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(config_to_dict(cfg), name, port)
    except ValueError as exc:  # Ray refuses a second live actor of the same name
        if owns_ray:
            ray.shutdown()
        raise ClusterUnavailable(f"a Fanout scheduler named {name!r} already runs in this Ray "
                                 f"cluster: {exc}") from exc
    try:
        info = ray.get(actor.info.remote(), timeout=120)
    except BaseException:
        _release(actor, owns_ray)
        raise
    say(f"Ray cluster at {ray.get_runtime_context().gcs_address} (`fanout status --ray "
        f"--address` it from another shell); scheduler actor {name!r} on node {info['node']}, "
        f"clients connect to {info['address']}")
    cluster = RayCluster(actor, info, name, owns_ray)
    cluster.config = cfg
    if wait:
        cluster.wait_ready_or_shutdown(timeout, on_status)
    return cluster


def connect(name: str = SCHEDULER_NAME, address: str | None = "auto",
            timeout: float = 10.0) -> Client:
    """A client of a scheduler found through Ray by its actor name (address and token included)."""
    if not ray.is_initialized():
        _join_ray(address, timeout)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError as exc:
        raise ClusterUnavailable(f"no Fanout scheduler named {name!r} in this Ray cluster; "
                                 f"start one with runtime.start(launcher='ray')") from exc
    found = cast(dict, ray.get(actor.info.remote(), timeout=timeout))
    return Client(found["address"], found["token"], timeout, keys=_keys(found))


CLIENT_SERVER_TRIES = 3


def _join_ray(address: str | None, timeout: float = 10.0) -> None:
    """``ray.init`` for a client, with errors that say what to check.

    Ray waits about a minute for a GCS that is not there, so an address that refuses or
    does not answer a TCP connection within ``timeout`` fails first, here. Through ``ray://``
    the head's Ray Client proxy forks a server per client; on a busy head that fork sometimes
    dies at once ("Starting Ray client server failed", seen 1 in ~4 full test runs here), and
    a new connection gets a new one: that is tried again."""
    _probe_ray_address(address, timeout)
    _token_mode_if_token(address)
    for attempt in range(1, CLIENT_SERVER_TRIES + 1):
        try:
            with _gcs_connect_window(timeout):
                ray.init(address=address, namespace=NAMESPACE)
            return
        except ConnectionError as exc:
            if "Starting Ray client server failed" in str(exc) \
                    and attempt < CLIENT_SERVER_TRIES:
                log.warning("the Ray client server at %s could not start a server for this "
                            "client (try %d of %d); trying again", address, attempt,
                            CLIENT_SERVER_TRIES)
                time.sleep(1.0)
                continue
            raise ClusterUnavailable(
                f"cannot reach the Ray cluster at {address} ({_first_words(exc)}); if it "
                f"uses Ray's token authentication, set RAY_AUTH_MODE=token and its token "
                f"(RAY_AUTH_TOKEN, or the file ~/.ray/auth_token)") from exc


@contextlib.contextmanager
def _gcs_connect_window(timeout: float):
    """Ray tries a GCS that takes the TCP connection but not the driver (another token, a
    head still starting) once a second, 20 times (``RAY_NUM_REDIS_GET_RETRIES``): so
    ``fanout status --ray --timeout 5`` with the wrong token took 20 s. For this ``ray.init``
    the tries fit in ``timeout``, unless that variable is set."""
    from ray._private import ray_constants

    if "RAY_NUM_REDIS_GET_RETRIES" in os.environ or not hasattr(
            ray_constants, "NUM_REDIS_GET_RETRIES"):
        yield
        return
    before = ray_constants.NUM_REDIS_GET_RETRIES
    ray_constants.NUM_REDIS_GET_RETRIES = max(1, math.ceil(timeout))
    try:
        yield
    finally:
        ray_constants.NUM_REDIS_GET_RETRIES = before


def _token_mode_if_token(address: str | None) -> None:
    """Join a cluster at an explicit address as Ray joins one it finds itself ("auto"): with
    this machine's token if it has one and ``RAY_AUTH_MODE`` is unset. Ray (2.59+) turns token
    authentication on for a new local cluster but, given an address, sends no token, so
    ``fanout status --ray --address`` of a ``fanout up --ray`` was refused. A token sent to a
    cluster without authentication is ignored."""
    if not address or address in ("auto", "local"):
        return
    try:  # Ray's own rule for "auto"; it also refreshes Ray's cached config
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication on by default
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _probe_ray_address(address: str | None, timeout: float) -> None:
    """``ClusterUnavailable`` at once if a ``ray://HOST:PORT`` or ``HOST:PORT`` address takes
    no TCP connection; "auto" and unset are Ray's to find."""
    if not address or address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterUnavailable(f"{address!r} is not a Ray address: use auto, ray://HOST:PORT "
                                 f"or the head's HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout, 3.0)
                                 ).close()
    except OSError as exc:
        why = "connection refused" if isinstance(exc, ConnectionRefusedError) else \
            (exc.strerror or type(exc).__name__)
        raise ClusterUnavailable(f"no Ray cluster answers at {address} ({why}); start one "
                                 f"with `ray start --head`, or check the address") from None


def _first_words(exc: BaseException) -> str:
    """Ray's connection errors embed whole tracebacks: the first line of it and its cause."""
    parts = []
    for e in (exc, exc.__cause__):
        lines = str(e or "").split("Traceback")[0].strip(" :\n").splitlines()
        if lines:
            parts.append(lines[0][:200])
    return ": ".join(parts) or type(exc).__name__


def _keys(info: dict) -> CurveKeys | None:
    return CurveKeys(**info["keys"]) if info.get("keys") else None


def ray_version() -> str:
    return ray.__version__


class SimulatedNodes:
    """Several Ray nodes on this one machine (``ray.cluster_utils``), joined by this process:
    multi-node runs without more machines, for benchmarks and drills.

    A head (no custom resources) and one node per entry of ``node_resources``, each with one
    CPU. Ray starts its workers at nice 15; here at 0, as the local launcher's processes are,
    so both launchers compete alike with whatever else runs on this machine. Each part is
    handed to ``cleanup`` as soon as it exists, so a failure half-way still shuts all down.
    """

    def __init__(self, node_resources: list[dict[str, float]], cleanup: Any) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster()
        cleanup.callback(self.cluster.shutdown)
        small: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 100 * 1024 ** 2}
        self.cluster.add_node(include_dashboard=False, _system_config={"worker_niceness": 0},
                              **small)
        for resources in node_resources:
            self.cluster.add_node(resources=resources, **small)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, namespace=NAMESPACE, logging_level=logging.WARNING,
                 configure_logging=False)
        cleanup.callback(ray.shutdown)
