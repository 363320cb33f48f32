"""Two hosts on this machine, for drills closer to real machines than ``ray.cluster_utils``.

Each host is a network namespace of its own; a veth pair joins them on a reserved range
(198.18.0.0/24, RFC 2544's benchmarking block, never routed off this machine). A Ray head runs
in one, a Ray node in the other, each with its own temp dir, and they talk real TCP across the
pair. Cutting the link drops every packet between them, as a pulled cable or a dead switch
does: no reset, no FIN, the peer just goes silent.

Everything a host runs is in its namespace, so ``close()`` ends exactly that: the processes
``ip netns pids`` lists (never ``ray stop``, which would end every Ray cluster on this
machine), then the namespaces and the pair.

Needs root and iproute2's ``ip`` (``missing()`` says which is absent).
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "198.18.0"
RAY_PORT = 6379


def missing() -> str | None:
    """Why two hosts cannot be made here, or None."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "two hosts as network namespaces need root"
    if shutil.which("ip") is None:
        return "two hosts as network namespaces need iproute2's `ip` (apt install iproute2)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    netns: str
    link: str  # its end of the veth pair
    ip: str
    temp_dir: Path  # Ray's, of this host only

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def pids(self) -> list[int]:
        done = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                              text=True)
        return [int(p) for p in done.stdout.split()]


class TwoHosts:
    """``head`` and ``node``: two namespaces, one link, a Ray cluster over it (``start_ray``).

    A context manager; ``close()`` is idempotent and runs even after a failed start."""

    def __init__(self, subnet: str = SUBNET) -> None:
        if (why := missing()) is not None:
            raise RuntimeError(why)
        tag = f"{os.getpid() % 100_000}"
        self._token = secrets.token_hex(32)
        self._dir = Path(tempfile.mkdtemp(prefix="fanout-hosts-"))
        self.head = Host(f"fanout-{tag}-a", f"fo{tag}a", f"{subnet}.1", self._dir / "ray-a")
        self.node = Host(f"fanout-{tag}-b", f"fo{tag}b", f"{subnet}.2", self._dir / "ray-b")
        self._made: list[str] = []
        try:
            for host in (self.head, self.node):
                _ip("netns", "add", host.netns)
                self._made.append(host.netns)
            _ip("link", "add", self.head.link, "type", "veth", "peer", "name", self.node.link)
            for host in (self.head, self.node):
                _ip("link", "set", host.link, "netns", host.netns)
                _ip("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", host.link)
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", host.netns, "link", "set", host.link, "up")
        except BaseException:
            self.close()
            raise

    @property
    def ray_address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    def start_ray(self, num_cpus: int = 1, timeout: float = 120.0) -> None:
        """A Ray head on ``head`` and a Ray node on ``node`` that joins it across the link."""
        common = ["--num-cpus", str(num_cpus), "--disable-usage-stats"]
        self._ray(self.head, ["--head", "--port", str(RAY_PORT), "--include-dashboard",
                              "false", *common], timeout)
        self._ray(self.node, ["--address", self.ray_address, *common], timeout)

    def _ray(self, host: Host, args: list[str], timeout: float) -> None:
        ray = [sys.executable, "-m", "ray.scripts.scripts"]  # this Python's Ray, PATH or not
        done = subprocess.run(host.argv(*ray, "start", "--node-ip-address", host.ip,
                                        "--temp-dir", str(host.temp_dir), *args),
                              capture_output=True, text=True, timeout=timeout,
                              env=self.env())
        if done.returncode != 0:
            raise RuntimeError(f"ray start on {host.ip} failed: {done.stderr[-2000:]}")

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a process on either host: Ray found at the head's address,
        with Ray's token authentication on and this cluster's own token (so that neither this
        machine's ~/.ray/auth_token nor its absence decides whether the nodes can talk)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_ADDRESS=self.ray_address, RAY_AUTH_MODE="token",
                   RAY_AUTH_TOKEN=self._token, **extra)
        return env

    def popen(self, host: Host, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("env", self.env())
        return subprocess.Popen(host.argv(*argv), **kw)

    def cut(self) -> float:
        """Drop the link from the node's side: the head's end keeps its address, so the head
        still reaches itself; nothing crosses any more. Returns when (time.time())."""
        _ip("-n", self.node.netns, "link", "set", self.node.link, "down")
        return time.time()

    def close(self) -> None:
        """End every process of both hosts, then the hosts."""
        hosts = [h for h in (self.head, self.node) if h.netns in self._made]
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for pid in [pid for h in hosts for pid in h.pids()]:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while any(h.pids() for h in hosts) and time.monotonic() < deadline:
                time.sleep(0.1)
        for netns in self._made:  # deleting a namespace deletes its end of the pair, and so both
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._made.clear()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> TwoHosts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
