"""The constrained row of ``fanout bench llm``: 8 concurrent tool-call requests under
``required`` and 8 ``json_schema`` requests against the same 8 prompts unconstrained, on one
cluster in one run. Tokens/s is each batch's completion tokens over its wall time; every kind
runs once first so the grammars are compiled (and cached) before anything is timed."""
from __future__ import annotations

import statistics
import time
from typing import Any

LOOKUP = {"type": "function", "function": {
    "name": "lookup", "description": "Look the answer to a question up",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                    "limit": {"type": "integer"}},
                   "required": ["query"]}}}
ANSWER = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string"},
                                     "confident": {"type": "boolean"}},
    "required": ["answer", "confident"]}}}
KINDS: dict[str, dict[str, Any]] = {"unconstrained": {},
         "tool calls (required)": {"tools": [LOOKUP], "tool_choice": "required"},
         "json_schema": {"response_format": ANSWER}}


def bench_constrained(client, model: str, prompts: list[str], tokens: int,
                      rounds: int = 3) -> None:
    chats = [[{"role": "user", "content": p}] for p in prompts]
    for params in KINDS.values():  # compile each grammar once, outside the timings
        client.generate_many(model, chats[:1], max_tokens=8, **params)
    rates: dict[str, list[float]] = {k: [] for k in KINDS}
    made: dict[str, int] = {}
    complete: dict[str, int] = {}
    for _ in range(rounds):  # interleaved, so that the machine's noise hits every kind alike
        for kind, params in KINDS.items():
            started = time.perf_counter()
            answers = client.generate_many(model, chats, max_tokens=tokens, **params)
            elapsed = time.perf_counter() - started
            made[kind] = sum(a.usage["completion_tokens"] for a in answers)
            rates[kind].append(made[kind] / elapsed)
            complete[kind] = sum(a.finish_reason != "length" for a in answers)
    base = statistics.median(rates["unconstrained"])
    print(f"\nconstrained decoding: {len(chats)} concurrent requests, max_tokens {tokens}, "
          f"median of {rounds} rounds (tokens/s = completion tokens / wall time)")
    for kind in KINDS:
        rate = statistics.median(rates[kind])
        print(f"  {kind:<24} {rate:8.1f} tokens/s  ({made[kind]} tokens, {complete[kind]} of "
              f"{len(chats)} ended before max_tokens)  {rate / base:5.2f}x unconstrained")
    worst = min(statistics.median(rates[k]) for k in KINDS if k != "unconstrained")
    print(f"constrained vs unconstrained tokens/s: {worst / base:.2f}x (target >= 0.8x)")


class CountingPipe:
    """openvino-genai's continuous-batching pipeline on CPU, with prefix caching, counting its
    steps and their time: what the runtime's batched session costs, counted in engine steps."""

    def __init__(self, path: str, properties: dict | None = None) -> None:
        import openvino_genai as ov_genai

        config = ov_genai.SchedulerConfig()
        config.enable_prefix_caching = True
        self.pipe = ov_genai.ContinuousBatchingPipeline(path, config, "CPU", properties or {})
        self.steps, self.step_s = 0, 0.0

    def step(self) -> Any:
        t0 = time.perf_counter()
        try:
            return self.pipe.step()
        finally:
            self.steps += 1
            self.step_s += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)


def constrained_steps(path: str, prompts: list[str], tokens: int, rounds: int = 3) -> None:
    """Why the row above is what it is: the same batches on the runtime's batched session in
    this process, counting the engine's steps. A batch takes as many steps as its longest
    request, so requests that end early (a tool call written, a JSON object closed) lower
    tokens/s without any step being slower."""
    import threading

    from ..backends.base import CancelToken
    from ..backends.genai.batched import BatchedLLMSession
    from ..wire.generation import read_request

    pipe = CountingPipe(path)
    session = BatchedLLMSession(lambda: pipe, "smollm2@bench", 8192, prefix_caching=True)

    def batch(params: dict, chosen: list[str], max_tokens: int) -> list:
        ended = threading.Semaphore(0)
        results: list = []

        def on_end(out: Any) -> None:
            results.append(out)
            ended.release()

        for text in chosen:
            request = read_request({"messages": [{"role": "user", "content": text}],
                                    "max_tokens": max_tokens, **params})
            session.start(request, lambda _delta: None, on_end, CancelToken())
        for _ in chosen:
            ended.acquire()
        for out in results:
            if isinstance(out, BaseException):
                raise out
        return results

    try:
        for params in KINDS.values():
            batch(params, prompts[:1], 8)
        seen: dict[str, list[tuple[int, int, float, float, int]]] = {k: [] for k in KINDS}
        for _ in range(rounds):
            for kind, params in KINDS.items():
                steps, step_s, started = pipe.steps, pipe.step_s, time.perf_counter()
                results = batch(params, prompts, tokens)
                wall = time.perf_counter() - started
                made = sum(r.completion_tokens for r in results)
                early = sum(r.completion_tokens < tokens for r in results)
                seen[kind].append((made, pipe.steps - steps, pipe.step_s - step_s, wall, early))
    finally:
        session.close()
    print(f"\nthe same batches in this process, on the runtime's batched session (fast "
          f"numerics), median of {rounds}: engine steps and time per step")
    base = statistics.median(m / w for m, _, _, w, _ in seen["unconstrained"])
    for kind, runs in seen.items():
        made, steps, step_s, wall, early = (statistics.median(v) for v in zip(*runs))
        rate = statistics.median(m / w for m, _, _, w, _ in runs)
        print(f"  {kind:<24} {made:4.0f} tokens in {steps:3.0f} steps, "
              f"{step_s / steps * 1000:5.1f} ms a step, {early:.0f} of {len(prompts)} ended "
              f"early  {rate:7.1f} tokens/s  {rate / base:5.2f}x unconstrained")


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"},
                                                    "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}
# (question, the tool it needs, the arguments it needs): the README's tool-use table
TOOL_PROMPTS = [
    ("What's the weather in Paris?", "get_weather", {"city": "Paris"}),
    ("Is it raining in London?", "get_weather", {"city": "London"}),
    ("How cold is Oslo today?", "get_weather", {"city": "Oslo"}),
    ("Weather in Tokyo, please.", "get_weather", {"city": "Tokyo"}),
    ("What is 2 plus 40?", "add", {"a": 2, "b": 40}),
    ("Add 7 and 8.", "add", {"a": 7, "b": 8}),
    ("Sum 100 and 23.", "add", {"a": 100, "b": 23}),
    ("What is 5 + 5?", "add", {"a": 5, "b": 5}),
]


def bench_tool_use(client, model: str) -> None:
    """How often the model calls the right tool, and with the right arguments, greedy, with
    both tools offered: under "required" (it must call one) and "auto" (it may answer)."""
    chats = [[{"role": "user", "content": q}] for q, _, _ in TOOL_PROMPTS]
    print(f"\ntool use, {len(chats)} fixed prompts, tools get_weather and add offered, greedy:")
    for choice in ("required", "auto"):
        answers = client.generate_many(model, chats, tools=[WEATHER, ADD], tool_choice=choice,
                                       max_tokens=64)
        called = right_tool = right_args = 0
        for answer, (_, tool, args) in zip(answers, TOOL_PROMPTS):
            first = answer.tool_calls[0] if answer.tool_calls else None
            called += first is not None
            right_tool += first is not None and first.name == tool
            right_args += first is not None and first.name == tool and first.args == args
        print(f"  tool_choice {choice:<9} called {called}/{len(chats)}, right tool "
              f"{right_tool}/{len(chats)}, right tool and arguments {right_args}/{len(chats)}")
