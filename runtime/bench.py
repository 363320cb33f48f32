"""``fanout bench``: throughput and latency against in-process baselines measured in the same run.

These machines are shared and noisy, so every figure is printed next to a baseline taken
moments before, as a ratio, with the hardware it ran on.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np

LLM_PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is two plus two?",
    "Give me a tip for learning Python.",
    "What do bees make?",
    "Describe a cat in one sentence.",
]


def hardware() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _row(name: str, total: float, tokens: int, ttfts: list[float], base: float | None) -> str:
    ratio = f"{base / total:5.2f}x" if base else "  1.00x"
    ttft = (f"{statistics.median(ttfts) * 1000:8.0f} {_pct(ttfts, 95) * 1000:8.0f}"
            if ttfts else f"{'n/a':>8} {'n/a':>8}")
    return f"{name:<44} {total:8.2f} {tokens / total:9.1f} {ttft}  {ratio}"


def _cluster_config(text: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="fanout-bench-")) / "bench.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def bench_llm(tokens: int = 64, n: int = 8) -> int:
    import openvino_genai as ov_genai

    import runtime
    from runtime.backends.genai import CPU_EXACT_PROPERTIES
    from runtime.models import fetch, model_home

    path = str(fetch("smollm2", model_home(), print))
    prompts = [LLM_PROMPTS[i % len(LLM_PROMPTS)] for i in range(n)]
    print(f"fanout bench llm: {n} chat requests x {tokens} new tokens (end of sequence "
          f"ignored), SmolLM2-135M Q4_1 on CPU, greedy, numerics {CPU_EXACT_PROPERTIES}\n"
          f"hardware: {hardware()}\n")

    # The baselines use the numerics the runtime's CPU workers use (batch-independent, so a
    # batched sequence equals its run alone); OpenVINO's faster defaults are shown apart.
    pipe = ov_genai.LLMPipeline(path, "CPU", **CPU_EXACT_PROPERTIES)
    tok = pipe.get_tokenizer()
    chats = [tok.apply_chat_template([{"role": "user", "content": p}],
                                     add_generation_prompt=True) for p in prompts]
    config = ov_genai.GenerationConfig(max_new_tokens=tokens, ignore_eos=True, do_sample=False)
    pipe.generate(chats[0], config)  # warm up

    # 1. one after another in one in-process pipeline, streaming to time the first token
    ttfts: list[float] = []
    started = time.perf_counter()
    for chat in chats:
        t0 = time.perf_counter()
        first: list[float] = []

        def streamer(_text, first=first, t0=t0):
            if not first:
                first.append(time.perf_counter() - t0)
            return ov_genai.StreamingStatus.RUNNING

        pipe.generate(chat, config, streamer=streamer)
        ttfts.append(first[0] if first else float("nan"))
    sequential = time.perf_counter() - started
    seq_ttft = ttfts

    # 2. all at once in one in-process pipeline call (no per-request streaming for a batch)
    started = time.perf_counter()
    pipe.generate(chats, config)
    batched = time.perf_counter() - started
    del pipe
    fast = ov_genai.LLMPipeline(path, "CPU")
    fast.generate(chats[0], config)
    started = time.perf_counter()
    fast.generate(chats, config)
    batched_default = time.perf_counter() - started
    del fast

    # 3. fanned out through the runtime: one CPU worker batching up to n sequences
    config_path = _cluster_config(f"""
        scheduler: {{address: "tcp://127.0.0.1:0"}}
        devices:
          - {{name: cpu0, kind: cpu, backend: openvino-genai, capacity: {n}}}
        models:
          - {{name: smollm2, source: "{path}", devices: [cpu0]}}
    """)
    with runtime.start(config_path) as cluster:
        client = cluster.client()
        client.generate("smollm2", prompts[0], max_tokens=8)  # warm up
        run_ttfts: list[float] = []

        def one(prompt: str) -> int:
            t0 = time.perf_counter()
            count = 0
            for chunk in client.stream("smollm2", [{"role": "user", "content": prompt}],
                                       max_tokens=tokens, ignore_eos=True):
                if chunk.text and count == 0:
                    run_ttfts.append(time.perf_counter() - t0)
                    count = 1
                if chunk.usage:
                    return chunk.usage["completion_tokens"]
            return 0

        counts: list[int] = []
        started = time.perf_counter()
        threads = [threading.Thread(target=lambda p=p: counts.append(one(p))) for p in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fanned = time.perf_counter() - started
    total_tokens = n * tokens
    assert sum(counts) == total_tokens, f"expected {total_tokens} tokens, got {sum(counts)}"

    print(f"{'':<44} {'total s':>8} {'tokens/s':>9} {'TTFT ms':>8} {'p95 ms':>8}  "
          f"vs one-after-another")
    print(_row("in-process, one after another", sequential, total_tokens, seq_ttft, None))
    print(_row("in-process, batched in one call", batched, total_tokens, [], sequential))
    print(_row("  (the same with OpenVINO's default numerics)", batched_default, total_tokens,
               [], sequential))
    print(_row("fanout runtime, fanned out (streaming)", fanned, total_tokens, run_ttfts,
               sequential))
    print(f"\nruntime vs one after another: {sequential / fanned:.2f}x faster (target >= 4x)")
    print(f"runtime vs in-process batched call: {fanned / batched:.2f}x the time "
          f"(target <= 1.15x); vs the default-numerics call: {fanned / batched_default:.2f}x")
    return 0


def bench_minilm(n: int = 512) -> int:
    import onnxruntime as ort

    import runtime
    from runtime.models import fetch, model_home

    path = str(fetch("minilm", model_home(), print))
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

    config_path = _cluster_config(f"""
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


def bench_http(tokens: int = 64, n: int = 16, rounds: int = 3) -> int:
    """The HTTP API's cost: the same n streaming chats through it and through the Python
    client, against one ``fanout up`` (the server in the scheduler's process, as deployed),
    alternating, so both see the same machine state."""
    import asyncio
    import json
    import signal
    import socket
    import subprocess
    import sys

    import aiohttp

    import runtime
    from runtime.models import fetch, model_home

    path = str(fetch("smollm2", model_home(), print))
    chats = [[{"role": "user", "content": LLM_PROMPTS[i % len(LLM_PROMPTS)]}] for i in range(n)]
    print(f"fanout bench http: {n} concurrent streaming chats x {tokens} new tokens (end of "
          f"sequence ignored), SmolLM2-135M Q4_1 on one CPU worker batching {n}, greedy; "
          f"{rounds} rounds each, alternating; `fanout up` serves both paths\n"
          f"hardware: {hardware()}\n")
    config_path = _cluster_config(f"""
        devices:
          - {{name: cpu0, kind: cpu, backend: openvino-genai, capacity: {n}}}
        models:
          - {{name: smollm2, source: "{path}", devices: [cpu0]}}
    """)

    async def via_client(client, chat) -> tuple[float, int]:
        t0, ttft = time.perf_counter(), float("nan")
        async for chunk in client.astream("smollm2", chat, max_tokens=tokens, ignore_eos=True):
            if chunk.text and ttft != ttft:
                ttft = time.perf_counter() - t0
            if chunk.usage:
                return ttft, chunk.usage["completion_tokens"]
        return ttft, 0

    async def via_http(session, url, chat) -> tuple[float, int]:
        t0, ttft = time.perf_counter(), float("nan")
        body = {"model": "smollm2", "messages": chat, "max_tokens": tokens, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{url}/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    return ttft, event["usage"]["completion_tokens"]
                if ttft != ttft and event["choices"] and event["choices"][0]["delta"].get(
                        "content"):
                    ttft = time.perf_counter() - t0
        return ttft, 0

    async def fan_out(one, chats) -> tuple[float, list[float]]:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(c) for c in chats))
        total = time.perf_counter() - started
        counted = sum(count for _, count in results)
        assert counted == len(chats) * tokens, f"expected {len(chats) * tokens} tokens, " \
                                               f"got {counted}"
        return total, [ttft for ttft, _ in results]

    async def run(address: str, url: str) -> tuple[dict, dict]:
        client = await runtime.AsyncClient(address).connect()
        figures: dict[str, list] = {"client": [], "http": []}
        alone: dict[str, list] = {"client": [], "http": [], "status": []}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as session:
            paths = {"client": lambda c: via_client(client, c),
                     "http": lambda c: via_http(session, url, c)}
            for one in paths.values():  # warm up: connections, the engine's first batch
                await fan_out(one, chats)
            for _ in range(rounds):
                for name, one in paths.items():
                    figures[name].append(await fan_out(one, chats))
            for chat in chats:  # one request at a time: the per-request cost alone
                for name, one in paths.items():
                    alone[name] += (await fan_out(one, [chat]))[1]
            for _ in range(50):  # the front door alone: a status round trip with and without
                t0 = time.perf_counter()
                await client.astatus()
                t1 = time.perf_counter()
                async with session.get(url.removesuffix("/v1") + "/health/ready") as r:
                    await r.read()
                alone["status"].append((t1 - t0, time.perf_counter() - t1))
        await client.close()
        return figures, alone

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    address, http = f"tcp://127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", "--config",
                           str(config_path), "--address", address, "--http", http],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in up.stdout:
            if "ready:" in line:
                break
        else:
            raise RuntimeError(f"fanout up exited with code {up.wait()} before it was ready")
        later: list[str] = []  # keep the pipe drained; worker restarts are worth showing
        threading.Thread(target=lambda: later.extend(up.stdout), daemon=True).start()
        figures, alone = asyncio.run(run(address, f"http://{http}/v1"))
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
    for line in later:
        if "killing" in line or "exited" in line:
            print(f"note, from fanout up: {line.strip()}")

    def summary(name: str) -> tuple[float, float]:
        totals = [total for total, _ in figures[name]]
        ttfts = [statistics.median(t) for _, t in figures[name]]
        return statistics.median(totals), statistics.median(ttfts)

    rows = {"client": "Python client (AsyncClient.astream)",
            "http": "HTTP API (aiohttp SSE client)"}
    print(f"{'':<38} {'total s':>8} {'tokens/s':>9} {'TTFT ms':>8} {'alone':>7}   "
          f"rounds: total s / TTFT ms")
    for name, label in rows.items():
        total, ttft = summary(name)
        per_round = ", ".join(f"{t:.2f}/{statistics.median(f) * 1000:.0f}"
                              for t, f in figures[name])
        print(f"{label:<38} {total:8.2f} {n * tokens / total:9.1f} {ttft * 1000:8.1f} "
              f"{statistics.median(alone[name]) * 1000:7.1f}   {per_round}")
    (direct, direct_ttft), (http_total, http_ttft) = summary("client"), summary("http")
    print(f"\nHTTP / Python client total time: {http_total / direct:.3f}x (target <= 1.10x)")
    print(f"HTTP - Python client median TTFT: {(http_ttft - direct_ttft) * 1000:+.1f} ms "
          f"with {n} at once, "
          f"{(statistics.median(alone['http']) - statistics.median(alone['client'])) * 1000:+.1f}"
          f" ms one at a time (target <= 5 ms)")
    direct_s = statistics.median(a for a, _ in alone["status"]) * 1000
    http_s = statistics.median(b for _, b in alone["status"]) * 1000
    print(f"a status round trip: {direct_s:.2f} ms from the Python client, {http_s:.2f} ms "
          f"through GET /health/ready: the HTTP front door adds {http_s - direct_s:.2f} ms")
    return 0


def bench_scale(**options) -> int:
    from .bench_scale import bench_scale as run  # imports Ray, which only this kind needs
    return run(**options)


BENCHES = {"llm": bench_llm, "minilm": bench_minilm, "http": bench_http, "scale": bench_scale}
