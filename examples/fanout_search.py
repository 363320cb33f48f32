"""Fan-out semantic search on an embedded Fanout cluster.

One step embeds every document and query at once (the fan-out an agent step makes), spread
over this PC's NPU and CPU: each text goes where it is expected to finish first, by the times
each device measured when it loaded the model, and a text longer than the NPU's static 32
tokens that lands there fails over to the CPU. It prints which device served each text, every
failover, and the time next to the same fan-out on the CPU alone; then answers the queries.

    python examples/fanout_search.py [--config deploy/local.yaml]
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import numpy as np

import runtime
from runtime import env
from runtime.cli import render_status
from runtime.frontdoors.embeddings import HIDDEN, TextEncoder, mean_pool
from runtime.launchers import local
from runtime.launchers.models import fetch

DOCS = [
    # Longer than the 32 tokens the NPU compiled for: tried there first, re-run on the CPU.
    "Static shapes let an NPU compiler plan memory ahead of time, so every input of a model "
    "compiled for thirty-two tokens must fit in thirty-two tokens or go to another device "
    "that accepts longer sequences, such as the CPU.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in the "
    "chloroplasts of plant cells, releasing the oxygen that animals breathe, which is why "
    "forests and oceans matter so much for the air.",
    "The NPU runs neural networks at low power on Copilot+ PCs.",
    "A CPU fallback keeps the application working when an accelerator fails.",
    "Paris is the capital of France.",
    "The Eiffel Tower was finished in 1889.",
    "Bread rises because yeast produces carbon dioxide.",
    "Sourdough uses wild yeast and lactic acid bacteria.",
    "Tides are caused by the gravity of the moon and the sun.",
    "The moon orbits the earth about once every 27 days.",
    "Python's asyncio runs many coroutines on one thread.",
    "ZeroMQ sockets carry messages between processes and machines.",
    "A scheduler places each task on the worker expected to finish it first.",
    "Heavy rain is expected in the mountains tomorrow afternoon.",
    "The marathon route passes the old harbour twice.",
    "Espresso is brewed by forcing hot water through finely ground coffee.",
]
ROUNDS = 5  # alternately, best of: a 0.1 s fan-out on a shared machine moves by a third
QUERIES = [
    "What happens when the accelerator breaks?",
    "Why does dough get bigger?",
    "Which city is France's capital?",
    "How do plants make oxygen?",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="a cluster config (default: this PC's devices)")
    args = ap.parse_args(argv)

    encoder = TextEncoder(fetch("minilm-tokenizer", env.home(), print))
    texts = DOCS + QUERIES
    inputs = [encoder.inputs(t) for t in texts]

    config = local.load(args.config)
    # The same model on the CPU alone, to time the fan-out against.
    cpu = [d for d in config.device_order("minilm") if config.device(d).kind == "cpu"][:1]
    config.models.append(dataclasses.replace(config.model("minilm"), name="minilm-cpu",
                                             devices=cpu, tokenizer=None))
    print("starting the embedded cluster ...")
    with runtime.start(config, progress=print) as cluster:
        client = cluster.client()
        took: dict[str, list[float]] = {"minilm": [], "minilm-cpu": []}
        for _ in range(ROUNDS):  # alternately, as this machine may be busy with other work
            for name, times in took.items():
                started = time.perf_counter()
                out = client.map(name, inputs)  # the fan-out: every text at once
                times.append(time.perf_counter() - started)
                if name == "minilm" and len(times) == 1:
                    results = out

        print(f"\n{len(texts)} texts embedded in {min(took['minilm']):.3f} s (best of "
              f"{ROUNDS}; on {cpu[0]} alone: {min(took['minilm-cpu']):.3f} s)\n")
        print(f"{'DEVICE':<7} {'TOKENS':>6}  TEXT")
        for text, x, r in zip(texts, inputs, results):
            print(f"{r.device:<7} {x['input_ids'].shape[1]:>6}  {text[:70]}")
            for a in r.attempts:
                print(f"{'':<15}failed over from {a.device} ({a.kind}): {a.message[:90]}")

        vectors = np.vstack([mean_pool(r[HIDDEN], x["attention_mask"])
                             for r, x in zip(results, inputs)])
        docs, queries = vectors[:len(DOCS)], vectors[len(DOCS):]
        print()
        for q, qv in zip(QUERIES, queries):
            scores = docs @ qv
            best = int(np.argmax(scores))
            print(f"Q: {q}\n   -> {DOCS[best][:80]}  (cosine {scores[best]:.2f})")

        served = collections.Counter(r.device for r in results)
        failovers = sum(len(r.attempts) for r in results)
        print(f"\nserved: {dict(served)}; failovers: {failovers}\n")
        print(render_status(cluster.cluster_status()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
