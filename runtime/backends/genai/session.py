"""What both openvino-genai sessions share: the engine's own checks, the prompt, the stages
of a generation, and the one engine thread that talks to the pipeline.

A pipeline fails when two threads call it, so every session has exactly one engine thread;
``start`` (any thread) tokenizes and hands the engine thread a job through its inbox, and
the engine thread drives the request's ``Generation`` from then on. ``generate`` is the
blocking form the worker calls. Subclasses implement ``_serve``.
"""
from __future__ import annotations

import queue
import re
import threading
from typing import Any

from ...errors import Cancelled, DeviceError, FanoutError, InvalidInput, Unsupported
from ...wire.generation import FinishReason, GenRequest, GenResult
from ..base import CancelToken, LLMSession, TokensFn
from . import constraints
from .deltas import Deltas
from .generations import EndFn, Generation
from .jobs import Job, generation_config


class EngineSession(LLMSession):
    """``structured_output``: whether this pipeline may constrain decoding; a constrained
    request on one that may not is ``Unsupported`` here and runs on the next device."""

    logprobs = True  # whether the pipeline reports each generated token's log-probability

    def __init__(self, pipe: Any, label: str, context_length: int,
                 structured_output: bool = True) -> None:
        self._pipe = pipe
        self._label = label
        self.context_length = context_length
        self.structured_output = structured_output
        self._tok = pipe.get_tokenizer()
        # The bindings set up their numpy API once, on first use; two threads that get there
        # together deadlock (1 fresh process in ~8 here, workers hung until killed): do it now.
        _ = self._tok.encode("warm up").input_ids.data
        self._eos = self._tok.get_eos_token_id()
        self._bad_grammars: dict[str, str] = {}  # constraints.key -> why the engine refused it
        # ("add", job) | ("cancel", generation) | ("close", None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._lock = threading.Lock()  # closing and submitting do not interleave
        self._dead: str | None = None  # set if the engine thread itself crashed
        self._thread = threading.Thread(target=self._run, name=f"genai-{label}", daemon=True)
        self._thread.start()

    # -- any thread --

    def prompt_ids(self, r: GenRequest, prefill: str = "") -> list[int]:
        if r.messages is not None:
            ids = self._tok.encode(self._chat_text(r) + prefill,
                                   add_special_tokens=False).input_ids.data
        else:
            ids = self._tok.encode(f"{r.prompt}{prefill}").input_ids.data
        return [int(t) for t in ids[0]]

    def _chat_text(self, r: GenRequest) -> str:
        # The template wants text where an assistant turn only called tools.
        history = [m if m.get("content") is not None else {**m, "content": ""}
                   for m in r.messages or []]
        if r.calls_tools:
            return self._tok.apply_chat_template(
                history, add_generation_prompt=True,
                tools=[t.to_wire() for t in r.offered_tools()])
        return self._tok.apply_chat_template(history, add_generation_prompt=True)

    def chat_prompts(self, requests: list[GenRequest]) -> list[list[int] | None]:
        """The prompt ids of the chat requests among ``requests``, tokenized in one call (a
        batch of 8 takes an eighth of 8 calls' time; the engine process's reader does this
        while a fan-out's first step waits); None for a request to tokenize on its own (a
        prompt, a template that fails), and all None if the batch fails."""
        texts: dict[int, str] = {}
        for i, r in enumerate(requests):
            if r.messages is not None:
                try:
                    texts[i] = self._chat_text(r) + constraints.prefill(r)
                except Exception:  # start() tokenizes it alone, and says what is wrong
                    pass
        out: list[list[int] | None] = [None] * len(requests)
        if len(texts) < 2:
            return out
        try:
            enc = self._tok.encode(list(texts.values()), add_special_tokens=False)
            ids, mask = enc.input_ids.data, enc.attention_mask.data
        except Exception:  # each is tokenized alone then
            return out
        for row, i in enumerate(texts):
            out[i] = [int(t) for t, keep in zip(ids[row], mask[row]) if keep]
        return out

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
        refused = unsupported(r, self._label, self.structured_output, self.logprobs)
        if refused is not None:
            raise refused

    def generate(self, request: GenRequest, on_tokens: TokensFn,
                 cancel: CancelToken) -> GenResult:
        done = threading.Event()
        outcome: list[GenResult | FanoutError] = []

        def on_end(result: GenResult | FanoutError) -> None:
            outcome.append(result)
            done.set()

        self.start(request, on_tokens, on_end, cancel)
        done.wait()
        if isinstance(outcome[0], FanoutError):
            raise outcome[0]
        return outcome[0]

    def start(self, request: GenRequest, on_tokens: TokensFn, on_end: EndFn,
              cancel: CancelToken, prompt: list[int] | None = None) -> None:
        """Hand ``request`` to the engine: ``on_tokens`` gets its deltas (on the engine
        thread) and ``on_end`` its result or error, once. Raises what is wrong with the
        request itself before anything runs. ``prompt``: its ids, if already tokenized
        (``chat_prompts``)."""
        self.check(request)
        prefill = constraints.prefill(request)
        if prompt is None:
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
        deltas = Deltas(lambda ids: self._tok.decode(ids), request,
                        constraints.reader_mode(request), self._label, prefill)
        gen = Generation(request, prompt, deltas, on_tokens, on_end, self._next_stage)
        job = self._job(gen)
        if job is None:
            return on_end(GenResult("length", len(prompt), len(request.prefix_ids)))
        gen.job = job
        with self._lock:
            if self._closed or self._dead:
                raise DeviceError(self._dead or f"{self._label}: session is closed")
            self._inbox.put(("add", job))
        cancel.on_cancel(lambda: self._cancel(gen))

    def _job(self, gen: Generation) -> Job | None:
        """The engine's first job: a constrained request re-runs from its prompt (its
        grammar cannot start after ids it did not generate); others continue after
        ``prefix_ids``. None when nothing is left to generate."""
        r = gen.request
        if not r.constrained:
            max_new = r.max_tokens - len(r.prefix_ids)
            if max_new == 0:
                return None
            return Job(gen, gen.prompt + list(r.prefix_ids), generation_config(r, max_new))
        grammar = constraints.key(r)
        if grammar in self._bad_grammars:
            raise InvalidInput(self._bad_grammars[grammar])
        try:
            structured = constraints.structured_output(r)
        except Exception as e:
            raise InvalidInput(f"{self._label}: cannot build the grammar for this request: "
                               f"{str(e).strip()}") from e
        return Job(gen, gen.prompt, generation_config(r, r.max_tokens, structured), grammar)

    def _next_stage(self, gen: Generation, last: Job) -> Job | None:
        """The job that writes the next tool call, when the last stage ended with ``, ``:
        from the prompt and every token so far, under the one-more-call grammar."""
        r, deltas = gen.request, gen.deltas
        if deltas.reader is None or not deltas.reader.wants_more:
            return None
        left = r.max_tokens - len(deltas.ids)
        if left <= 0:
            return None
        so_far = [t for t in deltas.ids if t != self._eos]  # each stage ended with end-of-seq
        seed = None if r.seed is None else r.seed + last.stage + 1
        config = generation_config(r, left, constraints.continuation(r), seed)
        return Job(gen, gen.prompt + so_far, config, f"{last.grammar}+", last.stage + 1)

    def _refused_grammar(self, job: Job, e: Exception) -> InvalidInput:
        """The engine could not compile this job's grammar: the request is at fault."""
        why = str(e).strip().splitlines()[-1]
        why = re.split(r"\.(?:cc|cpp|hpp):\d+: ", why)[-1][-300:]  # past the source path
        message = (f"{self._label}: the engine cannot compile the grammar of this request's "
                   f"tools or response_format: {why}")
        if job.grammar is not None:
            self._bad_grammars[job.grammar] = message
        return InvalidInput(message)

    def _cancel(self, gen: Generation) -> None:
        if not gen.ended:
            gen.fail(Cancelled(f"{self._label}: generation cancelled"))
            self._inbox.put(("cancel", gen))

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._inbox.put(("close", None))
        if self._thread is not threading.current_thread():
            self._thread.join()
            self._pipe = None  # frees the model and its KV cache

    # -- the engine thread --

    def _advance(self, job: Job, ids: list[int], logprobs: list[float] | None) -> bool:
        """Give the job's generation its new ids; True when the engine may drop the job
        (the answer is complete, or the caller's callback failed and ended it)."""
        try:
            return job.gen.tokens(ids, logprobs)
        except Exception as e:  # the caller's callback failed (e.g. an injected fault)
            job.gen.fail(_as_device_error(self._label, e))
            return True

    def _finish(self, job: Job, reason: FinishReason) -> Job | None:
        """The job ended with ``reason``: its generation's next stage, if any."""
        try:
            return job.gen.finished(reason)
        except Exception as e:
            job.gen.fail(_as_device_error(self._label, e))
            return None

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
            job.gen.fail(exc)
        while True:
            try:
                what, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if what == "add":
                item.gen.fail(exc)

    def _active(self) -> list[Job]:
        """Every job the engine thread holds, forgotten: the engine is gone or rebuilt."""
        return []

    def _serve(self) -> None:
        raise NotImplementedError


def unsupported(r: GenRequest, label: str, structured_output: bool,
                logprobs: bool) -> Unsupported | None:
    """What this pipeline cannot honour for ``r`` (another device may), else None."""
    if r.constrained and not structured_output:
        what = "tool calls" if r.calls_tools else "a JSON response_format"
        return Unsupported(f"{label}: this pipeline cannot constrain decoding, which {what} "
                           f"need (device option structured_output: false)")
    if r.logprobs and not logprobs:
        return Unsupported(f"{label}: this pipeline streams token ids only, without their "
                           f"log-probabilities")
    return None


def _as_device_error(label: str, e: Exception) -> FanoutError:
    return e if isinstance(e, FanoutError) else DeviceError(f"{label}: {type(e).__name__}: {e}")
