"""``fanout bench llm``: 8 chats x 64 tokens through the runtime against the engine in-process."""
from __future__ import annotations

import threading
import time

import runtime

from .. import env
from ..backends.genai import DETERMINISTIC_PROPERTIES
from ..launchers.models import fetch
from .common import LLM_PROMPTS, cluster_config, hardware, row
from .constrained import bench_constrained, bench_tool_use


def bench_llm(tokens: int = 64, n: int = 8) -> int:
    import openvino_genai as ov_genai

    path = str(fetch("smollm2", env.home(), print))
    prompts = [LLM_PROMPTS[i % len(LLM_PROMPTS)] for i in range(n)]
    print(f"fanout bench llm: {n} chat requests x {tokens} new tokens (end of sequence "
          f"ignored), SmolLM2-135M Q4_1 on CPU, greedy, numerics {DETERMINISTIC_PROPERTIES}\n"
          f"hardware: {hardware()}\n")

    # The baselines use the numerics the runtime's CPU workers use (batch-independent, so a
    # batched sequence equals its run alone); OpenVINO's faster defaults are shown apart.
    pipe = ov_genai.LLMPipeline(path, "CPU", **DETERMINISTIC_PROPERTIES)
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
    config_path = cluster_config(f"""
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
        bench_constrained(client, "smollm2", prompts, tokens)
        bench_tool_use(client, "smollm2")
    total_tokens = n * tokens
    assert sum(counts) == total_tokens, f"expected {total_tokens} tokens, got {sum(counts)}"

    print(f"{'':<44} {'total s':>8} {'tokens/s':>9} {'TTFT ms':>8} {'p95 ms':>8}  "
          f"vs one-after-another")
    print(row("in-process, one after another", sequential, total_tokens, seq_ttft, None))
    print(row("in-process, batched in one call", batched, total_tokens, [], sequential))
    print(row("  (the same with OpenVINO's default numerics)", batched_default, total_tokens,
               [], sequential))
    print(row("fanout runtime, fanned out (streaming)", fanned, total_tokens, run_ttfts,
               sequential))
    print(f"\nruntime vs one after another: {sequential / fanned:.2f}x faster (target >= 4x)")
    print(f"runtime vs in-process batched call: {fanned / batched:.2f}x the time "
          f"(target <= 1.15x); vs the default-numerics call: {fanned / batched_default:.2f}x")
    return 0
