"""Checking a task's inputs against a session's inputs, and fitting them to static shapes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backends.base import TensorSpec
from ..errors import InvalidInput, Unsupported
from ..wire.protocol import dtype_name


@dataclass(frozen=True)
class Padding:
    """How inputs were padded, so outputs can be cut back: axis -> (padded size, true size)."""

    axes: dict[int, tuple[int, int]]

    def unpad(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.axes:
            return outputs
        out = {}
        for name, arr in outputs.items():
            index = [slice(None)] * arr.ndim
            for axis, (padded, true) in self.axes.items():
                if axis < arr.ndim and arr.shape[axis] == padded:
                    index[axis] = slice(0, true)
            out[name] = arr[tuple(index)]
        return out


def fit_inputs(specs: list[TensorSpec], inputs: dict[str, np.ndarray], model: str,
               device: str, pad: bool = True, batch_free: bool = False
               ) -> tuple[dict[str, np.ndarray], Padding]:
    """Check names, dtypes and ranks (``InvalidInput``) and fit static dims.

    An input smaller than a static dimension is zero-padded when ``pad`` is set (a BERT
    attention mask of zeros ignores the padding); a larger one cannot run on this device
    (``Unsupported``), though a device with free dimensions may take it. ``batch_free``:
    the first axis (the batch) is left as it is, for a batch to fill.
    """
    check_inputs(specs, inputs, model)
    fitted: dict[str, np.ndarray] = {}
    axes: dict[int, tuple[int, int]] = {}
    for spec in specs:
        arr = inputs[spec.name]
        widths: list[tuple[int, int]] = []
        for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
            if batch_free and axis == 0 and (want is None or have <= want):
                widths.append((0, 0))  # the batch fills this axis, up to its static size
                continue
            if want is None or have == want:
                widths.append((0, 0))
                continue
            if have > want or not pad:
                raise Unsupported(f"{device} runs {model!r} with static shape "
                                  f"{spec.name}{_dims(spec.shape)}; got {list(arr.shape)}")
            widths.append((0, want - have))
            if axes.setdefault(axis, (want, have)) != (want, have):
                raise InvalidInput(f"model {model!r}: inputs disagree on the size of axis {axis}")
        fitted[spec.name] = np.pad(arr, widths) if any(w for _, w in widths) else arr
    return fitted, Padding(axes)


def check_inputs(specs: list[TensorSpec], inputs: dict[str, np.ndarray], model: str) -> None:
    """The inputs' names, dtypes and ranks are the session's (else ``InvalidInput``)."""
    expected = {s.name: s for s in specs}
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        takes = ", ".join(f"{s.name}: {s.dtype}{_dims(s.shape)}" for s in specs)
        raise InvalidInput(f"model {model!r} inputs: {'; '.join(parts)}; it takes {takes}")
    for spec in specs:
        arr = inputs[spec.name]
        if dtype_name(arr.dtype) != spec.dtype:
            raise InvalidInput(f"model {model!r} input {spec.name!r}: dtype {arr.dtype.name}, "
                               f"expected {spec.dtype}")
        if arr.ndim != len(spec.shape):
            raise InvalidInput(f"model {model!r} input {spec.name!r}: shape {list(arr.shape)} "
                               f"has rank {arr.ndim}, expected {_dims(spec.shape)}")
    _check_shared_dims(specs, inputs, model)


def _check_shared_dims(specs: list[TensorSpec], inputs: dict[str, np.ndarray],
                       model: str) -> None:
    """Inputs whose dimensions the model names alike must agree on their size: otherwise the
    engine fails deep in the graph, which would look like the device's fault."""
    seen: dict[str, tuple[str, int]] = {}
    for spec in specs:
        for axis, symbol in enumerate(spec.symbols):
            if symbol is None:
                continue
            size = inputs[spec.name].shape[axis]
            first, first_size = seen.setdefault(symbol, (spec.name, size))
            if first_size != size:
                raise InvalidInput(f"model {model!r}: inputs {first!r} and {spec.name!r} must "
                                   f"agree on dimension {symbol!r}: {first_size} vs {size}")


def _dims(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
