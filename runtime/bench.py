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


BENCHES = {"llm": bench_llm, "minilm": bench_minilm}
