"""One request at a time through ``LLMPipeline.generate``: the NPU's static pipeline takes
no more. ``generate`` releases the GIL while it runs; its streamer sees token ids only, so
this session cannot report log-probabilities."""
from __future__ import annotations

from typing import Any

from ...errors import Cancelled, DeviceError
from .batched import _ov_tensor
from .jobs import Job, genai, grammar_error
from .session import EngineSession


class SerialLLMSession(EngineSession):
    logprobs = False

    def __init__(self, pipe: Any, label: str, context_length: int,
                 structured_output: bool = True) -> None:
        self._current: Job | None = None
        super().__init__(pipe, label, context_length, structured_output)

    def _active(self) -> list[Job]:
        job, self._current = self._current, None
        return [job] if job else []

    def _serve(self) -> None:
        g = genai()
        session = self

        class IdStreamer(g.StreamerBase):  # type: ignore[name-defined]  # engine thread
            def __init__(self, job: Job) -> None:
                super().__init__()
                self.job = job
                self.count = 0

            def write(self, token: Any) -> Any:
                ids = [int(token)] if isinstance(token, int) else [int(t) for t in token]
                self.count += len(ids)
                stop = session._advance(self.job, ids, None) or session._closed
                return g.StreamingStatus.CANCEL if stop else g.StreamingStatus.RUNNING

            def end(self) -> None:
                pass

        while True:
            what, job = self._inbox.get()
            if what == "close":
                return
            while what == "add" and job is not None and not job.cancelled:
                job = self._run_one(job, IdStreamer(job))

    def _run_one(self, job: Job, streamer: Any) -> Job | None:
        """Run one stage; the next stage of its generation, if there is one."""
        self._current = job
        try:
            self._pipe.generate(_ov_tensor(job.input_ids), job.config, streamer)
        except Exception as e:
            if job.grammar is not None and grammar_error(e):
                job.gen.fail(self._refused_grammar(job, e))  # the pipeline stays usable
            else:
                job.gen.fail(DeviceError(f"{self._label}: "
                                         f"{str(e).strip() or type(e).__name__}"))
            return None
        finally:
            self._current = None
        if self._closed:
            job.gen.fail(Cancelled(f"{self._label}: generation cancelled"))
            return None
        if job.cancelled:
            return None
        return self._finish(job, "length" if streamer.count >= job.max_new_tokens else "stop")
