"""Expected service times of one model on one worker: calibrated at load, refined by each run.

A worker measures one warm-up run when a model becomes ready (``Calibration``, which travels
with the model's load state); the scheduler
starts its ``Estimate`` from it and moves it towards every measured run (an EWMA). Tensor
models: seconds per task alone, and, for a model the worker batches, seconds per task in a
batch (a batch of k costs less than k tasks alone). LLMs: time to the first token plus seconds
per token, and how much a decoding step slows per extra sequence in the batch, so a batched
CPU worker decoding 8 sequences is not taken for 8 times slower per request than one decoding 1.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..wire.status import Calibration

EWMA = 0.3  # weight of the newest measurement


@dataclass
class Estimate:
    """The expected service time of a model on one worker."""

    service_s: float | None = None  # per task (LLMs: per request, as measured; for status)
    ttft_s: float = 0.0  # LLM: time to the first token
    token_s: float | None = None  # LLM: seconds per further token, decoding alone
    slowdown: float = 0.0  # LLM: a step with b sequences takes token_s * (1 + slowdown*(b-1))
    share_s: float | None = None  # tensor model that batches: one task's share of a batch

    def calibrate(self, c: Calibration) -> None:
        if c.service_s is not None:
            self.service_s = c.service_s
        if c.token_s is not None:
            self.token_s = c.token_s
            self.ttft_s = c.ttft_s or 0.0
            if c.batch > 1 and c.batch_token_s is not None and c.token_s > 0:
                self.slowdown = max(0.0, (c.batch_token_s / c.token_s - 1) / (c.batch - 1))
        elif c.batch > 1 and c.batch_service_s is not None:
            self.share_s = c.batch_service_s / c.batch

    def step_s(self, batch: float) -> float:
        """Seconds per token with ``batch`` sequences decoding together."""
        return (self.token_s or 0.0) * (1 + self.slowdown * max(0.0, batch - 1))

    def expected(self, tokens: int | None = None, batch: int = 1,
                 batched: bool = False) -> float | None:
        """A task's expected time; for a generation of ``tokens`` among ``batch`` sequences;
        ``batched``: a tensor task that will share an engine call (its share of it)."""
        if tokens is not None and self.token_s is not None:
            return self.ttft_s + max(0, tokens - 1) * self.step_s(batch)
        if batched and self.share_s is not None:
            return self.share_s
        return self.service_s

    def observe_call(self, service_s: float, tasks: int) -> None:
        """A tensor task measured in an engine call of ``tasks`` tasks lasting ``service_s``."""
        if tasks <= 1:
            self.service_s = _ewma(self.service_s, service_s)
        else:
            self.share_s = _ewma(self.share_s, service_s / tasks)

    def observe(self, service_s: float, tokens: int = 0, batch: float = 1.0) -> None:
        """A measured run: ``tokens`` generated (0 for a tensor task) at a mean ``batch``."""
        self.service_s = _ewma(self.service_s, service_s)
        if tokens > 1 and self.token_s is not None:
            per_token = max(0.0, service_s - self.ttft_s) / (tokens - 1)
            alone = per_token / (1 + self.slowdown * max(0.0, batch - 1))
            self.token_s = _ewma(self.token_s, alone)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new
