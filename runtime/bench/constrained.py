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
