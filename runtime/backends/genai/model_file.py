"""What a model file says about itself: the GGUF header's metadata, the trained context."""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Used when neither the device options nor the model file say how long the context is.
DEFAULT_CONTEXT_LENGTH = 2048

_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?",
                 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: str | Path, wanted: Callable[[str], bool]) -> dict[str, Any]:
    """The GGUF header's key/value pairs whose key ``wanted`` accepts (arrays are skipped)."""
    found: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return found
        _version, _tensors, n_kv = struct.unpack("<IQQ", f.read(20))

        def read(fmt: str) -> Any:
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:  # array: skip it (the tokenizer's vocabulary lives here)
                item, count = struct.unpack("<IQ", f.read(12))
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize("<" + _GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return None
            return read(_GGUF_SCALARS[kind])

        for _ in range(n_kv):
            key = string()
            v = value(read("I"))
            if wanted(key):
                found[key] = v
    return found


def model_context_length(path: str | Path) -> int | None:
    """The context length the model was trained for: ``<arch>.context_length`` of a GGUF
    file, ``max_position_embeddings`` of an exported model folder's config.json; else None."""
    p = Path(path)
    try:
        if p.is_file() and p.suffix.lower() == ".gguf":
            meta = gguf_metadata(p, lambda k: k == "general.architecture" or
                                 k.endswith(".context_length"))
            n = meta.get(f"{meta.get('general.architecture')}.context_length")
            return int(n) if n else None
        if (p / "config.json").is_file():
            n = json.loads((p / "config.json").read_text()).get("max_position_embeddings")
            return int(n) if n else None
    except (OSError, ValueError, struct.error):
        return None
    return None
