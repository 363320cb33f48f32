"""The scheduler process: sockets and processes around the pure ``SchedulerState``.

Two ROUTER sockets: the front for clients (``scheduler.address``), the back for workers
(``scheduler.worker_address``). Input frames of a task are forwarded to the worker as they
came, without decoding. Every bad message gets an error reply and a log line; nothing a peer
sends can stop this process.
"""
from __future__ import annotations

import argparse
import errno
import hmac
import json
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from ..config.loader import config_from_dict
from ..config.schema import Config, config_to_dict
from ..core import scheduler as s
from ..env import setup_logging
from ..errors import ClusterUnavailable, ConfigError, ProtocolError, Unauthorized
from ..wire import protocol as p
from ..wire.security import Gate
from ..wire.status import ClusterInfo, Status
from .supervisor import LocalSupervisor, Supervisor

log = logging.getLogger("fanout.scheduler")
TICK_S = 0.05


def _token_ok(expected: str | None, given: str | None) -> bool:
    if not expected:
        return True
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def _bind_error(address: str, exc: zmq.ZMQError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return (f"{address} is already in use: another `fanout up` (or another program) "
                f"listens there. `fanout status --address {address}` tells; stop it with "
                f"`fanout down`, or choose another address (--address, scheduler.address)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {address}: no interface of this machine has that address; "
                f"use 127.0.0.1, or one of this machine's IP addresses")
    return f"cannot listen on {address}: {exc.strerror or exc}"


class SchedulerProcess:
    """Binds the sockets, starts the workers, and runs the event loop until stopped."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[SchedulerProcess, object], None] | None = None,
                 supervisor_factory: Callable[[str, str], Supervisor] = LocalSupervisor):
        self.config = config
        sc = config.scheduler
        self.clock = clock
        self.on_change = on_change
        self.ctx = zmq.Context()
        # With keys, both sockets are CURVE servers that admit only the cluster's client key.
        self._gate = Gate(self.ctx, config.cluster.keys) if config.cluster.keys else None
        try:
            self.front = self._router(sc.address)
            self.back = self._router(sc.worker_address)
        except BaseException:
            if self._gate is not None:
                self._gate.close()
            raise
        self.address = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_address = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self.front_decoder = p.Decoder(p.CLIENT_TO_SCHEDULER, sc.max_message_bytes,
                                       decode_arrays=False)
        self.back_decoder = p.Decoder(p.WORKER_TO_SCHEDULER, sc.max_message_bytes,
                                      decode_arrays=False)
        self._workers: dict[bytes, tuple[str, int]] = {}  # identity -> (device, epoch)
        self._tmp = tempfile.TemporaryDirectory(prefix="fanout-")
        config_file = Path(self._tmp.name) / "config.json"
        config_file.write_text(json.dumps(config_to_dict(config)))
        self.supervisor = supervisor_factory(self.worker_address, str(config_file))
        # A supervisor that tracks nodes (Ray) adds and removes workers as nodes come and go.
        self.state = s.SchedulerState(config, clock, track_nodes=self.supervisor.tracks_nodes)
        self._stopping = False
        self._last_ping = 0.0
        self.started = time.time()

    def _router(self, address: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Up to twice the limit, a message is read and answered with a typed error; past that
        # libzmq drops the frame and the connection, so no peer can make us buffer more.
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.config.scheduler.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker reuses its identity
        if self._gate is not None:
            self._gate.serve(sock)
        try:
            if address.startswith("tcp://") and address.rsplit(":", 1)[1] in ("0", "*"):
                host = address[len("tcp://"):].rsplit(":", 1)[0]
                port = sock.bind_to_random_port(f"tcp://{host}")
                log.debug("bound %s:%d", host, port)
            else:
                sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(_bind_error(address, exc)) from None
        return sock

    # -- loop --

    def stop(self) -> None:
        self._stopping = True

    def serve(self, watch_parent: int | None = None) -> None:
        self._execute(self.state.start())
        self._feed(*self.supervisor.node_events())
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        last_tick = 0.0
        heard_all_until = self.clock()
        try:
            while not self._stopping:
                ready = dict(poller.poll(int(TICK_S * 1000)))
                if self.back not in ready or self._drain(self.back, self._on_worker_message):
                    heard_all_until = self.clock()  # every worker message so far is read
                if self.front in ready:
                    self._drain(self.front, self._on_client_message)
                now = self.clock()
                if now - last_tick >= TICK_S:
                    last_tick = now
                    events: list = [s.WorkerExited(d, e, r) for d, e, r in self.supervisor.poll()]
                    events += self.supervisor.node_events()
                    self._feed(*events, s.Tick(heard_all_until))
                    self._ping_workers(now)
                    if watch_parent is not None and os.getppid() != watch_parent:
                        log.error("parent process died; shutting the cluster down")
                        break
        finally:
            self.close()

    def _drain(self, sock: zmq.Socket, handler) -> bool:
        """Handle waiting messages; True if the socket is now empty."""
        for _ in range(1000):  # bounded, so one busy socket cannot starve the other
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            if len(frames) < 2:
                continue
            try:
                handler(frames[0].bytes, frames[1:])
            except Exception:  # a bug in handling one message must not take the cluster down
                log.exception("error while handling a message")
        return False

    def _feed(self, *events: s.Event) -> None:
        self._execute(self.state.handle(*events))
        if self.on_change is not None:
            for ev in events:
                if not isinstance(ev, (s.Tick, s.ClientHeard)):
                    self.on_change(self, ev)

    def _ping_workers(self, now: float) -> None:
        if now - self._last_ping < self.config.scheduler.heartbeat_interval_s:
            return
        self._last_ping = now
        ping = p.encode(p.Ping())
        for ident in self._workers:
            self.back.send_multipart([ident] + ping)

    # -- clients --

    def _reply(self, ident: bytes, msg: p.Message) -> None:
        self.front.send_multipart([ident] + p.encode(msg), copy=False)

    def _on_client_message(self, ident: bytes, frames: list) -> None:
        try:
            msg = self.front_decoder.decode(frames)
        except ProtocolError as exc:
            log.warning("client %s: bad message: %s", ident.hex()[:16], exc)
            if exc.msg_type == p.Submit.TYPE and exc.ref is not None:
                self._reply(ident, p.Failure(task_id=exc.ref, error=exc))
            else:
                self._reply(ident, p.error_reply(exc.ref, exc))
            return
        sc = self.config.scheduler
        if isinstance(msg, p.Hello):
            if not _token_ok(sc.token, msg.token):
                log.warning("client %s: refused: wrong or missing token", ident.hex()[:16])
                self._reply(ident, p.error_reply(None, Unauthorized(
                    "this cluster needs a token: pass token= to runtime.connect() or set "
                    "FANOUT_TOKEN")))
                return
            self._feed(s.ClientHello(ident, msg.keepalive_s))
            self._reply(ident, p.Welcome(version=p.PROTOCOL_VERSION, cluster=self.info()))
            return
        if sc.token and ident not in self.state.clients:  # they said hello with the token
            self._reply(ident, p.error_reply(getattr(msg, "req_id", None), Unauthorized(
                "say hello with the cluster token first")))
            return
        if isinstance(msg, p.Bye):
            self._feed(s.ClientBye(ident))
            return
        heard = s.ClientHeard(ident)  # fed with the message's own event: one handle() each
        match msg:
            case p.Submit():
                self._feed(heard, s.TaskSubmitted((ident, msg.task_id), msg.model, msg.inputs,
                                                  msg.timeout_s, client=ident))
            case p.Generate():
                limit = msg.request.get("max_tokens")
                self._feed(heard, s.TaskSubmitted((ident, msg.task_id), msg.model, msg.request,
                                                  msg.timeout_s, generate=True,
                                                  stream=msg.stream, client=ident,
                                                  max_tokens=limit if isinstance(limit, int)
                                                  else None))
            case p.Cancel():
                self._feed(heard, s.TaskCancelled((ident, msg.task_id)))
            case p.StatusRequest():
                self._feed(heard)
                self._reply(ident, p.Reply(req_id=msg.req_id, body=self.status().to_wire()))
            case p.Shutdown():
                self._feed(heard)
                self._reply(ident, p.Reply(req_id=msg.req_id, body={"stopping": True}))
                self.stop()
            case _:  # KeepAlive
                self._feed(heard)

    def info(self) -> ClusterInfo:
        return ClusterInfo(
            address=self.address, worker_address=self.worker_address, pid=os.getpid(),
            node=socket.gethostname(), launcher="local", started=self.started,
            ready=self.state.ready() and self.supervisor.settled,
            max_message_bytes=self.config.scheduler.max_message_bytes,
            models=tuple(sorted(self.state.orders)))

    def status(self) -> Status:
        """The cluster's status, as a ``status`` request gets it."""
        return self.state.snapshot(self.info())

    # -- workers --

    def _on_worker_message(self, ident: bytes, frames: list) -> None:
        try:
            msg = self.back_decoder.decode(frames)
        except ProtocolError as exc:
            log.warning("worker %s: bad message: %s", ident[:40], exc)
            self.back.send_multipart([ident] + p.encode(p.error_reply(None, exc)))
            return
        if isinstance(msg, p.Register):
            if not _token_ok(self.config.scheduler.token, msg.token):
                log.warning("worker %s: refused: wrong or missing token", ident[:40])
                self.back.send_multipart([ident] + p.encode(p.error_reply(None, Unauthorized(
                    "worker token does not match the scheduler's"))))
                return
            if msg.device not in self.state.workers:
                self.back.send_multipart([ident] + p.encode(p.error_reply(None, ProtocolError(
                    f"device {msg.device!r} is not in this cluster's config"))))
                return
            self._workers = {i: w for i, w in self._workers.items() if w[0] != msg.device}
            self._workers[ident] = (msg.device, msg.epoch)
            self.back.send_multipart([ident] + p.encode(p.Welcome(version=p.PROTOCOL_VERSION)))
            self._feed(s.WorkerRegistered(msg.device, msg.epoch, msg.pid, msg.node, msg.models))
            return
        who = self._workers.get(ident)
        if who is None:
            log.warning("message from unregistered worker %s dropped", ident[:40])
            return
        device, epoch = who
        match msg:
            case p.Heartbeat():
                self._feed(s.WorkerHeartbeat(device, epoch, msg.peak_running, msg.cpu_s,
                                             msg.cores, msg.node_cpu_s))
            case p.ModelState():
                self._feed(s.ModelStateChanged(device, epoch, msg.model, msg.load))
            case p.Done():
                self._feed(s.TaskSucceeded(device, epoch, msg.attempt, msg.outputs,
                                           msg.service_s))
            case p.Tokens():
                self._feed(s.TaskTokens(device, epoch, msg.attempt, msg.ids, msg.text,
                                        msg.tool_calls, msg.logprobs))
            case p.Generated():
                self._feed(s.TaskSucceeded(device, epoch, msg.attempt, {
                    "finish_reason": msg.finish_reason, "prompt_tokens": msg.prompt_tokens,
                    "completion_tokens": msg.completion_tokens}, msg.service_s))
            case p.Failed():
                self._feed(s.TaskFailed(device, epoch, msg.attempt, msg.kind, msg.message,
                                        msg.service_s))

    # -- actions --

    def _execute(self, actions: list) -> None:
        for a in actions:
            match a:
                case s.Dispatch():
                    if a.generation is None:
                        run: p.Message = p.Run(attempt=a.attempt, model=a.model,
                                               inputs=a.payload, timeout_s=a.timeout_s)
                    else:
                        run = p.RunGenerate(attempt=a.attempt, model=a.model, request=a.payload,
                                            prefix_ids=list(a.generation.ids),
                                            prefix_text=a.generation.text,
                                            prefix_calls=len(a.generation.tool_calls),
                                            timeout_s=a.timeout_s)
                    self.back.send_multipart([f"{a.device}:{a.epoch}".encode()] + p.encode(run),
                                             copy=False)
                case s.StreamChunk():
                    ident, task_id = a.key
                    self._reply(ident, p.Chunk(task_id=task_id, text=a.text, device=a.device,
                                               previous_device=a.previous_device,
                                               tool_calls=a.tool_calls, logprobs=a.logprobs))
                case s.CancelAttempt():
                    self.back.send_multipart([f"{a.device}:{a.epoch}".encode()]
                                             + p.encode(p.CancelRun(attempt=a.attempt)))
                case s.Deliver():
                    ident, task_id = a.key
                    attempts = list(a.attempts)
                    timing = {"submitted_at": a.submitted_at, "started_at": a.started_at,
                              "finished_at": a.finished_at}
                    if a.generation is None:
                        self._reply(ident, p.Result(task_id=task_id, device=a.device,
                                                    outputs=a.payload, service_s=a.service_s,
                                                    attempts=attempts, **timing))
                        continue
                    done = len(a.generation.ids)
                    usage = {"prompt_tokens": a.payload["prompt_tokens"],
                             "completion_tokens": done,
                             "total_tokens": a.payload["prompt_tokens"] + done}
                    self._reply(ident, p.Completion(
                        task_id=task_id, text=a.generation.text, device=a.device,
                        finish_reason=a.payload["finish_reason"], usage=usage,
                        attempts=attempts, service_s=a.service_s, **timing,
                        tool_calls=a.generation.tool_calls, logprobs=a.generation.logprobs))
                case s.Reject():
                    ident, task_id = a.key
                    self._reply(ident, p.Failure(task_id=task_id, error=a.error))
                case s.ForgetClient():
                    who = a.client.hex()[:16]
                    if a.goodbye:
                        log.debug("client %s said goodbye (%d unfinished tasks cancelled)", who,
                                  a.cancelled)
                    else:
                        log.warning("client %s %s; cancelled its %d unfinished tasks", who,
                                    a.reason, a.cancelled)
                case s.StartWorker():
                    self.supervisor.start(a.device, a.epoch)
                case s.KillWorker():
                    log.warning("killing worker %s: %s", a.device, a.reason)
                    self.supervisor.kill(a.device, a.epoch)

    def close(self) -> None:
        """Answer every open task, stop the workers, release the sockets."""
        err = ClusterUnavailable("the cluster is shutting down")
        for key in list(self.state.tasks):
            ident, task_id = key
            try:
                self._reply(ident, p.Failure(task_id=task_id, error=err))
            except zmq.ZMQError:
                pass
        stop = p.encode(p.Stop())
        for ident in self._workers:
            try:
                self.back.send_multipart([ident] + stop)
            except zmq.ZMQError:
                pass
        self.supervisor.stop_all(timeout=5.0)
        self.front.close(linger=200)
        self.back.close(linger=200)
        if self._gate is not None:
            self._gate.close()
        self.ctx.term()
        self._tmp.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry of the scheduler process that ``runtime.start()`` spawns."""
    ap = argparse.ArgumentParser(prog="runtime.shells.scheduler_process")
    ap.add_argument("--config", required=True, help="the resolved config as JSON")
    ap.add_argument("--watch-parent", type=int, default=None)
    args = ap.parse_args(argv)
    setup_logging("scheduler")
    config = config_from_dict(json.loads(Path(args.config).read_text()))
    proc = SchedulerProcess(config)
    signal.signal(signal.SIGTERM, lambda *_: proc.stop())
    signal.signal(signal.SIGINT, lambda *_: proc.stop())
    sys.stdout.write(json.dumps({"address": proc.address, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    proc.serve(watch_parent=args.watch_parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
