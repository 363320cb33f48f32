"""openvino-genai on one device: "CPU" and "GPU" batch continuously (in an engine process of
their own), "NPU" runs one request at a time.

Options (device options, overridden per model):
- ``context_length``: default from the model file, else 2048.
- ``continuous_batching``: default true except on NPU.
- ``deterministic``: default false. False keeps OpenVINO's fast numerics (on CPU: bf16
  where the CPU has it, activations quantized dynamically, u8 KV cache); then a sequence
  decoded in a batch may differ from its run alone after a few tokens. True sets
  ``DETERMINISTIC_PROPERTIES`` on CPU and GPU: a sequence decoded in a batch equals its run
  alone, a mid-stream continuation equals the uninterrupted run, for ~1.6x the time here.
- ``engine_process``: default true. The batching pipeline runs in a child process, so that
  ``step()``, which holds the GIL, never stalls the worker; false runs it on a thread of
  the worker (for debugging).
- ``structured_output``: whether constrained decoding may run here; default true wherever
  the installed openvino-genai has structural tags, since every pipeline, the NPU's
  included, samples through the engine's Sampler that applies them.
- The ``SchedulerConfig`` fields (``cache_size``, ``max_num_seqs``,
  ``max_num_batched_tokens``, ``num_kv_blocks``, ``dynamic_split_fuse``,
  ``enable_prefix_caching``: default true here, so prompts that share a prefix reuse its
  KV blocks).
- Anything else is an OpenVINO property of the pipeline (``INFERENCE_NUM_THREADS``,
  ``MAX_PROMPT_LEN`` on NPU, ...).

Models of one device that load the same file with the same engine settings share one
pipeline (one engine process, one KV cache, one batch): a second name for a model costs
neither a load nor memory, and their requests batch together within the device's capacity.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from ...errors import ModelUnavailable
from ..base import ModelSpec, ProgressFn
from . import constraints
from .engine_process import open_session
from .jobs import genai
from .model_file import DEFAULT_CONTEXT_LENGTH, model_context_length
from .remote import EngineProcessSession
from .serial import SerialLLMSession

log = logging.getLogger("fanout.worker")

# The NPU static pipeline's defaults for MAX_PROMPT_LEN and MIN_RESPONSE_LEN.
NPU_PROMPT_LEN, NPU_RESPONSE_LEN = 1024, 128
# Numerics that do not depend on the batch. With OpenVINO's CPU defaults a greedy request
# decoded in a batch of 8 differed from the same request alone in 14-20 of 24 cases within
# 32 tokens (4-6 within the first 8); with these, in 0 of 24.
DETERMINISTIC_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32",
                            "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0, "KV_CACHE_PRECISION": "f16"}
_OWN_OPTIONS = {"device", "context_length", "continuous_batching", "warmup",
                "structured_output", "deterministic", "engine_process"}
_RETIRED_OPTIONS = {"gather_s": "requests join the running batch at the next engine step"}
SCHEDULER_OPTIONS = {"cache_size", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks",
                     "dynamic_split_fuse", "enable_prefix_caching"}


class GenAIBackend:
    name = "openvino-genai"

    def __init__(self, device: str = "CPU", options: dict[str, Any] | None = None) -> None:
        self.device = device
        self.options = dict(options or {})
        self._shared: dict[str, tuple[Any, str]] = {}  # engine settings -> (session, model)

    def load(self, model: ModelSpec, progress: ProgressFn) -> Any:
        opts = {**self.options, **model.options}
        label = f"{model.name}@genai-{self.device}"
        kind = self.device.split(".")[0].upper()
        batched = bool(opts.get("continuous_batching", kind != "NPU"))
        deterministic = _flag(opts, "deterministic", False, label)
        for key, why in _RETIRED_OPTIONS.items():
            if key in opts:
                log.warning("%s: option %s is no longer used: %s", label, key, why)
        props = {k: v for k, v in opts.items()
                 if k not in _OWN_OPTIONS | SCHEDULER_OPTIONS | _RETIRED_OPTIONS.keys()}
        if deterministic and kind in ("CPU", "GPU"):
            for key, value in DETERMINISTIC_PROPERTIES.items():
                props.setdefault(key, value)
        if kind != "CPU" and model.cache_dir and "CACHE_DIR" not in props:
            props["CACHE_DIR"] = str(model.cache_dir)
        context = opts.get("context_length") or model_context_length(model.path)
        if not context and kind == "NPU":
            context = (int(props.get("MAX_PROMPT_LEN", NPU_PROMPT_LEN)) +
                       int(props.get("MIN_RESPONSE_LEN", NPU_RESPONSE_LEN)))
        context = int(context or DEFAULT_CONTEXT_LENGTH)
        structured = bool(opts.get("structured_output", True)) and constraints.available()
        numerics = "deterministic numerics" if deterministic else "fast numerics"
        in_process = not _flag(opts, "engine_process", True, label)
        scheduling = {k: opts[k] for k in SCHEDULER_OPTIONS & opts.keys()}
        key = json.dumps([model.path, batched, in_process, structured, context, props,
                          scheduling], sort_keys=True, default=str)
        if key in self._shared:
            shared, first = self._shared[key]
            progress(f"{model.name} on {self.device} shares the pipeline loaded for {first}")
            return shared
        try:
            if batched:
                progress(f"loading {model.name} on {self.device} (continuous batching) ...")
                scheduler = {"enable_prefix_caching": True, **scheduling}
                spec = {"path": model.path, "device": self.device, "properties": props,
                        "scheduler": scheduler, "label": label, "context_length": context,
                        "structured_output": structured}
                if in_process:
                    session: Any = open_session(spec, None)
                    session.warm_up()
                else:
                    session = EngineProcessSession(spec, progress)
                if scheduler["enable_prefix_caching"]:
                    numerics += ", prefix caching"
            else:
                progress(f"loading {model.name} on {self.device} (one request at a time) ...")
                pipe = genai().LLMPipeline(model.path, self.device, **props)
                session = SerialLLMSession(pipe, label, context, structured)
                session.warm_up()
        except ModelUnavailable:
            raise
        except Exception as e:
            raise ModelUnavailable(f"{label}: {str(e).strip()}") from e
        progress(f"loaded {model.name} on {self.device}: context {context} tokens, {numerics}"
                 + ("" if session.structured_output else ", no constrained decoding"))
        self._shared[key] = (session, model.name)
        return session

    def close(self) -> None:
        for session, _ in self._shared.values():
            session.close()
        self._shared.clear()


def _flag(opts: dict[str, Any], key: str, default: bool, label: str) -> bool:
    value = opts.get(key, default)
    if not isinstance(value, bool):
        raise ModelUnavailable(f"{label}: option {key} must be true or false, got {value!r}")
    return value



