"""Starting, killing and watching worker processes on this machine (the local launcher)."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger("fanout.supervisor")


class LocalSupervisor:
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
        """Workers that exited since the last call: (device, epoch, reason)."""
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
        """Wait for workers told to stop; kill what is left after ``timeout``."""
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
