"""Constrained decoding: the grammar a request's tools and response format ask for, in
openvino-genai's structural tags (xgrammar underneath).

Calls come one per stage: a stage's grammar is one call followed by ``, `` or the close; a
stage that ends with ``, `` is followed by another (``continuation``: one call again), from
the prompt and the tokens so far. A grammar with a slot per possible call would cost the
engine's grammar compiler (which holds the GIL inside ``step()``, so heartbeats wait) once
per slot: 2-6 s for four slots and a few tools here, against 0.5-2 s for one.

- ``tool_choice`` "required" or a named tool: the whole answer is ``{"tool_calls": [...]}``,
  each call one of the offered tools with arguments that match its parameter schema. The
  fixed opening is appended to the prompt (``prefill``) rather than decoded token by token:
  ``{"tool_calls": [``, and for one named tool without parallel calls its call's opening too.
- ``tool_choice`` "auto": free text; once the model writes the ``"tool_calls"`` key (as the
  template's example shows) the calls are constrained to their end, and the answer ends
  there (``TriggeredTags``). Other JSON or code in the text stays text.
- ``response_format`` json_object / json_schema: the answer is that JSON. With tools under
  "auto" it is either the calls or that JSON.
"""
from __future__ import annotations

import json
from typing import Any

from ...wire.generation import GenRequest, Tool
from .tool_calls import CLOSE, ID_FIELD, KEY, OPEN, SEPARATOR, TRIGGER, call_begin

JSON_OBJECT_SCHEMA = {"type": "object"}  # any object: xgrammar allows any properties here


def _so() -> Any:
    import openvino_genai  # lazily: only LLM workers load it

    return openvino_genai.StructuredOutputConfig


def available() -> bool:
    """Whether the installed openvino-genai can constrain decoding with structural tags."""
    try:
        so = _so()
    except ImportError:
        return False
    return all(hasattr(so, n) for n in ("TriggeredTags", "Tag", "ConstString", "JSONSchema",
                                        "Union", "Concat", "Regex"))


def reader_mode(r: GenRequest) -> str | None:
    """How ``ToolCallReader`` reads this request's answer; None when there are no calls."""
    if not r.calls_tools:
        return None
    if r.tool_choice == "required":
        return "calls"
    return "auto_json" if r.response_format is not None else "auto"


def prefill(r: GenRequest) -> str:
    """Text the answer starts with, given to the engine with the prompt."""
    if not r.calls_tools or r.tool_choice != "required":
        return ""
    tools = r.offered_tools()
    if len(tools) == 1 and not r.parallel_tool_calls:
        return OPEN + call_begin(tools[0].name)
    return OPEN


def structured_output(r: GenRequest) -> Any | None:
    """The ``StructuredOutputConfig`` of a constrained request (for what follows its
    ``prefill``), else None."""
    if not r.constrained:
        return None
    so = _so()
    fmt = _format(r.response_format) if r.response_format is not None else None
    if not r.calls_tools:
        return so(structural_tags_config=fmt)
    tools = r.offered_tools()
    if r.tool_choice == "required":
        if prefill(r) == OPEN:
            root = _call_then(tools, r.parallel_tool_calls, CLOSE)
        else:  # one call of one tool, its opening given
            root = so.Concat(so.JSONSchema(json.dumps(tools[0].parameters)),
                             so.Regex(ID_FIELD), so.ConstString("}" + CLOSE))
    elif fmt is not None:
        root = so.Union(so.Tag(OPEN, _call_then(tools, r.parallel_tool_calls, CLOSE), ""), fmt)
    else:
        root = so.TriggeredTags([TRIGGER], [
            so.Tag(KEY, _call_then(tools, r.parallel_tool_calls, "]"), "")], False, True)
    return so(structural_tags_config=root)


def continuation(r: GenRequest) -> Any:
    """The grammar of a stage after ``, ``: one more call, then ``, `` or the close."""
    close = "]" if reader_mode(r) == "auto" else CLOSE
    return _so()(structural_tags_config=_call_then(r.offered_tools(), True, close))


def key(r: GenRequest) -> str:
    """What the compiled grammar depends on: equal keys compile to the same grammar."""
    return json.dumps([r.tool_choice, r.forced_tool, r.parallel_tool_calls,
                       [t.to_wire() for t in r.tools], r.response_format], sort_keys=True)


def _format(fmt: dict) -> Any:
    schema = fmt.get("schema", JSON_OBJECT_SCHEMA) if fmt["type"] == "json_schema" \
        else JSON_OBJECT_SCHEMA
    return _so().JSONSchema(json.dumps(schema))


def _call_then(tools: list[Tool], parallel: bool, close: str) -> Any:
    """One call of any offered tool, then ``close`` or (with ``parallel``) ``, ``."""
    so = _so()
    one = _union([so.Concat(so.ConstString(call_begin(t.name)),
                            so.JSONSchema(json.dumps(t.parameters)), so.Regex(ID_FIELD),
                            so.ConstString("}")) for t in tools])
    then = so.Union(so.ConstString(SEPARATOR), so.ConstString(close)) if parallel \
        else so.ConstString(close)
    return so.Concat(one, then)


def _union(items: list) -> Any:
    return items[0] if len(items) == 1 else _so().Union(*items)
