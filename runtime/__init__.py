"""Fanout: fan AI inference out over the devices of a PC and across machines.

    import runtime
    with runtime.start() as cluster:            # an embedded local cluster
        client = cluster.client()
        results = client.map("minilm", batch)   # each result says .device and .attempts

``start`` and ``connect`` are the only place that chooses between the local launcher and Ray;
Ray is imported only when it is chosen (it has no wheels for Windows on Arm).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from . import env, errors
from .config.loader import load_cluster_section
from .config.schema import LAUNCHERS, Config, client_address
from .errors import ConfigError
from .frontdoors.client import AsyncClient, Client, TaskResult, TextChunk, TextCompletion
from .launchers import local
from .launchers.handle import ClusterHandle
from .launchers.local import Cluster
from .wire.status import Status

__all__ = ["AsyncClient", "Client", "Cluster", "ClusterHandle", "Status", "TaskResult",
           "TextChunk", "TextCompletion", "connect", "errors", "start"]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fanout-runtime")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


__version__ = _version()

RAY_SCHEDULER_NAME = "fanout-scheduler"


def _ray_launcher(why: str) -> Any:
    try:
        from .launchers import ray as ray_launcher
    except ImportError as exc:
        raise ConfigError(f"{why} needs Ray ({exc}): pip install 'fanout-runtime[ray]'") from exc
    return ray_launcher


def launcher_for(config: Config | str | os.PathLike | None, launcher: str | None = None) -> str:
    """The launcher to run ``config`` with: ``launcher`` if given, else its
    ``cluster.launcher`` (a file's ``cluster`` section is read without the rest)."""
    if launcher is None:
        launcher = (config.cluster if isinstance(config, Config)
                    else load_cluster_section(config)).launcher
    if launcher not in LAUNCHERS:
        raise ConfigError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    return launcher


def start(config: Config | str | os.PathLike | None = None, *, address: str | None = None,
          launcher: str | None = None, wait: bool = True, timeout: float = 600.0,
          progress: Callable[[str], None] | None = None, **ray_options: Any) -> ClusterHandle:
    """Start a cluster and return its handle (a context manager; ``shutdown()`` stops it).

    ``config``: a ``Config``, a YAML path, or None for the embedded default (this machine's
    devices, the packaged models). ``launcher``: "local" (processes on this machine) or "ray"
    (Ray actors on the nodes of a Ray cluster); default: the config's ``cluster.launcher``.
    ``address``: local: where clients connect (default: a free loopback port); Ray: the Ray
    cluster (see ``runtime.launchers.ray.start``, which also takes ``ray_options`` such as
    ``name``, ``port`` and ``on_status``). ``wait``: return only once every model is loaded or
    known unavailable.
    """
    launcher = launcher_for(config, launcher)
    if launcher == "ray":
        return _ray_launcher("launcher 'ray'").start(config, address=address, wait=wait,
                                                     timeout=timeout, progress=progress,
                                                     **ray_options)
    if ray_options:
        raise ConfigError(f"options {sorted(ray_options)} are for launcher 'ray' only")
    return local.start(config, address=address, wait=wait, timeout=timeout, progress=progress)


def connect(address: str | None = None, token: str | None = None, timeout: float = 10.0,
            keys: Any = None, name: str = RAY_SCHEDULER_NAME,
            launcher: str | None = None) -> Client:
    """Attach to a running cluster (default: ``FANOUT_ADDRESS`` or tcp://127.0.0.1:8471).

    ``address``: the scheduler's tcp://HOST:PORT, or ``"auto"`` / ``"ray://HOST:PORT"`` to find
    it through Ray: the scheduler actor ``name`` hands out its address, token and keys.
    ``launcher="ray"``: ``address`` is a Ray cluster's in any form (also a head's HOST:PORT).
    ``token``: the cluster token (default: ``FANOUT_TOKEN``). ``keys``: the cluster's CurveZMQ
    key file or ``CurveKeys`` (default: ``FANOUT_KEYS``).
    """
    if launcher == "ray":
        address = address or "auto"
    address = address or env.get(env.ENV_ADDRESS) or env.DEFAULT_ADDRESS
    if launcher == "ray" or address == "auto" or address.startswith("ray://"):
        return _ray_launcher(f"connecting through Ray ({address})").connect(name, address,
                                                                            timeout)
    return Client(client_address(address, "address"), token, timeout, keys)
