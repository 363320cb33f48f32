"""Generation requests as they cross the wire: built and checked by the client, read by workers.

The checks live here once: the client raises ``InvalidInput`` before sending, and a worker
raises the same for a request that bypassed the client.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidInput


@dataclass
class GenRequest:
    """One chat or prompt completion, as a worker hands it to an ``LLMSession``.

    Exactly one of ``messages`` (chat, rendered with the model's chat template) and ``prompt``
    (raw text) is set. ``prefix_ids`` are tokens already generated for this request on
    another device (mid-stream failover): generation continues after them, exactly as if it
    had never stopped, and ``max_tokens`` counts them too.
    """

    messages: list[dict] | None = None
    prompt: str | None = None
    prefix_ids: list[int] = field(default_factory=list)
    prefix_text: str = ""  # the text already streamed for prefix_ids (deltas continue after it)
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always make max_tokens tokens


@dataclass
class GenResult:
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int  # all tokens of the completion, prefix_ids included


ROLES = ("system", "user", "assistant")
PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed", "ignore_eos")
MAX_TOKENS_LIMIT = 1 << 20


def build_request(messages_or_prompt: Any, params: dict[str, Any]) -> dict:
    """The wire form of a request: ``{"messages": [...]} or {"prompt": "..."}`` plus params."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise InvalidInput(f"unknown generation parameter(s) {unknown}; known: {list(PARAMS)}")
    if isinstance(messages_or_prompt, str):
        body: dict[str, Any] = {"prompt": messages_or_prompt}
    else:
        body = {"messages": list(messages_or_prompt or [])}
    body.update({k: v for k, v in params.items() if v is not None})
    read_request(body)  # fail here, in the caller's process, rather than on a device
    return body


def read_request(d: dict, prefix_ids: list[int] | None = None,
                 prefix_text: str = "") -> GenRequest:
    """Check a wire request and turn it into a ``GenRequest``; ``InvalidInput`` if wrong."""
    if not isinstance(d, dict):
        raise InvalidInput("a generation request must be a map")
    unknown = sorted(set(d) - set(PARAMS) - {"messages", "prompt"})
    if unknown:
        raise InvalidInput(f"unknown generation field(s) {unknown}")
    messages, prompt = d.get("messages"), d.get("prompt")
    if (messages is None) == (prompt is None):
        raise InvalidInput("give either chat messages or a prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise InvalidInput("prompt must be a non-empty string")
    if messages is not None:
        _check_messages(messages)
    max_tokens = d.get("max_tokens", 256)
    if not _int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidInput(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    temperature = d.get("temperature", 0.0)
    if not _num(temperature) or not 0 <= temperature <= 100:
        raise InvalidInput(f"temperature must be a number in 0..100, got {temperature!r}")
    top_p = d.get("top_p", 1.0)
    if not _num(top_p) or not 0 < top_p <= 1:
        raise InvalidInput(f"top_p must be a number in (0, 1], got {top_p!r}")
    stop = d.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 16
            or not all(isinstance(s, str) and s for s in stop)):
        raise InvalidInput(f"stop must be a string or a list of up to 16 non-empty strings, "
                           f"got {stop!r}")
    seed = d.get("seed")
    if seed is not None and (not _int(seed) or not 0 <= seed < 2**63):
        raise InvalidInput(f"seed must be a non-negative integer, got {seed!r}")
    ignore_eos = d.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidInput(f"ignore_eos must be true or false, got {ignore_eos!r}")
    return GenRequest(messages=messages, prompt=prompt, prefix_ids=list(prefix_ids or []),
                      prefix_text=prefix_text, max_tokens=max_tokens,
                      temperature=float(temperature), top_p=float(top_p), stop=stop, seed=seed,
                      ignore_eos=ignore_eos)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidInput("messages must be a non-empty list of {role, content} maps")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"}:
            raise InvalidInput(f"messages[{i}] must be a map with role and content, got {m!r:.80}")
        if m.get("role") not in ROLES:
            raise InvalidInput(f"messages[{i}].role must be one of {list(ROLES)}, "
                               f"got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise InvalidInput(f"messages[{i}].content must be a string")


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
