"""Dynamic batching: queued tasks of one model run as one engine call, and its outputs are cut
back per task.

The first axis of every input is the batch (rows). Tasks join a batch when their inputs have
the same names, dtypes and ranks, and either the same shape past the first axis or, when the
model tolerates zero padding (``pad``), sizes that line up across inputs along every other axis
(a BERT's ``input_ids`` and ``attention_mask``): those are padded to the longest of the batch.
A device compiled with a static batch (an NPU) gets its rows padded up to it. Every output
must have the batch as its first axis, or the model is run task by task.

A device may compute the rows of a batch wrongly (the QNN HTP simulator gives MiniLM compiled
for [2, 16] a second row 1.5 off the first for identical inputs), so a model batches only
once a batch of identical rows has come out identical (``rows_disagree``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import TensorSpec, WarmUp
from .tensors import Padding
from .warmup import representative_inputs

DEFAULT_DELAY_S = 0.002  # how long a batch may wait for more tasks, unless the options say
ROWS_TOLERANCE = 1e-3  # relative and absolute: identical rows may differ by this (fp16 NPUs)


@dataclass(frozen=True)
class Batching:
    """How one worker batches one model."""

    max_rows: int  # rows of one engine call, at most
    delay_s: float  # how long the oldest task of a batch may wait for it to fill
    pad: bool  # tasks of different lengths may be padded to a common one
    static_rows: int | None  # the session's static batch size, which every call pads to


class NotBatchable(Exception):
    """The model's outputs have no batch axis to cut them back by."""


def batching_for(specs: list[TensorSpec], options: dict[str, Any]) -> Batching | None:
    """The model's batching on this device, or None: ``max_batch`` (default 1, or the static
    batch size of the session's inputs), bounded by that static size."""
    firsts = {spec.shape[0] if spec.shape else 0 for spec in specs}
    if not specs or 0 in firsts or len(firsts) > 1:
        return None  # a scalar input, or inputs whose first axes are not one batch
    static = firsts.pop()
    if static and all(len(spec.shape) == 1 for spec in specs):
        static = None  # a vector's one static axis is its length, not a batch
    want = options.get("max_batch")
    rows = (static if want is None else min(int(want), static)) if static else int(want or 1)
    if rows <= 1:
        return None
    delay_ms = options.get("max_delay_ms")
    return Batching(rows, DEFAULT_DELAY_S if delay_ms is None else float(delay_ms) / 1000,
                    bool(options.get("pad", True)), static)


def shape_key(inputs: dict[str, np.ndarray], pad: bool) -> tuple[tuple, int] | None:
    """(what a batch mate must share, the task's rows), or None if it has no batch axis."""
    arrays = sorted(inputs.items())
    if not arrays or any(a.ndim == 0 for _, a in arrays):
        return None
    rows = arrays[0][1].shape[0]
    if any(a.shape[0] != rows for _, a in arrays):
        return None
    if pad and _aligned([a for _, a in arrays]):
        return tuple((n, a.ndim, a.dtype.str) for n, a in arrays), rows
    return tuple((n, a.shape[1:], a.dtype.str) for n, a in arrays), rows


def fits(specs: list[TensorSpec], inputs: dict[str, np.ndarray], pad: bool) -> bool:
    """Whether the task's inputs fit the session's static sizes past the batch axis (a task
    that does not cannot run here: it is not given a batch's room)."""
    for spec in specs:
        arr = inputs.get(spec.name)
        if arr is None or arr.ndim != len(spec.shape):
            return False
        for have, want in zip(arr.shape[1:], spec.shape[1:]):
            if want is not None and (have > want or have < want and not pad):
                return False
    return True


def _aligned(arrays: list[np.ndarray]) -> bool:
    """Every axis past the first has one size across the inputs that have it."""
    for axis in range(1, max(a.ndim for a in arrays)):
        if len({a.shape[axis] for a in arrays if a.ndim > axis}) > 1:
            return False
    return True


@dataclass(frozen=True)
class Part:
    """One task's inputs, checked and fitted to static shapes past the batch axis."""

    inputs: dict[str, np.ndarray]
    rows: int
    padding: Padding  # the static fit's: axis -> (padded, the task's own size)


@dataclass(frozen=True)
class Rows:
    """Where one task sits in a batch: its rows, and its own size of each padded axis."""

    start: int
    rows: int
    padding: Padding


def assemble(parts: list[Part], static_rows: int | None
             ) -> tuple[dict[str, np.ndarray], list[Rows], int]:
    """One batch's inputs (each part padded to the longest along other axes, then stacked),
    where each part's rows are, and the rows of the call (up to ``static_rows``)."""
    names = list(parts[0].inputs)
    target = {name: np.max([p.inputs[name].shape for p in parts], axis=0) for name in names}
    layout, start = [], 0
    for part in parts:
        axes = dict(part.padding.axes)
        for name in names:
            arr = part.inputs[name]
            for axis in range(1, arr.ndim):
                if arr.shape[axis] < target[name][axis]:
                    true = axes.get(axis, (0, arr.shape[axis]))[1]
                    axes[axis] = (int(target[name][axis]), true)
        layout.append(Rows(start, part.rows, Padding(axes)))
        start += part.rows
    total = max(start, static_rows or 0)
    batch = {}
    for name in names:
        shape = (total, *(int(d) for d in target[name][1:]))
        if len(parts) == 1 and shape == parts[0].inputs[name].shape:
            batch[name] = parts[0].inputs[name]  # alone and already the call's shape
            continue
        out = np.zeros(shape, dtype=parts[0].inputs[name].dtype)
        for part, where in zip(parts, layout):
            arr = part.inputs[name]
            out[(slice(where.start, where.start + where.rows),)
                + tuple(slice(0, d) for d in arr.shape[1:])] = arr
        batch[name] = out
    return batch, layout, total


def split(outputs: dict[str, np.ndarray], layout: list[Rows], total: int
          ) -> list[dict[str, np.ndarray]]:
    """Each task's outputs: its rows, cut back to its own size along the padded axes."""
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != total:
            raise NotBatchable(f"output {name!r} has shape {list(arr.shape)}, not a first "
                               f"axis of the batch's {total} rows")
    return [where.padding.unpad({name: arr[where.start:where.start + where.rows]
                                 for name, arr in outputs.items()})
            for where in layout]


def rows_disagree(session: Any, batching: Batching, shapes: dict | None = None) -> str | None:
    """Why ``session`` cannot batch (its outputs for a batch of identical rows differ from
    row to row, or have no batch axis), or None if it can."""
    one = representative_inputs(session.inputs, shapes)
    rows = batching.static_rows or batching.max_rows
    same = {name: np.repeat(arr[:1], rows, axis=0) for name, arr in one.items()}
    outputs = session.run(same, WarmUp())
    for name, arr in outputs.items():
        if arr.ndim == 0 or arr.shape[0] != rows:
            return f"output {name!r} has shape {list(arr.shape)}, no batch axis"
        if not np.allclose(arr, arr[:1], rtol=ROWS_TOLERANCE, atol=ROWS_TOLERANCE):
            worst = float(np.max(np.abs(arr.astype(np.float64) - arr[:1])))
            return (f"output {name!r} differs by up to {worst:.3g} between identical rows of a "
                    f"batch of {rows}")
    return None
