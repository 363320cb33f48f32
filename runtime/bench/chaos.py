"""``fanout bench chaos``: the cluster under attack and under faults, with the figures.

``fuzz_sockets``: 10,000 fuzzed messages on each socket (the client one, the worker one)
from peers without credentials, with the wrong ones (a client's on the worker socket) and
with the right ones, against clusters with keys, with a token and with neither; then the
crashes (processes that died or restarted: should be none), the exceptions the scheduler had
to catch (should be none), its memory, and a checked fan-out after it all.

``kill_and_stop``: a fan-out of 2,000 checked additions over three CPU workers while a random
worker (never the last one up) is SIGKILLed or SIGSTOPped (and continued) every second:
every task answered exactly once, and correctly. ``overload``: ten times what the queue
holds, submitted at once: the excess answered ``Overloaded``, everything accepted answered
correctly, the scheduler's memory bounded.

``lost_host``: two hosts made of network namespaces (``hosts.TwoHosts``), a Ray cluster over
them, ``fanout up --ray`` with a CPU worker on each, and the second host's link cut in the
middle of a 3,000-task fan-out from a client attached through Ray: every task answered once
and correctly, the client exits on its own, ``fanout down`` ends ``fanout up``, and the Fanout
processes left on the cut-off host end by themselves.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .common import hardware
from .fuzz import Credentials, FuzzReport, Peer, fuzz_cluster

TOKEN = "chaos-bench-token"
FUZZ_MESSAGES = 10_000


def _models(folder: Path) -> dict[str, Path]:
    from ..backends.onnx_proto import one_node_model
    paths = {"noop": folder / "noop.onnx", "add": folder / "add.onnx"}
    paths["noop"].write_bytes(one_node_model("Identity", ["x"], (4,), "noop"))
    paths["add"].write_bytes(one_node_model("Add", ["a", "b"], (4,), "add"))
    return paths


def _config(folder: Path, models: dict[str, Path], name: str, scheduler: str = "",
            cluster: str = "") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        scheduler: {{task_timeout_s: 5{scheduler}}}
        {cluster}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}}
        models:
          - {{name: noop, source: {models['noop']}}}
          - {{name: add, source: {models['add']}}}
    """))
    return path


def fuzz_plans(key_file: Path) -> dict[str, tuple[str, str, list[Peer]]]:
    """For each kind of cluster: its scheduler and cluster config lines, and its peers."""
    from ..config.keys import read_keys

    keys = read_keys(key_file)
    client_curve = Credentials(curve=(keys.server_public, keys.client_public or "",
                                      keys.client_secret or ""))
    worker_curve = Credentials(curve=(keys.server_public, keys.worker_public or "",
                                      keys.worker_secret or ""))
    return {
        "keys": (f", token: {TOKEN}", f"cluster: {{keys: {key_file}}}", [
            Peer("client socket, no credentials", "client", heard=False),
            Peer("client socket, client keys and token", "client", client_curve, TOKEN),
            Peer("worker socket, no credentials", "worker", heard=False),
            Peer("worker socket, client keys (posing)", "worker", client_curve, heard=False),
            Peer("worker socket, worker keys", "worker", worker_curve),
        ]),
        "token": (f", token: {TOKEN}", "", [
            Peer("client socket, no token", "client", heard=False),
            Peer("client socket, the token", "client", Credentials(plain=("client", TOKEN)),
                 TOKEN),
            Peer("worker socket, the client token (posing)", "worker",
                 Credentials(plain=("worker", TOKEN)), heard=False),
        ]),
        "open": ("", "", [
            Peer("client socket, open (loopback)", "client"),
            Peer("worker socket, no worker secret", "worker", heard=False),
        ]),
    }


def fuzz_sockets(count: int = FUZZ_MESSAGES, seed: int = 0,
                 say=print) -> dict[str, FuzzReport]:
    """Run every plan of ``fuzz_plans`` with ``count`` messages a peer; print the figures."""
    import runtime

    from ..config.keys import write_keys
    from ..wire.security import generate_keys

    reports: dict[str, FuzzReport] = {}
    with tempfile.TemporaryDirectory(prefix="fanout-chaos-") as tmp:
        folder = Path(tmp)
        models = _models(folder)
        key_file = write_keys(folder / "cluster.keys", generate_keys())
        for name, (scheduler, cluster_line, peers) in fuzz_plans(key_file).items():
            config = _config(folder, models, name, scheduler, cluster_line)
            with runtime.start(config) as cluster:
                client = cluster.client()
                report = fuzz_cluster(cluster, client, peers, count, seed)
            reports[name] = report
            say(f"\n{name} cluster ({count} fuzzed messages a peer):")
            for line in report.lines():
                say(f"  {line}")
    return reports


CHAOS_TASKS = 2_000
CHAOS_CONFIG = """
    scheduler: {{task_timeout_s: 120, heartbeat_interval_s: 0.2, heartbeat_timeout_s: 1.0,
                max_queue: {max_queue}}}
    devices:
      - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2, faults: {{hang_s: {hang}}}}}
      - {{name: cpu1, kind: cpu, backend: onnxruntime, capacity: 2, faults: {{hang_s: {hang}}}}}
      - {{name: cpu2, kind: cpu, backend: onnxruntime, capacity: 2, faults: {{hang_s: {hang}}}}}
    models:
      - {{name: add, source: {add}}}
"""


@dataclass
class ChaosReport:
    tasks: int
    correct: int = 0
    wrong: int = 0  # answered with the wrong sum: should be none
    errors: dict[str, int] = field(default_factory=dict)  # kind -> tasks that ended with it
    unmatched: int = 0  # answers for tasks already answered: should be none
    faults: dict[str, int] = field(default_factory=dict)  # "SIGKILL" / "SIGSTOP" -> sent
    restarts: int = 0
    seconds: float = 0.0
    rss_mb: tuple[float, float] = (0.0, 0.0)  # the scheduler's, before and at its peak

    def lines(self) -> list[str]:
        return [f"{self.tasks} tasks in {self.seconds:.1f} s: {self.correct} correct, "
                f"{self.wrong} wrong, errors {self.errors or 'none'}, answered twice "
                f"{self.unmatched}",
                f"faults sent {self.faults or 'none'}, worker restarts {self.restarts}; "
                f"scheduler RSS {self.rss_mb[0]:.0f} MB before, {self.rss_mb[1]:.0f} MB at most"]


def _fan_out(cluster, client, tasks: int, seed: int, during=None) -> ChaosReport:
    """Submit ``tasks`` checked additions at once; ``during(report)`` runs meanwhile."""
    import numpy as np

    from .fuzz import _rss_mb

    rng = np.random.default_rng(seed)
    inputs = [{"a": rng.standard_normal(4).astype(np.float32),
               "b": rng.standard_normal(4).astype(np.float32)} for _ in range(tasks)]
    report = ChaosReport(tasks)
    rss = [_rss_mb(cluster.pid)]
    stop = threading.Event()

    def watch_memory():
        while not stop.wait(0.1):
            rss.append(_rss_mb(cluster.pid))

    watcher = threading.Thread(target=watch_memory, daemon=True)
    watcher.start()
    chaos = None
    if during is not None:
        chaos = threading.Thread(target=during, args=(report, stop), daemon=True)
        chaos.start()
    started = time.monotonic()
    try:
        results = client.map("add", inputs, return_exceptions=True, window=tasks)
    finally:
        stop.set()
        watcher.join()
        if chaos is not None:
            chaos.join()
    report.seconds = time.monotonic() - started
    for x, r in zip(inputs, results):
        if isinstance(r, Exception):
            kind = getattr(r, "kind", type(r).__name__)
            report.errors[kind] = report.errors.get(kind, 0) + 1
        elif np.allclose(next(iter(r.outputs.values())), x["a"] + x["b"]):
            report.correct += 1
        else:
            report.wrong += 1
    report.unmatched = client._async.unmatched
    report.restarts = sum(w["restarts"] for w in cluster.status()["workers"])
    report.rss_mb = (rss[0], max(rss))
    return report


def kill_and_stop(tasks: int = CHAOS_TASKS, seed: int = 0, every_s: float = 1.0,
                  say=print) -> ChaosReport:
    """A fan-out through workers SIGKILLed or SIGSTOPped (continued at the next fault) at
    random; every task must be answered once, correctly."""
    import runtime

    rng = random.Random(seed)

    def faults(report: ChaosReport, stop: threading.Event) -> None:
        stopped: list[int] = []
        while not stop.wait(every_s):
            pids = [w["pid"] for w in cluster.status()["workers"]
                    if w["pid"] and w["state"] == "up"]
            for pid in stopped:
                _signal(pid, signal.SIGCONT)
            stopped.clear()
            if len(pids) < 2:  # the last one up is spared: the chaos is in the failover
                continue
            pid = rng.choice(pids)
            sig = rng.choice([signal.SIGKILL, signal.SIGSTOP])
            _signal(pid, sig)
            if sig == signal.SIGSTOP:
                stopped.append(pid)
            report.faults[sig.name] = report.faults.get(sig.name, 0) + 1
        for pid in stopped:
            _signal(pid, signal.SIGCONT)

    with tempfile.TemporaryDirectory(prefix="fanout-chaos-") as tmp:
        models = _models(Path(tmp))
        config = Path(tmp) / "kill.yaml"
        config.write_text(textwrap.dedent(CHAOS_CONFIG.format(
            max_queue=10_000, hang=0.05, add=models["add"])))
        with runtime.start(config) as cluster:
            report = _fan_out(cluster, cluster.client(), tasks, seed, faults)
    say(f"\nworkers killed and stopped through a fan-out (a fault every {every_s:g} s):")
    for line in report.lines():
        say(f"  {line}")
    return report


def overload(queue: int = 200, factor: int = 10, seed: int = 0, say=print) -> ChaosReport:
    """``factor`` times what the queue holds, at once: the excess is answered Overloaded,
    everything accepted is answered correctly, the scheduler's memory stays bounded."""
    import runtime

    with tempfile.TemporaryDirectory(prefix="fanout-chaos-") as tmp:
        models = _models(Path(tmp))
        config = Path(tmp) / "overload.yaml"
        config.write_text(textwrap.dedent(CHAOS_CONFIG.format(
            max_queue=queue, hang=0.002, add=models["add"])))
        with runtime.start(config) as cluster:
            report = _fan_out(cluster, cluster.client(), queue * factor, seed)
    say(f"\n{factor}x overload ({queue * factor} tasks at once, a queue of {queue}):")
    for line in report.lines():
        say(f"  {line}")
    return report


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it died meanwhile: the scheduler restarts it


def bench_chaos(quick: bool = False) -> int:
    print(f"fanout bench chaos on {hardware()}")
    killed = kill_and_stop(300 if quick else CHAOS_TASKS)
    loaded = overload(factor=10)
    bad_chaos = [f"{name}: {r.wrong} wrong, {r.unmatched} answered twice, errors {r.errors}"
                 for name, r, allowed in (("kill and stop", killed, set()),
                                          ("overload", loaded, {"overloaded"}))
                 if r.wrong or r.unmatched or set(r.errors) - allowed
                 or r.correct + sum(r.errors.values()) != r.tasks]
    import importlib.util

    from .hosts import missing

    why = missing() or (None if importlib.util.find_spec("ray") else
                        "needs Ray: pip install 'fanout-runtime[ray]'")
    if why is None:
        lost = lost_host(600 if quick else LOST_HOST_TASKS, wait_node_s=120)
        bad_chaos += [f"a host lost: {line}" for line in _host_loss_faults(lost, 120)]
    else:
        print(f"\na host lost mid fan-out: not run ({why})")
    reports = fuzz_sockets(300 if quick else FUZZ_MESSAGES)
    bad = [f"{name}: {r.crashed or ''} {r.internal_errors} internal errors"
           for name, r in reports.items() if r.crashed or r.internal_errors]
    unheard = [f"{name}: {row.peer.label} got {row.count.replies} replies"
               for name, r in reports.items() for row in r.rows
               if not row.peer.heard and row.count.replies]
    for line in bad_chaos + bad + unheard:
        print(f"FAILED: {line}")
    return 1 if bad_chaos or bad or unheard else 0


LOST_HOST_TASKS = 3_000
LOST_HOST_CONFIG = """
    scheduler: {{task_timeout_s: 120, heartbeat_interval_s: 0.5,
                heartbeat_timeout_s: {heartbeat_timeout}}}
    devices:
      - {{name: cpu, kind: cpu, backend: onnxruntime, capacity: 2, per_node: true,
          faults: {{hang_s: {hang}}}}}
    models:
      - {{name: add, source: {add}}}
"""
# The client of the drill, run on the head's host: ``runtime.connect("auto")`` (through Ray,
# at RAY_ADDRESS), a checked fan-out, a line per tenth done, the figures as one JSON line, and
# then a last line with the time: what follows it is the process's own exit.
LOST_HOST_CLIENT = """
import collections, json, sys, time
import numpy as np
import runtime
tasks = int(sys.argv[1])
client = runtime.connect("auto", timeout=30)
rng = np.random.default_rng(0)
inputs = [{"a": rng.standard_normal(4).astype(np.float32),
           "b": rng.standard_normal(4).astype(np.float32)} for _ in range(tasks)]
futures = [client.submit("add", x, timeout=120) for x in inputs]
print("submitted", flush=True)
out = {"correct": 0, "wrong": 0, "errors": {}, "served": collections.Counter(),
       "lost_attempts": 0, "lost_devices": []}
lost = set()
for i, (x, f) in enumerate(zip(inputs, futures), 1):
    try:
        r = f.result(timeout=180)
    except Exception as exc:
        kind = getattr(exc, "kind", type(exc).__name__)
        out["errors"][kind] = out["errors"].get(kind, 0) + 1
    else:
        ok = np.allclose(next(iter(r.outputs.values())), x["a"] + x["b"])
        out["correct" if ok else "wrong"] += 1
        out["served"][r.device] += 1
        for a in r.attempts:
            if a.kind == "worker_lost":
                out["lost_attempts"] += 1
                lost.add(a.device)
    if i % max(1, tasks // 10) == 0:
        print(f"done {i}", flush=True)
out["lost_devices"] = sorted(lost)
out["unmatched"] = client.unmatched
out["workers"] = [[w["device"], w["state"]] for w in client.status()["workers"]]
print(json.dumps(out), flush=True)
print(f"last {time.time()}", flush=True)
"""


@dataclass
class HostLossReport:
    tasks: int
    correct: int = 0
    wrong: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    unmatched: int = 0
    served: dict[str, int] = field(default_factory=dict)
    lost_attempts: int = 0  # "worker_lost" attempts: the tasks re-run elsewhere
    lost_devices: list[str] = field(default_factory=list)
    workers: list[list[str]] = field(default_factory=list)  # [device, state] after the fan-out
    cut_at_done: int = 0  # tasks done when the link was cut
    seconds: float = 0.0  # from the cut to the client's last line
    exit_s: float | None = None  # from the client's last line to its exit; None: never exited
    up_exit_s: float | None = None  # from `fanout down`'s return to `fanout up`'s exit
    head_left: int = 0  # Fanout's actor processes on the head 15 s after `fanout up` exited
    node_clear_s: float | None = None  # from the cut until none is left on the cut-off host
    log: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        exit_ = "never" if self.exit_s is None else f"{self.exit_s:.1f} s after its last line"
        return [f"{self.tasks} tasks, the link cut after {self.cut_at_done}: {self.correct} "
                f"correct, {self.wrong} wrong, errors {self.errors or 'none'}, answered twice "
                f"{self.unmatched}; served {self.served}",
                f"{self.lost_attempts} tasks re-run after their worker was lost "
                f"({', '.join(self.lost_devices) or 'none'}); the last answer "
                f"{self.seconds:.1f} s after the cut; workers after: {self.workers}",
                f"the client (runtime.connect('auto')) exited {exit_}; `fanout up` "
                f"{'never exited' if self.up_exit_s is None else 'exited'} after `fanout down`, "
                f"leaving {self.head_left} Fanout processes on the head; on the cut-off host "
                f"they " + ("were not waited for" if self.node_clear_s is None else
                           f"were gone {self.node_clear_s:.0f} s after the cut")]


def lost_host(tasks: int = LOST_HOST_TASKS, hang: float = 0.01, cut_after: float = 0.2,
              exit_within: float = 30.0, wait_node_s: float = 0.0,
              heartbeat_timeout: float = 5.0, say=print) -> HostLossReport:
    """A Ray cluster over two hosts (``hosts.TwoHosts``), ``fanout up --ray`` with a CPU
    worker on each, a client on the head's host fanning out ``tasks`` checked additions; the
    node's link is cut once ``cut_after`` of them are done. Every task must be answered once,
    correctly, the lost ones re-run on the head; and the client must then exit on its own
    (it waits ``exit_within`` s for that, then kills it). After `fanout down`, `fanout up`
    must exit and leave no Fanout process on the head; with ``wait_node_s``, the cut-off
    host's must end by themselves within that long of the cut (the worker exits once the
    scheduler is silent; the actor's process once its raylet gives up on the head)."""
    import json
    import queue
    import sys

    from .hosts import TwoHosts

    report = HostLossReport(tasks)
    fanout = [sys.executable, "-m", "runtime.cli"]
    with TwoHosts() as hosts, tempfile.TemporaryDirectory(prefix="fanout-chaos-") as tmp:
        folder = Path(tmp)
        config = folder / "hosts.yaml"
        config.write_text(textwrap.dedent(LOST_HOST_CONFIG.format(
            hang=hang, heartbeat_timeout=heartbeat_timeout, add=_models(folder)["add"])))
        env = hosts.env(FANOUT_HOME=str(folder / "home"), PYTHONUNBUFFERED="1")
        hosts.start_ray()
        up = hosts.popen(hosts.head, [*fanout, "up", "--ray", "--config", str(config),
                                      "--address", hosts.ray_address, "--no-http"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: queue.Queue[str | None] = queue.Queue()
        client = None
        try:
            _follow(up.stdout, lines, report.log, "up")
            _expect(lines, "ready:", 180, report.log)
            client = hosts.popen(hosts.head, [sys.executable, "-c", LOST_HOST_CLIENT,
                                              str(tasks)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
            said: queue.Queue[str | None] = queue.Queue()
            _follow(client.stdout, said, report.log, "client")
            cut_at = None
            last = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                line = said.get(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    break
                if line.startswith("done ") and cut_at is None \
                        and int(line.split()[1]) >= tasks * cut_after:
                    report.cut_at_done = int(line.split()[1])
                    cut_at = hosts.cut()
                elif line.startswith("{"):
                    vars(report).update({k: v for k, v in json.loads(line).items()
                                         if k in vars(report)})
                elif line.startswith("last "):
                    last = float(line.split()[1])
                    break
            if last is not None:
                report.seconds = last - (cut_at or last)
                try:
                    client.wait(exit_within)
                    report.exit_s = time.time() - last
                except subprocess.TimeoutExpired:
                    report.log.append(_stacks(client.pid))
            down = subprocess.run(hosts.head.argv(*fanout, "down", "--ray", "--address",
                                                  hosts.ray_address, "--timeout", "30"),
                                  env=env, capture_output=True, text=True, timeout=90)
            report.log.append(f"[down] {down.stdout.strip()} {down.stderr.strip()[-500:]}")
            downed = time.time()
            try:
                up.wait(60)
                report.up_exit_s = time.time() - downed
            except subprocess.TimeoutExpired:
                report.log.append(_stacks(up.pid, "up"))
            report.head_left = _settle(lambda: len(_fanout_pids(hosts.head)), 15.0)
            if wait_node_s and cut_at is not None:
                if _settle(lambda: len(_fanout_pids(hosts.node)),
                           max(0.0, cut_at + wait_node_s - time.time())) == 0:
                    report.node_clear_s = time.time() - cut_at
        finally:
            for proc in (client, up):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
    say("\na host lost mid fan-out (two network namespaces, Ray over a veth pair):")
    for line in report.lines():
        say(f"  {line}")
    return report


def _host_loss_faults(r: HostLossReport, wait_node_s: float) -> list[str]:
    """What went wrong in a ``lost_host`` drill (nothing, if all is well)."""
    faults = []
    if r.wrong or r.unmatched or r.errors or r.correct != r.tasks:
        faults.append(f"{r.wrong} wrong, {r.unmatched} answered twice, errors {r.errors}, "
                      f"{r.correct} of {r.tasks} correct")
    if not r.lost_attempts:
        faults.append("no task was re-run: the link was cut too late to test anything")
    if r.exit_s is None:
        faults.append("the client never exited")
    if r.up_exit_s is None:
        faults.append("`fanout up` did not exit after `fanout down`")
    if r.head_left:
        faults.append(f"{r.head_left} Fanout processes left on the head")
    if wait_node_s and r.node_clear_s is None:
        faults.append(f"Fanout processes still on the cut-off host {wait_node_s:g} s on")
    return faults


def _follow(stream, into, log: list[str], who: str) -> None:
    """Read a process's lines on a thread into ``into`` (None at its end) and ``log``."""
    def read() -> None:
        for line in stream:
            log.append(f"[{who}] {line.rstrip()}")
            into.put(line.strip())
        into.put(None)

    threading.Thread(target=read, daemon=True).start()


def _expect(lines, prefix: str, timeout: float, log: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            break
        if prefix in line:
            return
    raise RuntimeError(f"no {prefix!r} within {timeout:g} s:\n" + "\n".join(log[-30:]))


def _stacks(pid: int, who: str = "client") -> str:
    """Where a process that should have exited waits (py-spy, if it is installed)."""
    import shutil
    spy = shutil.which("py-spy")
    if spy is None:
        return f"[{who}] still alive; no py-spy to show where it waits"
    done = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                          timeout=60)
    return f"[{who}] still alive:\n" + done.stdout[-6000:] + done.stderr[-1000:]


def _settle(count, within: float) -> int:
    """``count()`` once it is 0, or when ``within`` s are up."""
    deadline = time.monotonic() + within
    while (n := count()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return n


def _fanout_pids(host) -> list[int]:
    """The processes of Fanout's actors (the scheduler's, the workers') on ``host``."""
    return [pid for pid in host.pids()
            if any(name in _cmdline(pid) for name in ("SchedulerActor", "DeviceWorker"))]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
