"""``fanout up`` as a background service: one per ``FANOUT_HOME``, a pid file and a log file.

The service is ``fanout up`` itself, started in a new session (so closing the terminal does
not stop it) with its output appended to the log; the pid file says where it listens, so
``fanout status``, ``down`` and ``logs`` find it without flags.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import env
from ..errors import ClusterUnavailable, ConfigError
from ..shells.supervisor import process_alive

READY_MARK = "] ready: "  # the line `fanout up` prints once every model is loaded or not
LOG_KEEP_BYTES = 16 * 1024 * 1024  # a longer log is moved to fanout-up.log.1 at the next start
FOLLOW_POLL_S = 0.2


@dataclass
class Service:
    """What the pid file records of the running service."""

    pid: int
    address: str | None  # the client address asked for (None: the config's)
    log: str
    started: float

    @property
    def alive(self) -> bool:
        return process_alive(self.pid)


def run_dir() -> Path:
    return env.home() / "run"


def pid_file() -> Path:
    return run_dir() / "fanout-up.json"


def log_file() -> Path:
    return env.home() / "logs" / "fanout-up.log"


def running() -> Service | None:
    """The background service, if its pid file names a live process (a stale file is removed)."""
    try:
        service = Service(**json.loads(pid_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if service.alive:
        return service
    with contextlib.suppress(OSError):
        pid_file().unlink()
    return None


def start(up_args: list[str], address: str | None, timeout: float,
          say: Callable[[str], None]) -> Service:
    """Start ``fanout up UP_ARGS`` in the background; return once it is ready, passing its
    progress lines to ``say``. Raises if one already runs, or if it exits or is not ready in
    ``timeout`` seconds (then it is stopped)."""
    current = running()
    if current is not None:
        raise ConfigError(f"fanout up already runs in the background (pid {current.pid}, "
                          f"log {current.log}); `fanout down` stops it")
    log = log_file()
    log.parent.mkdir(parents=True, exist_ok=True)
    run_dir().mkdir(parents=True, exist_ok=True)
    if log.exists() and log.stat().st_size > LOG_KEEP_BYTES:
        os.replace(log, log.with_name(log.name + ".1"))
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        out.write(f"--- fanout up {' '.join(up_args)} (started {time.ctime()})\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", *up_args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                **_detached())
    service = Service(proc.pid, address, str(log), time.time())
    tmp = pid_file().with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(service)))
    os.replace(tmp, pid_file())
    try:
        _wait_ready(proc, log, offset, timeout, say)
    except BaseException:
        stop(service, timeout=10.0)
        raise
    return service


def _detached() -> dict:
    if sys.platform == "win32":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS  # type: ignore[attr-defined]
        return {"creationflags": flags}
    return {"start_new_session": True}


def _wait_ready(proc: subprocess.Popen, log: Path, offset: int, timeout: float,
                say: Callable[[str], None]) -> None:
    deadline = time.monotonic() + timeout
    for line in follow(log, offset, lambda: proc.poll() is None and time.monotonic() < deadline):
        say(line)
        if READY_MARK in line:
            return
    if proc.poll() is not None:
        raise ClusterUnavailable(f"fanout up exited with code {proc.returncode} before it was "
                                 f"ready; its output is above and in {log}")
    raise ClusterUnavailable(f"fanout up was not ready within {timeout:g} s (see {log}); "
                             f"stopped it. Raise --timeout if loading takes longer here")


def follow(path: Path, offset: int, keep_going: Callable[[], bool]) -> Iterator[str]:
    """Lines appended to ``path`` after ``offset``, as they come, while ``keep_going()``;
    then whatever is left."""
    with open(path, "rb") as f:
        f.seek(offset)
        pending = b""
        while True:
            chunk = f.read(65536)
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
                continue
            if not keep_going():
                if pending:
                    yield pending.decode("utf-8", "replace")
                return
            time.sleep(FOLLOW_POLL_S)


def stop(service: Service, timeout: float = 30.0) -> bool:
    """Stop the service process (SIGTERM, then SIGKILL after ``timeout``); True if it had to
    be killed. The pid file goes either way."""
    killed = False
    if service.alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(service.pid, signal.SIGTERM)
        killed = not wait_exit(service.pid, timeout)
        if killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(service.pid, signal.SIGKILL)
            wait_exit(service.pid, 5.0)
    with contextlib.suppress(OSError):
        pid_file().unlink()
    return killed


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` is gone (reaping it if it is our child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
        if not process_alive(pid):
            return True
        time.sleep(0.1)
    return not process_alive(pid)
