"""The shared-prefix row of ``fanout bench llm`` (issue 13 item 4): 8 chats that share a
~1,000-token document, each with its own question, with and without prefix caching.

Each round uses a document not seen before (a round number leads it), so that the cache
starts cold and what is measured is the prefix computed once per fan-out, not a prefix left
over from the round before. Both models run deterministic numerics, so that their greedy
answers can be compared token for token."""
from __future__ import annotations

import statistics

from .common import pct
from .fanouts import fan_out

QUESTIONS = ["Which lecture was about chess?", "On which day was coffee discussed?",
             "What was lecture 12 about?", "Name two subjects of the lectures.",
             "How many lectures were there?", "Which lecture came after the one on glaciers?",
             "Was there a lecture on the moon?", "Summarise the notes in one sentence."]
TOPICS = ["the ocean", "volcanoes", "the moon", "honey bees", "the Roman empire", "chess",
          "coffee", "glaciers", "tides", "bread", "owls", "copper"]
MODELS = {"with prefix caching": "smollm2-prefix", "without": "smollm2-noprefix"}


def document(nonce: int, lectures: int = 48) -> str:
    notes = " ".join(f"Lecture {i}: {TOPICS[i % len(TOPICS)]}, on day {3 * i + nonce % 7}, "
                     f"room {100 + i}." for i in range(lectures))
    return f"Course notes, edition {nonce}. {notes}"


def chats(nonce: int) -> list[list[dict]]:
    doc = document(nonce)
    return [[{"role": "user", "content": f"{doc}\n\nQuestion: {q}"}] for q in QUESTIONS]


def bench_prefix(client, tokens: int = 32, rounds: int = 3) -> None:
    results: dict[str, list] = {name: [] for name in MODELS}
    for r in range(rounds):
        for name, model in MODELS.items():  # interleaved: the noise hits both alike
            results[name].append(fan_out(client, model, chats(1000 + r), tokens,
                                         ignore_eos=False))
    prompt = client.generate(MODELS["without"], chats(0)[0], max_tokens=1)
    print(f"\nshared prefix: {len(QUESTIONS)} chats, one ~{prompt.usage['prompt_tokens']}-token "
          f"document, a question each, max_tokens {tokens}, greedy, deterministic numerics, "
          f"median of {rounds} rounds, a fresh document each round")
    base = statistics.median(run.total_s for run in results["without"])
    for name, runs in results.items():
        total = statistics.median(run.total_s for run in runs)
        ttfts = [t for run in runs for t in run.ttfts]
        print(f"  {name:<22} total {total:6.2f} s  TTFT p50 {statistics.median(ttfts) * 1000:6.0f}"
              f" ms  p95 {pct(ttfts, 95) * 1000:6.0f} ms  {base / total:5.2f}x")
    same = all(a.texts == b.texts for a, b in zip(*results.values()))
    print(f"  greedy answers equal with and without: {'yes' if same else 'NO'}")
