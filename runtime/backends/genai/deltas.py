"""From the engine's token ids to what the caller is sent: text, whole tool calls, logprobs.

``TextDeltas`` turns ids into text; ``Deltas`` adds the tool-call reader, the log-probabilities
and the replay of a constrained generation re-run after a failover.

Failover of a constrained generation: the engine's grammar advances only over tokens it
generated itself, so it cannot continue after ids it did not make. The request is re-run
from the start instead, and the ids already streamed (``prefix_ids``) are replayed: each
re-generated id must equal the streamed one (it does under the same numerics, greedy or
seeded), nothing of them is sent again, and what follows goes out as usual. A re-run that
diverges is this device's failure, and the next device is tried.
"""
from __future__ import annotations

from collections.abc import Callable

from ...errors import DeviceError
from ...wire.generation import Delta, FinishReason, GenRequest, TokenLogprob, ToolCall
from .tool_calls import ToolCallReader


class TextDeltas:
    """Turns the completion's token ids into text deltas.

    Decodes the cumulative ids (prefix included) and emits only text past what was emitted
    (``prefix_text`` counts as emitted). Holds back a trailing incomplete UTF-8 character
    (decoded as U+FFFD) and a trailing piece that may begin a stop string; cuts the text at a
    stop string the engine did not catch (one that ends inside a token).
    """

    def __init__(self, decode: Callable[[list[int]], str], r: GenRequest,
                 continued: bool = True) -> None:
        self._decode = decode
        self._stop = list(r.stop)
        self.ids = list(r.prefix_ids) if continued else []
        self.emitted = len(r.prefix_text) if continued else 0
        self.stopped = False  # a stop string was found in the text
        self._primed: tuple[int, list[int], str] | None = None

    def prime(self, new_ids: list[int], text: str) -> None:
        """``text`` is what ``self.ids + new_ids`` decode to: the next ``push(new_ids)`` uses
        it instead of decoding (the engine thread decodes every job of a step in one call:
        a call costs ~75 us here whatever its length, so eight jobs alone cost 0.7 ms a step,
        together 0.1 ms)."""
        self._primed = (len(self.ids), list(new_ids), text)

    def push(self, new_ids: list[int]) -> str:
        primed, self._primed = self._primed, None
        fits = primed is not None and primed[0] == len(self.ids) and primed[1] == new_ids
        self.ids += new_ids
        text = primed[2] if fits and primed is not None else self._decode(self.ids)
        hits = [i for i in (text.find(s, self.emitted) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1
        hold = max((k for s in self._stop for k in range(1, len(s))
                    if text.endswith(s[:k], self.emitted, end)), default=0)
        return self._take(text, end - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._take(self._decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


class Deltas:
    """One generation's deltas for the caller. ``push`` takes the engine's new ids (and
    their log-probabilities), ``flush`` the end; ``stopped`` says the engine may stop.

    For a constrained re-run, what the caller already has is ``prefix_text`` (content) and
    ``prefix_calls`` (whole calls); the re-run's deltas start past them."""

    def __init__(self, decode: Callable[[list[int]], str], r: GenRequest,
                 reader_mode: str | None, label: str, prefill: str = "") -> None:
        self._decode = decode
        self._label = label
        self._logprobs = r.logprobs
        self.replay = list(r.prefix_ids) if r.constrained else []
        self._replayed = 0
        self._content_sent = len(r.prefix_text) if r.constrained else 0
        self._calls_sent = r.prefix_calls if r.constrained else 0
        self._content_made = 0
        self.text = TextDeltas(decode, r, continued=not r.constrained)
        self.reader = ToolCallReader(reader_mode, prefill=prefill) if reader_mode else None

    @property
    def ids(self) -> list[int]:
        return self.text.ids

    @property
    def stopped(self) -> bool:
        return self.text.stopped or (self.reader is not None and self.reader.done)

    @property
    def calls(self) -> list[ToolCall]:
        return self.reader.calls if self.reader is not None else []

    def push(self, ids: list[int], logprobs: list[float] | None = None) -> Delta | None:
        """The caller's delta for these ids; None when it holds nothing new."""
        new = self._check_replay(ids)
        delta = self._delta(new, self.text.push(ids))
        if self._logprobs and new:
            delta.logprobs = [TokenLogprob(self._decode([t]), float(lp))
                              for t, lp in zip(new, (logprobs or [])[len(ids) - len(new):])]
        return delta if delta.ids or delta.text or delta.tool_calls else None

    def flush(self) -> Delta | None:
        delta = self._delta([], self.text.flush())
        return delta if delta.text or delta.tool_calls else None

    def finish_reason(self, engine_reason: FinishReason) -> FinishReason:
        return "tool_calls" if self.calls else engine_reason

    def _check_replay(self, ids: list[int]) -> list[int]:
        """The ids past the replay, after checking the replayed ones equal those streamed."""
        left = len(self.replay) - self._replayed
        if left <= 0:
            return ids
        head, expected = ids[:left], self.replay[self._replayed:self._replayed + left]
        for i, (a, b) in enumerate(zip(head, expected)):
            if a != b:
                raise DeviceError(
                    f"{self._label}: the re-run of a constrained generation diverged at "
                    f"token {self._replayed + i} of the {len(self.replay)} already streamed; "
                    f"it cannot continue here without repeating text")
        self._replayed += len(head)
        return ids[left:]

    def _delta(self, ids: list[int], raw: str) -> Delta:
        calls: list[ToolCall]
        if self.reader is None:
            content, calls = raw, []
        else:
            content, calls = self.reader.feed(raw)
        # Past what the caller already has (a re-run's replay makes it all again).
        start = self._content_made
        self._content_made += len(content)
        content = content[max(0, self._content_sent - start):]
        calls = [c for c in calls if c.index >= self._calls_sent]
        return Delta(ids, content, calls)
