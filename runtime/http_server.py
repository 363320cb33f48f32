"""The OpenAI-compatible HTTP API: an aiohttp server that is one more client of the scheduler.

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (both also as server-sent events),
``/v1/embeddings``, ``/v1/models``, ``/health/live``, ``/health/ready`` and ``/metrics``.
Every answer names the device that served it: headers ``X-Fanout-Device`` and
``X-Fanout-Failed-Over``, and an extra ``"fanout"`` JSON field that OpenAI clients ignore.

Requests are checked here before anything runs: wrong types name the field, and fields this
server cannot honour (tools, logprobs, penalties...) get a 400 instead of a silently wrong
answer. Unknown fields are ignored and logged once per name, as other compatible servers do.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from aiohttp import web

from .client import AsyncClient, Chunk, Completion
from .config import Config, HttpConfig, _is_loopback
from .embeddings import HIDDEN, TextEncoder, mean_pool
from .errors import (ClusterUnavailable, ConfigError, DeadlineExceeded, FanoutError,
                     InvalidInput, NoDeviceAvailable, Overloaded)

log = logging.getLogger("fanout.http")

MAX_N = 16  # choices per request; more is refused rather than quietly queued
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request
RETRY_AFTER_S = 1  # what a 429 tells the client to wait; the queue drains in about that
CONNECT_RETRY_S = 1.0
SHUTDOWN_TIMEOUT_S = 2.0  # open requests were answered by the scheduler's shutdown already
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI spec's default for /v1/completions
LLM_BACKENDS = ("openvino-genai",)

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
    n = body.integer("n", 1)
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

def _fanout_field(device: str, attempts: list) -> dict:
    return {"device": device, "failed_over": bool(attempts),
            "attempts": [a.to_wire() for a in attempts]}


def _device_headers(devices: list[str], failed_over: bool) -> dict[str, str]:
    unique = list(dict.fromkeys(devices))
    return {"X-Fanout-Device": ",".join(unique),
            "X-Fanout-Failed-Over": "true" if failed_over else "false"}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sum_usage(usages: list[dict], prompts: int) -> dict:
    """Each distinct prompt's tokens count once (as OpenAI counts n choices)."""
    per_choice = len(usages) // max(prompts, 1)
    prompt = sum(u.get("prompt_tokens", 0) for u in usages[::max(per_choice, 1)])
    return _usage(prompt, sum(u.get("completion_tokens", 0) for u in usages))


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Shape:
    """How one endpoint's objects look: chat.completion vs text_completion."""

    chat: bool
    id: str
    model: str
    created: int

    def completion(self, results: list[Completion], prompts: int) -> dict:
        choices = []
        for i, c in enumerate(results):
            if self.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                "finish_reason": c.finish_reason, "logprobs": None})
            else:
                choices.append({"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                "logprobs": None})
        fanout = _fanout_field(results[0].device, [a for c in results for a in c.attempts])
        if len(results) > 1:
            fanout["device"] = ",".join(dict.fromkeys(c.device for c in results))
            fanout["choices"] = [{"index": i, **_fanout_field(c.device, c.attempts)}
                                 for i, c in enumerate(results)]
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": _sum_usage([c.usage for c in results], prompts), "fanout": fanout}

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


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def _label(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: Any) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in kv.items()) + "}"


def prometheus_text(status: dict, requests: Counter, models: list[str] = ()) -> str:
    """The cluster's status and this server's request counts in Prometheus text format."""
    families: list[tuple[str, str, str, list[str]]] = []

    def family(name: str, kind: str, help_: str) -> list[str]:
        samples: list[str] = []
        families.append((name, kind, help_, samples))
        return samples

    queue = family("fanout_queue_depth", "gauge", "Tasks waiting for a slot, per model.")
    up = family("fanout_worker_up", "gauge", "1 if the device's worker is up.")
    in_flight = family("fanout_in_flight", "gauge", "Tasks running on the device now.")
    capacity = family("fanout_capacity", "gauge", "Tasks the device runs at once.")
    done = family("fanout_tasks_completed_total", "counter",
                  "Tasks completed, per device and model.")
    failed = family("fanout_tasks_failed_total", "counter",
                    "Tries that failed, per device and model.")
    failed_over = family("fanout_tasks_failed_over_total", "counter",
                         "Tasks completed after failing on another device, per device and model.")
    seconds = family("fanout_task_seconds", "histogram", "Service time of a task.")
    tokens = family("fanout_generated_tokens_total", "counter", "Tokens generated.")
    rate = family("fanout_tokens_per_second", "gauge", "Tokens generated per second, recently.")
    http = family("fanout_http_requests_total", "counter",
                  "HTTP requests answered, per endpoint and status.")

    queued = dict.fromkeys(models, 0) | (status.get("queued_by_model") or {})
    for model, n in sorted(queued.items()):
        queue.append(f"fanout_queue_depth{_labels(model=model)} {n}")
    for w in status.get("workers", []):
        dev = w["device"]
        up.append(f"fanout_worker_up{_labels(device=dev)} {int(w['state'] == 'up')}")
        in_flight.append(f"fanout_in_flight{_labels(device=dev)} {w['in_flight']}")
        capacity.append(f"fanout_capacity{_labels(device=dev)} {w['capacity']}")
        for model, m in w.get("models", {}).items():
            lab = _labels(device=dev, model=model)
            done.append(f"fanout_tasks_completed_total{lab} {m.get('done', 0)}")
            failed.append(f"fanout_tasks_failed_total{lab} {m.get('failed', 0)}")
            failed_over.append(f"fanout_tasks_failed_over_total{lab} {m.get('failed_over', 0)}")
            latency = m.get("latency") or {}
            for le, count in latency.get("buckets", []):
                le_text = le if isinstance(le, str) else repr(float(le))
                seconds.append(f"fanout_task_seconds_bucket"
                               f"{_labels(device=dev, model=model, le=le_text)} {count}")
            seconds.append(f"fanout_task_seconds_sum{lab} {float(latency.get('sum', 0.0))}")
            seconds.append(f"fanout_task_seconds_count{lab} {latency.get('count', 0)}")
            tokens.append(f"fanout_generated_tokens_total{lab} {m.get('tokens', 0)}")
            rate.append(f"fanout_tokens_per_second{lab} {float(m.get('tokens_per_s') or 0.0)}")
    for (endpoint, code), n in sorted(requests.items()):
        http.append(f"fanout_http_requests_total{_labels(endpoint=endpoint, status=code)} {n}")

    lines = []
    for name, kind, help_, samples in families:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", *samples]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    """What the HTTP API needs to know of a model: its kind and, for embeddings, the tokenizer."""

    name: str
    kind: str  # "llm" | "embedding" | "tensor" (served by the Python client only)
    tokenizer: str | None = None


def model_specs(config: Config) -> list[ModelSpec]:
    specs = []
    for m in config.models:
        backends = {config.device(d).backend for d in config.device_order(m.name)}
        kind = ("llm" if backends & set(LLM_BACKENDS)
                else "embedding" if m.tokenizer else "tensor")
        specs.append(ModelSpec(m.name, kind, m.tokenizer))
    return specs


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"http.address must be HOST:PORT, got {address!r}")
    host = host[1:-1] if host.startswith("[") else host
    return ("0.0.0.0" if host == "*" else host), int(port)


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
             "/health/live", "/health/ready", "/metrics")


class HttpServer:
    """The OpenAI-compatible API of one cluster, on its own event loop (``serve_in_thread``)
    or on the caller's (``await start()`` / ``await stop()``)."""

    def __init__(self, http: HttpConfig, models: list[ModelSpec], scheduler_address: str,
                 token: str | None = None):
        self.http = http
        self.host, self.port = split_host_port(http.address)
        if not http.api_key and not _is_loopback(self.host):
            raise ConfigError(f"http.address {http.address!r} binds a non-loopback host and so "
                              f"needs an API key (http.api_key or env FANOUT_API_KEY)")
        self.models = {m.name: m for m in models}
        self.scheduler_address = scheduler_address
        self.token = token
        self.created = int(time.time())
        self.requests: Counter = Counter()  # (endpoint, status) -> answered
        self._warned: set[str] = set()
        self._encoders: dict[str, TextEncoder] = {}
        self._client: AsyncClient | None = None
        self._connected: asyncio.Future | None = None
        self._connector: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None

    @classmethod
    def from_config(cls, config: Config, scheduler_address: str, token: str | None = None,
                    http: HttpConfig | None = None) -> "HttpServer":
        return cls(http or config.http, model_specs(config), scheduler_address,
                   token if token is not None else config.scheduler.token)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    # -- life cycle --

    async def start(self) -> None:
        """Listen, then connect to the scheduler in the background: requests wait for it,
        so ``fanout up`` can start this before its scheduler loop runs."""
        app = web.Application(client_max_size=self.http.max_body_bytes,
                              middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/health/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        # A client that goes away cancels its handler, and so its generation on the cluster.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(f"cannot listen on http.address {self.http.address}: "
                              f"{exc.strerror or exc}") from exc
        self.port = self._runner.addresses[0][1]
        self._connected = asyncio.get_running_loop().create_future()
        self._connector = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        while True:
            client = AsyncClient(self.scheduler_address, self.token)
            try:
                await client.connect()
            except ClusterUnavailable as exc:
                log.warning("HTTP API: %s; retrying", exc)
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            except FanoutError as exc:  # a wrong token will not fix itself
                log.error("HTTP API cannot connect to the scheduler: %s", exc)
                self._connected.set_exception(exc)
                return
            self._client = client
            self._connected.set_result(client)
            return

    async def stop(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def serve_in_thread(self, timeout: float = 30.0) -> "ServerThread":
        """Run on a private event loop in a daemon thread; returns once listening."""
        return ServerThread(self, timeout)

    async def client(self, timeout: float = 10.0) -> AsyncClient:
        if self._client is not None:
            return self._client
        try:
            return await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except asyncio.TimeoutError:
            raise ClusterUnavailable(f"the HTTP API could not reach the scheduler at "
                                     f"{self.scheduler_address}") from None

    # -- middleware: auth, errors in the OpenAI format, request counters --

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        endpoint = request.path if request.path in ENDPOINTS else "other"
        status = 499  # the client went away before an answer
        try:
            self._authorize(request)
            response = await handler(request)
            status = response.status
            return response
        except HttpError as exc:
            status = exc.status
            return exc.response()
        except FanoutError as exc:
            err = http_error_from(exc)
            status = err.status
            return err.response()
        except web.HTTPException as exc:  # aiohttp's own 404 / 405 / 413, reworded
            status = exc.status
            message = ("the request body is larger than http.max_body_bytes "
                       f"({self.http.max_body_bytes} bytes)" if exc.status == 413
                       else f"{exc.reason}: {request.method} {request.path}")
            return HttpError(exc.status, message, code=exc.reason.lower().replace(" ", "_"),
                             headers={k: v for k, v in exc.headers.items()
                                      if k == "Allow"}).response()
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("error while answering %s %s", request.method, request.path)
            status = 500
            return HttpError(500, "internal server error; see the server's log",
                             "server_error").response()
        finally:
            self.requests[(endpoint, str(status))] += 1

    def _authorize(self, request: web.Request) -> None:
        key = self.http.api_key
        if not key or request.path == "/health/live":
            return
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 key.encode()):
            raise HttpError(401, "a valid API key is required: send Authorization: Bearer "
                                 "<key>", code="invalid_api_key")

    async def _body(self, request: web.Request, known: set[str],
                    unsupported: dict[str, Callable] | None = None) -> Body:
        raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge -> 413
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the request body is not valid JSON: {exc}") from None
        return Body(data, known, unsupported or {},
                    lambda name: self._warn_unknown(request.path, name))

    def _warn_unknown(self, path: str, name: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning("ignoring unknown request field %r (first seen on %s)", name, path)

    def _model(self, body: Body, kind: str, endpoint: str) -> str:
        name = body.model()
        spec = self.models.get(name)
        if spec is None:
            raise HttpError(404, f"the model {name!r} does not exist; this cluster serves "
                                 f"{sorted(self.models)}", param="model", code="model_not_found")
        if spec.kind != kind:
            what = {"llm": "a language model", "embedding": "an embedding model",
                    "tensor": "a tensor model for the Python client"}[spec.kind]
            raise HttpError(400, f"the model {name!r} is {what} and cannot serve {endpoint}",
                            param="model", code="wrong_model_kind")
        return name

    # -- generation --

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, CHAT_FIELDS, UNSUPPORTED_CHAT)
        model = self._model(body, "llm", "/v1/chat/completions")
        messages = chat_messages(body)
        shape = Shape(True, f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time()))
        return await self._generate(request, body, shape, [messages], generation_params(body))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, COMPLETIONS_FIELDS, UNSUPPORTED_COMPLETIONS)
        model = self._model(body, "llm", "/v1/completions")
        prompts = text_list(body, "prompt", "a string or a non-empty array of strings")
        shape = Shape(False, f"cmpl-{uuid.uuid4().hex}", model, int(time.time()))
        return await self._generate(request, body, shape, prompts,
                                    generation_params(body, COMPLETIONS_DEFAULT_MAX_TOKENS))

    def _calls(self, body: Body, inputs: list, params: dict) -> list[tuple[Any, dict]]:
        """One generation per (input, choice), in OpenAI's choice order. With a seed and
        n > 1, choice j uses seed + j: reproducible, and not n copies of one answer."""
        n = choice_count(body)
        calls = []
        for x in inputs:
            for j in range(n):
                p = dict(params)
                if j and "seed" in p:
                    p["seed"] = p["seed"] + j
                calls.append((x, p))
        return calls

    async def _generate(self, request: web.Request, body: Body, shape: Shape, inputs: list,
                        params: dict) -> web.StreamResponse:
        calls = self._calls(body, inputs, params)
        stream = body.boolean("stream")
        usage_chunk = include_usage(body) if stream else False
        client = await self.client()
        if stream:
            return await self._stream(request, client, shape, calls, len(inputs), usage_chunk)
        tasks = [asyncio.create_task(client.agenerate(shape.model, x, **p)) for x, p in calls]
        results = await _all_or_cancel(tasks)
        headers = _device_headers([c.device for c in results],
                                  any(c.attempts for c in results))
        return web.json_response(shape.completion(results, len(inputs)), headers=headers,
                                 dumps=_dumps)

    async def _stream(self, request: web.Request, client: AsyncClient, shape: Shape,
                      calls: list, prompts: int, usage_chunk: bool) -> web.StreamResponse:
        """Server-sent events. Headers go out with the first chunk of every choice, so an
        error before any token (overload, bad input) still gets its HTTP status."""
        items: asyncio.Queue = asyncio.Queue()
        pumps = [asyncio.create_task(_pump(client.astream(shape.model, x, **p), i, items))
                 for i, (x, p) in enumerate(calls)]
        try:
            first: list[tuple[int, Any]] = []
            opening: dict[int, Chunk] = {}  # each choice's first chunk
            while len(opening) < len(pumps):
                index, item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                opening.setdefault(index, item)
                first.append((index, item))
            # What is known at the first token; the last chunk's "fanout" field has it all.
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                **_device_headers([opening[i].device for i in range(len(pumps))],
                                  any(c.previous_device or c.attempts
                                      for c in opening.values()))})
            await response.prepare(request)
            try:
                await self._write_events(response, shape, pumps, items, first, prompts,
                                         usage_chunk)
            except ConnectionResetError:
                log.debug("client left a stream of %s; cancelling it", shape.model)
            return response
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    async def _write_events(self, response, shape: Shape, pumps: list, items: asyncio.Queue,
                            first: list, prompts: int, usage_chunk: bool) -> None:
        usage_null = {"usage": None} if usage_chunk else {}
        out = bytearray()
        if shape.chat:
            for index in range(len(pumps)):
                out += _sse(shape.chunk(index, role=True) | usage_null)
        usages: dict[int, dict] = {}
        ended, backlog = 0, list(first)
        while ended < len(pumps):
            if not backlog:
                await response.write(bytes(out))
                out.clear()
                backlog.append(await items.get())
                while not items.empty():  # what arrived meanwhile goes out in one write
                    backlog.append(items.get_nowait())
            index, item = backlog.pop(0)
            if item is _END:
                ended += 1
            elif isinstance(item, FanoutError):
                # Too late for a status code: an error event, as other compatible servers do.
                err = http_error_from(item)
                out += _sse(err.body() | {"status": err.status})
                break
            elif isinstance(item, Chunk):
                if item.text or item.previous_device:
                    event = shape.chunk(index, item.text) | usage_null
                    if item.previous_device:
                        event["fanout"] = {"device": item.device, "failed_over": True,
                                           "previous_device": item.previous_device}
                    out += _sse(event)
                if item.finish_reason:
                    usages[index] = item.usage or {}
                    event = shape.chunk(index, finish_reason=item.finish_reason) | usage_null
                    event["fanout"] = _fanout_field(item.device, item.attempts)
                    out += _sse(event)
        else:
            if usage_chunk:
                out += _sse(shape.usage_chunk(
                    _sum_usage([usages.get(i, {}) for i in range(len(pumps))], prompts)))
            out += b"data: [DONE]\n\n"
        await response.write(bytes(out))
        await response.write_eof()

    # -- embeddings --

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request, EMBEDDINGS_FIELDS,
                                {"dimensions": lambda v: v is None})
        model = self._model(body, "embedding", "/v1/embeddings")
        texts = text_list(body, "input", "a string or a non-empty array of strings")
        if len(texts) > MAX_EMBEDDING_INPUTS:
            raise HttpError(400, f"input has {len(texts)} items; at most "
                                 f"{MAX_EMBEDDING_INPUTS} per request", param="input")
        encoding = body.get("encoding_format", (str,), '"float" or "base64"', "float")
        if encoding not in ("float", "base64"):
            raise HttpError(400, f'encoding_format must be "float" or "base64", got '
                                 f'{encoding!r}', param="encoding_format")
        encoder = self._encoder(model)
        inputs = [encoder.inputs(t) for t in texts]
        client = await self.client()
        results = await client.amap(model, inputs)
        data = []
        for i, (x, r) in enumerate(zip(inputs, results)):
            vector = mean_pool(_hidden(r.outputs), x["attention_mask"])[0].astype("<f4")
            value: Any = (base64.b64encode(vector.tobytes()).decode() if encoding == "base64"
                          else vector.tolist())
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(int(x["attention_mask"].sum()) for x in inputs)
        attempts = [a for r in results for a in r.attempts]
        fanout = _fanout_field(",".join(dict.fromkeys(r.device for r in results)), attempts)
        return web.json_response(
            {"object": "list", "data": data, "model": model,
             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "fanout": fanout},
            headers=_device_headers([r.device for r in results], bool(attempts)), dumps=_dumps)

    def _encoder(self, model: str) -> TextEncoder:
        if model not in self._encoders:
            self._encoders[model] = TextEncoder(self.models[model].tokenizer)
        return self._encoders[model]

    # -- listing, health, metrics --

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": name, "object": "model", "created": self.created, "owned_by": "fanout"}
            for name in self.models]})

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 when every model has a worker up with it loaded; the body lists them."""
        try:
            status = await (await self.client(timeout=2.0)).astatus(timeout=2.0)
        except FanoutError as exc:
            return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
        serving = {name: [w["device"] for w in status["workers"] if w["state"] == "up"
                          and w["models"].get(name, {}).get("state") == "ready"]
                   for name in self.models}
        ok = all(serving.values())
        return web.json_response({"status": "ready" if ok else "not ready", "models": serving},
                                 status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        status = await (await self.client(timeout=2.0)).astatus(timeout=5.0)
        return web.Response(text=prometheus_text(status, self.requests, list(self.models)),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _hidden(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """MiniLM's last hidden state, else the first [batch, seq, dim] output."""
    if HIDDEN in outputs:
        return outputs[HIDDEN]
    for value in outputs.values():
        if value.ndim == 3:
            return value
    raise InvalidInput(f"the model gives no [batch, tokens, dim] output to pool: "
                       f"{ {k: v.shape for k, v in outputs.items()} }")


_END = object()


async def _pump(stream, index: int, items: asyncio.Queue) -> None:
    """Forward one stream's chunks, its end or its error; cancelling this cancels the
    generation (the stream's own cleanup tells the scheduler)."""
    try:
        async for chunk in stream:
            items.put_nowait((index, chunk))
        items.put_nowait((index, _END))
    except FanoutError as exc:
        items.put_nowait((index, exc))


async def _all_or_cancel(tasks: list[asyncio.Task]) -> list:
    """Every task's result, or the first error after cancelling the rest (freeing slots)."""
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ServerThread:
    """An ``HttpServer`` on its own event loop in a daemon thread: ``.port``, ``.url``,
    ``.stop()``."""

    def __init__(self, server: HttpServer, timeout: float = 30.0):
        self.server = server
        self.loop = asyncio.new_event_loop()
        started: concurrent.futures.Future = concurrent.futures.Future()
        self.thread = threading.Thread(target=self._run, args=(started,), name="fanout-http",
                                       daemon=True)
        self.thread.start()
        started.result(timeout)  # re-raises ConfigError and friends in the caller

    def _run(self, started: concurrent.futures.Future) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:
            started.set_exception(exc)
            self.loop.close()
            return
        started.set_result(None)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self, timeout: float = 10.0) -> None:
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(timeout)
        finally:
            if not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
