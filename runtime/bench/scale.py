"""``fanout bench scale``: fan-out throughput over 1, 2, 3 simulated Ray nodes, and the Ray
launcher's data path against the local launcher's, in one run.

One Ray cluster is started once (``ray.cluster_utils``: a head for the schedulers and one node
per device set, all on this machine). Every node hosts the same device, an onnxruntime CPU
worker pinned to it by the custom resource ``fanout_node_<i>``. One Fanout cluster per node
count N runs under the Ray launcher, its config listing the devices of nodes 1..N, all side by
side, so the node counts are measured in alternating rounds against the same machine state;
the 1-node config also runs under the local launcher, for the data-path comparison.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import runtime

from .. import env
from ..backends.onnx_proto import one_node_model
from ..errors import ConfigError
from ..frontdoors.client import Client
from ..launchers.models import fetch
from .common import hardware

NODE_CAPACITY = 2  # a node's worker runs this many tasks at once, one onnxruntime thread each
NOOP_SHAPE = (1, 4)
SEQ = 16
SCHEDULER_NAME = "fanout-bench-scale"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU model"


def _config(nodes: int, noop: Path) -> dict:
    """The devices of nodes 1..``nodes``, each serving ``noop`` and ``minilm``."""
    devices = [{"name": f"node{i}-cpu", "kind": "cpu", "backend": "onnxruntime",
                "capacity": NODE_CAPACITY, "options": {"intra_op_num_threads": 1},
                "resources": {f"fanout_node_{i}": 1}} for i in range(1, nodes + 1)]
    models = [{"name": "noop", "source": str(noop)},
              {"name": "minilm", "source": "packaged:minilm"}]
    return {"scheduler": {"address": "tcp://127.0.0.1:0"}, "devices": devices, "models": models}


def _rate(client: Client, model: str, batch: list) -> tuple[float, collections.Counter]:
    started = time.perf_counter()
    results = client.map(model, batch)
    elapsed = time.perf_counter() - started
    return len(batch) / elapsed, collections.Counter(r.device for r in results)


def bench_scale(tasks: int | None = None, quick: bool = False, nodes: int = 3) -> int:
    if not 1 <= nodes <= 8:
        raise ConfigError(f"--nodes must be 1..8, got {nodes}")
    if tasks is not None and tasks < 1:
        raise ConfigError(f"--tasks must be at least 1, got {tasks}")
    tasks = tasks or (40 if quick else 2000)
    rounds = 1 if quick else 5
    minilm_tasks = max(8, tasks // 4)
    try:  # on SIGTERM, Ray's own handler (set when its head node starts) exits through here
        with contextlib.ExitStack() as cleanup:
            return _run(cleanup, tasks, minilm_tasks, rounds, nodes)
    except KeyboardInterrupt:
        print("fanout bench scale: interrupted; everything it started is shut down",
              file=sys.stderr)
        return 130


def _run(cleanup: contextlib.ExitStack, tasks: int, minilm_tasks: int, rounds: int,
         max_nodes: int) -> int:
    import onnxruntime as ort

    from ..launchers import ray as ray_launcher

    print(f"fanout bench scale: no-op and MiniLM fan-out over 1..{max_nodes} simulated Ray "
          f"nodes, and the Ray launcher's data path vs the local launcher's; {rounds} round(s) "
          f"of {tasks} no-op / {minilm_tasks} MiniLM [1, {SEQ}] tasks per figure, node counts "
          f"alternating, medians\n"
          f"hardware: {hardware()}; CPU: {_cpu_model()}; Ray {ray_launcher.ray_version()}, "
          f"onnxruntime {ort.__version__}", flush=True)
    tmp = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="fanout-bench-scale-")))
    noop = tmp / "noop.onnx"
    noop.write_bytes(one_node_model("Identity", ["x"], NOOP_SHAPE, "noop"))
    fetch("minilm", env.home(), print)
    paths = {}
    for n in range(1, max_nodes + 1):
        paths[n] = tmp / f"nodes-{n}.yaml"
        paths[n].write_text(json.dumps(_config(n, noop)))
    clients = _start(cleanup, paths)

    rng = np.random.default_rng(0)
    batches: dict[str, list[dict[str, np.ndarray]]] = {
        "noop": [{"x": rng.random(NOOP_SHAPE, dtype=np.float32)} for _ in range(tasks)],
        "minilm": []}
    for _ in range(minilm_tasks):
        ids = rng.integers(1000, 30000, size=(1, SEQ), dtype=np.int64)
        batches["minilm"].append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    for kind, batch in batches.items():  # warm up every session and connection
        for client in clients.values():
            client.map(kind, batch[:16])

    rates: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    split: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter)
    labels = list(clients)
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[:r % len(labels)]  # each goes first in turn
        for kind, batch in batches.items():
            for label in order:
                rate, devices = _rate(clients[label], kind, batch)
                rates[kind, label].append(rate)
                split[kind, label].update(devices)

    session = ort.InferenceSession(str(noop), providers=["CPUExecutionProvider"])
    session.run(None, batches["noop"][0])
    started = time.perf_counter()
    for item in batches["noop"]:
        session.run(None, item)
    in_process_us = (time.perf_counter() - started) / tasks * 1e6
    _report(rates, split, in_process_us, max_nodes)
    return 0


def _start(cleanup: contextlib.ExitStack, paths: dict[int, Path]) -> dict[str, Client]:
    """The Ray nodes, a Fanout cluster per node count and the local one; their clients by label
    ("1".."N", "local"). Each part is handed to ``cleanup`` as soon as it exists."""
    from ..launchers.ray import SimulatedNodes

    max_nodes, cores = len(paths), os.cpu_count() or 1
    started = time.monotonic()
    # node i hosts a worker of every cluster of >= i nodes
    SimulatedNodes([{f"fanout_node_{i}": max_nodes} for i in range(1, max_nodes + 1)],
                   cleanup)
    ray_up = time.monotonic() - started
    clusters: dict[str, runtime.ClusterHandle] = {}
    for n, path in paths.items():
        clusters[str(n)] = runtime.start(path, launcher="ray", name=f"{SCHEDULER_NAME}-{n}",
                                         wait=False)
        cleanup.callback(clusters[str(n)].shutdown)
    clusters["local"] = runtime.start(paths[1], launcher="local", wait=False)
    cleanup.callback(clusters["local"].shutdown)
    for cluster in clusters.values():
        cluster.wait_ready_or_shutdown(600.0)
    fanout_up = time.monotonic() - started - ray_up
    print(f"nodes: one Ray cluster started once on this machine in {ray_up:.1f} s: a head (the "
          f"schedulers, no devices) and {max_nodes} device nodes. Each node: one onnxruntime "
          f"CPU worker, capacity {NODE_CAPACITY}, 1 thread per run, pinned by the resource "
          f"fanout_node_<i>. 'N nodes' = a Fanout cluster under the Ray launcher whose config "
          f"has the devices of nodes 1..N; the {max_nodes} clusters and a local-launcher "
          f"cluster of the 1-node config run side by side (up in {fanout_up:.1f} s), idle but "
          f"for the one measured. Ray's worker_niceness is 0 here (Ray's default: 15), as the "
          f"local launcher's processes have.")
    want = max_nodes * NODE_CAPACITY
    print(f"note: the nodes share this machine's {cores} cores with each other, the client, the "
          f"schedulers and the Ray daemons; {max_nodes} nodes x {NODE_CAPACITY} runs at once "
          + (f"would want {want} cores, so throughput cannot grow with the node count here as "
             f"it would on separate machines: the ratios show what adding nodes costs the "
             f"runtime, not hardware scaling.\n" if cores < want else
             f"fit in {cores} cores, but the nodes still share its memory bandwidth.\n"),
          flush=True)
    return {label: cluster.client() for label, cluster in clusters.items()}


def _report(rates: dict, split: dict, in_process_us: float, max_nodes: int) -> None:
    def median(kind: str, label: str) -> float:
        return statistics.median(rates[kind, label])

    titles = {"noop": f"no-op (Identity, float32 {list(NOOP_SHAPE)})",
              "minilm": f"MiniLM (paraphrase-MiniLM-L3-v2, [1, {SEQ}])"}
    for kind, title in titles.items():
        base = median(kind, "1")
        print(f"{title:<44} {'tasks/s':>9} {'vs 1 node':>10}   {'tasks per node':<18} "
              f"rounds (tasks/s)")
        for n in range(1, max_nodes + 1):
            label = str(n)
            counts = split[kind, label]
            shares = "/".join(f"{counts[f'node{i}-cpu'] * 100 // sum(counts.values())}%"
                              for i in range(1, n + 1))
            rounds_text = ", ".join(f"{v:.0f}" for v in rates[kind, label])
            name = f"  Ray launcher, {n} node{'s' if n > 1 else ''}"
            print(f"{name:<44} {median(kind, label):9.1f} {median(kind, label) / base:9.2f}x   "
                  f"{shares:<18} {rounds_text}")
        print()

    print(f"{'data path, 1 node, the same config':<44} {'µs/task':>9} {'tasks/s':>9} "
          f"{'vs local':>9}")
    print(f"{'  no-op, in-process session.run':<44} {in_process_us:9.1f} "
          f"{1e6 / in_process_us:9.1f}")
    for kind, name in (("noop", "no-op"), ("minilm", "MiniLM")):
        local_rate, ray_rate = median(kind, "local"), median(kind, "1")
        print(f"{'  ' + name + ', local launcher':<44} {1e6 / local_rate:9.1f} "
              f"{local_rate:9.1f} {1.0:8.2f}x")
        print(f"{'  ' + name + ', Ray launcher':<44} {1e6 / ray_rate:9.1f} {ray_rate:9.1f} "
              f"{local_rate / ray_rate:8.2f}x")
    print()
    for kind, name in (("noop", "no-op"), ("minilm", "MiniLM")):
        base = median(kind, "1")
        ratios = ", ".join(f"{n} nodes {median(kind, str(n)) / base:.2f}x"
                           for n in range(2, max_nodes + 1))
        print(f"scaling vs 1 node, {name}: {ratios or 'only 1 node measured'}")
    for kind, name in (("noop", "no-op"), ("minilm", "MiniLM")):
        local_us, ray_us = 1e6 / median(kind, "local"), 1e6 / median(kind, "1")
        print(f"Ray / local launcher, {name}: {ray_us / local_us:.2f}x the time per task "
              f"({ray_us - local_us:+.1f} µs/task)")
    print(f"the runtime's own cost per no-op task (local launcher - in-process): "
          f"{1e6 / median('noop', 'local') - in_process_us:.1f} µs")
