"""``POST /v1/responses``, stateless: OpenAI's Responses API over the same generations.

The OpenAI Agents SDK's default model speaks it. The whole conversation comes in ``input``
(text, or items: messages, ``function_call``, ``function_call_output``); nothing is stored,
so ``previous_response_id`` is refused. ``tools`` are function tools, ``text.format`` is the
structured output, and a stream is the Responses event sequence (``response.created`` ...
``response.output_text.delta`` ... ``response.function_call_arguments.delta`` ...
``response.completed``).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..errors import FanoutError
from .client import AsyncClient, TextChunk, TextCompletion
from .openai_api import (
    Body,
    HttpError,
    device_headers,
    fanout_field,
    http_error_from,
    text_content,
)

UNSUPPORTED = {
    "previous_response_id": (lambda v: v is None, "this server stores no responses: send the "
                                                  "whole conversation as input"),
    "conversation": (lambda v: v is None, "this server stores no conversations: send the "
                                          "whole conversation as input"),
    "background": (lambda v: v in (None, False), "background responses are not supported"),
    "prompt": (lambda v: v is None, "stored prompt templates are not supported"),
    "top_logprobs": (lambda v: v in (None, 0), "top_logprobs is not supported"),
}
FIELDS = {"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
          "max_output_tokens", "text", "temperature", "top_p", "stream", "store", "include",
          "metadata", "truncation", "user", "reasoning", "service_tier", "safety_identifier",
          "prompt_cache_key", "stream_options", "max_tool_calls"} | set(UNSUPPORTED)


@dataclass
class Call:
    """A Responses request as a generation: chat messages and the parameters."""

    messages: list[dict]
    params: dict
    echo: dict  # request fields the response object repeats


def read(body: Body) -> Call:
    messages = _messages(body)
    params: dict[str, Any] = {}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"),
                         ("top_p", "top_p")):
        value = (body.integer(theirs) if theirs == "max_output_tokens"
                 else body.number(theirs))
        if value is not None:
            params[ours] = value
    for name in ("tools", "tool_choice"):
        if body.data.get(name) is not None:
            params[name] = body.data[name]
    if body.data.get("parallel_tool_calls") is not None:
        params["parallel_tool_calls"] = body.boolean("parallel_tool_calls")
    text = body.get("text", (dict,), "an object", {})
    if text.get("format") is not None:
        params["response_format"] = text["format"]
    echo = {"instructions": body.data.get("instructions"),
            "tools": body.data.get("tools") or [],
            "tool_choice": body.data.get("tool_choice") or "auto",
            "parallel_tool_calls": params.get("parallel_tool_calls", True),
            "temperature": params.get("temperature"), "top_p": params.get("top_p"),
            "max_output_tokens": params.get("max_tokens"),
            "text": {"format": text.get("format") or {"type": "text"}},
            "metadata": body.data.get("metadata") or {}}
    return Call(messages, params, echo)


def _messages(body: Body) -> list[dict]:
    """``instructions`` and ``input`` as chat messages (a run of ``function_call`` items is
    one assistant turn with those tool calls)."""
    out: list[dict] = []
    instructions = body.get("instructions", (str,), "a string")
    if instructions:
        out.append({"role": "system", "content": instructions})
    items = body.data.get("input")
    if isinstance(items, str):
        return out + [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise HttpError(400, "input must be a string or a non-empty array of items",
                        param="input")
    for i, item in enumerate(items):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise HttpError(400, f"{where}.role must be user, system, developer or "
                                     f"assistant, got {json.dumps(role)[:40]}",
                                param=f"{where}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": text_content(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": _text(item, "call_id", where), "type": "function",
                    "function": {"name": _text(item, "name", where),
                                 "arguments": item.get("arguments") or "{}"}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": _text(item, "call_id", where),
                        "content": output if isinstance(output, str)
                        else text_content(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # nothing here reasons; another model's notes are not replayed
        else:
            raise HttpError(400, f"{where}: items of type {json.dumps(kind)[:40]} are not "
                                 f"supported; send messages, function_call and "
                                 f"function_call_output", param=where,
                            code="unsupported_parameter")
    return out


def _text(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str) or not value:
        raise HttpError(400, f"{where}.{name} must be a non-empty string",
                        param=f"{where}.{name}")
    return value


# ---- answers ------------------------------------------------------------------------------

def _ids() -> tuple[str, str]:
    hex_ = uuid.uuid4().hex
    return f"resp_{hex_}", f"msg_{hex_}"


def _usage(usage: dict) -> dict:
    prompt, done = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": done, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + done}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    content = [] if status == "in_progress" else [_text_part(text)]
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": content}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call, status: str = "completed") -> dict:
    return {"type": "function_call", "id": f"fc_{call.id.removeprefix('call_')}",
            "call_id": call.id, "name": call.name,
            "arguments": call.arguments if status == "completed" else "", "status": status}


def _envelope(response_id: str, model: str, call: Call, status: str, output: list,
              created: int, usage: dict | None = None, finish: str | None = None) -> dict:
    incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
    return {"id": response_id, "object": "response", "created_at": created,
            "status": "incomplete" if incomplete and status == "completed" else status,
            "incomplete_details": incomplete, "error": None, "model": model,
            "output": output, "usage": _usage(usage) if usage is not None else None,
            "store": False, "truncation": "disabled", "previous_response_id": None,
            "reasoning": None, **call.echo}


def response(model: str, call: Call, c: TextCompletion) -> dict:
    """The whole response object of a finished generation."""
    response_id, item_id = _ids()
    output = []
    if c.text or not c.tool_calls:
        output.append(_message_item(item_id, c.text))
    output += [_call_item(t) for t in c.tool_calls]
    return _envelope(response_id, model, call, "completed", output, int(time.time()),
                     c.usage, c.finish_reason) | {"fanout": fanout_field(c.device, c.attempts)}


async def stream(request: web.Request, client: AsyncClient, model: str,
                 call: Call) -> web.StreamResponse:
    """The Responses event stream. The HTTP status goes out with the first chunk, so an
    error before any token (overload, bad input) still gets its status code."""
    chunks = client.astream(model, call.messages, **call.params)
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:  # a stream always ends with a chunk that has finish_reason
        raise HttpError(500, "the generation ended without an answer", "server_error") from None
    events = _Events(model, call)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        **device_headers([first.device], bool(first.previous_device))})
    await response.prepare(request)
    try:
        await response.write(events.start())
        item: TextChunk | None = first
        while item is not None:
            await response.write(events.chunk(item))
            item = await anext(chunks, None)
    except FanoutError as exc:  # too late for a status code: an error event
        err = http_error_from(exc)
        await response.write(events.error(err))
    except ConnectionResetError:
        pass
    finally:
        await chunks.aclose()  # a client that left cancels the generation
    await response.write_eof()
    return response


class _Events:
    """The Responses server-sent events of one answer, numbered in order."""

    def __init__(self, model: str, call: Call) -> None:
        self.model, self.call = model, call
        self.response_id, self.item_id = _ids()
        self.created = int(time.time())
        self.seq = 0
        self.output: list[dict] = []
        self.text: str | None = None  # the open message's text, once one is open

    def _event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return (f"event: {kind}\ndata: ".encode() + json.dumps(data, separators=(",", ":"))
                .encode() + b"\n\n")

    def _response(self, status: str, **kw: Any) -> dict:
        return _envelope(self.response_id, self.model, self.call, status, self.output,
                         self.created, **kw)

    def start(self) -> bytes:
        return (self._event("response.created", response=self._response("in_progress")) +
                self._event("response.in_progress", response=self._response("in_progress")))

    def chunk(self, c: TextChunk) -> bytes:
        out = b""
        if c.text:
            if self.text is None:
                out += self._open_message()
            self.text = (self.text or "") + c.text
            out += self._event("response.output_text.delta", item_id=self.item_id,
                               output_index=len(self.output), content_index=0, delta=c.text,
                               logprobs=[])
        for tool_call in c.tool_calls:
            out += self._close_message() + self._call(tool_call)
        if c.finish_reason is not None:
            if not self.output and self.text is None:
                out += self._open_message()  # an empty answer is an empty message
            out += self._close_message()
            final = self._response("completed", usage=c.usage or {}, finish=c.finish_reason)
            final["fanout"] = fanout_field(c.device, c.attempts)
            out += self._event("response.completed", response=final)
        return out

    def error(self, err: HttpError) -> bytes:
        return self._event("error", code=err.code or err.type, message=err.message,
                           param=err.param)

    def _open_message(self) -> bytes:
        self.text = ""
        index = len(self.output)
        return (self._event("response.output_item.added", output_index=index,
                            item=_message_item(self.item_id, "", "in_progress")) +
                self._event("response.content_part.added", item_id=self.item_id,
                            output_index=index, content_index=0, part=_text_part("")))

    def _close_message(self) -> bytes:
        if self.text is None:
            return b""
        text, index = self.text, len(self.output)
        self.text = None
        item = _message_item(self.item_id, text)
        self.output.append(item)
        return (self._event("response.output_text.done", item_id=self.item_id,
                            output_index=index, content_index=0, text=text, logprobs=[]) +
                self._event("response.content_part.done", item_id=self.item_id,
                            output_index=index, content_index=0, part=_text_part(text)) +
                self._event("response.output_item.done", output_index=index, item=item))

    def _call(self, tool_call) -> bytes:
        index = len(self.output)
        item = _call_item(tool_call)
        self.output.append(item)
        return (self._event("response.output_item.added", output_index=index,
                            item=_call_item(tool_call, "in_progress")) +
                self._event("response.function_call_arguments.delta", item_id=item["id"],
                            output_index=index, delta=tool_call.arguments) +
                self._event("response.function_call_arguments.done", item_id=item["id"],
                            output_index=index, name=tool_call.name,
                            arguments=tool_call.arguments) +
                self._event("response.output_item.done", output_index=index, item=item))
