"""``fanout bench llm``: chat fan-outs through the runtime against the engine in-process
(issue 13). SmolLM2-135M on the CPU, greedy, 64 new tokens a chat (end of sequence ignored).

In one run: the engine in-process one request after another, and one batched call at both
numerics (in turn); then, each round the engine's figure and the runtime's one after the
other (this machine's speed moves between minutes): the 8-way fan-out against the engine's
batched call, its first tokens against the engine's batched prefill (after a round of the
same chats in full, as each runtime round runs) and against the worker's own engine
in-process, the same for prompts not seen before, and the 32-way fan-out; control during a
64-stream burst; the capacity sweep; the shared-prefix case with and without prefix
caching; constrained decoding and tool use; and ``llama-server`` as a peer if one is on
PATH."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import runtime

from .. import env
from ..backends.genai import DETERMINISTIC_PROPERTIES
from ..launchers.models import fetch
from . import control, peer
from .common import LLM_PROMPTS, cluster_config, hardware, pct, row
from .constrained import bench_constrained, bench_tool_use, constrained_steps
from .fanouts import AsyncFanOut, Load, best_of, fan_out
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


class Engine:
    """openvino-genai's ``LLMPipeline`` in this process, given the chats the runtime gets,
    templated once: the baseline each runtime round is timed next to."""

    def __init__(self, path: str, tokens: int, properties: dict | None = None) -> None:
        import openvino_genai as ov_genai

        self.pipe = ov_genai.LLMPipeline(path, "CPU", **(properties or {}))
        self._tok = self.pipe.get_tokenizer()
        self.full = as_given(ov_genai.GenerationConfig(max_new_tokens=tokens, ignore_eos=True,
                                                       do_sample=False))
        self.first_only = as_given(ov_genai.GenerationConfig(max_new_tokens=1, do_sample=False))
        self.pipe.generate(self.texts(chats_for(1)), self.full)  # warm up

    def texts(self, chats: list[list[dict]]) -> list[str]:
        return [self._tok.apply_chat_template(c, add_generation_prompt=True) for c in chats]

    def batched(self, chats: list[list[dict]]) -> float:
        """Seconds for ``chats`` in one batched call, ``tokens`` new tokens each."""
        return _timed(self.pipe.generate, self.texts(chats), self.full)

    def batched_then_prefill(self, chats: list[list[dict]]) -> tuple[float, float]:
        """Seconds for ``chats`` in one batched call, then for their batched prefill alone,
        timed from the state each of the runtime's rounds starts from: its previous round
        generated these chats in full, which leaves other blocks in the prefix cache than a
        first-token-only call does (a prefill of 8 took 16-26 ms after one, 31-48 ms after a
        64-token round, measured in turn on 2026-12-04)."""
        texts = self.texts(chats)
        return (_timed(self.pipe.generate, texts, self.full),
                _timed(self.pipe.generate, texts, self.first_only))

    def prefill_fresh(self, chats: list[list[dict]]) -> float:
        """The batched prefill of chats not seen before."""
        return _timed(self.pipe.generate, self.texts(chats), self.first_only)

    def one_after_another(self, chats: list[list[dict]]) -> tuple[float, list[float]]:
        """Seconds for ``chats`` one after another, and each one's time to its first token
        (streamed)."""
        import openvino_genai as ov_genai

        ttfts: list[float] = []
        started = time.perf_counter()
        for text in self.texts(chats):
            t0 = time.perf_counter()
            first: list[float] = []

            def streamer(_text, first=first, t0=t0):
                if not first:
                    first.append(time.perf_counter() - t0)
                return ov_genai.StreamingStatus.RUNNING

            self.pipe.generate(text, self.full, streamer=streamer)
            ttfts.append(first[0])
        return time.perf_counter() - started, ttfts


class OwnEngine:
    """The engine the CPU worker runs (a ``ContinuousBatchingPipeline`` with prefix caching,
    the worker's default) in this process, driven by the same ``step()`` loop: what the
    runtime's first tokens cost before any message moves."""

    def __init__(self, path: str, tokens: int) -> None:
        import openvino_genai as ov_genai

        self._g = ov_genai
        sched = ov_genai.SchedulerConfig()
        sched.enable_prefix_caching = True
        self.pipe = ov_genai.ContinuousBatchingPipeline(path, sched, "CPU", {})
        self._tok = self.pipe.get_tokenizer()
        self.full = as_given(ov_genai.GenerationConfig(max_new_tokens=tokens, ignore_eos=True,
                                                       do_sample=False))
        self._rid = 0

    def first_tokens(self, chats: list[list[dict]]) -> float:
        """The p95 first-token time of ``chats`` added at once, generated in full (so the
        next call starts after a full round, as each of the runtime's rounds does)."""
        g = self._g
        texts = [self._tok.apply_chat_template(c, add_generation_prompt=True) for c in chats]
        started = time.perf_counter()
        handles = [self.pipe.add_request(self._rid + i, text, self.full)
                   for i, text in enumerate(texts)]
        self._rid += len(texts)
        firsts: dict[int, float] = {}
        while len(firsts) < len(handles) and self.pipe.has_non_finished_requests():
            self.pipe.step()
            for i, handle in enumerate(handles):
                if i not in firsts and (handle.can_read() or handle.get_status()
                                        != g.GenerationStatus.RUNNING):
                    firsts[i] = time.perf_counter() - started
        while self.pipe.has_non_finished_requests():
            self.pipe.step()
        for handle in handles:
            if handle.can_read():
                handle.read()
        return pct(list(firsts.values()), 95)


def numerics_cost(path: str, tokens: int, n: int) -> tuple[float, float]:
    """Median seconds of one batched call of ``n`` chats at the fast and at the
    deterministic numerics, the two pipelines timed in turn."""
    fast, exact = Engine(path, tokens), Engine(path, tokens, DETERMINISTIC_PROPERTIES)
    times: dict[str, list[float]] = {"fast": [], "deterministic": []}
    for _ in range(ROUNDS):
        times["fast"].append(fast.batched(chats_for(n)))
        times["deterministic"].append(exact.batched(chats_for(n)))
    del fast, exact
    return statistics.median(times["fast"]), statistics.median(times["deterministic"])


@dataclass
class Paired:
    """One comparison, its rounds alternating between the engine and the runtime (this
    machine's speed moves by a third from one minute to the next)."""

    engine: list[float] = field(default_factory=list)
    runs: list[Load] = field(default_factory=list)

    @property
    def engine_s(self) -> float:
        return statistics.median(self.engine)

    @property
    def run(self) -> Load:
        return best_of(self.runs)

    @property
    def ttft_p95s(self) -> list[float]:
        """Each round's p95 time to first text, in round order."""
        return [pct(load.ttfts, 95) for load in self.runs]

    @property
    def ttft_p95(self) -> float:
        """The median over rounds of each round's p95, as the engine's figures are medians
        over rounds (one round whose requests reached the engine across two steps is one
        round in three, not the whole figure)."""
        return statistics.median(self.ttft_p95s)


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def bench_llm(tokens: int = 64, n: int = 8) -> int:
    path = str(fetch("smollm2", env.home(), print))
    print(f"fanout bench llm: chat requests x {tokens} new tokens (end of sequence ignored), "
          f"SmolLM2-135M Q4_1 on CPU, greedy; the runtime and the engine at OpenVINO's fast "
          f"numerics (the default) unless a row says otherwise; each figure the median of "
          f"{ROUNDS} rounds, the engine's and the runtime's in turn\nhardware: {hardware()}\n")
    fast_s, exact_s = numerics_cost(path, tokens, n)
    engine = Engine(path, tokens)
    sequential, sequential_ttfts = engine.one_after_another(chats_for(n))
    own = OwnEngine(path, tokens)
    own.first_tokens(chats_for(n))  # warm up: each timed round follows a full one

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
    eight, wide, fresh, gathered = Paired(), Paired(), Paired(), Paired()
    prefill_s: list[float] = []
    own_first: list[float] = []
    with runtime.start(config_path) as cluster:
        client = cluster.client()
        # first, on the fresh worker: 64 streams at once while status is polled
        burst = control.status_during(cluster, client, "smollm2", chats_for(64), tokens)
        client.generate("smollm2", LLM_PROMPTS[0], max_tokens=8)
        fan_out(client, "smollm2", chats_for(n), tokens)  # its blocks cached, as the engine's
        in_loop = AsyncFanOut(cluster)
        try:
            in_loop("smollm2", chats_for(n), tokens)  # its connection up
            for r in range(ROUNDS):
                batched_s, prefilled_s = engine.batched_then_prefill(chats_for(n))
                eight.engine.append(batched_s)
                prefill_s.append(prefilled_s)
                eight.runs.append(fan_out(client, "smollm2", chats_for(n), tokens))
                gathered.engine.append(prefilled_s)
                gathered.runs.append(in_loop("smollm2", chats_for(n), tokens))
                own_first.append(own.first_tokens(chats_for(n)))
                fresh.engine.append(engine.prefill_fresh(fresh_chats(n, 900 + r)))
                fresh.runs.append(fan_out(client, "smollm2", fresh_chats(n, 100 + r), tokens))
                wide.engine.append(engine.batched(chats_for(32)))
                wide.runs.append(fan_out(client, "smollm2", chats_for(32), tokens))
        finally:
            in_loop.close()
        del own, engine
        sweep = {k: best_of([fan_out(client, "smollm2", chats_for(k), tokens)
                             for _ in range(2)]) for k in SWEEP}
        bench_prefix(client)
        bench_constrained(client, "smollm2", LLM_PROMPTS[:n], tokens)
        bench_tool_use(client, "smollm2")
    constrained_steps(path, LLM_PROMPTS[:n], tokens)
    fan8, fan32 = eight.run, wide.run
    for load, k in ((fan8, n), (fan32, 32), (gathered.run, n)):
        assert load.tokens == k * tokens, f"expected {k * tokens} tokens, got {load.tokens}"

    print(f"\nthe runtime's rows: its round of median total time; the engine's: medians\n"
          f"{'':<44} {'total s':>8} {'tokens/s':>9} {'TTFT ms':>8} {'p95 ms':>8}  "
          f"vs one-after-another")
    print(row(f"in-process, {n} one after another", sequential, n * tokens, sequential_ttfts,
              None))
    print(row(f"in-process, {n} in one batched call", eight.engine_s, n * tokens, [],
              sequential))
    print(row("  (the same, deterministic numerics)", exact_s, n * tokens, [], sequential))
    print(row(f"fanout runtime, {n} streams at once", fan8.total_s, fan8.tokens, fan8.ttfts,
              sequential))
    print(row("in-process, 32 in one batched call", wide.engine_s, 32 * tokens, [], sequential))
    print(row("fanout runtime, 32 streams at once", fan32.total_s, fan32.tokens, fan32.ttfts,
              sequential))
    print(f"\nruntime vs one after another ({n}): {sequential / fan8.total_s:.2f}x faster "
          f"(target >= 4x)")
    print(f"runtime vs the engine's batched call: {n}-way {fan8.total_s / eight.engine_s:.2f}x, "
          f"32-way {fan32.total_s / wide.engine_s:.2f}x the time (target <= 1.10x)")
    ttft, own_s, prefill = eight.ttft_p95, statistics.median(own_first), statistics.median(
        prefill_s)
    print(f"first tokens of the {n}-way fan-out: p95 {ttft * 1000:.0f} ms (the median of the "
          f"rounds' {', '.join(f'{x * 1000:.0f}' for x in eight.ttft_p95s)} ms) against the "
          f"engine's batched prefill of {prefill * 1000:.0f} ms: {ttft / prefill:.2f}x "
          f"(target <= 1.2x)")
    print(f"  the same {n} chats added at once to the worker's own engine in this process "
          f"(ContinuousBatchingPipeline, prefix caching, a step() loop): first tokens p95 "
          f"{own_s * 1000:.0f} ms, so the runtime's p95 is {ttft / own_s:.2f}x its engine's own")
    print(f"  the same {n} from one event loop (asyncio.gather over AsyncClient.astream, as an "
          f"async agent framework fans out): first tokens p95 {gathered.ttft_p95 * 1000:.0f} "
          f"ms (rounds {', '.join(f'{x * 1000:.0f}' for x in gathered.ttft_p95s)}): "
          f"{gathered.ttft_p95 / prefill:.2f}x the engine's batched prefill; total "
          f"{gathered.run.total_s / eight.engine_s:.2f}x the engine's batched call")
    ttft_fresh = fresh.ttft_p95
    print(f"  prompts not seen before (a new tag leads each, every round, in both): first "
          f"tokens p95 {ttft_fresh * 1000:.0f} ms against the engine's batched prefill of "
          f"{fresh.engine_s * 1000:.0f} ms: {ttft_fresh / fresh.engine_s:.2f}x")
    print(f"deterministic numerics (one batched call of {n}, in turn with the fast one): "
          f"{exact_s:.2f} s against {fast_s:.2f} s, {exact_s / fast_s:.2f}x the time")
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
