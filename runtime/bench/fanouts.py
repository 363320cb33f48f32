"""Streaming fan-outs against a cluster, timed per request: the loads of ``fanout bench llm``."""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import runtime

from .common import pct


@dataclass
class Load:
    """What one fan-out measured: its wall time, each request's time to first text, the
    gaps between the chunks of every stream (one chunk per engine step: ~ time per token),
    the completion tokens and each request's text, in input order."""

    total_s: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    texts: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.tokens / self.total_s

    def p95_gap_ms(self) -> float:
        return pct(self.gaps, 95) * 1000


class _Timed:
    """One stream's figures as its chunks come: time to first text, the gaps between chunks
    with text, the completion tokens and the text."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.first: float | None = None
        self.gaps: list[float] = []
        self.parts: list[str] = []
        self.count = 0

    def see(self, chunk) -> None:
        now = time.perf_counter()
        if chunk.text:
            self.parts.append(chunk.text)
            if self.first is None:
                self.first = now - self.t0
            else:
                self.gaps.append(now - self.last)
            self.last = now
        if chunk.usage:
            self.count = chunk.usage["completion_tokens"]

    def add_to(self, load: Load, i: int) -> None:
        """Into ``load``, as the stream of chat ``i`` (under the caller's lock, if shared)."""
        load.ttfts.append(self.first if self.first is not None else float("nan"))
        load.gaps += self.gaps
        load.tokens += self.count
        load.texts[i] = "".join(self.parts)


def fan_out(client, model: str, chats: list[list[dict]], tokens: int,
            ignore_eos: bool = True) -> Load:
    """Every chat streamed at once, one thread each, ``tokens`` new tokens per chat."""
    load = Load(texts=[""] * len(chats))
    lock = threading.Lock()

    def one(i: int) -> None:
        timed = _Timed()
        for chunk in client.stream(model, chats[i], max_tokens=tokens, ignore_eos=ignore_eos):
            timed.see(chunk)
        with lock:
            timed.add_to(load, i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(chats))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load.total_s = time.perf_counter() - started
    return load


class AsyncFanOut:
    """Every chat streamed at once from one event loop, ``asyncio.gather`` over
    ``AsyncClient.astream``: how an async agent framework fans out. The thread-per-chat
    ``fan_out`` sends them over a few ms; these leave in one pass of the loop. One
    connection for every call, on a loop of its own; ``close()`` ends both."""

    def __init__(self, cluster) -> None:
        self._runner = asyncio.Runner()
        self._client = self._runner.run(
            runtime.AsyncClient(cluster.address, cluster.token, keys=cluster.keys).connect())

    def __call__(self, model: str, chats: list[list[dict]], tokens: int,
                 ignore_eos: bool = True) -> Load:
        return self._runner.run(self._fan_out(model, chats, tokens, ignore_eos))

    async def _fan_out(self, model: str, chats: list[list[dict]], tokens: int,
                       ignore_eos: bool) -> Load:
        load = Load(texts=[""] * len(chats))

        async def one(i: int) -> None:
            timed = _Timed()
            async for chunk in self._client.astream(model, chats[i], max_tokens=tokens,
                                                    ignore_eos=ignore_eos):
                timed.see(chunk)
            timed.add_to(load, i)

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(chats))))
        load.total_s = time.perf_counter() - started
        return load

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()


def best_of(runs: list[Load]) -> Load:
    """The median run by wall time (the machine is shared: one run can catch a neighbour)."""
    return sorted(runs, key=lambda r: r.total_s)[len(runs) // 2]
