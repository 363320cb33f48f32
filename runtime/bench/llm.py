"""``fanout bench llm``: chat fan-outs through the runtime against the engine in-process
(issue 13). SmolLM2-135M on the CPU, greedy, 64 new tokens a chat (end of sequence ignored).

In one run: the engine in-process one request after another and in one batched call at both
numerics; the runtime at 8 and 32 concurrent streams; the 8-way first tokens against the
engine's batched prefill, for the same prompts every round (their blocks cached after the
first; the engine timed, as each runtime round runs, after a round of them in full) and for
prompts not seen before; control during a 64-stream burst; the capacity
sweep; the shared-prefix case with and without prefix caching; constrained decoding and
tool use; and ``llama-server`` as a peer if one is on PATH."""
from __future__ import annotations

import statistics
import time

import runtime

from .. import env
from ..backends.genai import DETERMINISTIC_PROPERTIES
from ..launchers.models import fetch
from . import control, peer
from .common import LLM_PROMPTS, cluster_config, hardware, pct, row
from .constrained import bench_constrained, bench_tool_use, constrained_steps
from .fanouts import Load, best_of, fan_out
from .prefix import bench_prefix

SWEEP = [1, 4, 8, 16, 32]
P95_TOKEN_BOUND_S = 0.1  # a stream slower than 10 tokens/s reads as stalling to a person
# Each engine and runtime figure is the median of this many runs, the same statistic on both
# sides of a ratio (the fastest engine run against the median runtime run, or the slower of
# two, made the runtime look slower than it is).
ROUNDS = 3


def chats_for(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": LLM_PROMPTS[i % len(LLM_PROMPTS)]}] for i in range(n)]


def fresh_chats(n: int, nonce: int) -> list[list[dict]]:
    """``chats_for(n)``, each led by a tag not sent before: prompts whose KV blocks no prefix
    cache holds yet, as each step of an agent sends (``chats_for``'s repeat every round)."""
    return [[{"role": "user", "content": f"(request {nonce}.{i}) {chat[0]['content']}"}]
            for i, chat in enumerate(chats_for(n))]


def as_given(config):
    """``config`` for prompts that are chat-templated already, as every prompt here is (the
    worker templates a chat once, then sends token ids): openvino-genai applies the chat
    template to a text prompt by default, which would template it twice (37 tokens became
    67 here) and time the engine on other prompts than the runtime's."""
    config.apply_chat_template = False
    return config


def engine_rows(path: str, tokens: int, n: int) -> dict[str, float | list[float]]:
    """The engine alone, in this process: what the runtime is measured against."""
    import openvino_genai as ov_genai

    out: dict[str, float | list[float]] = {}
    config = as_given(ov_genai.GenerationConfig(max_new_tokens=tokens, ignore_eos=True,
                                                do_sample=False))
    first_only = as_given(ov_genai.GenerationConfig(max_new_tokens=1, do_sample=False))
    for numerics, props in (("fast", {}), ("deterministic", DETERMINISTIC_PROPERTIES)):
        pipe = ov_genai.LLMPipeline(path, "CPU", **props)
        tok = pipe.get_tokenizer()
        texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats_for(32)]
        pipe.generate(texts[0], config)  # warm up
        out[f"batched {n} {numerics}"] = statistics.median(
            _timed(pipe.generate, texts[:n], config) for _ in range(ROUNDS))
        if numerics == "fast":
            out[f"prefill {n}"] = statistics.median(
                _prefill_after_a_fan_out(pipe, texts[:n], config, first_only)
                for _ in range(ROUNDS))
            fresh = [[tok.apply_chat_template(c, add_generation_prompt=True)
                      for c in fresh_chats(n, 900 + r)] for r in range(ROUNDS)]
            out[f"prefill {n} fresh"] = statistics.median(
                _timed(pipe.generate, texts_r, first_only) for texts_r in fresh)
            out["batched 32 fast"] = statistics.median(
                _timed(pipe.generate, texts, config) for _ in range(ROUNDS))
            ttfts: list[float] = []
            started = time.perf_counter()
            for text in texts[:n]:  # one after another, streaming to time the first token
                t0 = time.perf_counter()
                first: list[float] = []

                def streamer(_text, first=first, t0=t0):
                    if not first:
                        first.append(time.perf_counter() - t0)
                    return ov_genai.StreamingStatus.RUNNING

                pipe.generate(text, config, streamer=streamer)
                ttfts.append(first[0])
            out["sequential"] = time.perf_counter() - started
            out["sequential ttfts"] = ttfts
        del pipe
    return out


def engine_first_tokens(path: str, n: int, tokens: int, rounds: int = 5) -> float:
    """The median over ``rounds`` of the p95 first-token time of ``n`` chats of ``tokens``
    tokens added at once to the engine the CPU worker runs (a ContinuousBatchingPipeline with
    prefix caching, the worker's default), driven in this process by the same ``step()``
    loop: what the runtime's TTFT costs before any message moves. Warmed up first, and each
    round after a round of the same chats in full, as the runtime's rounds are."""
    import openvino_genai as ov_genai

    sched = ov_genai.SchedulerConfig()
    sched.enable_prefix_caching = True
    pipe = ov_genai.ContinuousBatchingPipeline(path, sched, "CPU", {})
    tok = pipe.get_tokenizer()
    texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in chats_for(n)]
    full = as_given(ov_genai.GenerationConfig(max_new_tokens=tokens, ignore_eos=True,
                                              do_sample=False))
    pipe.generate(texts, [full] * n)  # warm up
    p95s = []
    for r in range(rounds):
        started = time.perf_counter()
        handles = [pipe.add_request(r * n + i, text, full) for i, text in enumerate(texts)]
        firsts: dict[int, float] = {}
        while len(firsts) < n and pipe.has_non_finished_requests():
            pipe.step()
            for i, handle in enumerate(handles):
                if i not in firsts and (handle.can_read() or handle.get_status()
                                        != ov_genai.GenerationStatus.RUNNING):
                    firsts[i] = time.perf_counter() - started
        while pipe.has_non_finished_requests():
            pipe.step()
        for handle in handles:
            if handle.can_read():
                handle.read()
        p95s.append(pct(list(firsts.values()), 95))
    del pipe
    return statistics.median(p95s)


def _prefill_after_a_fan_out(pipe, texts: list[str], config, first_only) -> float:
    """The batched prefill of ``texts``, timed from the state each of the runtime's rounds
    starts from: its previous round generated these chats in full, which leaves other blocks
    in the prefix cache than a first-token-only call does (a prefill of 8 took 16-26 ms after
    one, 31-48 ms after a 64-token round, measured in turn on 2026-12-04)."""
    pipe.generate(texts, config)
    return _timed(pipe.generate, texts, first_only)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_llm(tokens: int = 64, n: int = 8) -> int:
    path = str(fetch("smollm2", env.home(), print))
    print(f"fanout bench llm: chat requests x {tokens} new tokens (end of sequence ignored), "
          f"SmolLM2-135M Q4_1 on CPU, greedy; the runtime and the engine at OpenVINO's fast "
          f"numerics (the default) unless a row says otherwise\nhardware: {hardware()}\n")
    engine = engine_rows(path, tokens, n)
    own_first = engine_first_tokens(path, n, tokens)

    config_path = cluster_config(f"""
        scheduler: {{address: "tcp://127.0.0.1:0"}}
        devices:
          - {{name: cpu0, kind: cpu, backend: openvino-genai, capacity: {max(SWEEP)}}}
        models:
          - {{name: smollm2, source: "{path}", devices: [cpu0]}}
          - {{name: smollm2-prefix, source: "{path}", devices: [cpu0],
             options: {{cpu0: {{deterministic: true, warmup: false}}}}}}
          - {{name: smollm2-noprefix, source: "{path}", devices: [cpu0],
             options: {{cpu0: {{deterministic: true, enable_prefix_caching: false,
                               warmup: false}}}}}}
    """)
    with runtime.start(config_path) as cluster:
        client = cluster.client()
        # first, on the fresh worker: 64 streams at once while status is polled
        burst = control.status_during(cluster, client, "smollm2", chats_for(64), tokens)
        client.generate("smollm2", LLM_PROMPTS[0], max_tokens=8)
        fan8 = best_of([fan_out(client, "smollm2", chats_for(n), tokens) for _ in range(ROUNDS)])
        fresh8 = best_of([fan_out(client, "smollm2", fresh_chats(n, 100 + r), tokens)
                          for r in range(ROUNDS)])
        fan32 = best_of([fan_out(client, "smollm2", chats_for(32), tokens)
                         for _ in range(ROUNDS)])
        sweep = {k: best_of([fan_out(client, "smollm2", chats_for(k), tokens)
                             for _ in range(2)]) for k in SWEEP}
        bench_prefix(client)
        bench_constrained(client, "smollm2", LLM_PROMPTS[:n], tokens)
        bench_tool_use(client, "smollm2")
    constrained_steps(path, LLM_PROMPTS[:n], tokens)
    for load, k in ((fan8, n), (fan32, 32)):
        assert load.tokens == k * tokens, f"expected {k * tokens} tokens, got {load.tokens}"

    sequential = float(engine["sequential"])  # type: ignore[arg-type]
    batched = float(engine[f"batched {n} fast"])  # type: ignore[arg-type]
    batched32 = float(engine["batched 32 fast"])  # type: ignore[arg-type]
    prefill = float(engine[f"prefill {n}"])  # type: ignore[arg-type]
    prefill_fresh = float(engine[f"prefill {n} fresh"])  # type: ignore[arg-type]
    print(f"\n{'':<44} {'total s':>8} {'tokens/s':>9} {'TTFT ms':>8} {'p95 ms':>8}  "
          f"vs one-after-another")
    print(row(f"in-process, {n} one after another", sequential, n * tokens,
              engine["sequential ttfts"], None))  # type: ignore[arg-type]
    print(row(f"in-process, {n} in one batched call", batched, n * tokens, [], sequential))
    print(row("  (the same, deterministic numerics)",
              float(engine[f"batched {n} deterministic"]),  # type: ignore[arg-type]
              n * tokens, [], sequential))
    print(row(f"fanout runtime, {n} streams at once", fan8.total_s, fan8.tokens, fan8.ttfts,
              sequential))
    print(row("in-process, 32 in one batched call", batched32, 32 * tokens, [], sequential))
    print(row("fanout runtime, 32 streams at once", fan32.total_s, fan32.tokens, fan32.ttfts,
              sequential))
    print(f"\nruntime vs one after another ({n}): {sequential / fan8.total_s:.2f}x faster "
          f"(target >= 4x)")
    print(f"runtime vs the engine's batched call: {n}-way {fan8.total_s / batched:.2f}x, 32-way "
          f"{fan32.total_s / batched32:.2f}x the time (target <= 1.10x)")
    print(f"first tokens of the {n}-way fan-out: p95 {pct(fan8.ttfts, 95) * 1000:.0f} ms against "
          f"the engine's batched prefill of {prefill * 1000:.0f} ms: "
          f"{pct(fan8.ttfts, 95) / prefill:.2f}x (target <= 1.2x)")
    print(f"  the same {n} chats added at once to the worker's own engine in this process "
          f"(ContinuousBatchingPipeline, prefix caching, a step() loop): first tokens p95 "
          f"{own_first * 1000:.0f} ms, so the runtime's p95 is "
          f"{pct(fan8.ttfts, 95) / own_first:.2f}x its engine's own")
    print(f"  prompts not seen before (a new tag leads each, every round, in both): first "
          f"tokens p95 {pct(fresh8.ttfts, 95) * 1000:.0f} ms against the engine's batched "
          f"prefill of {prefill_fresh * 1000:.0f} ms: {pct(fresh8.ttfts, 95) / prefill_fresh:.2f}x")
    control.report(path, burst)
    _report_sweep(sweep, tokens)
    peer.bench_llama_server(path, chats_for(n), tokens, fan8)
    return 0


def _report_sweep(sweep: dict[int, Load], tokens: int) -> None:
    print(f"\ncapacity sweep (issue 13 item 5): k streams at once into one CPU worker, "
          f"{tokens} tokens each; p95 gap between a stream's chunks (~ time per token)")
    best = max(load.rate for load in sweep.values())
    for k, load in sweep.items():
        print(f"  k={k:<3} {load.rate:7.1f} tokens/s  p95 per token {load.p95_gap_ms():6.1f} ms  "
              f"TTFT p50 {statistics.median(load.ttfts) * 1000:5.0f} ms  "
              f"{load.rate / best:5.2f}x the best")
    fits = [k for k, load in sweep.items() if load.p95_gap_ms() <= P95_TOKEN_BOUND_S * 1000]
    pick = next((k for k in fits if sweep[k].rate >= 0.9 * best), fits[-1] if fits else 1)
    print(f"  suggested capacity: {pick} (the fewest streams reaching 90% of the best tokens/s "
          f"with p95 per token <= {P95_TOKEN_BOUND_S * 1000:.0f} ms)")
