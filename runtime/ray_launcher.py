"""The Ray launcher: the same scheduler and workers as Ray actors, on the nodes that have the devices.

The scheduler runs as a named, detached actor around the same ``SchedulerProcess``; its
``RaySupervisor`` starts each device's worker as an actor placed by the device's ``resources``
(e.g. ``{NPU: 1}``). The data path stays ZMQ over TCP: both scheduler sockets bind the
scheduler node's IP, so a token is always set (generated here if the config has none) and
reaches workers and clients through Ray, never through a file or argv.

Ray restarts no actor itself (``max_restarts=0``): the scheduler already restarts a lost worker
with a new epoch and a backoff, and Ray re-running the same incarnation would bypass both.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import secrets
import threading
import weakref
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from .client import Client
from .config import Config, DeviceConfig, config_from_dict, config_to_dict, load_config
from .errors import ClusterUnavailable
from .launcher import ClusterHandle
from .models import model_home, resolve_source
from .scheduler_process import SchedulerProcess
from .worker_process import WorkerProcess

log = logging.getLogger("fanout.ray")
NAMESPACE = "fanout"
SCHEDULER_NAME = "fanout-scheduler"


def node_label() -> str:
    """This Ray node as status shows it: its IP (shared by nodes on one host) and node id."""
    return f"{_ip()}/{ray.get_runtime_context().get_node_id()[:8]}"


def _ip() -> str:
    ip = ray.util.get_node_ip_address()
    return f"[{ip}]" if ":" in ip else ip


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
    """The config with this device's models fetched on this node (paths must exist on every node)."""
    home = model_home(config.model_cache)
    models = []
    for m in config.models:
        if device in config.device_order(m.name):
            m = dataclasses.replace(m, source=str(resolve_source(m.source, None, home)))
        models.append(m)
    return dataclasses.replace(config, models=models, model_cache=str(home))


@ray.remote(max_restarts=0)
class DeviceWorker:
    """One device's worker; ``run`` returns when the worker exits, so its ref marks the exit."""

    def run(self, config: dict, device: str, epoch: int, scheduler: str) -> int:
        logging.basicConfig(level=os.environ.get("FANOUT_LOG", "WARNING").upper(),
                            format=f"%(asctime)s {device} %(levelname)s %(message)s")
        cfg = _resolve_for_device(config_from_dict(config), device)
        return WorkerProcess(cfg, device, epoch, scheduler, node=node_label()).run()


class RaySupervisor:
    """``LocalSupervisor``'s interface over Ray actors, one per device, owned by the scheduler."""

    def __init__(self, worker_address: str, config_file: str, prefix: str = SCHEDULER_NAME):
        self.worker_address = worker_address
        self.config = json.loads(Path(config_file).read_text())
        self.devices = {d.name: d for d in config_from_dict(self.config).devices}
        self.prefix = prefix
        self.actors: dict[str, tuple[int, Any, ray.ObjectRef]] = {}  # device -> (epoch, actor, run)
        self._exited: list[tuple[str, int, str]] = []

    def start(self, device: str, epoch: int) -> None:
        self._reap(device)
        actor = DeviceWorker.options(name=f"{self.prefix}-{device}-{epoch}", namespace=NAMESPACE,
                                     **actor_options(self.devices[device])).remote()
        self.actors[device] = (epoch, actor, actor.run.remote(self.config, device, epoch,
                                                              self.worker_address))
        log.info("started worker %s (epoch %d) as a Ray actor", device, epoch)

    def kill(self, device: str, epoch: int) -> None:
        entry = self.actors.get(device)
        if entry and entry[0] == epoch:
            ray.kill(entry[1], no_restart=True)  # poll() then reports it, as for a process

    def poll(self) -> list[tuple[str, int, str]]:
        """Workers whose actor died or whose run ended since the last call: (device, epoch, reason)."""
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

    def stop_all(self, timeout: float = 5.0) -> None:
        """Wait for workers told to stop; then kill every actor, done or not."""
        runs = [entry[2] for entry in self.actors.values()]
        if runs:
            ray.wait(runs, num_returns=len(runs), timeout=timeout)
        for _, actor, _ in self.actors.values():
            ray.kill(actor, no_restart=True)
        self.actors.clear()


def _exit_reason(ref: ray.ObjectRef) -> str:
    try:
        return f"exit code {ray.get(ref, timeout=5)}"
    except ray.exceptions.RayActorError as exc:
        # Ray's message ends with the cause, e.g. "killed by `ray.kill`" or the node's death.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return f"Ray actor died: {lines[-1] if lines else type(exc).__name__}"
    except ray.exceptions.RayError as exc:
        return f"worker failed: {str(exc).strip().splitlines()[-1]}"


class RaySchedulerProcess(SchedulerProcess):
    """The scheduler shell as it runs inside the Ray actor: says so, and which node it is on."""

    def __init__(self, config: Config, node: str, **kw):
        super().__init__(config, **kw)
        self.node = node

    def info(self) -> dict:
        return super().info() | {"launcher": "ray", "node": self.node}


@ray.remote(max_restarts=0)
class SchedulerActor:
    """Runs ``SchedulerProcess.serve`` in a thread; its methods answer from the actor's own."""

    def __init__(self, config: dict, name: str, port: int):
        logging.basicConfig(level=os.environ.get("FANOUT_LOG", "WARNING").upper(),
                            format="%(asctime)s scheduler %(levelname)s %(message)s")
        cfg = config_from_dict(config)
        ip = _ip()
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(
            cfg.scheduler, address=f"tcp://{ip}:{port}", worker_address=f"tcp://{ip}:0"))
        self.proc = RaySchedulerProcess(
            cfg, node_label(), supervisor_factory=functools.partial(RaySupervisor, prefix=name))
        self.thread = threading.Thread(target=self.proc.serve, name="fanout-scheduler",
                                       daemon=True)
        self.thread.start()

    def info(self) -> dict:
        """Where clients connect, with the token they need; sent only over Ray's channel."""
        return {"address": self.proc.address, "worker_address": self.proc.worker_address,
                "token": self.proc.config.scheduler.token, "node": self.proc.node,
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
        super().__init__(info["address"], info["token"])
        self.actor = actor
        self.name = name
        self.node: str = info["node"]
        self.pid: int = info["pid"]  # of the scheduler actor's process
        self._finalizer = weakref.finalize(self, _release, name, owns_ray)

    def _check_alive(self) -> None:
        try:
            alive = ray.get(self.actor.alive.remote(), timeout=30)
        except ray.exceptions.RayError as exc:
            raise ClusterUnavailable(f"the scheduler actor died while starting: {exc}") from exc
        if not alive:
            raise ClusterUnavailable("the scheduler stopped while starting; see its log "
                                     "in the Ray session's logs")

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the scheduler and every worker actor, then kill the detached actor; idempotent."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        if self._finalizer.alive and ray.is_initialized():
            try:
                ray.get(self.actor.stop.remote(timeout), timeout=timeout + 5)
            except (ray.exceptions.RayError, TimeoutError):
                pass  # already dead or stuck: the kill below ends it and its workers
        self._finalizer()


def _release(name: str, owns_ray: bool) -> None:
    """Kill the detached scheduler actor (its worker actors share its fate); end our Ray."""
    if not ray.is_initialized():
        return
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    except ValueError:
        pass  # already gone
    if owns_ray:
        ray.shutdown()


def start(config: Config | str | os.PathLike | None = None, *, address: str | None = None,
          name: str = SCHEDULER_NAME, port: int = 0, wait: bool = True, timeout: float = 600.0,
          progress: Callable[[str], None] | None = None) -> RayCluster:
    """Start the scheduler as a detached Ray actor and return its handle.

    ``address``: the Ray cluster (None: the one this process is connected to, else Ray's own
    default: ``RAY_ADDRESS``, the latest local cluster, or a new local one; "auto" or
    "ray://HOST:PORT" join one). ``name``: the scheduler actor's name in the "fanout" Ray
    namespace. ``port``: where clients connect on the scheduler's node (0: a free one).
    Packaged models are fetched by each worker on its node, not here.
    """
    cfg = config if isinstance(config, Config) else load_config(config)
    if cfg.scheduler.token is None:  # the sockets bind a node IP: never without a token
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(
            cfg.scheduler, token=secrets.token_urlsafe(32)))
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(address=address, namespace=NAMESPACE)
    say = progress or (lambda line: None)
    here = ray.get_runtime_context().get_node_id()
    try:
        actor = SchedulerActor.options(
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
        _release(name, owns_ray)
        raise
    say(f"scheduler actor {name!r} on node {info['node']}, clients connect to {info['address']}")
    cluster = RayCluster(actor, info, name, owns_ray)
    if wait:
        cluster.wait_ready_or_shutdown(timeout)
    return cluster


def connect(name: str = SCHEDULER_NAME, address: str | None = "auto",
            timeout: float = 10.0) -> Client:
    """A client of a scheduler found through Ray by its actor name (address and token included)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE)
    try:
        actor = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError as exc:
        raise ClusterUnavailable(f"no Fanout scheduler named {name!r} in this Ray cluster; "
                                 f"start one with runtime.start(launcher='ray')") from exc
    info = ray.get(actor.info.remote(), timeout=timeout)
    return Client(info["address"], info["token"], timeout)
