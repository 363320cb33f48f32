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

import collections
import itertools
import json
import queue
import random
import re
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import (
    Cancelled,
    DeviceError,
    FanoutError,
    InvalidInput,
    ModelUnavailable,
    Unsupported,
)
from . import constraints
from .base import (
    CancelToken,
    GenRequest,
    GenResult,
    LLMSession,
    ModelSpec,
    ProgressFn,
    TokensFn,
)
from .deltas import Deltas

# Used when neither the device options nor the model file say how long the context is.
DEFAULT_CONTEXT_LENGTH = 2048
GATHER_S = 0.02  # an idle engine waits this long for the rest of a fan-out (option gather_s)
GATHER_CAP = 5  # ... after each arrival, up to this many times gather_s in all
# The NPU static pipeline's defaults for MAX_PROMPT_LEN and MIN_RESPONSE_LEN.
NPU_PROMPT_LEN, NPU_RESPONSE_LEN = 1024, 128
# Device options this module interprets; SchedulerConfig fields go to the scheduler, the rest
# are OpenVINO properties of the pipeline (e.g. INFERENCE_NUM_THREADS, MAX_PROMPT_LEN on NPU).
_OWN_OPTIONS = {"device", "context_length", "continuous_batching", "gather_s", "warmup",
                "structured_output"}
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

def generation_config(r: GenRequest, max_new_tokens: int, structured: Any = None,
                      seed: int | None = None) -> Any:
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
        seed = seed if seed is not None else r.seed
        gc.rng_seed = seed if seed is not None else random.getrandbits(31)
    gc.presence_penalty = float(r.presence_penalty)
    gc.frequency_penalty = float(r.frequency_penalty)
    if r.logprobs:
        gc.logprobs = 1  # the chosen token's; the engine reports no alternatives
    if structured is not None:
        gc.structured_output_config = structured
    return gc


def _grammar_error(e: Exception) -> bool:
    """Whether an engine error came from compiling a request's grammar (xgrammar)."""
    text = str(e).lower()
    return "xgrammar" in text or "grammar" in text or "structural tag" in text


class _Job:
    """One request between its ``generate`` thread and the engine thread."""

    _ids = itertools.count()

    def __init__(self, input_ids: list[int], config: Any, grammar: str | None = None,
                 stage: int = 0) -> None:
        self.rid = next(self._ids)
        self.input_ids = input_ids
        self.config = config
        self.grammar = grammar  # the key of its constraint (constraints.key), if constrained
        self.stage = stage  # the how-manieth tool call this job writes (0: the first)
        self.max_new_tokens = int(config.max_new_tokens)
        # ("tokens", ids) | ("stopped", None) | ("done", finish_reason) | ("error", exception)
        self.out: queue.SimpleQueue = queue.SimpleQueue()
        self.cancelled = False
        self.handle: Any = None
        # Set by generate(): turns new ids (and their log-probabilities) into the caller's
        # deltas; True once the answer is complete (a stop string, the tool calls closed).
        # The batched engine thread calls it directly (one thread handoff less per token and
        # sequence); the serial session hands ids over through ``out``.
        self.sink: Callable[[list[int], list[float] | None], bool] | None = None

    def fail(self, exc: FanoutError) -> None:
        self.out.put(("error", exc))


# ---- sessions -------------------------------------------------------------------------------

class _EngineSession(LLMSession):
    """What both sessions share: the engine's own checks, tokenizing, the caller's side of
    ``generate``, the engine thread's lifetime. Subclasses implement ``_serve``.

    ``structured_output``: whether this pipeline may constrain decoding; a constrained
    request on one that may not is ``Unsupported`` here and runs on the next device."""

    logprobs = True  # whether the pipeline reports each generated token's log-probability

    def __init__(self, pipe: Any, label: str, context_length: int,
                 structured_output: bool = True) -> None:
        self._pipe = pipe
        self._label = label
        self.context_length = context_length
        self.structured_output = structured_output
        self._tok = pipe.get_tokenizer()
        self._bad_grammars: dict[str, str] = {}  # constraints.key -> why the engine refused it
        # The bindings set up their numpy API once, on first use; two threads that get there
        # together deadlock (1 fresh process in ~8 here, workers hung until killed): do it now.
        _ = self._tok.encode("warm up").input_ids.data
        # ("add" | "cancel", job) | ("close", None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # closing and submitting do not interleave
        self._dead: str | None = None  # set if the engine thread itself crashed
        self._thread = threading.Thread(target=self._run, name=f"genai-{label}", daemon=True)
        self._thread.start()

    # -- caller threads --

    def prompt_ids(self, r: GenRequest, prefill: str = "") -> list[int]:
        if r.messages is not None:
            # The template wants text where an assistant turn only called tools.
            history = [m if m.get("content") is not None else {**m, "content": ""}
                       for m in r.messages]
            if r.calls_tools:
                text = self._tok.apply_chat_template(
                    history, add_generation_prompt=True,
                    tools=[t.to_wire() for t in r.offered_tools()])
            else:
                text = self._tok.apply_chat_template(history, add_generation_prompt=True)
            ids = self._tok.encode(text + prefill, add_special_tokens=False).input_ids.data
        else:
            ids = self._tok.encode(f"{r.prompt}{prefill}").input_ids.data
        return [int(t) for t in ids[0]]

    def warm_up(self) -> None:
        """Render a tool conversation once, before callers' threads do: the engine's first
        conversion of Python tools and tool calls initializes statics that need the GIL, and
        two threads doing it at once deadlock (seen with 8 concurrent first requests). Then
        decode one constrained token, so that the engine builds its grammar compiler's view
        of the vocabulary now, while the worker is loading, not inside a serving step."""
        call = {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        history = [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "", "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "call_0", "content": "y"}]
        tools = [{"type": "function", "function": {"name": "f", "description": "",
                                                   "parameters": {"type": "object"}}}]
        try:
            self._tok.apply_chat_template(history, add_generation_prompt=True, tools=tools)
        except Exception:
            pass  # a template that refuses tools: such requests fail as InvalidInput later
        if self.structured_output:
            one = GenRequest(prompt="{", max_tokens=1, response_format={"type": "json_object"})
            try:
                self.generate(one, lambda _delta: None, CancelToken())
            except FanoutError:
                pass  # it fails again, with its reason, for the request that needs it

    def check(self, r: GenRequest) -> None:
        """``Unsupported`` for what this pipeline cannot honour (another device may)."""
        if r.constrained and not self.structured_output:
            what = "tool calls" if r.calls_tools else "a JSON response_format"
            raise Unsupported(f"{self._label}: this pipeline cannot constrain decoding, which "
                              f"{what} need (device option structured_output: false)")
        if r.logprobs and not self.logprobs:
            raise Unsupported(f"{self._label}: this pipeline streams token ids only, without "
                              f"their log-probabilities")

    def generate(self, request: GenRequest, on_tokens: TokensFn,
                 cancel: CancelToken) -> GenResult:
        self.check(request)
        prefill = constraints.prefill(request)
        try:
            prompt = self.prompt_ids(request, prefill)
        except Exception as e:  # a chat template that rejects the messages, ...
            raise InvalidInput(f"{self._label}: cannot tokenize the request: {e}") from e
        if len(prompt) + request.max_tokens > self.context_length:
            # the GGUF tokenizer silently truncates at the model's context: a lower bound then
            at_least = "at least " if len(prompt) >= self.context_length else ""
            raise InvalidInput(f"{self._label}: prompt is {at_least}{len(prompt)} tokens, "
                               f"max_tokens {request.max_tokens}, the model's context is "
                               f"{self.context_length}")
        job = self._job(request, prompt)
        if job is None:
            return GenResult("length", len(prompt), len(request.prefix_ids))
        deltas = Deltas(lambda ids: self._tok.decode(ids), request,
                        constraints.reader_mode(request), self._label, prefill)

        def sink(ids: list[int], logprobs: list[float] | None) -> bool:
            delta = deltas.push(ids, logprobs)
            if delta is not None:
                on_tokens(delta)
            return deltas.stopped

        job.sink = sink
        self._submit(job)
        current = [job]  # the stage running now (calls come one per stage)
        cancelled = Cancelled(f"{self._label}: generation cancelled")
        cancel.on_cancel(lambda: self._cancel(current[0], cancelled))
        finished = False
        try:
            while True:
                what, value = current[0].out.get()
                if what == "error":
                    raise value
                if what == "tokens" and not sink(value, None):
                    continue
                if what in ("tokens", "stopped"):  # the answer is complete (stop string, ...)
                    reason = "stop"
                    break
                following = self._next_stage(request, prompt, deltas, current[0]) \
                    if value == "stop" else None
                if following is not None:
                    following.sink = sink
                    current[0] = following
                    self._submit(following)
                    if cancel.cancelled:
                        self._cancel(following, cancelled)
                    continue
                reason = value
                finished = True
                tail = deltas.flush()
                if tail is not None:
                    on_tokens(tail)
                break
        finally:
            if not finished:  # cancelled, the answer complete, on_tokens raised: free it
                self._cancel(current[0], None)
        return GenResult(deltas.finish_reason(reason), len(prompt), len(deltas.ids))

    def _submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed or self._dead:
                raise DeviceError(self._dead or f"{self._label}: session is closed")
            self._inbox.put(("add", job))

    def _next_stage(self, r: GenRequest, prompt: list[int], deltas: Deltas,
                    last: _Job) -> _Job | None:
        """The job that writes the next tool call, when the last stage ended with ``, ``:
        from the prompt and every token so far, under the one-more-call grammar."""
        if deltas.reader is None or not deltas.reader.wants_more:
            return None
        left = r.max_tokens - len(deltas.ids)
        if left <= 0:
            return None
        eos = self._tok.get_eos_token_id()
        so_far = [t for t in deltas.ids if t != eos]  # each stage ended with end-of-sequence
        seed = None if r.seed is None else r.seed + last.stage + 1
        config = generation_config(r, left, constraints.continuation(r), seed)
        return _Job(prompt + so_far, config, f"{last.grammar}+", last.stage + 1)

    def _job(self, r: GenRequest, prompt: list[int]) -> _Job | None:
        """The engine's job: a constrained request re-runs from its prompt (its grammar
        cannot start after ids it did not generate); others continue after ``prefix_ids``.
        None when nothing is left to generate."""
        if not r.constrained:
            max_new = r.max_tokens - len(r.prefix_ids)
            if max_new == 0:
                return None
            return _Job(prompt + list(r.prefix_ids), generation_config(r, max_new))
        grammar = constraints.key(r)
        if grammar in self._bad_grammars:
            raise InvalidInput(self._bad_grammars[grammar])
        try:
            structured = constraints.structured_output(r)
        except Exception as e:
            raise InvalidInput(f"{self._label}: cannot build the grammar for this request: "
                               f"{str(e).strip()}") from e
        return _Job(prompt, generation_config(r, r.max_tokens, structured), grammar)

    def _refused_grammar(self, job: _Job, e: Exception) -> InvalidInput:
        """The engine could not compile this job's grammar: the request is at fault."""
        why = str(e).strip().splitlines()[-1]
        why = re.split(r"\.(?:cc|cpp|hpp):\d+: ", why)[-1][-300:]  # past the source path
        message = (f"{self._label}: the engine cannot compile the grammar of this request's "
                   f"tools or response_format: {why}")
        if job.grammar is not None:
            self._bad_grammars[job.grammar] = message
        return InvalidInput(message)

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
    """Continuous batching: concurrent ``generate`` calls are decoded together.

    A grammar the engine fails to compile fails the whole ``step()`` and leaves the pipeline
    unusable, so a constraint not yet seen to compile here joins the batch alone: while one
    such request waits for its first token, others with unproven grammars wait their turn.
    If the step fails then, that request is the one refused (``InvalidInput``); the others
    are re-run elsewhere as after any failed step, and the pipeline is rebuilt."""

    def __init__(self, make_pipe: Callable[[], Any], label: str, context_length: int,
                 gather_s: float = GATHER_S, structured_output: bool = True) -> None:
        self._make_pipe = make_pipe
        self._running: dict[int, _Job] = {}
        self._gather_s = gather_s
        self._proven: set[str] = set()  # grammars that compiled in this pipeline
        self._proving: _Job | None = None  # the job whose grammar is on trial
        self._waiting: collections.deque[_Job] = collections.deque()  # unproven, queued
        super().__init__(make_pipe(), label, context_length, structured_output)

    def _active(self) -> list[_Job]:
        jobs, self._running = list(self._running.values()), {}
        jobs += list(self._waiting)
        self._waiting.clear()
        self._proving = None
        return jobs

    def _serve(self) -> None:
        g = _genai()
        ov_tensor = _ov_tensor()
        while True:
            self._admit_waiting(ov_tensor)
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
                    if job is self._proving:
                        self._proving = None
                elif what == "add" and not job.cancelled:
                    self._admit(job, ov_tensor)
            if not self._running and not (self._pipe and self._pipe.has_non_finished_requests()):
                continue
            try:
                self._pipe.step()
            except Exception as e:
                self._step_failed(e)
                continue
            for job in list(self._running.values()):
                self._collect(job, g)

    def _admit(self, job: _Job, ov_tensor: Callable) -> None:
        if job.grammar is None or job.grammar in self._proven:
            self._add(job, ov_tensor)
        elif self._proving is None:
            self._proving = job
            self._add(job, ov_tensor)
        else:
            self._waiting.append(job)

    def _admit_waiting(self, ov_tensor: Callable) -> None:
        while self._waiting and self._proving is None:
            job = self._waiting.popleft()
            if not job.cancelled:
                self._admit(job, ov_tensor)

    def _add(self, job: _Job, ov_tensor: Callable) -> None:
        if self._pipe is None:
            self._pipe = self._rebuild()
            if self._pipe is None:
                return job.fail(DeviceError(self._broken))
        try:
            job.handle = self._pipe.add_request(job.rid, ov_tensor(job.input_ids), job.config)
        except Exception as e:
            if job is self._proving:
                self._proving = None
            if job.grammar is not None and _grammar_error(e):
                return job.fail(self._refused_grammar(job, e))
            return job.fail(DeviceError(f"{self._label}: {str(e).strip()}"))
        self._running[job.rid] = job

    def _collect(self, job: _Job, g: Any) -> None:
        h = job.handle
        status = h.get_status()  # before reading: a finished request's last ids are readable
        ids: list[int] = []
        logprobs: list[float] = []
        reason = None
        while h.can_read():
            for out in h.read().values():
                ids += out.generated_ids
                logprobs += out.generated_log_probs
                reason = out.finish_reason
        if job is self._proving and (ids or status != g.GenerationStatus.RUNNING):
            self._proving = None  # its grammar compiled: the sampler has used it
            if job.grammar is not None and (ids or status == g.GenerationStatus.FINISHED):
                self._proven.add(job.grammar)
        if ids:
            stopped: bool | Exception = False
            try:
                if job.sink is not None:
                    stopped = job.sink(ids, logprobs)
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
        culprit = self._proving if _grammar_error(e) else None
        if culprit is not None:
            self._running.pop(culprit.rid, None)
            culprit.fail(self._refused_grammar(culprit, e))
        err = DeviceError(f"{self._label}: {str(e).strip() or type(e).__name__}")
        waiting = list(self._waiting)  # not in the engine yet: they stay queued
        for job in self._active():
            if job not in waiting:
                job.fail(err)
        self._waiting.extend(waiting)
        self._pipe = None  # its state is unknown after a failed step: build a fresh one
        self._pipe = self._rebuild()

    def _rebuild(self) -> Any:
        try:
            return self._make_pipe()
        except Exception as e:
            self._broken = f"{self._label}: cannot recreate the pipeline: {str(e).strip()}"
            return None


class SerialLLMSession(_EngineSession):
    """One request at a time through ``LLMPipeline.generate`` (the NPU pipeline's limit).

    Its streamer sees token ids only, so it cannot report log-probabilities."""

    logprobs = False

    def __init__(self, pipe: Any, label: str, context_length: int,
                 structured_output: bool = True) -> None:
        self._current: _Job | None = None
        super().__init__(pipe, label, context_length, structured_output)

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
                if job.grammar is not None and _grammar_error(e):
                    job.fail(self._refused_grammar(job, e))  # the pipeline stays usable
                else:
                    job.fail(DeviceError(f"{self._label}: "
                                         f"{str(e).strip() or type(e).__name__}"))
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
    ``SchedulerConfig`` fields (cache_size, max_num_seqs, ...), ``structured_output``
    (whether constrained decoding may run here; default: true wherever the installed
    openvino-genai has structural tags, since every pipeline, the NPU's included, samples
    through the engine's Sampler that applies them), and OpenVINO properties (on CPU the
    batch-independent numerics of ``CPU_EXACT_PROPERTIES`` unless set otherwise).
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
        structured = bool(opts.get("structured_output", True)) and constraints.available()
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
                    make, label, context, float(opts.get("gather_s", GATHER_S)), structured)
            else:
                progress(f"loading {model.name} on {self.device} (one request at a time) ...")
                pipe = g.LLMPipeline(model.path, self.device, **props)
                session = SerialLLMSession(pipe, label, context, structured)
        except Exception as e:
            raise ModelUnavailable(f"{label}: {str(e).strip()}") from e
        session.warm_up()
        progress(f"loaded {model.name} on {self.device}: context {context} tokens"
                 + ("" if structured else ", no constrained decoding"))
        self._sessions.append(session)
        return session

    def close(self) -> None:
        for s in self._sessions:
            s.close()
        self._sessions.clear()
