"""``fanout bench minilm``: 512 MiniLM texts through ``map()`` against a bare in-process loop.

In each round, one after another on the same machine state: the floor, a bare in-process
onnxruntime loop of single runs (``INTRA_OP_THREADS`` threads, as the worker's sessions get);
the same texts in-process in batches of ``BATCH`` (what batching can gain); and ``map()``
through a cluster of one onnxruntime CPU worker that batches (``max_batch: BATCH``) and
prefetches. Target: ``map()`` no slower than the bare loop. Then the batch sizes the worker
ran, from the cluster's status. The machine is shared: medians of the rounds, load shown.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

import runtime

from .. import env
from ..launchers.models import fetch
from .common import cluster_config, hardware
from .overhead import load

SEQ = 24  # tokens per text
BATCH = 16
INTRA_OP_THREADS = 2
ROUNDS = 3


def bench_minilm(n: int = 512, rounds: int = ROUNDS) -> int:
    import onnxruntime as ort

    path = str(fetch("minilm", env.home(), print))
    rng = np.random.default_rng(0)
    texts = []
    for _ in range(n):
        ids = rng.integers(1000, 30000, size=(1, SEQ), dtype=np.int64)
        texts.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    print(f"fanout bench minilm: {n} MiniLM texts of {SEQ} tokens; {rounds} rounds, medians\n"
          f"hardware: {hardware()}; onnxruntime {ort.__version__}; {load()} at the start\n",
          flush=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = INTRA_OP_THREADS
    session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    session.run(None, texts[0])
    batched_inputs = [{k: np.concatenate([t[k] for t in texts[i:i + BATCH]])
                       for k in texts[0]} for i in range(0, n, BATCH)]
    config_path = cluster_config(f"""
        scheduler: {{address: "tcp://127.0.0.1:0"}}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1,
              options: {{intra_op_num_threads: {INTRA_OP_THREADS}}}}}
        models:
          - {{name: minilm, source: "{path}", devices: [cpu0],
              options: {{cpu0: {{max_batch: {BATCH}}}}}}}
    """)
    loop, batched, fanned = [], [], []
    with runtime.start(config_path) as cluster:
        client = cluster.client()
        client.map("minilm", texts[:64])  # warm up
        before = _batches(client)
        for r in range(rounds):
            started = time.perf_counter()
            for x in texts:
                session.run(None, x)
            loop.append(time.perf_counter() - started)
            started = time.perf_counter()
            for x in batched_inputs:
                session.run(None, x)
            batched.append(time.perf_counter() - started)
            started = time.perf_counter()
            client.map("minilm", texts)
            fanned.append(time.perf_counter() - started)
            print(f"  round {r + 1}: loop {loop[-1]:.3f} s, in-process batches "
                  f"{batched[-1]:.3f} s, map() {fanned[-1]:.3f} s ({load()})", flush=True)
        after = _batches(client)
    direct, grouped, through = (statistics.median(v) for v in (loop, batched, fanned))
    print(f"\n{'':<48} {'total s':>8} {'texts/s':>9} {'vs loop':>8}")
    print(f"{'in-process loop of single runs (floor)':<48} {direct:8.3f} {n / direct:9.1f} "
          f"{1.0:7.2f}x")
    print(f"{f'in-process, batches of {BATCH}':<48} {grouped:8.3f} {n / grouped:9.1f} "
          f"{grouped / direct:7.2f}x")
    print(f"{f'fanout map(), one worker batching <= {BATCH}':<48} {through:8.3f} "
          f"{n / through:9.1f} {through / direct:7.2f}x  target <= 1.00x: "
          f"{'met' if through <= direct else 'NOT met'}")
    sizes = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    tasks = sum(sizes.values())
    print(f"\nbatch sizes the worker ran over the {rounds} map() rounds (size: tasks, calls):")
    for size in sorted((k for k, v in sizes.items() if v), key=int):
        print(f"  {size:>4}: {sizes[size]:6} tasks {sizes[size] // int(size):5} calls "
              f"({sizes[size] * 100 / max(1, tasks):.0f}% of tasks)")
    print(f"\n{load()} at the end (2 cores: figures move with what else runs)")
    return 0


def _batches(client: runtime.Client) -> dict[str, int]:
    status = client.cluster_status()
    return dict(status.worker("cpu0").models["minilm"].batches)
