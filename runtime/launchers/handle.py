"""What every launcher's cluster handle offers: a shared client, status, readiness, ``with``."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..config.schema import Config, CurveKeys
from ..errors import ClusterUnavailable
from ..frontdoors.client import Client
from ..wire.status import Status


class ClusterHandle:
    """What every launcher's handle offers: a shared client, status, readiness, ``with``.

    A launcher's subclass says how to tell its scheduler died (``_check_alive``) and how to
    stop everything (``shutdown``)."""

    address: str
    token: str | None
    keys: CurveKeys | None  # the cluster's CurveZMQ keys, when its config has them
    config: Config | None = None  # the config it runs, as resolved (token and keys included)

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
        """The status as plain data (JSON-able); ``cluster_status()`` has it typed."""
        return self.client().status()

    def cluster_status(self) -> Status:
        return self.client().cluster_status()

    def _check_alive(self) -> None:
        """Raise ``ClusterUnavailable`` if the scheduler is gone."""

    def serving(self, timeout: float = 10.0) -> bool:
        """Whether the scheduler still serves: False once it stopped or died, True while it
        cannot tell (a busy or stopped scheduler), so that only a sure answer ends a watch."""
        try:
            self._check_alive()
        except ClusterUnavailable:
            return False
        return True

    def wait_ready(self, timeout: float = 600.0,
                   on_status: Callable[[Status], None] | None = None) -> Status:
        """Block until every worker is up and every model loaded or unavailable;
        ``on_status`` sees each status polled meanwhile (e.g. to print load progress)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            status = self.cluster_status()
            if on_status is not None:
                on_status(status)
            if status.cluster is not None and status.cluster.ready:
                return status
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"cluster not ready after {timeout:g} s: "
                                         f"{_loading(status)}")
            time.sleep(0.1)

    def wait_ready_or_shutdown(self, timeout: float,
                               on_status: Callable[[Status], None] | None = None) -> None:
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


def _loading(status: Status) -> str:
    busy = [f"{w.device}:{w.state}" + "".join(
        f" {name}={m.state}" for name, m in w.models.items() if m.state == "loading")
        for w in status.workers]
    return ", ".join(busy)
