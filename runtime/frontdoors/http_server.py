"""The OpenAI-compatible HTTP API: an aiohttp server that is one more client of the scheduler.

Endpoints: ``/v1/chat/completions`` and ``/v1/completions`` (both also as server-sent events),
``/v1/embeddings``, ``/v1/models``, ``/health/live``, ``/health/ready`` and ``/metrics``.
Every answer names the device that served it: headers ``X-Fanout-Device`` and
``X-Fanout-Failed-Over``, and an extra ``"fanout"`` JSON field that OpenAI clients ignore.

Requests are checked here before anything runs: wrong types name the field, and fields this
server cannot honour (top_logprobs, logit_bias...) get a 400 that says so instead of a
silently wrong answer (``openai_api.py``); every refused request is logged, one line each.
Unknown fields are ignored and logged once per name, as other compatible servers do.
``/v1/responses`` is ``responses.py``.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from aiohttp import web

from ..config.schema import Config, CurveKeys, HttpConfig, is_loopback
from ..errors import ClusterUnavailable, ConfigError, FanoutError, InvalidInput
from ..wire.status import Status
from . import responses
from .client import AsyncClient, TextChunk
from .embeddings import HIDDEN, TextEncoder, mean_pool
from .http_guard import ConnectionGuard, GuardedSite
from .loopthread import END, LoopThread, pump
from .metrics import prometheus_text
from .openai_api import (
    CHAT_FIELDS,
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    COMPLETIONS_FIELDS,
    EMBEDDINGS_FIELDS,
    MAX_EMBEDDING_INPUTS,
    UNSUPPORTED_CHAT,
    UNSUPPORTED_COMPLETIONS,
    Body,
    HttpError,
    Shape,
    chat_messages,
    chat_params,
    choice_count,
    device_headers,
    fanout_field,
    generation_params,
    http_error_from,
    include_usage,
    sse,
    sum_usage,
    text_list,
)

log = logging.getLogger("fanout.http")
access_log = logging.getLogger("fanout.http.access")  # INFO: one line per request
MODEL_KEY = web.RequestKey("fanout_model", str)
FIRST_BYTE_KEY = web.RequestKey("fanout_first_byte", float)

CONNECT_RETRY_S = 1.0
# After an early answer (408, 413), how long the rest of a body is read before the
# connection closes (aiohttp's default, 10 s, holds a descriptor per slow sender that long).
LINGER_S = 1.0
BIG_BODY_BYTES = 256 * 1024
SHUTDOWN_TIMEOUT_S = 2.0  # open requests were answered by the scheduler's shutdown already
LLM_BACKENDS = ("openvino-genai",)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

ApiModelKind = Literal["llm", "embedding", "tensor"]  # tensor: the Python client's only


@dataclass
class ApiModel:
    """What the HTTP API needs to know of a model: its kind and, for embeddings, the tokenizer."""

    name: str
    kind: ApiModelKind
    tokenizer: str | None = None


def api_models(config: Config) -> list[ApiModel]:
    models = []
    for m in config.models:
        backends = {config.device(d).backend for d in config.device_order(m.name)}
        kind: ApiModelKind = ("llm" if backends & set(LLM_BACKENDS)
                              else "embedding" if m.tokenizer else "tensor")
        models.append(ApiModel(m.name, kind, m.tokenizer))
    return models


def split_host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"http.address must be HOST:PORT, got {address!r}")
    host = host[1:-1] if host.startswith("[") else host
    return ("0.0.0.0" if host == "*" else host), int(port)


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
             "/v1/models", "/health/live", "/health/ready", "/metrics")


class HttpServer:
    """The OpenAI-compatible API of one cluster, on its own event loop (``serve_in_thread``)
    or on the caller's (``await start()`` / ``await stop()``)."""

    def __init__(self, http: HttpConfig, models: list[ApiModel], scheduler_address: str,
                 token: str | None = None, keys: CurveKeys | None = None):
        self.http = http
        self.host, self.port = split_host_port(http.address)
        if not http.api_key and not is_loopback(self.host):
            raise ConfigError(f"http.address {http.address!r} binds a non-loopback host and so "
                              f"needs an API key (http.api_key or env FANOUT_API_KEY)")
        self.models = {m.name: m for m in models}
        self.scheduler_address = scheduler_address
        self.token = token
        self.keys = keys
        self.created = int(time.time())
        self.requests: Counter = Counter()  # (endpoint, status) -> answered
        self._warned: set[str] = set()
        self._encoders: dict[str, TextEncoder] = {}
        self._client: AsyncClient | None = None
        self._connected: asyncio.Future | None = None
        self._connector: asyncio.Task | None = None
        self._runner: web.AppRunner | None = None
        self._guard: ConnectionGuard | None = None

    @classmethod
    def from_config(cls, config: Config, scheduler_address: str, token: str | None = None,
                    http: HttpConfig | None = None,
                    keys: CurveKeys | None = None) -> HttpServer:
        return cls(http or config.http, api_models(config), scheduler_address,
                   token if token is not None else config.scheduler.token,
                   keys if keys is not None else config.cluster.keys)

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
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model}", self.get_model)
        app.router.add_get("/health/live", self.live)
        app.router.add_get("/health/ready", self.ready)
        app.router.add_get("/metrics", self.metrics)
        # A client that goes away cancels its handler, and so its generation on the cluster.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                                     lingering_time=LINGER_S)
        await self._runner.setup()
        self._guard = ConnectionGuard(self.http.max_connections, self.http.header_timeout_s)
        site = GuardedSite(self._runner, self.host, self.port, self._guard)
        try:
            await site.start()
        except OSError as exc:
            self._guard.close()
            await self._runner.cleanup()
            raise ConfigError(f"cannot listen on http.address {self.http.address}: "
                              f"{exc.strerror or exc}") from exc
        self.port = self._runner.addresses[0][1]
        self._connected = asyncio.get_running_loop().create_future()
        self._connector = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        connected = self._connected
        assert connected is not None  # made by start() before this task
        while True:
            client = AsyncClient(self.scheduler_address, self.token, keys=self.keys)
            try:
                await client.connect()
            except ClusterUnavailable as exc:
                log.warning("HTTP API: %s; retrying", exc)
                await asyncio.sleep(CONNECT_RETRY_S)
                continue
            except FanoutError as exc:  # a wrong token will not fix itself
                log.error("HTTP API cannot connect to the scheduler: %s", exc)
                connected.set_exception(exc)
                return
            self._client = client
            connected.set_result(client)
            return

    async def stop(self) -> None:
        if self._connector is not None:
            self._connector.cancel()
        if self._guard is not None:
            self._guard.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def serve_in_thread(self, timeout: float = 30.0) -> ServerThread:
        """Run on a private event loop in a daemon thread; returns once listening."""
        return ServerThread(self, timeout)

    async def client(self, timeout: float = 10.0) -> AsyncClient:
        if self._client is not None:
            return self._client
        if self._connected is None:
            raise ClusterUnavailable("the HTTP API is not started")
        try:
            return await asyncio.wait_for(asyncio.shield(self._connected), timeout)
        except TimeoutError:
            raise ClusterUnavailable(f"the HTTP API could not reach the scheduler at "
                                     f"{self.scheduler_address}") from None

    # -- middleware: auth, errors in the OpenAI format, request counters --

    @web.middleware
    async def _middleware(self, request: web.Request, handler) -> web.StreamResponse:
        endpoint = request.path if request.path in ENDPOINTS else "other"
        status = 499  # the client went away before an answer
        started = time.perf_counter()
        refused: str | None = None
        response: web.StreamResponse | None = None
        assert self._guard is not None  # made by start(), before any request
        self._guard.serving(request.transport)
        try:
            self._authorize(request)
            response = await handler(request)
            status = response.status
            return response
        except HttpError as exc:
            status, refused = exc.status, exc.message
            response = exc.response()
            if status == 408:  # the rest of its body may never come: the connection ends
                response.force_close()
            return response
        except FanoutError as exc:
            err = http_error_from(exc)
            status, refused = err.status, err.message
            response = err.response()
            return response
        except web.HTTPException as exc:  # aiohttp's own 404 / 405 / 413, reworded
            status = exc.status
            refused = ("the request body is larger than http.max_body_bytes "
                       f"({self.http.max_body_bytes} bytes)" if exc.status == 413
                       else f"{exc.reason}: {request.method} {request.path}")
            response = HttpError(exc.status, refused, code=exc.reason.lower().replace(" ", "_"),
                                 headers={k: v for k, v in exc.headers.items()
                                          if k == "Allow"}).response()
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("error while answering %s %s", request.method, request.path)
            status, refused = 500, "internal server error"
            response = HttpError(500, "internal server error; see the server's log",
                                 "server_error").response()
            return response
        finally:
            self._guard.served(request.transport)
            self.requests[(endpoint, str(status))] += 1
            _access(request, status, started, response, refused)

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
                    unsupported: dict[str, tuple[Callable, str]] | None = None) -> Body:
        try:  # over client_max_size: HTTPRequestEntityTooLarge -> 413
            raw = await asyncio.wait_for(request.read(), self.http.body_timeout_s)
        except TimeoutError:
            raise HttpError(408, f"the request body did not arrive within "
                                 f"{self.http.body_timeout_s:g} s (http.body_timeout_s)",
                            code="request_timeout") from None
        try:
            # A big body parses off the event loop (8 MB of JSON: a fair part of a second).
            data = json.loads(raw) if len(raw) < BIG_BODY_BYTES else \
                await asyncio.to_thread(json.loads, raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the request body is not valid JSON: {exc}") from None
        except RecursionError:  # a few KB of brackets nest past what the parser survives
            raise HttpError(400, "the request body's JSON nests too deeply") from None
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            request[MODEL_KEY] = data["model"][:64]  # for the access log
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
        shape = Shape(True, f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time()),
                      logprobs=body.boolean("logprobs"))
        return await self._generate(request, body, shape, [messages], chat_params(body))

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, responses.FIELDS, responses.UNSUPPORTED)
        model = self._model(body, "llm", "/v1/responses")
        call = responses.read(body)
        client = await self.client()
        if body.boolean("stream"):
            return await responses.stream(request, client, model, call)
        completion = await client.agenerate(model, call.messages, **call.params)
        return web.json_response(
            responses.response(model, call, completion),
            headers=device_headers([completion.device], bool(completion.attempts)),
            dumps=_dumps)

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
        if len(inputs) * n > self.http.max_generations:  # refused before any is started
            raise HttpError(400, f"the request asks for {len(inputs)} prompt(s) x n={n} = "
                                 f"{len(inputs) * n} generations; at most "
                                 f"{self.http.max_generations} per request "
                                 f"(http.max_generations)", param="prompt" if n == 1 else "n",
                            code="too_many_generations")
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
        headers = device_headers([c.device for c in results],
                                  any(c.attempts for c in results))
        return web.json_response(shape.completion(results, len(inputs)), headers=headers,
                                 dumps=_dumps)

    async def _stream(self, request: web.Request, client: AsyncClient, shape: Shape,
                      calls: list, prompts: int, usage_chunk: bool) -> web.StreamResponse:
        """Server-sent events. Headers go out with the first chunk of every choice, so an
        error before any token (overload, bad input) still gets its HTTP status."""
        items: asyncio.Queue = asyncio.Queue()

        def tagged(index: int) -> Callable[[Any], None]:
            return lambda item: items.put_nowait((index, item))

        pumps = [asyncio.create_task(pump(client.astream(shape.model, x, **p), tagged(i)))
                 for i, (x, p) in enumerate(calls)]
        try:
            first: list[tuple[int, Any]] = []
            opening: dict[int, TextChunk] = {}  # each choice's first chunk
            while len(opening) < len(pumps):
                index, item = await items.get()
                if isinstance(item, BaseException):
                    raise item
                opening.setdefault(index, item)
                first.append((index, item))
            # What is known at the first token; the last chunk's "fanout" field has it all.
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                **device_headers([opening[i].device for i in range(len(pumps))],
                                  any(c.previous_device or c.attempts
                                      for c in opening.values()))})
            await response.prepare(request)
            request[FIRST_BYTE_KEY] = time.perf_counter()
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
                out += sse(shape.chunk(index, role=True) | usage_null)
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
            if item is END:
                ended += 1
            elif isinstance(item, FanoutError):
                # Too late for a status code: an error event, as other compatible servers do.
                err = http_error_from(item)
                out += sse(err.body() | {"status": err.status})
                break
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item, TextChunk):
                if item.text or item.previous_device or item.logprobs:
                    event = shape.chunk(index, item.text, logprobs=item.logprobs) | usage_null
                    if item.previous_device:
                        event["fanout"] = {"device": item.device, "failed_over": True,
                                           "previous_device": item.previous_device}
                    out += sse(event)
                for call in item.tool_calls:
                    for event in shape.tool_call_chunks(index, call):
                        out += sse(event | usage_null)
                if item.finish_reason:
                    usages[index] = item.usage or {}
                    event = shape.chunk(index, finish_reason=item.finish_reason) | usage_null
                    event["fanout"] = fanout_field(item.device, item.attempts)
                    out += sse(event)
        else:
            if usage_chunk:
                out += sse(shape.usage_chunk(
                    sum_usage([usages.get(i, {}) for i in range(len(pumps))], prompts)))
            out += b"data: [DONE]\n\n"
        await response.write(bytes(out))
        await response.write_eof()

    # -- embeddings --

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request, EMBEDDINGS_FIELDS,
                                {"dimensions": (lambda v: v is None,
                                                "dimensions is not supported: MiniLM's "
                                                "vectors have one size")})
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
        # Off the event loop: 2,048 long texts take seconds to tokenize.
        inputs = await asyncio.to_thread(lambda: [encoder.inputs(t) for t in texts])
        client = await self.client()
        results = await client.amap(model, inputs)

        def answer() -> str:  # pooling and JSON of 2,048 vectors: off the event loop too
            data = []
            for i, (x, r) in enumerate(zip(inputs, results)):
                vector = mean_pool(_hidden(r.outputs), x["attention_mask"])[0].astype("<f4")
                value: Any = (base64.b64encode(vector.tobytes()).decode()
                              if encoding == "base64" else vector.tolist())
                data.append({"object": "embedding", "index": i, "embedding": value})
            tokens = sum(int(x["attention_mask"].sum()) for x in inputs)
            return _dumps({"object": "list", "data": data, "model": model,
                           "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                           "fanout": fanout})

        attempts = [a for r in results for a in r.attempts]
        fanout = fanout_field(",".join(dict.fromkeys(r.device for r in results)), attempts)
        return web.Response(text=await asyncio.to_thread(answer),
                            content_type="application/json",
                            headers=device_headers([r.device for r in results], bool(attempts)))

    def _encoder(self, model: str) -> TextEncoder:
        if model not in self._encoders:
            tokenizer = self.models[model].tokenizer
            assert tokenizer is not None  # an embedding model has one (api_models)
            self._encoders[model] = TextEncoder(tokenizer)
        return self._encoders[model]

    # -- listing, health, metrics --

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            self._model_object(name) for name in self.models]})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.models:
            raise HttpError(404, f"the model {name!r} does not exist; this cluster serves "
                                 f"{sorted(self.models)}", param="model", code="model_not_found")
        return web.json_response(self._model_object(name))

    def _model_object(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "fanout"}

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 when every model has a worker up with it loaded; the body lists them."""
        try:
            status = await (await self.client(timeout=2.0)).acluster_status(timeout=2.0)
        except FanoutError as exc:
            return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
        serving = {name: _serving(status, name) for name in self.models}
        ok = all(serving.values())
        return web.json_response({"status": "ready" if ok else "not ready", "models": serving},
                                 status=200 if ok else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        status = await (await self.client(timeout=2.0)).acluster_status(timeout=5.0)
        return web.Response(text=prometheus_text(status, self.requests, list(self.models)),
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})


def _serving(status: Status, model: str) -> list[str]:
    """The devices whose worker is up with ``model`` ready."""
    return [w.device for w in status.workers if w.state == "up"
            and model in w.models and w.models[model].state == "ready"]


def _access(request: web.Request, status: int, started: float,
            response: web.StreamResponse | None, refused: str | None) -> None:
    """One access-log line per request: what was asked, the answer, where it ran, how fast
    (ttft: until a stream's first event); a refused request also says why."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    device = response.headers.get("X-Fanout-Device", "-") if response is not None else "-"
    first = request.get(FIRST_BYTE_KEY)
    ttft = f"{first - started:.3f}s" if first else "-"
    line = (f"{request.remote or '-'} {request.method} {request.path} "
            f"model={request.get(MODEL_KEY, '-')} status={status} device={device} "
            f"ttft={ttft} duration={time.perf_counter() - started:.3f}s")
    if refused:
        line += f" refused: {refused}"
    access_log.info("%s", line)


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
        self._loop = LoopThread("fanout-http")
        try:
            self._loop.call(server.start(), timeout)  # re-raises ConfigError and friends here
        except BaseException:
            self._loop.stop()
            raise

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop.closed:
            return
        try:
            self._loop.call(self.server.stop(), timeout)
        finally:
            self._loop.stop(timeout)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
