"""One error tree for the whole runtime.

Each class says whether running the task elsewhere can help (``retry_elsewhere``). The
scheduler decides failover from the ``kind`` string that crosses the wire, never from the
Python class of an engine's exception.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    """One try of a task: the worker that ran it and why it did not succeed."""

    device: str
    kind: str
    message: str

    def to_wire(self) -> dict:
        return {"device": self.device, "kind": self.kind, "message": self.message}

    @classmethod
    def from_wire(cls, d: dict) -> Attempt:
        return cls(str(d["device"]), str(d["kind"]), str(d["message"]))

    def __str__(self) -> str:
        return f"{self.device}: {self.kind}: {self.message}"


class FanoutError(Exception):
    """Base of every error the runtime raises on purpose."""

    kind = "error"
    retry_elsewhere = False

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


class DeviceError(FanoutError):
    """The engine or device failed on a valid task. Another device can serve it."""

    kind = "device"
    retry_elsewhere = True


class Unsupported(FanoutError):
    """This device cannot take this input (e.g. larger than its static NPU shape); another may."""

    kind = "unsupported"
    retry_elsewhere = True


class ModelUnavailable(FanoutError):
    """The model failed to load or compile on the device; the message is the engine's text."""

    kind = "model_unavailable"
    retry_elsewhere = True


class WorkerLost(FanoutError):
    """The worker process died or stopped answering while it held the task."""

    kind = "worker_lost"
    retry_elsewhere = True


class Overloaded(FanoutError):
    """The scheduler's queue is full. Retry later, or raise ``scheduler.max_queue``."""

    kind = "overloaded"


class DeadlineExceeded(FanoutError):
    """The task did not finish within its deadline."""

    kind = "deadline"


class Cancelled(FanoutError):
    """The task was cancelled by its caller."""

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
    c.kind: c for c in (InvalidInput, DeviceError, Unsupported, ModelUnavailable, WorkerLost,
                        Overloaded, DeadlineExceeded, Cancelled, NoDeviceAvailable,
                        ProtocolError, Unauthorized, ConfigError, ClusterUnavailable)
}


def error_from_wire(d: dict) -> FanoutError:
    cls = _BY_KIND.get(str(d.get("kind")), FanoutError)
    attempts = [Attempt.from_wire(a) for a in d.get("attempts") or ()]
    return cls(str(d.get("message", "")), attempts)
