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
"""
from __future__ import annotations

import os
import random
import signal
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
    reports = fuzz_sockets(300 if quick else FUZZ_MESSAGES)
    bad = [f"{name}: {r.crashed or ''} {r.internal_errors} internal errors"
           for name, r in reports.items() if r.crashed or r.internal_errors]
    unheard = [f"{name}: {row.peer.label} got {row.count.replies} replies"
               for name, r in reports.items() for row in r.rows
               if not row.peer.heard and row.count.replies]
    for line in bad_chaos + bad + unheard:
        print(f"FAILED: {line}")
    return 1 if bad_chaos or bad or unheard else 0
