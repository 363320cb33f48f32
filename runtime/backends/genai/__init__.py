"""openvino-genai for LLMs, one module per concept:

- ``backend``: the backend, its device options and numerics.
- ``session``: what both sessions share (prompt, checks, stages, the engine thread);
  ``batched`` (continuous batching, CPU/GPU) and ``serial`` (one request at a time, NPU).
- ``engine_process`` and ``remote``: the batching session in a child process and the
  worker's side of it; ``channel``: the pipe between them.
- ``generations`` (one request across its stages), ``jobs`` (one stage in the engine),
  ``deltas`` (ids to the caller's text, calls and logprobs), ``constraints`` (the grammar of
  tools and formats), ``tool_calls`` (reading calls back), ``model_file`` (GGUF facts).
"""
from __future__ import annotations

from .backend import DETERMINISTIC_PROPERTIES, GenAIBackend
from .model_file import gguf_metadata, model_context_length

__all__ = ["DETERMINISTIC_PROPERTIES", "GenAIBackend", "gguf_metadata", "model_context_length"]
