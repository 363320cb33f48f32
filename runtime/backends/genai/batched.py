"""Continuous batching on CPU and GPU: concurrent generations decoded together.

The engine thread adds each job the moment it arrives and ``step()``s while any is
unfinished: a request joins the running batch at the next step, never waiting for others to
gather. Two things can hold a job back:

- **A shared prefix being computed.** With the engine's prefix caching, a prompt reuses the
  KV blocks of earlier prompts, but only blocks that exist when it is added. So a job whose
  prompt shares most of itself with a prompt still in its prefill (the same document or
  tools for every agent of a fan-out) waits for that prefill to end, then joins and
  computes only what is its own: the shared part is computed once per fan-out, not N times.
  It waits only for what that prefill adds to the prompts already computed here: the tools
  every agent of a fan-out shares are cached after the first, and a job that waited for each
  newcomer's prefill anyway joined the batch one step after the other (of four agents, the
  last had its first token three steps after the second).
- **A grammar on trial.** A grammar the engine fails to compile fails the whole ``step()``
  and leaves the pipeline unusable, so a constraint not yet seen to compile here joins the
  batch alone: while one such job waits for its first token, others with unproven grammars
  wait their turn. If the step fails then, that request is the one refused
  (``InvalidInput``); the others are failed as after any failed step (the worker re-runs
  them elsewhere), and the pipeline is rebuilt.

``step()`` holds the GIL for its whole length (the pipeline's bindings do not release it),
and the engine compiles a new grammar inside it: run this session in its own process
(``engine_process.py``), as the backend does, so that no other thread waits on it.
"""
from __future__ import annotations

import collections
import os
import queue
from collections.abc import Callable
from typing import Any

import numpy as np

from ...errors import Cancelled, DeviceError, FanoutError
from .jobs import Job, genai, grammar_error
from .session import EngineSession

# A job waits for a prompt in prefill when they share at least this many tokens (the KV
# blocks are 16-32 tokens: less than this saves nothing) ...
MIN_SHARED_TOKENS = 64
# ... and at least this share of both prompts (else the wait costs more than it saves).
MIN_SHARED_FRACTION = 0.5
# The prompts whose prefill ended last, remembered as cached (the engine may have evicted
# some since: then a job computes that part itself, as without prefix caching).
REMEMBERED_PROMPTS = 64


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading token ids ``a`` and ``b`` have in common."""
    return len(os.path.commonprefix([a, b]))


class BatchedLLMSession(EngineSession):
    """``prefix_caching``: whether the pipeline's scheduler caches prompt prefixes (then jobs
    wait for a shared prefix in prefill, as above). ``after_step`` is called on the engine
    thread at the top of each pass of its loop, so after each step's tokens have been handed
    out and before it blocks for more work, and once more when the thread ends (the engine
    process sends what ended since the last call in one message then). ``catch_up`` is
    called on the engine thread before it takes what its inbox holds: the engine process
    waits there for requests already in its pipe, so that those sent together join one step."""

    def __init__(self, make_pipe: Callable[[], Any], label: str, context_length: int,
                 structured_output: bool = True, prefix_caching: bool = False,
                 after_step: Callable[[], None] | None = None,
                 catch_up: Callable[[], None] | None = None) -> None:
        self._make_pipe = make_pipe
        self.catch_up = catch_up
        self._running: dict[int, Job] = {}
        self.prefix_caching = prefix_caching
        self.after_step = after_step
        self._prefilling: dict[int, Job] = {}  # running jobs without a token yet
        self._held: dict[int, list[Job]] = {}  # leader's rid -> jobs waiting for its prefix
        self._computed: collections.deque[list[int]] = collections.deque(
            maxlen=REMEMBERED_PROMPTS)  # prompts whose prefill ended, newest last
        self._proven: set[str] = set()  # grammars that compiled in this pipeline
        self._proving: Job | None = None  # the job whose grammar is on trial
        self._waiting: collections.deque[Job] = collections.deque()  # unproven, queued
        self._broken = ""
        super().__init__(make_pipe(), label, context_length, structured_output)

    def _fail_all(self, exc: FanoutError) -> None:
        super()._fail_all(exc)
        if self.after_step is not None:
            self.after_step()

    def _active(self) -> list[Job]:
        jobs, self._running = list(self._running.values()), {}
        jobs += list(self._waiting) + [j for held in self._held.values() for j in held]
        self._waiting.clear()
        self._held.clear()
        self._prefilling.clear()
        self._proving = None
        return jobs

    def _serve(self) -> None:
        g = genai()
        while True:
            if self.after_step is not None:
                # Every pass, not only after a good step: a failed step or a refused
                # admission also ends generations, and the loop may block next.
                self.after_step()
            self._admit_waiting()
            busy = bool(self._running) or (self._pipe is not None and
                                           self._pipe.has_non_finished_requests())
            msgs = [self._inbox.get()] if not busy else []  # idle: block, no busy loop
            if self.catch_up is not None:
                self.catch_up()
            while True:
                try:
                    msgs.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for what, item in msgs:
                if what == "close":
                    return self._drop_running()
                if what == "cancel":
                    self._drop(item.job)
                elif what == "add" and not item.cancelled:
                    self._admit(item)
            if not self._running and not (self._pipe and self._pipe.has_non_finished_requests()):
                continue
            try:
                self._pipe.step()
            except Exception as e:
                self._step_failed(e)
                continue
            read = [self._read(job, g) for job in list(self._running.values())]
            self._decode_together(read)
            for job, status, ids, logprobs, reason in read:
                self._collect(job, g, status, ids, logprobs, reason)

    # -- admission --

    def _admit(self, job: Job) -> None:
        leader = self._leader_for(job)
        if leader is not None:
            self._held.setdefault(leader.rid, []).append(job)
        elif job.grammar is None or job.grammar in self._proven:
            self._add(job)
        elif self._proving is None:
            self._proving = job
            self._add(job)
        else:
            self._waiting.append(job)

    def _leader_for(self, job: Job) -> Job | None:
        """A job in prefill that computes enough of this one's prompt, beyond what is cached
        already, to wait for."""
        if not self.prefix_caching or not self._prefilling:
            return None
        ids = job.input_ids
        cached = max((shared_prefix(p, ids) for p in self._computed), default=0)
        for leader in self._prefilling.values():
            gain = shared_prefix(leader.input_ids, ids) - cached
            if gain >= MIN_SHARED_TOKENS and gain >= MIN_SHARED_FRACTION * (
                    max(len(leader.input_ids), len(ids)) - cached):
                return leader
        return None

    def _release(self, leader: Job) -> None:
        """The leader's prefill is over (or it left): its followers join now."""
        self._prefilling.pop(leader.rid, None)
        for job in self._held.pop(leader.rid, []):
            if not job.cancelled:
                self._admit(job)

    def _admit_waiting(self) -> None:
        while self._waiting and self._proving is None:
            job = self._waiting.popleft()
            if not job.cancelled:
                self._admit(job)

    def _add(self, job: Job) -> None:
        if self._pipe is None:
            self._pipe = self._rebuild()
            if self._pipe is None:
                return job.gen.fail(DeviceError(self._broken))
        try:
            ids = _ov_tensor(job.input_ids)
            job.handle = self._pipe.add_request(job.rid, ids, job.config)
        except Exception as e:
            if job is self._proving:
                self._proving = None
            if job.grammar is not None and grammar_error(e):
                return job.gen.fail(self._refused_grammar(job, e))
            return job.gen.fail(DeviceError(f"{self._label}: {str(e).strip()}"))
        self._running[job.rid] = job
        self._prefilling[job.rid] = job

    def _drop(self, job: Job | None) -> None:
        """Stop a job (cancelled, or its answer is complete): it leaves at the next step."""
        if job is None:
            return
        running = self._running.pop(job.rid, None)
        if running is not None:
            running.handle.cancel()
        if job is self._proving:
            self._proving = None
        self._release(job)

    # -- after a step --

    @staticmethod
    def _read(job: Job, g: Any) -> tuple[Job, Any, list[int], list[float], Any]:
        """What the last step made for ``job``: its status, new ids, their log-probabilities
        and the engine's finish reason."""
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
        return job, status, ids, logprobs, reason

    def _decode_together(self, read: list[tuple[Job, Any, list[int], list[float], Any]]) -> None:
        """Decode the text of every job with new ids in one tokenizer call, for their deltas
        to use; if that call fails, each decodes its own."""
        texts = [(job.gen.deltas.text, ids) for job, _, ids, _, _ in read
                 if ids and not job.gen.ended]
        if len(texts) < 2:
            return
        try:
            decoded = self._tok.decode([text.ids + ids for text, ids in texts])
        except Exception:
            return
        for (text, ids), out in zip(texts, decoded):
            text.prime(ids, out)

    def _collect(self, job: Job, g: Any, status: Any, ids: list[int], logprobs: list[float],
                 reason: Any) -> None:
        if job.rid in self._prefilling and (ids or status != g.GenerationStatus.RUNNING):
            self._computed.append(job.input_ids)  # its prompt's blocks are computed (and cached)
            self._release(job)
        if job is self._proving and (ids or status != g.GenerationStatus.RUNNING):
            self._proving = None  # its grammar compiled: the sampler has used it
            if job.grammar is not None and (ids or status == g.GenerationStatus.FINISHED):
                self._proven.add(job.grammar)
        if ids and self._advance(job, ids, logprobs):
            return self._drop(job)
        if status == g.GenerationStatus.RUNNING:
            return
        del self._running[job.rid]
        if status == g.GenerationStatus.FINISHED:
            following = self._finish(job, "length" if reason == g.GenerationFinishReason.LENGTH
                                     else "stop")
            if following is not None:
                self._admit(following)  # the next tool call, from all tokens so far
        elif status == g.GenerationStatus.IGNORED:
            job.gen.fail(DeviceError(f"{self._label}: the engine dropped the request (it does "
                                     f"not fit the KV cache)"))
        else:
            job.gen.fail(Cancelled(f"{self._label}: generation stopped ({status.name})"))

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
        culprit = self._proving if grammar_error(e) else None
        if culprit is not None:
            self._running.pop(culprit.rid, None)
            culprit.gen.fail(self._refused_grammar(culprit, e))
        err = DeviceError(f"{self._label}: {str(e).strip() or type(e).__name__}")
        # not in the engine yet: they stay queued
        queued = list(self._waiting) + [j for held in self._held.values() for j in held]
        for job in self._active():
            if job not in queued:
                job.gen.fail(err)
        self._pipe = None  # its state is unknown after a failed step: build a fresh one
        self._pipe = self._rebuild()
        for job in queued:
            if not job.cancelled:
                self._admit(job)

    def _rebuild(self) -> Any:
        self._computed.clear()  # a new pipeline's cache is empty
        try:
            return self._make_pipe()
        except Exception as e:
            self._broken = f"{self._label}: cannot recreate the pipeline: {str(e).strip()}"
            return None


def _ov_tensor(ids: list[int]) -> Any:
    import openvino as ov

    return ov.Tensor(np.array([ids], dtype=np.int64))
