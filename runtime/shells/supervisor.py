"""What the scheduler shell asks of a launcher (``Supervisor``), and the local launcher's:
worker processes on this machine (``LocalSupervisor``)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from abc import abstractmethod
from typing import ClassVar, Protocol

log = logging.getLogger("fanout.supervisor")


class Supervisor(Protocol):
    """Starts, kills and watches the workers the scheduler asks for; under a launcher that
    tracks nodes, also reports workers added and gone as nodes join and leave.

    Built as ``factory(worker_address, config_file)``: where workers connect, and the
    resolved config as a JSON file."""

    tracks_nodes: ClassVar[bool] = False  # True: workers come and go with nodes

    @abstractmethod
    def start(self, device: str, epoch: int) -> None:
        """Start incarnation ``epoch`` of ``device``'s worker (replacing any older one)."""
        ...

    @abstractmethod
    def kill(self, device: str, epoch: int) -> None:
        """Kill incarnation ``epoch`` of ``device``'s worker, if it still runs."""
        ...

    @abstractmethod
    def poll(self) -> list[tuple[str, int, str]]:
        """Workers that exited since the last call: (device, epoch, reason)."""
        ...

    def node_events(self) -> list:
        """``WorkerAdded``/``WorkerGone`` events since the last call (none without nodes)."""
        return []

    @property
    def settled(self) -> bool:
        """False while the launcher still learns what its nodes can host (not ready yet)."""
        return True

    @abstractmethod
    def stop_all(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for workers told to stop; kill whatever is left."""
        ...


class LocalSupervisor(Supervisor):
    """One ``runtime.shells.worker_process`` per device, started with the resolved config file."""

    def __init__(self, worker_address: str, config_file: str):
        self.worker_address = worker_address
        self.config_file = config_file
        self.procs: dict[str, tuple[int, subprocess.Popen]] = {}  # device -> (epoch, process)
        self._exited: list[tuple[str, int, str]] = []

    def start(self, device: str, epoch: int) -> None:
        self._reap(device)
        cmd = [sys.executable, "-m", "runtime.shells.worker_process", "--scheduler",
               self.worker_address, "--device", device, "--epoch", str(epoch),
               "--config", self.config_file]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        self.procs[device] = (epoch, proc)
        log.info("started worker %s (epoch %d) as pid %d", device, epoch, proc.pid)

    def kill(self, device: str, epoch: int) -> None:
        entry = self.procs.get(device)
        if entry and entry[0] == epoch and entry[1].poll() is None:
            entry[1].kill()
            # A SIGSTOPped process dies from SIGKILL too; wait so it is not a zombie.
            try:
                entry[1].wait(timeout=5)
            except subprocess.TimeoutExpired:
                log.error("worker %s pid %d did not die after SIGKILL", device, entry[1].pid)

    def poll(self) -> list[tuple[str, int, str]]:
        for device, (epoch, proc) in list(self.procs.items()):
            code = proc.poll()
            if code is not None:
                del self.procs[device]
                reason = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                self._exited.append((device, epoch, reason))
        out, self._exited = self._exited, []
        return out

    def _reap(self, device: str) -> None:
        entry = self.procs.pop(device, None)
        if entry and entry[1].poll() is None:
            entry[1].kill()
            entry[1].wait()

    def stop_all(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        for device, (_, proc) in list(self.procs.items()):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not stop in time; killing pid %d", device, proc.pid)
                proc.kill()
                proc.wait()
        self.procs.clear()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
