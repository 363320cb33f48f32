"""The tool-call text a model writes, and reading it back as it streams.

openvino-genai renders ``tools`` into the chat template; for a template without tool support of
its own (SmolLM2's) it adds the instructions and the example ``{"tool_calls": [{"name": ...,
"arguments": {...}, "id": ...}]}``. Fanout constrains decoding to exactly that shape
(``constraints.py``), compact between its fields, so ``ToolCallReader`` can cut the text into
the caller's content and whole calls without guessing.

A call is handed on only once complete. A call that ``max_tokens`` cuts short, or one that
repeats an earlier call exactly (a small model looping), is never sent: the first ends the
answer with ``finish_reason="length"`` if no call was complete, the second stops the generation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ...wire.generation import ToolCall

TRIGGER = '"tool_calls"'  # under tool_choice "auto", writing this key opens the calls
KEY = TRIGGER + ": ["
OPEN = "{" + KEY  # the polyfilled template's wrapper, without its line breaks
CLOSE = "]}"
SEPARATOR = ", "
# The example's "id": the model may write one, of a few characters. Not more: SmolLM2 copied
# the example's digit by digit, a token each (43 tokens for one call with 24 characters).
# Not none: a model made to close the call where it meant to write an id went on with a
# second call (46 tokens, the second one a copy); with 8 it closes after one (30 tokens).
ID_FIELD = r'(, "id": "[A-Za-z0-9_]{1,8}")?'
MAX_CALLS = 8  # per answer: a model that goes on calling is stopped there


def call_begin(name: str) -> str:
    return '{"name": ' + json.dumps(name) + ', "arguments": '


@dataclass
class ToolCallReader:
    """Reads a growing completion: ``feed(text)`` returns the new content and the calls that
    became complete. The result depends only on the text so far, not on how it was cut into
    pieces, so a re-run that replays the same tokens yields the same deliveries.

    ``mode``: "calls" (the whole answer is the calls: tool_choice required or a named tool),
    "auto" (text until the model writes the ``"tool_calls"`` key; the object it opens, from
    its ``{``, is the calls), or "auto_json" (the calls, or a JSON answer of the response
    format: told apart by whether the text starts as ``OPEN`` does).
    """

    mode: str
    text: str = ""  # all the text fed
    content_end: int = 0  # text[:content_end] is content delivered
    calls: list[ToolCall] = field(default_factory=list)
    calls_at: int | None = None  # where the calls object starts in text
    scan: int = 0  # where the next call (or the close) starts, once calls_at is known
    done: bool = False  # the calls object closed, or a call repeated: stop generating
    repeated: bool = False

    prefill: str = ""  # the answer's opening, given with the prompt (constraints.prefill)

    def __post_init__(self) -> None:
        if self.mode == "calls":
            self.text = self.prefill
            self._open(0, len(OPEN))

    def feed(self, piece: str) -> tuple[str, list[ToolCall]]:
        if self.done or not piece:
            return "", []
        self.text += piece
        content = self._content()
        return content, self._calls() if self.calls_at is not None else []

    def _content(self) -> str:
        if self.calls_at is not None:
            return ""
        text, start = self.text, self.content_end
        if self.mode == "auto":
            at = text.find(TRIGGER, start)
            if at >= 0:
                end = _brace_before(text, at, start)
                self._open(end, at + len(KEY))
            else:  # hold back what may yet become "{ ... "tool_calls"
                end = _brace_before(text, len(text) - _partial(text, TRIGGER), start)
        else:  # auto_json: undecided while the text may still become OPEN
            if OPEN.startswith(text) and len(text) < len(OPEN):
                return ""
            if text.startswith(OPEN):
                self._open(0, len(OPEN))
                return ""
            end = len(text)
        self.content_end = end
        return text[start:end]

    def _open(self, at: int, calls_from: int) -> None:
        self.calls_at = at
        self.scan = calls_from

    def _calls(self) -> list[ToolCall]:
        new: list[ToolCall] = []
        text = self.text
        while not self.done:
            if text.startswith("]", self.scan):  # the array closes: the calls are done
                self.done = True
                break
            if text.startswith(SEPARATOR, self.scan):
                self.scan += len(SEPARATOR)
            if self.scan >= len(text) or text[self.scan] != "{":
                break
            try:
                obj, end = json.JSONDecoder().raw_decode(text, self.scan)
            except ValueError:  # not complete yet
                break
            call = ToolCall(str(obj["name"]), json.dumps(obj["arguments"]), len(self.calls))
            if any(c.name == call.name and c.arguments == call.arguments for c in self.calls):
                self.done = self.repeated = True
                break
            self.calls.append(call)
            new.append(call)
            self.scan = end
        return new

    @property
    def content(self) -> str:
        return self.text[:self.content_end]

    @property
    def wants_more(self) -> bool:
        """The text so far ends with a call and ``, ``: another call is to follow."""
        return (not self.done and self.calls_at is not None and bool(self.calls)
                and len(self.calls) < MAX_CALLS and self.scan == len(self.text)
                and self.text.endswith(SEPARATOR))


def _partial(text: str, word: str) -> int:
    """The length of the longest end of ``text`` that begins ``word``."""
    return max((k for k in range(1, len(word)) if text.endswith(word[:k])), default=0)


def _brace_before(text: str, at: int, start: int) -> int:
    """Where the object that ``text[at:]`` is inside starts: the ``{`` right before ``at``
    (whitespace between), else ``at``; never before ``start``."""
    i = at
    while i > start and text[i - 1].isspace():
        i -= 1
    return i - 1 if i > start and text[i - 1] == "{" else at
