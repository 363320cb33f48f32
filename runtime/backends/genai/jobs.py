"""One stage of a generation as the engine sees it: its token ids and GenerationConfig."""
from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING, Any

from ...wire.generation import GenRequest

if TYPE_CHECKING:
    from .generations import Generation


def genai() -> Any:
    import openvino_genai  # lazily: only LLM workers load it

    return openvino_genai


def generation_config(r: GenRequest, max_new_tokens: int, structured: Any = None,
                      seed: int | None = None) -> Any:
    gc = genai().GenerationConfig()
    gc.max_new_tokens = max_new_tokens
    gc.ignore_eos = bool(r.ignore_eos)
    if r.stop:
        # The engine stops at a stop string but cuts whole tokens (" city" for stop "city",
        # losing the space); TextDeltas cuts the text exactly, so the engine keeps them.
        gc.stop_strings = set(r.stop)
        gc.include_stop_str_in_output = True
    if r.temperature == 0:
        gc.do_sample = False
    else:
        gc.do_sample = True
        gc.temperature = float(r.temperature)
        gc.top_p = float(r.top_p)
        seed = seed if seed is not None else r.seed
        gc.rng_seed = seed if seed is not None else random.getrandbits(31)
    gc.presence_penalty = float(r.presence_penalty)
    gc.frequency_penalty = float(r.frequency_penalty)
    if r.logprobs:
        gc.logprobs = 1  # the chosen token's; the engine reports no alternatives
    if structured is not None:
        gc.structured_output_config = structured
    return gc


def grammar_error(e: Exception) -> bool:
    """Whether an engine error came from compiling a request's grammar (xgrammar)."""
    text = str(e).lower()
    return "xgrammar" in text or "grammar" in text or "structural tag" in text


class Job:
    """One stage of a generation in the engine: the prompt (and the tokens of earlier
    stages), its config, and the handle the engine gave it."""

    _ids = itertools.count()

    def __init__(self, gen: Generation, input_ids: list[int], config: Any,
                 grammar: str | None = None, stage: int = 0) -> None:
        self.rid = next(self._ids)
        self.gen = gen
        self.input_ids = input_ids
        self.config = config
        self.grammar = grammar  # the key of its constraint (constraints.key), if constrained
        self.stage = stage  # the how-manieth tool call this job writes (0: the first)
        self.max_new_tokens = int(config.max_new_tokens)
        self.handle: Any = None

    @property
    def cancelled(self) -> bool:
        return self.gen.ended
