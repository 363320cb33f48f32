"""The warm-up a worker runs when a model loads: it pays the engine's first-run cost before a
user does, and measures the service time the scheduler's placement starts from.

Tensor models run once on a representative input built from the session's inputs: static
dimensions as the session declares them (an NPU's ``shapes``), a free leading dimension 1 (the
batch), any other free dimension ``DEFAULT_FREE_DIM``, unless the device's model options give
``warmup: {input: [dims]}``; ``warmup: false`` skips it; a model that batches also runs one
full batch, so the estimate knows what a task costs in one. LLMs generate ``WARMUP_TOKENS`` tokens
alone, then, on a worker that batches, as many sequences at once as its capacity (up to
``MAX_WARMUP_BATCH``), so the estimate knows what a fuller batch costs per token.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..backends.base import Delta, GenRequest, LLMSession, ModelSpec, TensorSpec, WarmUp
from ..errors import Cancelled
from ..wire.status import Calibration

DEFAULT_FREE_DIM = 16  # a short sentence's tokens, a small image's side
WARMUP_TOKENS = 8
MAX_WARMUP_BATCH = 8
# A warm-up still running after this is stopped and reported as taking at least this long.
WARMUP_TIMEOUT_S = 2.0
WARMUP_PROMPT = "Say hello."


def representative_inputs(specs: list[TensorSpec], shapes: dict | None = None
                          ) -> dict[str, np.ndarray]:
    """Zeros of each input's dtype and a shape it accepts (``shapes`` overrides by name)."""
    out = {}
    for spec in specs:
        given = (shapes or {}).get(spec.name)
        if given is not None and len(given) == len(spec.shape):
            dims = [int(d) for d in given]
        else:
            dims = [d if d is not None else 1 if axis == 0 else DEFAULT_FREE_DIM
                    for axis, d in enumerate(spec.shape)]
        out[spec.name] = np.zeros(dims, dtype=spec.dtype)
    return out


def warm_up(session: Any, spec: ModelSpec, capacity: int,
            clock: Callable[[], float] = time.perf_counter,
            cpu: Callable[[], float] = time.process_time, max_batch: int = 1
            ) -> Calibration | None:
    """Warm ``session`` up and measure it; None if the options say ``warmup: false``. A model
    that batches ``max_batch`` rows is also measured running a full batch."""
    option = spec.options.get("warmup", True)
    if option is False:
        return None
    if isinstance(session, LLMSession):
        return _warm_up_llm(session, capacity, clock, cpu)
    inputs = representative_inputs(session.inputs, option if isinstance(option, dict) else None)
    started, cpu0 = clock(), cpu()
    _timed_run(session, inputs)
    alone = Calibration(service_s=clock() - started, cpu_s=max(0.0, cpu() - cpu0))
    rows = min((a.shape[0] for a in inputs.values() if a.ndim), default=1)
    if max_batch <= 1:
        return alone
    if rows >= max_batch:  # a static batch: the run above was a full one
        return Calibration(service_s=alone.service_s, cpu_s=alone.cpu_s, batch=rows,
                           batch_service_s=alone.service_s)
    full = {name: np.zeros((max_batch, *a.shape[1:]), a.dtype) for name, a in inputs.items()}
    started = clock()
    _timed_run(session, full)
    return Calibration(service_s=alone.service_s, cpu_s=alone.cpu_s, batch=max_batch,
                       batch_service_s=clock() - started)


def _timed_run(session: Any, inputs: dict[str, np.ndarray]) -> None:
    """One warm-up run, stopped after ``WARMUP_TIMEOUT_S`` (then timed as that long)."""
    with _deadline() as token:
        try:
            session.run(inputs, token)
        except Cancelled:
            if not token.cancelled:
                raise


def _warm_up_llm(session: Any, capacity: int, clock: Callable[[], float],
                 cpu: Callable[[], float]) -> Calibration:
    started, cpu0 = clock(), cpu()
    ttft, token_s = _generation(session, clock)
    alone = Calibration(service_s=clock() - started, cpu_s=max(0.0, cpu() - cpu0),
                        ttft_s=ttft, token_s=token_s)
    batch = min(capacity, MAX_WARMUP_BATCH)
    if batch < 2 or token_s is None:
        return alone
    with ThreadPoolExecutor(batch, thread_name_prefix="warmup") as pool:
        runs = list(pool.map(lambda _: _generation(session, clock), range(batch)))
    steps = [s for _, s in runs if s is not None]
    if not steps:
        return alone
    return Calibration(service_s=alone.service_s, cpu_s=alone.cpu_s, ttft_s=ttft,
                       token_s=token_s, batch=batch, batch_token_s=sum(steps) / len(steps))


def _generation(session: Any, clock: Callable[[], float]) -> tuple[float, float | None]:
    """One warm-up generation: (time to its first token, seconds per later token)."""
    times: list[float] = []

    def on_tokens(delta: Delta) -> None:
        times.extend([clock()] * len(delta.ids))

    request = GenRequest(prompt=WARMUP_PROMPT, max_tokens=WARMUP_TOKENS, ignore_eos=True)
    with _deadline() as token:
        started = clock()
        try:
            session.generate(request, on_tokens, token)
        except Cancelled:
            if not token.cancelled:
                raise
    if not times:
        return clock() - started, None
    per_token = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return times[0] - started, per_token


class _deadline:
    """A warm-up token that cancels itself after ``WARMUP_TIMEOUT_S``."""

    def __enter__(self) -> WarmUp:
        self.token = WarmUp()
        self.timer = threading.Timer(WARMUP_TIMEOUT_S, self.token.cancel)
        self.timer.daemon = True
        self.timer.start()
        return self.token

    def __exit__(self, *exc: object) -> None:
        self.timer.cancel()
