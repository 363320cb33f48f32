"""Log lines about what peers do wrong, at most one per (peer, kind) per period.

A peer that sends garbage as fast as it can must not turn the log into its own: the first
line of each kind is written at once, the rest are counted and said in the next line of that
kind ("N more since the last report"). The memory it keeps is bounded too.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

PERIOD_S = 10.0
MAX_PEERS = 4096  # (peer, kind) pairs remembered; the least recent are forgotten first


class PeerLog:
    """Rate-limited logging per (peer, kind); thread-safe."""

    def __init__(self, logger: logging.Logger, period_s: float = PERIOD_S,
                 clock: Callable[[], float] = time.monotonic, max_peers: int = MAX_PEERS):
        self.logger = logger
        self.period_s = period_s
        self.clock = clock
        self.max_peers = max_peers
        self._lock = threading.Lock()
        self._last: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def log(self, level: int, peer: str, kind: str, message: str, *args,
            exc_info: bool | BaseException = False) -> bool:
        """Log ``message % args`` unless this (peer, kind) was logged within the period;
        True if it was written."""
        now = self.clock()
        key = (peer, kind)
        with self._lock:
            last, quiet = self._last.get(key, (None, 0))
            if last is not None and now - last < self.period_s:
                self._last[key] = (last, quiet + 1)
                return False
            self._last[key] = (now, 0)
            self._last.move_to_end(key)
            while len(self._last) > self.max_peers:
                self._last.popitem(last=False)
        if quiet:
            message += f" ({quiet} more since the last report)"
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, peer: str, kind: str, message: str, *args) -> bool:
        return self.log(logging.WARNING, peer, kind, message, *args)

    def error(self, peer: str, kind: str, message: str, *args,
              exc_info: bool | BaseException = False) -> bool:
        return self.log(logging.ERROR, peer, kind, message, *args, exc_info=exc_info)
