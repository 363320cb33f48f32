"""The process around a ``WorkerCore``: one ZMQ DEALER socket to the scheduler.

Started as ``python -m runtime.shells.worker_process --scheduler ADDR --device NAME --epoch N
--config FILE``. The main thread owns the socket and answers runs, cancels and pings while
the core's threads run inference; their results come back through a queue and a socketpair
that wakes the poller. The process exits when the scheduler says stop, goes silent, or its
parent dies (no orphans).

It authenticates at the worker socket's handshake with what its scheduler handed it (the
worker key pair, else the worker secret) and chooses an unguessable routing id. An exception
while handling one message fails that message's run (a ``Failed`` the scheduler answers),
never the process.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

import zmq

from ..backends import make_backend
from ..backends.base import ModelSpec
from ..config.loader import config_from_dict
from ..config.schema import Config
from ..core.worker import LoadChanged, Outcome, TokensOut, WorkerCore
from ..env import home, setup_logging
from ..errors import InvalidInput
from ..wire import protocol as p
from ..wire.generation import read_request
from ..wire.peerlog import PeerLog
from ..wire.security import PLAIN_WORKER, apply_plain, apply_worker

log = logging.getLogger("fanout.worker")


def model_specs(config: Config, device: str, cache_root: Path) -> list[ModelSpec]:
    """The models this device serves, with their per-device options and compile cache."""
    specs = []
    for m in config.models:
        if device in config.device_order(m.name):
            specs.append(ModelSpec(m.name, m.source, dict(m.options.get(device, {})),
                                   str(cache_root / device)))
    return specs


def usable_cores() -> int:
    """The cores this process may run on (its affinity), which the node's workers share."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def node_cpu_s() -> float | None:
    """CPU seconds all processes of this machine have used (Linux: /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None


def die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the parent dies (the scheduler also watches ppid)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


class WorkerProcess:
    def __init__(self, config: Config, device: str, epoch: int, scheduler: str,
                 node: str | None = None):
        self.config = config
        # Several Ray nodes can share one host name; a launcher passes what tells them apart.
        self.node = node or socket.gethostname()
        self.device = config.device(device)
        self.epoch = epoch
        sc = config.scheduler
        self.heartbeat_s = sc.heartbeat_interval_s
        # Exit when the scheduler is silent far longer than it would take to notice us hung.
        self.orphan_s = max(10.0, 4 * sc.heartbeat_timeout_s)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        # Unguessable, and never starting with 0 (libzmq's own ids do): nobody can claim it.
        self.sock.setsockopt(zmq.ROUTING_ID, b"W" + secrets.token_bytes(16))
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        if config.cluster.keys is not None:
            apply_worker(self.sock, config.cluster.keys)
        elif sc.worker_token is not None:
            apply_plain(self.sock, PLAIN_WORKER, sc.worker_token)
        self.sock.connect(scheduler)
        # A Run wraps a client's Submit of up to the limit in a header of its own.
        self.decoder = p.Decoder(p.SCHEDULER_TO_WORKER, sc.max_message_bytes + p.ENVELOPE_BYTES)
        self.peers = PeerLog(log)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._woken = False  # a wake-up is on its way to the main thread
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        cache = home(config.model_cache) / "compiled"
        self.core = WorkerCore(device, self.device.capacity, make_backend(self.device),
                               model_specs(config, device, cache), self._emit,
                               max_output_bytes=sc.max_message_bytes)
        self._parent = os.getppid()

    def _emit(self, event) -> None:  # called from the core's threads
        self.events.put(event)
        if self._woken:
            return  # a wake-up is on its way, and the flush it leads to takes this too
        self._woken = True
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full of wake-ups already

    def send(self, msg: p.Message) -> None:
        p.send_frames(self.sock, p.encode(msg))

    def run(self) -> int:
        self.send(p.Register(version=p.PROTOCOL_VERSION, device=self.device.name,
                             epoch=self.epoch, pid=os.getpid(), node=self.node,
                             token=self.config.scheduler.token,
                             models=dict(self.core.states)))
        self.core.start_loading()
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        last_heard = last_beat = time.monotonic()
        try:
            while True:
                ready = dict(poller.poll(int(self.heartbeat_s * 1000 / 2)))
                if self._wake_r.fileno() in ready:
                    self._drain_wakeups()
                self._woken = False  # after the drain, before the flush: no event is missed
                self._flush_events()
                if self.sock in ready:
                    while True:
                        try:
                            frames = p.recv_frames(self.sock)
                        except zmq.Again:
                            break
                        last_heard = time.monotonic()
                        for message in self._unpack(frames):
                            if self._guarded_handle(message) == "stop":
                                return 0
                now = time.monotonic()
                if now - last_beat >= self.heartbeat_s:
                    self.send(p.Heartbeat(in_flight=self.core.in_flight(),
                                          peak_running=self.core.peak_running,
                                          cpu_s=time.process_time(), cores=usable_cores(),
                                          node_cpu_s=node_cpu_s()))
                    last_beat = now
                if now - last_heard > self.orphan_s:
                    log.error("%s: scheduler silent for %.0f s; exiting", self.device.name,
                              now - last_heard)
                    return 3
                if os.getppid() != self._parent:
                    log.error("%s: parent process died; exiting", self.device.name)
                    return 3
        finally:
            self.close()

    def _unpack(self, frames: list) -> list[list]:
        """The messages in what the scheduler sent (several, if a pack); none if it is a
        broken pack."""
        try:
            return p.unpack(frames)
        except p.ProtocolError as exc:
            self.peers.warning("scheduler", "bad", "%s: dropped a bad message from the "
                               "scheduler: %s", self.device.name, exc)
            return []

    def _guarded_handle(self, frames) -> str | None:
        """``_handle``, with any exception failing that message's run instead of the worker."""
        try:
            return self._handle(frames)
        except Exception as exc:  # a bug in handling one message must not end the worker
            head = frames[0].bytes if hasattr(frames[0], "bytes") else bytes(frames[0])
            attempt = p.peek_attempt(head)
            self.peers.error("scheduler", "internal", "%s: failed to handle a message from "
                             "the scheduler (%s: %s); its run fails, the worker goes on",
                             self.device.name, type(exc).__name__, str(exc)[:200],
                             exc_info=True)
            if attempt is not None:
                self.send(p.Failed(attempt=attempt, kind="error", message=(
                    f"the worker failed to handle this run: {type(exc).__name__}: "
                    f"{str(exc)[:200]}")))
            return None

    def _handle(self, frames) -> str | None:
        try:
            msg = self.decoder.decode(frames)
        except p.ProtocolError as exc:
            self.peers.warning("scheduler", "bad", "%s: dropped a bad message from the "
                               "scheduler: %s", self.device.name, exc)
            return None
        match msg:
            case p.Run():
                self.core.run(msg.attempt, msg.model, msg.inputs)
            case p.RunGenerate():
                try:
                    request = read_request(msg.request, msg.prefix_ids, msg.prefix_text,
                                           msg.prefix_calls)
                except InvalidInput as exc:
                    self.send(p.Failed(attempt=msg.attempt, kind=exc.kind, message=exc.message))
                    return None
                except (RecursionError, MemoryError, ValueError, TypeError) as exc:
                    # The validator choked on the request itself: still the request's fault,
                    # so no other device is asked to choke on it too.
                    self.send(p.Failed(attempt=msg.attempt, kind="invalid_input",
                                       message=f"the generation request could not be read: "
                                               f"{type(exc).__name__}"))
                    return None
                self.core.generate(msg.attempt, msg.model, request)
            case p.CancelRun():
                self.core.cancel(msg.attempt)
            case p.Ping() | p.Welcome():
                pass
            case p.Stop():
                return "stop"
            case p.Reply(error=error) if error:
                log.error("%s: the scheduler refused this worker: %s", self.device.name,
                          error.message)
                return "stop"
        return None

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _flush_events(self) -> None:
        """Send what the core's threads have made since the last flush, in order, several
        messages to a pack."""
        out: list[list] = []
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            try:
                if isinstance(event, LoadChanged):
                    out.append(p.encode(p.ModelState(model=event.model, load=event.load)))
                elif isinstance(event, TokensOut):
                    d = event.delta
                    out.append(p.encode(p.Tokens(
                        attempt=event.attempt, ids=list(d.ids), text=d.text,
                        tool_calls=[c.to_wire() for c in d.tool_calls],
                        logprobs=[x.to_wire() for x in d.logprobs])))
                elif isinstance(event, Outcome):
                    out.append(p.encode(self._outcome_message(event)))
            except Exception as exc:  # one event that cannot be sent fails its run only
                self.peers.error("events", type(exc).__name__, "%s: could not send %s (%s: "
                                 "%s)", self.device.name, type(event).__name__,
                                 type(exc).__name__, str(exc)[:200], exc_info=True)
                if isinstance(event, Outcome):
                    out.append(p.encode(p.Failed(attempt=event.attempt, kind="error", message=(
                        f"the worker could not send this run's outcome: "
                        f"{type(exc).__name__}: {str(exc)[:200]}"))))
        try:
            for frames in p.packed(out):
                p.send_frames(self.sock, frames)
        except zmq.ZMQError as exc:  # the socket is closing: the scheduler re-runs what is lost
            self.peers.error("events", "send", "%s: could not send %d messages (%s)",
                             self.device.name, len(out), exc)

    @staticmethod
    def _outcome_message(event: Outcome) -> p.Message:
        if event.generated is not None:
            g = event.generated
            return p.Generated(attempt=event.attempt, finish_reason=g.finish_reason,
                               prompt_tokens=g.prompt_tokens,
                               completion_tokens=g.completion_tokens, service_s=event.service_s)
        if event.kind is None:  # the core has checked that the outputs fit a message
            return p.Done(attempt=event.attempt, outputs=event.outputs or {},
                          service_s=event.service_s, batch=event.batch)
        return p.Failed(attempt=event.attempt, kind=event.kind, message=event.message,
                        service_s=event.service_s)

    def close(self) -> None:
        self.core.close()
        self._flush_events()
        self.sock.close(linger=500)
        self.ctx.term()
        self._wake_r.close()
        self._wake_w.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="runtime.shells.worker_process")
    ap.add_argument("--scheduler", required=True)
    ap.add_argument("--device", required=True)
    ap.add_argument("--epoch", type=int, required=True)
    ap.add_argument("--config", required=True, help="the resolved config as JSON")
    args = ap.parse_args(argv)
    setup_logging(args.device)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the scheduler, which stops us
    config = config_from_dict(json.loads(Path(args.config).read_text()))
    return WorkerProcess(config, args.device, args.epoch, args.scheduler).run()


if __name__ == "__main__":
    sys.exit(main())
