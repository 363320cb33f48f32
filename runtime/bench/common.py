"""What every benchmark shares: the hardware line, the prompts, a throwaway cluster config."""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import textwrap
from pathlib import Path

import numpy as np

LLM_PROMPTS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is two plus two?",
    "Give me a tip for learning Python.",
    "What do bees make?",
    "Describe a cat in one sentence.",
]


def hardware() -> str:
    return (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def row(name: str, total: float, tokens: int, ttfts: list[float], base: float | None) -> str:
    ratio = f"{base / total:5.2f}x" if base else "  1.00x"
    ttft = (f"{statistics.median(ttfts) * 1000:8.0f} {pct(ttfts, 95) * 1000:8.0f}"
            if ttfts else f"{'n/a':>8} {'n/a':>8}")
    return f"{name:<44} {total:8.2f} {tokens / total:9.1f} {ttft}  {ratio}"


def cluster_config(text: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix="fanout-bench-")) / "bench.yaml"
    path.write_text(textwrap.dedent(text))
    return path
