"""``fanout bench minilm``: 512 MiniLM tasks through ``map()`` against a bare in-process loop."""
from __future__ import annotations

import os
import time

import numpy as np

import runtime

from .. import env
from ..launchers.models import fetch
from .common import cluster_config, hardware


def bench_minilm(n: int = 512) -> int:
    import onnxruntime as ort

    path = str(fetch("minilm", env.home(), print))
    rng = np.random.default_rng(0)
    batch = []
    for _ in range(n):
        ids = rng.integers(1000, 30000, size=(1, 16), dtype=np.int64)
        batch.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    print(f"fanout bench minilm: {n} MiniLM tasks [1, 16]\nhardware: {hardware()}\n")
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    session.run(None, batch[0])
    started = time.perf_counter()
    for x in batch:
        session.run(None, x)
    direct = time.perf_counter() - started

    config_path = cluster_config(f"""
        scheduler: {{address: "tcp://127.0.0.1:0"}}
        devices:
          - {{name: cpu0, kind: cpu, backend: onnxruntime, capacity: {os.cpu_count() or 1}}}
        models:
          - {{name: minilm, source: "{path}", devices: [cpu0]}}
    """)
    with runtime.start(config_path) as cluster:
        client = cluster.client()
        client.map("minilm", batch[:8])  # warm up
        started = time.perf_counter()
        client.map("minilm", batch)
        fanned = time.perf_counter() - started
    print(f"{'':<40} {'total s':>8} {'tasks/s':>9}")
    print(f"{'in-process session, one after another':<40} {direct:8.2f} {n / direct:9.1f}")
    print(f"{'fanout runtime, map() over one worker':<40} {fanned:8.2f} {n / fanned:9.1f}")
    print(f"\nruntime / in-process time: {fanned / direct:.2f}x "
          f"(the cost of processes, sockets and scheduling per task: "
          f"{(fanned - direct) / n * 1000:.2f} ms)")
    return 0
