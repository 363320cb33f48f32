"""Generation requests as they cross the wire, and their one validator.

``build_request`` (the client, before sending) and ``read_request`` (the worker, on receipt)
run the same checks, so a bad request fails with ``InvalidInput`` in the caller's process and
one that bypassed the client fails the same way on the worker. The HTTP front door maps
OpenAI's JSON onto these fields and reports ``InvalidField.field`` as the 400's ``param``.
The engine checks only what it alone knows: the context length and what its pipeline can
honour (``Unsupported``).
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidInput, brief

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")
PARAMS = ("max_tokens", "temperature", "top_p", "stop", "seed", "ignore_eos", "tools",
          "tool_choice", "parallel_tool_calls", "response_format", "presence_penalty",
          "frequency_penalty", "logprobs")
MAX_TOKENS_LIMIT = 1 << 20
MAX_TOOLS = 128  # OpenAI's own limit per request
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 64  # levels of maps and lists in a tool's or a response format's schema
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
SCHEMA_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}


class InvalidField(InvalidInput):
    """An ``InvalidInput`` that names the request field at fault (``messages[2].role``)."""

    def __init__(self, field_: str, why: str) -> None:
        self.field = field_
        super().__init__(f"{field_} {why}")


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is the JSON schema of its arguments."""

    name: str
    parameters: dict
    description: str = ""

    def to_wire(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description":
                                                 self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name and its arguments as a JSON text that
    matches the tool's parameter schema. ``id`` is given by the front door that answers."""

    name: str
    arguments: str
    index: int = 0  # its place among the calls of one answer
    id: str = ""

    @property
    def args(self) -> Any:
        """The arguments, parsed."""
        return json.loads(self.arguments)

    def to_wire(self) -> dict:
        return {"index": self.index, "name": self.name, "arguments": self.arguments}

    @classmethod
    def from_wire(cls, d: dict) -> ToolCall:
        return cls(str(d["name"]), str(d["arguments"]), int(d.get("index", 0)))


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability the model gave one token it chose."""

    token: str
    logprob: float

    def to_wire(self) -> tuple[str, float]:
        return (self.token, self.logprob)

    @classmethod
    def from_wire(cls, v: list) -> TokenLogprob:
        return cls(str(v[0]), float(v[1]))


@dataclass
class GenRequest:
    """One chat or prompt completion, as a worker hands it to an ``LLMSession``.

    Exactly one of ``messages`` (chat, rendered with the model's chat template) and ``prompt``
    (raw text) is set. ``prefix_ids`` are tokens already generated for this request on
    another device (mid-stream failover): generation continues after them, exactly as if it
    had never stopped, and ``max_tokens`` counts them too. ``prefix_text`` is the text the
    caller has already been sent for them (a constrained request re-runs instead: see
    ``backends/genai/deltas.py``).
    """

    messages: list[dict] | None = None
    prompt: str | None = None
    prefix_ids: list[int] = field(default_factory=list)
    prefix_text: str = ""
    prefix_calls: int = 0  # whole tool calls the caller has already been sent
    max_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: always make max_tokens tokens
    tools: list[Tool] = field(default_factory=list)
    tool_choice: str = "none"  # "none" | "auto" | "required"; "required" with forced_tool
    forced_tool: str | None = None  # tool_choice named this function
    parallel_tool_calls: bool = True
    # None (free text), {"type": "json_object"} or {"type": "json_schema", "name", "schema"}
    response_format: dict | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False

    @property
    def calls_tools(self) -> bool:
        """The model may (or must) answer with tool calls, which are parsed out of its text."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def constrained(self) -> bool:
        """Decoding follows a grammar (tool calls or a JSON format), not only the model."""
        return self.calls_tools or self.response_format is not None

    def offered_tools(self) -> list[Tool]:
        """The tools a call may name: all of them, or the one ``tool_choice`` forced."""
        if self.forced_tool is None:
            return list(self.tools)
        return [t for t in self.tools if t.name == self.forced_tool]


# "stop" (end of sequence or a stop string) | "length" | "tool_calls" (it called tools)
FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass
class GenResult:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int  # all tokens of the completion, prefix_ids included


@dataclass
class Delta:
    """What one step of a generation adds: token ids, the caller's text, whole tool calls
    (a call is sent once complete, never cut), and each token's log-probability if asked."""

    ids: list[int]
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


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
    request = read_request(body)  # fail here, in the caller's process, rather than on a device
    if request.temperature > 0 and request.seed is None:
        # A seed of its own, so that a re-run on another device (failover) draws the same.
        body["seed"] = random.getrandbits(31)
    return body


def read_request(d: Any, prefix_ids: list[int] | None = None, prefix_text: str = "",
                 prefix_calls: int = 0) -> GenRequest:
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
        raise InvalidField("prompt", "must be a non-empty string")
    if messages is not None:
        messages = [_message(i, m) for i, m in _items(messages, "messages")]
    max_tokens = d.get("max_tokens", 256)
    if not _int(max_tokens) or not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidField("max_tokens", f"must be an integer >= 1, got {brief(max_tokens)}")
    temperature = _number(d, "temperature", 0.0, 0, 2)
    top_p = _number(d, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise InvalidField("top_p", "must be a number in (0, 1], got 0")
    stop = d.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if (not isinstance(stop, list) or len(stop) > 16
            or not all(isinstance(s, str) and s for s in stop)):
        raise InvalidField("stop", f"must be a string or a list of up to 16 non-empty "
                                   f"strings, got {brief(stop, 80)}")
    seed = d.get("seed")
    if seed is not None and (not _int(seed) or not 0 <= seed < 2**63):
        raise InvalidField("seed", f"must be a non-negative integer, got {brief(seed)}")
    tools = [_tool(i, t) for i, t in _items(d.get("tools", []), "tools", empty_ok=True)]
    if len(tools) > MAX_TOOLS:
        raise InvalidField("tools", f"has {len(tools)} tools; at most {MAX_TOOLS}")
    names = [t.name for t in tools]
    if len(set(names)) < len(names):
        raise InvalidField("tools", f"names each function once; got {names}")
    tool_choice, forced = _tool_choice(d.get("tool_choice"), names)
    prefix = list(prefix_ids or [])
    if not all(_int(t) and t >= 0 for t in prefix):
        raise InvalidInput("prefix_ids must be token ids (integers >= 0)")
    if not isinstance(prefix_text, str) or not _int(prefix_calls) or prefix_calls < 0:
        raise InvalidInput("prefix_text must be a string and prefix_calls a count")
    if len(prefix) > max_tokens:
        raise InvalidInput(f"prefix_ids has {len(prefix)} tokens, more than max_tokens "
                           f"{max_tokens}")
    return GenRequest(
        messages=messages, prompt=prompt, prefix_ids=prefix, prefix_text=prefix_text,
        prefix_calls=prefix_calls, max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, stop=stop, seed=seed,
        ignore_eos=_bool(d, "ignore_eos", False), tools=tools, tool_choice=tool_choice,
        forced_tool=forced, parallel_tool_calls=_bool(d, "parallel_tool_calls", True),
        response_format=_response_format(d.get("response_format")),
        presence_penalty=_number(d, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=_number(d, "frequency_penalty", 0.0, -2, 2),
        logprobs=_bool(d, "logprobs", False))


# ---- messages -------------------------------------------------------------------------------

def _message(i: int, m: Any) -> dict:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise InvalidField(where, f"must be a map with role and content, got {brief(m, 80)}")
    extra = sorted(set(m) - _MESSAGE_KEYS)
    if extra:
        raise InvalidField(where, f"has unknown field(s) {extra}; known: {sorted(_MESSAGE_KEYS)}")
    role = m.get("role")
    if role not in ROLES:
        raise InvalidField(f"{where}.role", f"must be one of {list(ROLES)}, got {brief(role, 40)}")
    out: dict[str, Any] = {"role": role}
    content = m.get("content")
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise InvalidField(f"{where}.tool_calls", "belongs to assistant messages only")
        out["tool_calls"] = [_history_call(f"{where}.tool_calls[{j}]", c)
                             for j, c in _items(calls, f"{where}.tool_calls")]
    if content is None and calls is None:
        raise InvalidField(f"{where}.content", "must be a string")
    if content is not None and not isinstance(content, str):
        raise InvalidField(f"{where}.content", "must be a string")
    out["content"] = content
    if role == "tool":
        call_id = m.get("tool_call_id")
        if not isinstance(call_id, str) or not call_id:
            raise InvalidField(f"{where}.tool_call_id", "must name the call this answers")
        out["tool_call_id"] = call_id
    elif "tool_call_id" in m:
        raise InvalidField(f"{where}.tool_call_id", "belongs to tool messages only")
    if m.get("name") is not None:
        if not isinstance(m["name"], str):
            raise InvalidField(f"{where}.name", "must be a string")
        out["name"] = m["name"]
    return out


def _history_call(where: str, c: Any) -> dict:
    """A call in an earlier assistant turn: OpenAI's shape, arguments as a JSON text."""
    if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
        raise InvalidField(where, 'must be {"id", "type": "function", "function": {name, '
                                  'arguments}}')
    fn = c["function"]
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise InvalidField(f"{where}.function.name", "must be a non-empty string")
    arguments = fn.get("arguments", "{}")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments)
    if not isinstance(arguments, str):
        raise InvalidField(f"{where}.function.arguments", "must be a JSON text")
    call_id = c.get("id", "")
    if not isinstance(call_id, str):
        raise InvalidField(f"{where}.id", "must be a string")
    return {"id": call_id, "type": "function",
            "function": {"name": fn["name"], "arguments": arguments}}


# ---- tools and formats ----------------------------------------------------------------------

def _tool(i: int, t: Any) -> Tool:
    """OpenAI's chat shape ``{"type": "function", "function": {...}}`` or the flat one of the
    Responses API ``{"type": "function", "name": ...}``."""
    where = f"tools[{i}]"
    if not isinstance(t, dict) or t.get("type", "function") != "function":
        kind = t.get("type") if isinstance(t, dict) else t
        raise InvalidField(where, f'must be a function tool {{"type": "function", "function": '
                                  f'{{name, description, parameters}}}}, got {brief(kind, 40)}')
    fn = t.get("function", t)
    if not isinstance(fn, dict):
        raise InvalidField(f"{where}.function", "must be a map")
    at = f"{where}.function" if "function" in t else where
    name = fn.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise InvalidField(f"{at}.name", f"must be 1-64 letters, digits, _ or -, got "
                                         f"{brief(name, 70)}")
    description = fn.get("description") or ""
    if not isinstance(description, str):
        raise InvalidField(f"{at}.description", "must be a string")
    parameters = fn.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    check_schema(parameters, f"{at}.parameters")
    if parameters.get("type", "object") != "object":
        raise InvalidField(f"{at}.parameters", f'must describe an object ("type": "object"), '
                                               f'got type {brief(parameters.get("type"))}')
    return Tool(name, parameters, description)


def _tool_choice(choice: Any, names: list[str]) -> tuple[str, str | None]:
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, str) and choice not in TOOL_CHOICES and choice in names:
        return "required", choice  # the Python client's short form: a tool's name
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise InvalidField("tool_choice", f"must be one of {list(TOOL_CHOICES)} or "
                                              f'{{"type": "function", "function": {{"name"}}}}, '
                                              f"got {brief(choice, 40)}")
        if choice == "required" and not names:
            raise InvalidField("tool_choice", '"required" needs tools to call')
        return choice, None
    fn = choice.get("function", choice) if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise InvalidField("tool_choice", f"must be a string or name a function, got "
                                          f"{brief(choice, 60)}")
    if name not in names:
        raise InvalidField("tool_choice", f"names {brief(name)}, which is not among the tools "
                                          f"{names}")
    return "required", name


def _response_format(fmt: Any) -> dict | None:
    """OpenAI's chat shape (``json_schema: {name, schema, strict}``) or the flat one of the
    Responses API's ``text.format``; None for plain text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise InvalidField("response_format", f'type must be "text", "json_object" or '
                                              f'"json_schema", got {brief(kind, 40)}')
    spec = fmt.get("json_schema", fmt)
    if not isinstance(spec, dict):
        raise InvalidField("response_format.json_schema", "must be a map")
    name = spec.get("name", "response")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise InvalidField("response_format.json_schema.name",
                           f"must be 1-64 letters, digits, _ or -, got {brief(name, 70)}")
    schema = spec.get("schema")
    if schema is None:
        raise InvalidField("response_format.json_schema.schema", "is required")
    check_schema(schema, "response_format.json_schema.schema")
    strict = spec.get("strict", False)
    if not isinstance(strict, bool) and strict is not None:
        raise InvalidField("response_format.json_schema.strict", "must be true or false")
    return {"type": "json_schema", "name": name, "schema": schema, "strict": bool(strict)}


def check_schema(schema: Any, where: str) -> None:
    """The checks a JSON schema must pass before the engine compiles it: a map of at most
    ``MAX_SCHEMA_BYTES``, with known ``type`` names and local ``$ref``s only. The engine's
    grammar compiler finds what is left (a bad ``pattern``); ``genai.py`` reports that."""
    if not isinstance(schema, dict):
        raise InvalidField(where, f"must be a JSON schema (a map), got {type(schema).__name__}")
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError) as e:
        raise InvalidField(where, f"must be JSON: {brief(str(e), 120)}") from None
    except RecursionError:
        raise InvalidField(where, f"nests deeper than {MAX_SCHEMA_DEPTH} levels") from None
    if size > MAX_SCHEMA_BYTES:
        raise InvalidField(where, f"is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES}")
    _check_node(schema, where, 0)


def _check_node(node: Any, where: str, depth: int) -> None:
    if depth > MAX_SCHEMA_DEPTH:  # a few KB can nest past Python's recursion limit
        raise InvalidField(where, f"nests deeper than {MAX_SCHEMA_DEPTH} levels")
    if isinstance(node, list):
        for i, item in enumerate(node):
            _check_node(item, f"{where}[{i}]", depth + 1)
        return
    if not isinstance(node, dict):
        return
    kinds = node.get("type")
    if kinds is not None:
        for kind in kinds if isinstance(kinds, list) else [kinds]:
            if kind not in SCHEMA_TYPES:
                raise InvalidField(f"{where}.type", f"must be among {sorted(SCHEMA_TYPES)}, "
                                                    f"got {brief(kind, 40)}")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#")):
        raise InvalidField(f"{where}.$ref", f"must point inside the schema (#/...), got "
                                            f"{brief(ref, 60)}")
    low, high = node.get("minItems"), node.get("maxItems")
    if isinstance(low, int) and isinstance(high, int) and low > high:
        raise InvalidField(where, f"has minItems {low} > maxItems {high}")
    for key, value in node.items():
        if key not in ("enum", "const", "default", "examples"):  # values, not schemas
            _check_node(value, f"{where}.{key}", depth + 1)


# ---- small checks ---------------------------------------------------------------------------

def _items(v: Any, where: str, empty_ok: bool = False) -> enumerate:
    if not isinstance(v, list) or (not v and not empty_ok):
        raise InvalidField(where, "must be a non-empty list" if not empty_ok else "must be a list")
    return enumerate(v)


def _number(d: dict, name: str, default: float, low: float, high: float) -> float:
    v = d.get(name, default)
    if not _num(v) or not low <= v <= high:
        raise InvalidField(name, f"must be a number in {low:g}..{high:g}, got {brief(v, 40)}")
    return float(v)


def _bool(d: dict, name: str, default: bool) -> bool:
    v = d.get(name, default)
    if not isinstance(v, bool):
        raise InvalidField(name, f"must be true or false, got {brief(v, 40)}")
    return v


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
