"""The interface every engine backend implements.

A backend belongs to one device worker. ``load`` creates one session per model (the worker
shares it between all its tasks); ``Session.run`` may be called from up to ``capacity``
threads at once, so a session must be safe for concurrent ``run`` calls (onnxruntime and
OpenVINO compiled models are; an implementation that is not must serialize inside).

Errors: ``load`` raises ``ModelUnavailable`` with the engine's own text; ``run`` raises
``DeviceError`` for engine/device faults and ``InvalidInput`` for bad inputs the engine found.
Inputs reaching ``run`` are already checked against ``Session.inputs`` by the worker.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..wire.generation import Delta, GenRequest, GenResult


@dataclass(frozen=True)
class TensorSpec:
    """One model input as the session accepts it; ``None`` in ``shape`` is a free dimension."""

    name: str
    dtype: str  # numpy dtype name, e.g. "int64", "float32"
    shape: tuple[int | None, ...]
    # The model's names of its free dimensions, where it names them: inputs that share a
    # name must agree on its size (a mask as long as its input ids), or the run fails.
    symbols: tuple[str | None, ...] = ()


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load one model on its device."""

    name: str
    path: str  # a resolved local file or folder (packaged models are fetched before this)
    options: dict[str, Any] = field(default_factory=dict)  # per-device options from the config
    cache_dir: str | None = None  # where compiled NPU contexts / OpenVINO caches go


class CancelToken:
    """Set by the worker when the task is cancelled; a session may poll it or register a hook."""

    def __init__(self) -> None:
        self._cancelled = False  # a flag, not a threading.Event: one is made per task
        self._hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def on_cancel(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if not self._cancelled:
                self._hooks.append(hook)
                return
        hook()

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            try:
                hook()
            except Exception:  # a failing hook must not stop the others
                pass


class WarmUp(CancelToken):
    """The token of a worker's warm-up run at load: a calibration, not a task (the fault
    wrapper delays it as it delays runs, but neither counts nor fails it)."""


ProgressFn = Callable[[str], None]  # a one-line note: "compiling for HTP", "cached context found"


class Session(Protocol):
    inputs: list[TensorSpec]
    outputs: list[str]

    def run(self, inputs: dict[str, np.ndarray], cancel: CancelToken) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """One engine on one device, e.g. onnxruntime+QNN HTP, or OpenVINO 'CPU'."""

    name: str  # "onnxruntime", "qnn", "openvino"

    def load(self, model: ModelSpec, progress: ProgressFn) -> Session | LLMSession: ...

    def close(self) -> None: ...


# ---- generation (LLMs) --------------------------------------------------------------------

TokensFn = Callable[[Delta], None]  # new token ids, text, whole tool calls as they come


@runtime_checkable
class LLMSession(Protocol):
    """A model that generates text. ``generate`` blocks its calling thread until done and may
    be called from up to ``capacity`` threads at once: a session that batches runs the
    concurrent requests together (continuous batching); one that cannot serializes them.

    The worker tells it from a tensor ``Session`` by type (``isinstance``); implementations
    subclass it to say so."""

    context_length: int  # prompt + completion tokens the session accepts

    def generate(self, request: GenRequest, on_tokens: TokensFn,
                 cancel: CancelToken) -> GenResult: ...

    def close(self) -> None: ...
