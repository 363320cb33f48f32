"""One error tree for the whole runtime.

Each class has a ``kind``, the string that crosses the wire, and says how the scheduler
treats a run that ended with it (``retry_elsewhere``, ``opens_breaker``, ``input_fault``):
the scheduler reads those rules here, by the kind a worker reported, never from the Python
class of an engine's exception.
"""
from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args

ErrorKind = Literal["error", "invalid_input", "device", "unsupported", "model_unavailable",
                    "worker_lost", "worker_gone", "overloaded", "deadline", "cancelled",
                    "no_device", "protocol", "unauthorized", "config", "cluster_unavailable"]
ERROR_KINDS: frozenset[str] = frozenset(get_args(ErrorKind))

_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 60, 60


def brief(value: Any, width: int = 80) -> str:
    """``repr(value)``, cut short: safe for a value nested to any depth (error messages quote
    what a peer sent, and ``repr`` of 1,000 nested lists raises ``RecursionError``)."""
    return _BRIEF.repr(value)[:width]


@dataclass(frozen=True)
class Attempt:
    """One try of a task: the worker that ran it and why it did not succeed.

    ``started_at`` / ``ended_at``: when it was dispatched and when it failed, on the
    scheduler's clock (0 for a device skipped without a try); not part of equality.
    """

    device: str
    kind: ErrorKind
    message: str
    started_at: float = field(default=0.0, compare=False)
    ended_at: float = field(default=0.0, compare=False)

    def to_wire(self) -> dict:
        return {"device": self.device, "kind": self.kind, "message": self.message,
                "started_at": self.started_at, "ended_at": self.ended_at}

    @classmethod
    def from_wire(cls, d: Any) -> Attempt:
        """The attempt in ``d``; ``ProtocolError`` naming what is wrong with it. Its times
        are optional (an older peer sends none)."""
        if not (isinstance(d, dict) and isinstance(d.get("device"), str)
                and isinstance(d.get("message"), str)):
            raise ProtocolError(f"an attempt must have string fields device, kind and message, "
                                f"got {brief(d, 120)}")
        return cls(d["device"], _kind(d.get("kind")), d["message"],
                   _seconds(d.get("started_at")), _seconds(d.get("ended_at")))

    def __str__(self) -> str:
        return f"{self.device}: {self.kind}: {self.message}"


def _seconds(v: object) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


class FanoutError(Exception):
    """Base of every error the runtime raises on purpose."""

    kind: ClassVar[ErrorKind] = "error"
    # How the scheduler treats a run that ended with this error (core/scheduler.py reads
    # these, nothing else): an error of a run that names no cause is the device's.
    retry_elsewhere: ClassVar[bool] = True  # another device may serve the task
    opens_breaker: ClassVar[bool] = False  # counts toward the (worker, model) breaker
    input_fault: ClassVar[bool] = False  # if every try says so, the answer is InvalidInput

    def __init__(self, message: str, attempts: list[Attempt] | tuple[Attempt, ...] = ()):
        self.message = message
        self.attempts = list(attempts)
        super().__init__(self._render())

    def _render(self) -> str:
        if not self.attempts:
            return self.message
        tried = "; ".join(str(a) for a in self.attempts)
        return f"{self.message} (attempts: {tried})"

    def to_wire(self) -> dict:
        return {"kind": self.kind, "message": self.message,
                "attempts": [a.to_wire() for a in self.attempts]}


class InvalidInput(FanoutError):
    """The task itself is wrong (unknown model, input names, dtypes, shapes). Never retried."""

    kind = "invalid_input"
    retry_elsewhere = False
    input_fault = True


class DeviceError(FanoutError):
    """The engine or device failed on a valid task. Another device can serve it."""

    kind = "device"
    opens_breaker = True  # only real device faults: a bad input or a lost worker does not


class Unsupported(FanoutError):
    """This device cannot take this input (e.g. larger than its static NPU shape); another may."""

    kind = "unsupported"
    input_fault = True


class ModelUnavailable(FanoutError):
    """The model failed to load or compile on the device; the message is the engine's text."""

    kind = "model_unavailable"


class WorkerLost(FanoutError):
    """The worker process died or stopped answering while it held the task."""

    kind = "worker_lost"


class WorkerGone(FanoutError):
    """The worker's node left the cluster (or no node can host it); it is not restarted.
    Named in a task's attempts for a device it skipped for that reason."""

    kind = "worker_gone"


class Overloaded(FanoutError):
    """The scheduler's queue is full. Retry later, or raise ``scheduler.max_queue``."""

    kind = "overloaded"


class DeadlineExceeded(FanoutError):
    """The task did not finish within its deadline."""

    kind = "deadline"


class Cancelled(FanoutError):
    """The task was cancelled by its caller. A run that a worker cancelled on its own (it is
    stopping) is re-run elsewhere; a caller's cancel answers the task before that matters."""

    kind = "cancelled"


class NoDeviceAvailable(FanoutError):
    """Every device that may serve the model was tried or is unavailable; see ``attempts``."""

    kind = "no_device"


class ProtocolError(FanoutError):
    """A message could not be decoded, was too large, or spoke another protocol version."""

    kind = "protocol"
    ref: str | None = None  # the task or request id of the bad message, when readable
    msg_type: str | None = None


class Unauthorized(FanoutError):
    """The peer did not present the cluster's credential."""

    kind = "unauthorized"


class ConfigError(FanoutError):
    """The configuration is invalid; the message names the file, field and bad value."""

    kind = "config"


class ClusterUnavailable(FanoutError):
    """No scheduler answers at the address, or the cluster has shut down."""

    kind = "cluster_unavailable"


_BY_KIND: dict[str, type[FanoutError]] = {
    c.kind: c for c in (FanoutError, InvalidInput, DeviceError, Unsupported, ModelUnavailable,
                        WorkerLost, WorkerGone, Overloaded, DeadlineExceeded, Cancelled,
                        NoDeviceAvailable, ProtocolError, Unauthorized, ConfigError,
                        ClusterUnavailable)
}


def error_class(kind: ErrorKind) -> type[FanoutError]:
    """The class of an error kind: where the scheduler reads what a failed run means."""
    return _BY_KIND[kind]


def _kind(value: Any) -> ErrorKind:
    if value not in ERROR_KINDS:
        raise ProtocolError(f"unknown error kind {brief(value, 60)}; known: "
                            f"{', '.join(sorted(ERROR_KINDS))}")
    return value


def error_from_wire(d: Any) -> FanoutError:
    """The error in ``d`` (as ``FanoutError.to_wire`` wrote it); ``ProtocolError`` if it is
    not one."""
    if not (isinstance(d, dict) and isinstance(d.get("message"), str)
            and isinstance(d.get("attempts", []), list)):
        raise ProtocolError(f"an error must have a kind, a string message and a list of "
                            f"attempts, got {brief(d, 120)}")
    return _BY_KIND[_kind(d.get("kind"))](d["message"],
                                          [Attempt.from_wire(a) for a in d.get("attempts", [])])
