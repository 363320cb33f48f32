"""``fanout bench``: throughput and latency against in-process baselines measured in the same run.

These machines are shared and noisy, so every figure is printed next to a baseline taken
moments before, as a ratio, with the hardware it ran on. Each benchmark is a module; they
import their engines only when run.
"""
from __future__ import annotations

from collections.abc import Callable


def _lazy(module: str) -> Callable[..., int]:
    def run(**options) -> int:
        import importlib
        bench = importlib.import_module(f"{__name__}.{module}")
        return getattr(bench, f"bench_{module}")(**options)
    return run


BENCHES: dict[str, Callable[..., int]] = {
    name: _lazy(name)
    for name in ("llm", "minilm", "overhead", "http", "scale", "placement", "chaos")}
