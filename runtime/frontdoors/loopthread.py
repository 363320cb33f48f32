"""An asyncio event loop on a daemon thread, and a pump from an async iterator to any thread.

The sync ``Client`` runs its ``AsyncClient`` on one; ``ServerThread`` runs the HTTP server on
another. Both hand streams across with ``pump``: one hop per item, then ``END`` or the error.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

END = object()  # what ``pump`` hands on after a stream's last item


class LoopThread:
    """An event loop running forever in a daemon thread, until ``stop()``."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Run ``coro`` on the loop; its future, for any thread. ``RuntimeError`` once
        stopped (the coroutine is closed, never left un-awaited)."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            raise

    def call(self, coro: Coroutine, timeout: float | None = None) -> Any:
        """Run ``coro`` on the loop and wait for its result. If the wait ends early (a
        timeout, Ctrl-C), the coroutine is cancelled on the loop too."""
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the loop and wait for its thread; idempotent."""
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:  # closed meanwhile
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


async def pump(items: AsyncIterator, put: Callable[[Any], None]) -> None:
    """Hand each item of ``items`` to ``put``, then ``END``; or the error that ended them
    (which is raised here too), so the reader learns of it where it reads."""
    try:
        async for item in items:
            put(item)
        put(END)
    except BaseException as exc:
        put(exc)
        raise
