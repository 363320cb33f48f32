"""openvino-genai backend for LLMs: one engine thread per session owns the pipeline.

A pipeline fails when two threads call it, so every session has exactly one engine thread
that talks to openvino-genai; the worker's ``generate`` threads hand it requests through a
queue and wait on a queue of their own for token ids. Tokenizing, detokenizing and
``on_tokens`` run in the caller's thread.

- CPU / GPU: ``BatchedLLMSession`` over a ``ContinuousBatchingPipeline``. The engine thread
  adds each request as it arrives and ``step()``s while any is unfinished, so concurrent
  ``generate`` calls decode together in one batch. ``step()`` holds the GIL (measured: a
  1 ms ticker thread gets one tick per step, ~20-40 ms apart), so other Python threads of
  the worker run between steps, not during them.
- NPU: ``SerialLLMSession`` over an ``LLMPipeline`` (the static NPU pipeline takes one
  request at a time): requests run one after another on the engine thread.
"""
from __future__ import annotations

import itertools
import json
import math
import queue
import random
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import Cancelled, DeviceError, FanoutError, InvalidInput, ModelUnavailable
from .base import (
    CancelToken,
    GenRequest,
    GenResult,
    LLMSession,
    ModelSpec,
    ProgressFn,
    TokensFn,
)

# Used when neither the device options nor the model file say how long the context is.
DEFAULT_CONTEXT_LENGTH = 2048
GATHER_S = 0.02  # an idle engine waits this long for the rest of a fan-out (option gather_s)
GATHER_CAP = 5  # ... after each arrival, up to this many times gather_s in all
# The NPU static pipeline's defaults for MAX_PROMPT_LEN and MIN_RESPONSE_LEN.
NPU_PROMPT_LEN, NPU_RESPONSE_LEN = 1024, 128
ROLES = ("system", "user", "assistant", "tool")
# Device options this module interprets; SchedulerConfig fields go to the scheduler, the rest
# are OpenVINO properties of the pipeline (e.g. INFERENCE_NUM_THREADS, MAX_PROMPT_LEN on NPU).
_OWN_OPTIONS = {"device", "context_length", "continuous_batching", "gather_s", "warmup"}
# CPU numerics that do not depend on the batch. With OpenVINO's CPU defaults (bf16 where AMX
# exists, activations quantized dynamically for int4 weights, u8 KV cache) a greedy request
# decoded in a batch of 8 differed from the same request alone in 16-20 of 24 cases within 32
# tokens (6 within the first 8); with these, in 0 of 24, for ~10-15% less batched throughput.
# The same numerics make a mid-stream continuation (prefix_ids) reproduce the uninterrupted run.
CPU_EXACT_PROPERTIES = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
              "KV_CACHE_PRECISION": "f16"}
_SCHEDULER_OPTIONS = {"cache_size", "max_num_seqs", "max_num_batched_tokens", "num_kv_blocks",
                      "dynamic_split_fuse", "enable_prefix_caching"}


def _genai() -> Any:
    import openvino_genai  # lazily: only LLM workers load it

    return openvino_genai


# ---- model facts ----------------------------------------------------------------------------

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


# ---- requests -------------------------------------------------------------------------------

def check_request(r: GenRequest, label: str) -> None:
    """Raise ``InvalidInput`` for a request no engine could serve."""
    def bad(why: str) -> InvalidInput:
        return InvalidInput(f"{label}: {why}")

    if (r.messages is None) == (r.prompt is None):
        raise bad("set exactly one of messages and prompt")
    if r.messages is not None:
        if not isinstance(r.messages, list) or not r.messages:
            raise bad("messages must be a non-empty list")
        for i, m in enumerate(r.messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                          f"{m.get('role') if isinstance(m, dict) else m!r}")
            if not isinstance(m.get("content"), str):
                raise bad(f"messages[{i}].content must be a string")
    elif not isinstance(r.prompt, str) or not r.prompt:
        raise bad("prompt must be a non-empty string")
    if not isinstance(r.max_tokens, int) or r.max_tokens < 1:
        raise bad(f"max_tokens must be an integer >= 1, got {r.max_tokens!r}")
    if not isinstance(r.temperature, (int, float)) or not 0 <= r.temperature < math.inf:
        raise bad(f"temperature must be a number >= 0, got {r.temperature!r}")
    if not isinstance(r.top_p, (int, float)) or not 0 < r.top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {r.top_p!r}")
    if not all(isinstance(s, str) and s for s in r.stop):
        raise bad(f"stop must be a list of non-empty strings, got {r.stop!r}")
    if not all(isinstance(t, int) and t >= 0 for t in r.prefix_ids):
        raise bad("prefix_ids must be token ids (integers >= 0)")
    if len(r.prefix_ids) > r.max_tokens:
        raise bad(f"prefix_ids has {len(r.prefix_ids)} tokens, more than max_tokens "
                  f"{r.max_tokens}")


def generation_config(r: GenRequest, max_new_tokens: int) -> Any:
    gc = _genai().GenerationConfig()
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
        gc.rng_seed = r.seed if r.seed is not None else random.getrandbits(31)
    return gc


class TextDeltas:
    """Turns the completion's token ids into text deltas.

    Decodes the cumulative ids (prefix included) and emits only text past what was emitted
    (``prefix_text`` counts as emitted). Holds back a trailing incomplete UTF-8 character
    (decoded as U+FFFD) and a trailing piece that may begin a stop string; cuts the text at a
    stop string the engine did not catch (one that ends inside a token).
    """

    def __init__(self, decode: Callable[[list[int]], str], r: GenRequest) -> None:
        self._decode = decode
        self._stop = list(r.stop)
        self.ids = list(r.prefix_ids)
        self.emitted = len(r.prefix_text)
        self.stopped = False  # a stop string was found in the text

    def push(self, new_ids: list[int]) -> str:
        self.ids += new_ids
        text = self._decode(self.ids)
        hits = [i for i in (text.find(s, self.emitted) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1
        hold = max((k for s in self._stop for k in range(1, len(s))
                    if text.endswith(s[:k], self.emitted, end)), default=0)
        return self._take(text, end - hold)

    def flush(self) -> str:
        return "" if self.stopped else self._take(self._decode(self.ids), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else end
        delta = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta


class _Job:
    """One request between its ``generate`` thread and the engine thread."""

    _ids = itertools.count()

    def __init__(self, input_ids: list[int], config: Any) -> None:
        self.rid = next(self._ids)
        self.input_ids = input_ids
        self.config = config
        self.max_new_tokens = int(config.max_new_tokens)
        # ("tokens", ids) | ("stopped", None) | ("done", finish_reason) | ("error", exception)
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.handle: Any = None
        # Set by generate(): turns new ids into text for the caller; True once a stop string
        # appeared. The batched engine thread calls it directly (one thread handoff less per
        # token and sequence); the serial session hands ids over through ``out``.
        self.sink: Callable[[list[int]], bool] | None = None

    def fail(self, exc: FanoutError) -> None:
        self.out.put(("error", exc))


# ---- sessions -------------------------------------------------------------------------------

class _EngineSession(LLMSession):
    """What both sessions share: request checks, tokenizing, the caller's side of
    ``generate``, the engine thread's lifetime. Subclasses implement ``_serve``."""

    def __init__(self, pipe: Any, label: str, context_length: int) -> None:
        self._pipe = pipe
        self._label = label
        self.context_length = context_length
        self._tok = pipe.get_tokenizer()
        # ("add" | "cancel", job) | ("close", None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # closing and submitting do not interleave
        self._dead: str | None = None  # set if the engine thread itself crashed
        self._thread = threading.Thread(target=self._run, name=f"genai-{label}", daemon=True)
        self._thread.start()

    # -- caller threads --

    def prompt_ids(self, r: GenRequest) -> list[int]:
        if r.messages is not None:
            text = self._tok.apply_chat_template(r.messages, add_generation_prompt=True)
            ids = self._tok.encode(text, add_special_tokens=False).input_ids.data
        else:
            ids = self._tok.encode(r.prompt).input_ids.data
        return [int(t) for t in ids[0]]

    def generate(self, request: GenRequest, on_tokens: TokensFn,
                 cancel: CancelToken) -> GenResult:
        check_request(request, self._label)
        try:
            prompt = self.prompt_ids(request)
        except Exception as e:  # a chat template that rejects the messages, ...
            raise InvalidInput(f"{self._label}: cannot tokenize the request: {e}") from e
        if len(prompt) + request.max_tokens > self.context_length:
            # the GGUF tokenizer silently truncates at the model's context: a lower bound then
            at_least = "at least " if len(prompt) >= self.context_length else ""
            raise InvalidInput(f"{self._label}: prompt is {at_least}{len(prompt)} tokens, "
                               f"max_tokens {request.max_tokens}, the model's context is "
                               f"{self.context_length}")
        max_new = request.max_tokens - len(request.prefix_ids)
        if max_new == 0:
            return GenResult("length", len(prompt), len(request.prefix_ids))
        job = _Job(prompt + list(request.prefix_ids), generation_config(request, max_new))
        text = TextDeltas(lambda ids: self._tok.decode(ids), request)

        def sink(ids: list[int]) -> bool:
            on_tokens(ids, text.push(ids))
            return text.stopped

        job.sink = sink
        with self._lock:
            if self._closed or self._dead:
                raise DeviceError(self._dead or f"{self._label}: session is closed")
            self._inbox.put(("add", job))
        cancelled = Cancelled(f"{self._label}: generation cancelled")
        cancel.on_cancel(lambda: self._cancel(job, cancelled))
        finished = False
        try:
            while True:
                what, value = job.out.get()
                if what == "error":
                    raise value
                if what == "tokens" and not sink(value):
                    continue
                if what in ("tokens", "stopped"):  # a stop string appeared in the text
                    reason = "stop"
                    break
                else:
                    reason = value
                    finished = True
                    tail = text.flush()
                    if tail:
                        on_tokens([], tail)
                    break
        finally:
            if not finished:  # cancelled, a stop string in the text, on_tokens raised: free it
                self._cancel(job, None)
        return GenResult(reason, len(prompt), len(text.ids))

    def _cancel(self, job: _Job, exc: FanoutError | None) -> None:
        if exc is not None:
            job.fail(exc)
        if not job.cancelled:
            job.cancelled = True
            self._inbox.put(("cancel", job))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(("close", None))
        if self._thread is not threading.current_thread():
            self._thread.join()
            self._pipe = None  # frees the model and its KV cache

    # -- the engine thread --

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug here must not leave callers waiting forever
            with self._lock:
                self._dead = f"{self._label}: engine thread failed: {type(e).__name__}: {e}"
            self._fail_all(DeviceError(self._dead))
            raise
        self._fail_all(Cancelled(f"{self._label}: session closed"))

    def _fail_all(self, exc: FanoutError) -> None:
        for job in self._active():
            job.fail(exc)
        while True:
            try:
                what, job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if what == "add":
                job.fail(exc)

    def _active(self) -> list[_Job]:
        return []

    def _serve(self) -> None:
        raise NotImplementedError


class BatchedLLMSession(_EngineSession):
    """Continuous batching: concurrent ``generate`` calls are decoded together."""

    def __init__(self, make_pipe: Callable[[], Any], label: str, context_length: int,
                 gather_s: float = GATHER_S) -> None:
        self._make_pipe = make_pipe
        self._running: dict[int, _Job] = {}
        self._gather_s = gather_s
        super().__init__(make_pipe(), label, context_length)

    def _active(self) -> list[_Job]:
        jobs, self._running = list(self._running.values()), {}
        return jobs

    def _serve(self) -> None:
        g = _genai()
        ov_tensor = _ov_tensor()
        while True:
            busy = bool(self._running) or (self._pipe is not None and
                                           self._pipe.has_non_finished_requests())
            msgs = [self._inbox.get()] if not busy else []  # idle: block, no busy loop
            if msgs and self._gather_s > 0:
                # Woken from idle: the rest of a fan-out is a few ms behind; let it join the
                # first step, or each straggler costs extra steps (step() holds the GIL).
                # Wait gather_s after each arrival, at most GATHER_CAP times that in all.
                cap = time.monotonic() + GATHER_CAP * self._gather_s
                while (left := min(cap - time.monotonic(), self._gather_s)) > 0:
                    try:
                        msgs.append(self._inbox.get(timeout=left))
                    except queue.Empty:
                        break
            while True:
                try:
                    msgs.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for what, job in msgs:
                if what == "close":
                    return self._drop_running()
                if what == "cancel" and job.rid in self._running:
                    self._running.pop(job.rid).handle.cancel()  # dropped at the next step
                elif what == "add" and not job.cancelled:
                    self._add(job, ov_tensor)
            if not self._running and not (self._pipe and self._pipe.has_non_finished_requests()):
                continue
            try:
                self._pipe.step()
            except Exception as e:
                self._step_failed(e)
                continue
            for job in list(self._running.values()):
                self._collect(job, g)

    def _add(self, job: _Job, ov_tensor: Callable) -> None:
        if self._pipe is None:
            self._pipe = self._rebuild()
            if self._pipe is None:
                return job.fail(DeviceError(self._broken))
        try:
            job.handle = self._pipe.add_request(job.rid, ov_tensor(job.input_ids), job.config)
        except Exception as e:
            return job.fail(DeviceError(f"{self._label}: {str(e).strip()}"))
        self._running[job.rid] = job

    def _collect(self, job: _Job, g: Any) -> None:
        h = job.handle
        status = h.get_status()  # before reading: a finished request's last ids are readable
        ids: list[int] = []
        reason = None
        while h.can_read():
            for out in h.read().values():
                ids += out.generated_ids
                reason = out.finish_reason
        if ids:
            stopped: bool | Exception = False
            try:
                if job.sink is not None:
                    stopped = job.sink(ids)
                else:
                    job.out.put(("tokens", ids))
            except Exception as e:  # the caller's callback failed (e.g. an injected fault)
                stopped = e
            if stopped:
                h.cancel()  # dropped at the next step
                del self._running[job.rid]
                if isinstance(stopped, Exception):
                    job.fail(stopped if isinstance(stopped, FanoutError) else DeviceError(
                        f"{self._label}: {type(stopped).__name__}: {stopped}"))
                else:
                    job.out.put(("stopped", None))
                return
        if status == g.GenerationStatus.RUNNING:
            return
        del self._running[job.rid]
        if status == g.GenerationStatus.FINISHED:
            job.out.put(("done", "length" if reason == g.GenerationFinishReason.LENGTH else "stop"))
        elif status == g.GenerationStatus.IGNORED:
            job.fail(DeviceError(f"{self._label}: the engine dropped the request (it does not "
                                 f"fit the KV cache)"))
        else:
            job.fail(Cancelled(f"{self._label}: generation stopped ({status.name})"))

    def _drop_running(self) -> None:
        """Cancel what runs and step once, so the pipeline frees their KV blocks."""
        if self._pipe is None or not self._running:
            return
        for job in self._running.values():
            job.handle.cancel()
        try:
            self._pipe.step()
        except Exception:
            pass  # closing anyway

    def _step_failed(self, e: Exception) -> None:
        err = DeviceError(f"{self._label}: {str(e).strip() or type(e).__name__}")
        for job in self._active():
            job.fail(err)
        self._pipe = None  # its state is unknown after a failed step: build a fresh one
        self._pipe = self._rebuild()

    def _rebuild(self) -> Any:
        try:
            return self._make_pipe()
        except Exception as e:
            self._broken = f"{self._label}: cannot recreate the pipeline: {str(e).strip()}"
            return None


class SerialLLMSession(_EngineSession):
    """One request at a time through ``LLMPipeline.generate`` (the NPU pipeline's limit)."""

    def __init__(self, pipe: Any, label: str, context_length: int) -> None:
        self._current: _Job | None = None
        super().__init__(pipe, label, context_length)

    def _active(self) -> list[_Job]:
        job, self._current = self._current, None
        return [job] if job else []

    def _serve(self) -> None:
        g = _genai()
        ov_tensor = _ov_tensor()
        session = self

        class IdStreamer(g.StreamerBase):  # type: ignore[name-defined]  # engine thread
            def __init__(self, job: _Job) -> None:
                super().__init__()
                self.job = job
                self.count = 0

            def write(self, token: Any) -> Any:
                ids = [int(token)] if isinstance(token, int) else [int(t) for t in token]
                self.count += len(ids)
                self.job.out.put(("tokens", ids))
                stop = self.job.cancelled or session._closed
                return g.StreamingStatus.CANCEL if stop else g.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        while True:
            what, job = self._inbox.get()
            if what == "close":
                return
            if what != "add" or job.cancelled:
                continue
            self._current = job
            streamer = IdStreamer(job)
            try:
                self._pipe.generate(ov_tensor(job.input_ids), job.config, streamer)
            except Exception as e:
                job.fail(DeviceError(f"{self._label}: {str(e).strip() or type(e).__name__}"))
            else:
                if job.cancelled or self._closed:
                    job.fail(Cancelled(f"{self._label}: generation cancelled"))
                else:
                    job.out.put(("done", "length" if streamer.count >= job.max_new_tokens
                                 else "stop"))
            self._current = None


def _ov_tensor() -> Callable[[list[int]], Any]:
    import openvino as ov

    return lambda ids: ov.Tensor(np.array([ids], dtype=np.int64))


# ---- the backend ----------------------------------------------------------------------------

class GenAIBackend:
    """openvino-genai on one device: "CPU" or "GPU" batch continuously, "NPU" runs serially.

    Options (device options, overridden per model): ``context_length`` (default: from the
    model file, else 2048), ``continuous_batching`` (default: true except on NPU), the
    ``SchedulerConfig`` fields (cache_size, max_num_seqs, ...), and OpenVINO properties
    (on CPU the batch-independent numerics of ``CPU_EXACT_PROPERTIES`` unless set otherwise).
    """

    name = "openvino-genai"

    def __init__(self, device: str = "CPU", options: dict[str, Any] | None = None) -> None:
        self.device = device
        self.options = dict(options or {})
        self._sessions: list[_EngineSession] = []

    def load(self, model: ModelSpec, progress: ProgressFn) -> _EngineSession:
        opts = {**self.options, **model.options}
        label = f"{model.name}@genai-{self.device}"
        npu = self.device.split(".")[0].upper() == "NPU"
        batched = bool(opts.get("continuous_batching", not npu))
        props = {k: v for k, v in opts.items() if k not in _OWN_OPTIONS | _SCHEDULER_OPTIONS}
        if self.device.upper() == "CPU":
            for key, value in CPU_EXACT_PROPERTIES.items():
                props.setdefault(key, value)
        elif model.cache_dir and "CACHE_DIR" not in props:
            props["CACHE_DIR"] = str(model.cache_dir)
        context = opts.get("context_length") or model_context_length(model.path)
        if not context and npu:
            context = (int(props.get("MAX_PROMPT_LEN", NPU_PROMPT_LEN)) +
                       int(props.get("MIN_RESPONSE_LEN", NPU_RESPONSE_LEN)))
        context = int(context or DEFAULT_CONTEXT_LENGTH)
        try:
            g = _genai()
            if batched:
                progress(f"loading {model.name} on {self.device} (continuous batching) ...")
                sched = g.SchedulerConfig()
                for key in _SCHEDULER_OPTIONS & opts.keys():
                    setattr(sched, key, opts[key])
                def make() -> Any:
                    return g.ContinuousBatchingPipeline(model.path, sched, self.device, props)

                session: _EngineSession = BatchedLLMSession(
                    make, label, context, float(opts.get("gather_s", GATHER_S)))
            else:
                progress(f"loading {model.name} on {self.device} (one request at a time) ...")
                pipe = g.LLMPipeline(model.path, self.device, **props)
                session = SerialLLMSession(pipe, label, context)
        except Exception as e:
            raise ModelUnavailable(f"{label}: {str(e).strip()}") from e
        progress(f"loaded {model.name} on {self.device}: context {context} tokens")
        self._sessions.append(session)
        return session

    def close(self) -> None:
        for s in self._sessions:
            s.close()
        self._sessions.clear()
