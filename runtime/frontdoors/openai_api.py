"""The OpenAI API's wire shapes: reading and checking requests, shaping answers and errors.

Requests are checked before anything runs: wrong types name the field, and fields this
server cannot honour (tools, logprobs, penalties...) get a 400 instead of a silently wrong
answer. No I/O here; ``http_server.py`` does that.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import (
    ClusterUnavailable,
    DeadlineExceeded,
    FanoutError,
    InvalidInput,
    NoDeviceAvailable,
    Overloaded,
)
from .client import TextCompletion

log = logging.getLogger("fanout.http")

MAX_N = 16  # choices per request; more is refused rather than quietly queued
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request
RETRY_AFTER_S = 1  # what a 429 tells the client to wait; the queue drains in about that
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI spec's default for /v1/completions

# Fields of the OpenAI API we accept and ignore, without a log line.
QUIETLY_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _zero(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


# Fields that change the answer in ways this server cannot: allowed only at their no-op value.
UNSUPPORTED_CHAT = {
    "tools": _empty, "functions": _empty,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": _empty, "presence_penalty": _zero, "frequency_penalty": _zero,
    "audio": _empty, "prediction": _empty,
    "modalities": lambda v: v in (None, ["text"]),
}
UNSUPPORTED_COMPLETIONS = {
    "logprobs": lambda v: v is None, "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""), "best_of": lambda v: v in (None, 1),
    "logit_bias": _empty, "presence_penalty": _zero, "frequency_penalty": _zero,
}
GENERATION_FIELDS = {"model", "n", "max_tokens", "temperature", "top_p", "stop", "seed",
                     "stream", "stream_options", "ignore_eos"}
CHAT_FIELDS = GENERATION_FIELDS | {"messages", "max_completion_tokens"} | set(UNSUPPORTED_CHAT)
COMPLETIONS_FIELDS = GENERATION_FIELDS | {"prompt"} | set(UNSUPPORTED_COMPLETIONS)
EMBEDDINGS_FIELDS = {"model", "input", "encoding_format", "dimensions"}


class HttpError(Exception):
    """An answer in the OpenAI error format: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def http_error_from(exc: FanoutError) -> HttpError:
    """The HTTP status for each runtime error; see the README's error table."""
    if isinstance(exc, InvalidInput):
        if exc.message.startswith("unknown model"):
            return HttpError(404, exc.message, param="model", code="model_not_found")
        return HttpError(400, str(exc))
    if isinstance(exc, Overloaded):
        return HttpError(429, str(exc), "rate_limit_error", code="overloaded",
                         headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, DeadlineExceeded):
        return HttpError(504, str(exc), "timeout_error", code="deadline_exceeded")
    if isinstance(exc, (NoDeviceAvailable, ClusterUnavailable)):
        return HttpError(503, str(exc), "service_unavailable", code=exc.kind)
    log.error("unexpected runtime error: %r", exc)
    return HttpError(500, str(exc), "server_error", code=exc.kind)


# ---------------------------------------------------------------------------------------------
# Reading requests
# ---------------------------------------------------------------------------------------------

class Body:
    """A JSON request body with typed getters; each wrong type is a 400 naming the field."""

    def __init__(self, data: Any, known: set[str], unsupported: dict[str, Callable],
                 warn_unknown: Callable[[str], None]):
        if not isinstance(data, dict):
            raise HttpError(400, f"the request body must be a JSON object, got "
                                 f"{_json_type(data)}")
        self.data = data
        for name, allowed in unsupported.items():
            if name in data and not allowed(data[name]):
                raise HttpError(400, f"{name}={json.dumps(data[name])[:80]} is not supported "
                                     f"by this server", param=name, code="unsupported_parameter")
        for name in data:
            if name not in known and name not in QUIETLY_IGNORED:
                warn_unknown(name)

    def get(self, name: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise HttpError(400, f"{name} must be {what}, got {_json_type(value)} "
                                 f"{json.dumps(value)[:60]}", param=name)
        return value

    def integer(self, name: str, default: int | None = None) -> int | None:
        return self.get(name, (int,), "an integer", default)

    def number(self, name: str) -> float | None:
        value = self.get(name, (int, float), "a number")
        if value is not None and not math.isfinite(value):
            raise HttpError(400, f"{name} must be a finite number", param=name)
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        return self.get(name, (bool,), "true or false", default)

    def model(self) -> str:
        model = self.get("model", (str,), "a string")
        if not model:
            raise HttpError(400, "model is required", param="model")
        return model


def _json_type(v: Any) -> str:
    for kinds, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"),
                        (str, "a string"), (list, "an array"), (dict, "an object")):
        if isinstance(v, kinds):
            return name
    return "null"


def generation_params(body: Body, default_max_tokens: int | None = None) -> dict:
    """The runtime's generation parameters from an OpenAI request (ranges checked later, by
    ``runtime.generation``, whose messages name the field too)."""
    max_tokens = body.integer("max_completion_tokens", body.integer("max_tokens"))
    stop = body.get("stop", (str, list), "a string or an array of strings")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise HttpError(400, "stop must be a string or an array of strings", param="stop")
    params = {"max_tokens": max_tokens if max_tokens is not None else default_max_tokens,
              "temperature": body.number("temperature"), "top_p": body.number("top_p"),
              "stop": stop, "seed": body.integer("seed"),
              "ignore_eos": body.boolean("ignore_eos") or None}  # an extension, as in vLLM
    return {k: v for k, v in params.items() if v is not None}


def choice_count(body: Body) -> int:
    n = body.integer("n") or 1
    if n < 1:
        raise HttpError(400, f"n must be at least 1, got {n}", param="n")
    if n > MAX_N:
        raise HttpError(400, f"n={n} is not supported: at most {MAX_N} choices per request",
                        param="n", code="unsupported_parameter")
    return n


def include_usage(body: Body) -> bool:
    options = body.get("stream_options", (dict,), "an object", {})
    value = options.get("include_usage", False)
    if not isinstance(value, bool):
        raise HttpError(400, "stream_options.include_usage must be true or false",
                        param="stream_options")
    return value


ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(body: Body) -> list[dict]:
    """OpenAI messages as the runtime takes them: role and a string content."""
    messages = body.data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "messages must be a non-empty array of {role, content} objects",
                        param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise HttpError(400, f"{where} must be an object", param=where)
        role = m.get("role")
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise HttpError(400, f"{where}: tool and function messages are not supported by "
                                 f"this server", param=where, code="unsupported_parameter")
        if role not in ROLE_MAP:
            raise HttpError(400, f"{where}.role must be one of {sorted(ROLE_MAP)}, got "
                                 f"{json.dumps(role)[:40]}", param=f"{where}.role")
        out.append({"role": ROLE_MAP[role], "content": _content(m.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else _json_type(part)
                raise HttpError(400, f"{where}.content[{j}]: only text parts are supported, "
                                     f"got {json.dumps(kind)[:40]}",
                                param=f"{where}.content", code="unsupported_parameter")
            if not isinstance(part.get("text"), str):
                raise HttpError(400, f"{where}.content[{j}].text must be a string",
                                param=f"{where}.content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise HttpError(400, f"{where}.content must be a string or an array of text parts, got "
                         f"{_json_type(content)}", param=f"{where}.content")


def text_list(body: Body, name: str, what: str) -> list[str]:
    """A string or a non-empty array of strings (token-id arrays are not supported)."""
    value = body.data.get(name)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) for v in value):
        raise HttpError(400, f"{name} as token ids is not supported; send text",
                        param=name, code="unsupported_parameter")
    raise HttpError(400, f"{name} must be {what}, got {_json_type(value)}", param=name)


# ---------------------------------------------------------------------------------------------
# Shaping answers
# ---------------------------------------------------------------------------------------------

def fanout_field(device: str, attempts: list) -> dict:
    return {"device": device, "failed_over": bool(attempts),
            "attempts": [a.to_wire() for a in attempts]}


def device_headers(devices: list[str], failed_over: bool) -> dict[str, str]:
    unique = list(dict.fromkeys(devices))
    return {"X-Fanout-Device": ",".join(unique),
            "X-Fanout-Failed-Over": "true" if failed_over else "false"}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sum_usage(usages: list[dict], prompts: int) -> dict:
    """Each distinct prompt's tokens count once (as OpenAI counts n choices)."""
    per_choice = len(usages) // max(prompts, 1)
    prompt = sum(u.get("prompt_tokens", 0) for u in usages[::max(per_choice, 1)])
    return _usage(prompt, sum(u.get("completion_tokens", 0) for u in usages))


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Shape:
    """How one endpoint's objects look: chat.completion vs text_completion."""

    chat: bool
    id: str
    model: str
    created: int

    def completion(self, results: list[TextCompletion], prompts: int) -> dict:
        choices = []
        for i, c in enumerate(results):
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                "finish_reason": c.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": None})
        fanout = fanout_field(results[0].device, [a for c in results for a in c.attempts])
        if len(results) > 1:
            fanout["device"] = ",".join(dict.fromkeys(c.device for c in results))
            fanout["choices"] = [{"index": i, **fanout_field(c.device, c.attempts)}
                                 for i, c in enumerate(results)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": sum_usage([c.usage for c in results], prompts), "fanout": fanout}

    def chunk(self, index: int, text: str | None = None, finish_reason: str | None = None,
              role: bool = False) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}
