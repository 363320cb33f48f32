"""Real models for tests, fetched once per machine into the model cache.

The cache is $FANOUT_HOME if set, else ~/.cache/fanout, so the ~65 MB MiniLM download happens
once, not per test run. A conftest can wrap these in fixtures:
``@pytest.fixture(scope="session") def minilm_path(): return _models.minilm_path()``.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from runtime import env
from runtime.launchers.models import fetch

MINILM_INPUTS = ("input_ids", "attention_mask")
MINILM_SHAPES_32 = {"input_ids": [1, 32], "attention_mask": [1, 32]}  # what QNN HTP compiles
MINILM_NPU_OPTIONS = {"soc_model": "69", "shapes": MINILM_SHAPES_32}


@functools.cache
def minilm_path() -> Path:
    return fetch("minilm", env.home(), print)


def minilm_inputs(batch: int = 1, seq: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq), dtype=np.int64)
    ids[:, 0] = 101  # [CLS]
    ids[:, -1] = 102  # [SEP]
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64)}
