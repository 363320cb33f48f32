"""``fanout bench chaos``: the cluster under attack and under faults, with the figures.

``fuzz_sockets``: 10,000 fuzzed messages on each socket (the client one, the worker one)
from peers without credentials, with the wrong ones (a client's on the worker socket) and
with the right ones, against clusters with keys, with a token and with neither; then the
crashes (processes that died or restarted: should be none), the exceptions the scheduler had
to catch (should be none), its memory, and a checked fan-out after it all.
"""
from __future__ import annotations

import tempfile
import textwrap
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


def bench_chaos(quick: bool = False) -> int:
    print(f"fanout bench chaos on {hardware()}")
    reports = fuzz_sockets(300 if quick else FUZZ_MESSAGES)
    bad = [f"{name}: {r.crashed or ''} {r.internal_errors} internal errors"
           for name, r in reports.items() if r.crashed or r.internal_errors]
    unheard = [f"{name}: {row.peer.label} got {row.count.replies} replies"
               for name, r in reports.items() for row in r.rows
               if not row.peer.heard and row.count.replies]
    for line in bad + unheard:
        print(f"FAILED: {line}")
    return 1 if bad or unheard else 0
