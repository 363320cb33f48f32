"""The OpenAI API's wire shapes: reading and checking requests, shaping answers and errors.

Requests are checked before anything runs: wrong types name the field, and fields this
server cannot honour (top_logprobs, logit_bias, audio...) get a 400 that says so instead of a
silently wrong answer. The fields' own rules (roles, bounds, tool and schema shapes) are
``wire/generation.py``'s, the one validator of generation requests; this module maps OpenAI's
JSON onto it. No I/O here; ``http_server.py`` does that.
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
from ..wire.generation import InvalidField, TokenLogprob, ToolCall
from .client import TextCompletion

log = logging.getLogger("fanout.http")

MAX_N = 16  # choices per request; more is refused rather than quietly queued
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request
RETRY_AFTER_S = 1  # what a 429 tells the client to wait; the queue drains in about that
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI spec's default for /v1/completions

# Fields of the OpenAI API we accept and ignore, without a log line.
QUIETLY_IGNORED = {"user", "metadata", "store", "service_tier", "safety_identifier",
                   "prompt_cache_key"}


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


def _zero(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


# Fields that change the answer in ways this server cannot: allowed only at their no-op value,
# refused otherwise with the reason (each refused request is logged, see http_server.py).
UNSUPPORTED_CHAT = {
    "functions": (_empty, "the legacy functions field is not supported; send tools"),
    "function_call": (lambda v: v in (None, "none"),
                      "the legacy function_call field is not supported; send tool_choice"),
    "top_logprobs": (_zero, "top_logprobs is not supported: the engine reports only the "
                            "chosen token's log-probability (logprobs: true)"),
    "logit_bias": (_empty, "logit_bias is not supported by the engine"),
    "audio": (_empty, "audio output is not supported"),
    "prediction": (_empty, "predicted outputs are not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "web_search_options": (_empty, "web search is not supported"),
}
UNSUPPORTED_COMPLETIONS = {
    "logprobs": (lambda v: v is None, "logprobs is not supported on /v1/completions; use "
                                      "/v1/chat/completions"),
    "echo": (lambda v: v in (None, False), "echo is not supported"),
    "suffix": (lambda v: v in (None, ""), "suffix is not supported"),
    "best_of": (lambda v: v in (None, 1), "best_of is not supported"),
    "logit_bias": (_empty, "logit_bias is not supported by the engine"),
}
GENERATION_FIELDS = {"model", "n", "max_tokens", "temperature", "top_p", "stop", "seed",
                     "stream", "stream_options", "ignore_eos", "presence_penalty",
                     "frequency_penalty"}
CHAT_FIELDS = GENERATION_FIELDS | {"messages", "max_completion_tokens", "tools", "tool_choice",
                                   "parallel_tool_calls", "response_format",
                                   "logprobs"} | set(UNSUPPORTED_CHAT)
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
    if isinstance(exc, InvalidField):
        return HttpError(400, str(exc), param=exc.field)
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

    def __init__(self, data: Any, known: set[str],
                 unsupported: dict[str, tuple[Callable, str]],
                 warn_unknown: Callable[[str], None]):
        if not isinstance(data, dict):
            raise HttpError(400, f"the request body must be a JSON object, got "
                                 f"{_json_type(data)}")
        self.data = data
        for name, (allowed, why) in unsupported.items():
            if name in data and not allowed(data[name]):
                raise HttpError(400, f"{why} (got {name}={json.dumps(data[name])[:80]})",
                                param=name, code="unsupported_parameter")
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
              "presence_penalty": body.number("presence_penalty"),
              "frequency_penalty": body.number("frequency_penalty"),
              "ignore_eos": body.boolean("ignore_eos") or None}  # an extension, as in vLLM
    return {k: v for k, v in params.items() if v is not None}


def chat_params(body: Body) -> dict:
    """``generation_params`` plus what only chats have: tools, tool_choice, the response
    format and logprobs, passed on as OpenAI shapes (``wire/generation.py`` reads them)."""
    params = generation_params(body)
    params.update({k: body.data[k] for k in ("tools", "tool_choice", "response_format")
                   if body.data.get(k) is not None})
    if body.data.get("parallel_tool_calls") is not None:
        params["parallel_tool_calls"] = body.boolean("parallel_tool_calls")
    if body.boolean("logprobs"):
        params["logprobs"] = True
    return params


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


ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
            "tool": "tool"}


def chat_messages(body: Body) -> list[dict]:
    """OpenAI messages as the runtime takes them: a role, content as one string (None for
    an assistant turn that only called tools), the calls and the call a tool answers."""
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
        if role == "function" or m.get("function_call"):
            raise HttpError(400, f"{where}: the legacy function role is not supported; send "
                                 f"tool messages", param=where, code="unsupported_parameter")
        if role not in ROLE_MAP:
            raise HttpError(400, f"{where}.role must be one of {sorted(ROLE_MAP)}, got "
                                 f"{json.dumps(role)[:40]}", param=f"{where}.role")
        message: dict[str, Any] = {"role": ROLE_MAP[role]}
        calls = m.get("tool_calls")
        content = m.get("content")
        message["content"] = (None if content is None and calls is not None
                              else text_content(content, where))
        if calls is not None:
            message["tool_calls"] = calls  # its shape is checked with the rest of the request
        if role == "tool":
            message["tool_call_id"] = m.get("tool_call_id")
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


TEXT_PARTS = ("text", "input_text", "output_text")  # chat and Responses spellings


def text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PARTS:
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


def message(c: TextCompletion) -> dict:
    """The assistant message of a chat answer: its text (None when it only called tools)
    and its tool calls in OpenAI's shape."""
    out: dict[str, Any] = {"role": "assistant",
                           "content": None if c.tool_calls and not c.text else c.text}
    if c.tool_calls:
        out["tool_calls"] = [tool_call(t) for t in c.tool_calls]
    return out


def tool_call(t: ToolCall) -> dict:
    return {"id": t.id, "type": "function",
            "function": {"name": t.name, "arguments": t.arguments}}


def logprobs_field(logprobs: list[TokenLogprob] | None) -> dict | None:
    """OpenAI's ``logprobs`` of a choice; no alternatives (``top_logprobs`` is refused)."""
    if logprobs is None:
        return None
    return {"content": [{"token": x.token, "logprob": x.logprob,
                         "bytes": list(x.token.encode("utf-8")), "top_logprobs": []}
                        for x in logprobs], "refusal": None}


@dataclass
class Shape:
    """How one endpoint's objects look: chat.completion vs text_completion."""

    chat: bool
    id: str
    model: str
    created: int
    logprobs: bool = False  # the request asked for them

    def completion(self, results: list[TextCompletion], prompts: int) -> dict:
        choices = []
        for i, c in enumerate(results):
            if self.chat:
                choices.append({"index": i, "message": message(c),
                                "finish_reason": c.finish_reason,
                                "logprobs": logprobs_field(c.logprobs if self.logprobs
                                                           else None)})
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
              role: bool = False, logprobs: list[TokenLogprob] | None = None) -> dict:
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": index, "delta": delta,
                      "logprobs": logprobs_field(logprobs) if self.logprobs and logprobs
                      else None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None,
                      "finish_reason": finish_reason}
        return self._object([choice])

    def tool_call_chunks(self, index: int, call: ToolCall) -> list[dict]:
        """A whole call as OpenAI streams one: its index, id and name first, then the
        arguments (the official client's stream helpers put them back together)."""
        head = {"index": call.index, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}
        body = {"index": call.index, "function": {"arguments": call.arguments}}
        return [self._object([{"index": index, "delta": {"tool_calls": [part]},
                               "logprobs": None, "finish_reason": None}])
                for part in (head, body)]

    def usage_chunk(self, usage: dict) -> dict:
        return self._object([]) | {"usage": usage}

    def _object(self, choices: list) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat
                else "text_completion", "created": self.created, "model": self.model,
                "choices": choices}
