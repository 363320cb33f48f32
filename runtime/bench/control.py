"""Issue 13 item 6 in ``fanout bench llm``: does control wait behind the engine?

Two measures during a 64-stream burst:
- in one process, a 5 ms ticker thread beside an openvino-genai session, with the engine in
  its own process (the default) and on a thread of this process (``engine_process: false``):
  the longest gap is how long a worker's heartbeat or status reply could wait;
- through a cluster, the round trip of ``status()`` while the burst runs, and whether the
  worker was lost or restarted for silence.
"""
from __future__ import annotations

import threading
import time

from ..backends.base import CancelToken, ModelSpec
from ..backends.genai import GenAIBackend
from ..wire.generation import read_request
from .common import pct
from .fanouts import fan_out


def ticker_gaps(path: str, engine_process: bool, streams: int = 64,
                tokens: int = 32) -> list[float]:
    backend = GenAIBackend("CPU", {"engine_process": engine_process})
    session = backend.load(ModelSpec("smollm2", path), lambda _note: None)
    gaps: list[float] = []
    done = threading.Event()

    def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last - 0.005)
            last = now

    def one(i: int) -> None:
        request = read_request({"messages": [{"role": "user", "content": f"Count to {i}."}],
                                "max_tokens": tokens, "ignore_eos": True})
        session.generate(request, lambda _delta: None, CancelToken())

    try:
        ticker = threading.Thread(target=tick)
        ticker.start()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        ticker.join()
    finally:
        backend.close()
    return gaps


def status_during(cluster, client, model: str, chats: list, tokens: int) -> dict:
    """``status()`` round trips while ``chats`` stream, and the worker's losses after."""
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            t0 = time.perf_counter()
            cluster.status()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        load = fan_out(client, model, chats, tokens)
    finally:
        done.set()
        poller.join()
    workers = cluster.status()["workers"]
    return {"p50_ms": pct(latencies, 50) * 1000, "max_ms": max(latencies) * 1000,
            "samples": len(latencies), "load": load,
            "lost": sum(w["lost"] for w in workers), "restarts": sum(w["restarts"]
                                                                   for w in workers)}


def report(path: str, burst: dict) -> None:
    print(f"\ncontrol during a {len(burst['load'].ttfts)}-stream burst (issue 13 item 6, "
          f"target: answered within 100 ms, no worker lost):")
    print(f"  status() round trip through the cluster: p50 {burst['p50_ms']:.1f} ms, max "
          f"{burst['max_ms']:.1f} ms over {burst['samples']} calls; workers lost "
          f"{burst['lost']}, restarted {burst['restarts']}")
    for engine_process in (True, False):
        gaps = ticker_gaps(path, engine_process)
        where = ("engine process (default)" if engine_process else
                 "engine thread in the worker (engine_process: false)")
        print(f"  a 5 ms ticker beside the session, {where}: longest wait "
              f"{max(gaps) * 1000:.0f} ms, p99 {pct(gaps, 99) * 1000:.0f} ms")
