"""The scheduler process: sockets and processes around the pure ``SchedulerState``.

Two ROUTER sockets: the front for clients (``scheduler.address``), the back for workers
(``scheduler.worker_address``). Every peer is authenticated per connection at the handshake
(``wire/security.py``): the client door takes the keys or the token, the worker door only the
credential this process hands its own workers. Workers choose unguessable routing ids; a
client's cannot be taken over (no handover on the front: a client that lost its connection
comes back under a new id, and a client connection silent for ``CLIENT_SILENT_MS`` though
pinged is closed). Input frames of a task are forwarded to the worker as they came, without
decoding. Answers a client is slow to read wait in its outbox (``outbox.py``), never dropped.

Nothing a peer sends can stop this process: a bad message gets a typed error reply and a log
line (at most one per peer and kind per period); an exception while handling one message
fails that message, and one on the tick path is logged and the loop goes on.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import errno
import functools
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from ..config.loader import config_from_dict
from ..config.schema import Config, CurveKeys, config_to_dict
from ..core import scheduler as s
from ..env import setup_logging
from ..errors import ClusterUnavailable, ConfigError, FanoutError, ProtocolError, Unauthorized
from ..wire import protocol as p
from ..wire.peerlog import PeerLog
from ..wire.security import Door, Gate, doors, with_worker_pair
from ..wire.status import ClusterInfo, Status
from .outbox import Held, Outbox
from .supervisor import LocalSupervisor, Supervisor

log = logging.getLogger("fanout.scheduler")
TICK_S = 0.05
DRAIN_BATCH = 1000  # messages read from one socket at a time: neither can starve the other
HANDSHAKE_MS = 10_000  # a connection that has not authenticated by then is closed
# A client connection from which nothing came for this long, though pinged, is closed: a link
# that died without a word is otherwise held for good (TCP tells nothing while we only wait).
CLIENT_PING_MS, CLIENT_SILENT_MS = 1_000, 5_000
# Messages queued for one worker before its ROUTER drops them: above what its credits let it
# hold (capacity 256 + prefetch 4096 tasks, their cancels, pings), so none is ever dropped.
WORKER_SNDHWM = 16_384
# Messages queued in ZMQ for one client before the rest wait in the outbox, where they are
# counted against max_client_backlog_bytes: each may be a pack of answers (up to
# protocol.PACK_BYTES), so at most a few MiB sit where no bound sees them.
CLIENT_SNDHWM = 100
MAX_FORGOTTEN = 10_000  # clients remembered as forgotten for not reading their answers
# Submits refused to a client whose answers pile up unread, before it is forgotten: answers
# to its accepted tasks are bounded by its share of the queue; refusals only by this.
MAX_UNREAD_REFUSALS = 1000
# A worker's error text kept in a task's attempts: up to max_attempts of them go into one
# answer, whose header must stay under its limit.
MAX_ERROR_CHARS = 2000


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


def unpredictable_routing_ids() -> None:
    """Seed C ``rand()``, which libzmq numbers a ROUTER's unnamed peers from and never seeds
    itself: unseeded, every process hands out the same ids, and a peer that claims the next
    one before it is handed out makes libzmq abort the process (a duplicate in its table)."""
    try:
        libc = ctypes.cdll.ucrtbase if sys.platform == "win32" else ctypes.CDLL(None)
        libc.srand(ctypes.c_uint(secrets.randbits(32)))
    except (OSError, AttributeError):  # no C runtime to seed: the ids stay guessable
        log.warning("could not seed libzmq's routing ids; set a token or keys")


def worker_config(config: Config, keys: CurveKeys | None, worker_token: str) -> Config:
    """The config as the workers get it: their own credential, and nobody else's secrets (not
    the client token, the client keys, the scheduler's secret key or the HTTP API key)."""
    return dataclasses.replace(
        config,
        scheduler=dataclasses.replace(config.scheduler, token=None, worker_token=worker_token),
        cluster=dataclasses.replace(config.cluster, keys=keys.for_workers() if keys else None),
        http=dataclasses.replace(config.http, api_key=None))


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:  # an exception whose str() fails is still an exception
        text = ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


class SchedulerProcess:
    """Binds the sockets, starts the workers, and runs the event loop until stopped."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[SchedulerProcess, object], None] | None = None,
                 supervisor_factory: Callable[[str, str], Supervisor] = LocalSupervisor):
        self.config = config
        sc = config.scheduler
        self.clock = clock
        self.on_change = on_change
        unpredictable_routing_ids()  # before the ROUTERs: each draws its first id at creation
        self.ctx = zmq.Context()
        keys = with_worker_pair(config.cluster.keys) if config.cluster.keys else None
        self.worker_token = secrets.token_urlsafe(32)  # new at every start, for our workers
        front_door, back_door = doors(keys, sc.token, self.worker_token)
        self._gate = Gate(self.ctx, keys.server_secret if keys else None,
                          [front_door, back_door])
        try:
            self.front = self._router(sc.address, front_door, client_side=True)
        except BaseException:
            self._gate.close()
            raise
        try:
            self.back = self._router(sc.worker_address, back_door, client_side=False)
        except BaseException:
            self.front.close(linger=0)
            self._gate.close()
            raise
        self.address = self.front.getsockopt_string(zmq.LAST_ENDPOINT)
        self.worker_address = self.back.getsockopt_string(zmq.LAST_ENDPOINT)
        self.front_decoder = p.Decoder(p.CLIENT_TO_SCHEDULER, sc.max_message_bytes,
                                       decode_arrays=False)
        self.back_decoder = p.Decoder(p.WORKER_TO_SCHEDULER, sc.max_message_bytes,
                                      decode_arrays=False)
        self.outbox = Outbox(self.front)
        # What a step (a drain, a tick) sends, per peer, goes out when it ends, in packs.
        self._to_clients = Held(self.outbox.send)
        self._to_workers = Held(lambda ident, frames: p.send_frames(self.back,
                                                                    [ident] + frames))
        self.peers = PeerLog(log)
        self._workers: dict[bytes, tuple[str, int]] = {}  # identity -> (device, epoch)
        self._routes: dict[str, bytes] = {}  # device -> identity it registered from
        self._later: list = []  # events that arose while carrying out actions: next tick
        self._answered: set = set()  # task keys answered while handling the current message
        self._forgotten: dict[bytes, None] = {}  # clients dropped for not reading answers
        self._unread_refusals: dict[bytes, int] = {}  # submits refused for an unread backlog
        self.internal_errors = 0  # exceptions caught while handling messages or ticking
        self._tmp = tempfile.TemporaryDirectory(prefix="fanout-")
        config_file = Path(self._tmp.name) / "config.json"
        config_file.write_text(json.dumps(config_to_dict(
            worker_config(config, keys, self.worker_token))))
        self.supervisor = supervisor_factory(self.worker_address, str(config_file))
        # A supervisor that tracks nodes (Ray) adds and removes workers as nodes come and go.
        self.state = s.SchedulerState(config, clock, track_nodes=self.supervisor.tracks_nodes)
        self._stopping = False
        self._held: list | None = None  # events of the drain under way, fed when it ends
        self._last_ping = 0.0
        self.started = time.time()

    def _router(self, address: str, door: Door, client_side: bool) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # Per frame: arrays come in frames of FRAME_BYTES, headers up to twice their limit get
        # a typed error; a larger frame ends its connection, before or after authentication.
        sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        if client_side:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full pipe says so: answers wait
            sock.setsockopt(zmq.SNDHWM, CLIENT_SNDHWM)
            sock.setsockopt(zmq.HEARTBEAT_IVL, CLIENT_PING_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, CLIENT_SILENT_MS)
        else:  # an authenticated worker with its own unguessable id takes its route back
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            sock.setsockopt(zmq.SNDHWM, WORKER_SNDHWM)
        self._gate.serve(sock, door)
        try:
            if address.startswith("tcp://") and address.rsplit(":", 1)[1] in ("0", "*"):
                host = address[len("tcp://"):].rsplit(":", 1)[0]
                port = sock.bind_to_random_port(f"tcp://{host}")
                log.debug("bound %s:%d", host, port)
            else:
                sock.bind(address)
            if address.startswith("ipc://"):  # the socket file: its owner only
                os.chmod(address[len("ipc://"):], 0o600)
        except (zmq.ZMQError, OSError) as exc:
            sock.close(linger=0)
            if isinstance(exc, zmq.ZMQError):
                raise ConfigError(_bind_error(address, exc)) from None
            raise ConfigError(f"cannot restrict {address} to its owner: {exc}") from None
        return sock

    # -- loop --

    def stop(self) -> None:
        self._stopping = True

    def serve(self, watch_parent: int | None = None) -> None:
        self._guarded("start", lambda: self._execute(self.state.start()))
        self._guarded("start", lambda: self._feed(*self.supervisor.node_events()))
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        last_tick = 0.0
        heard_all_until = self.clock()
        try:
            while not self._stopping:
                ready = dict(poller.poll(int(TICK_S * 1000)))
                if self.back in ready:
                    self._drain(self.back, self._on_worker_message)
                # A ROUTER reads its peers in turn, so one batch holds a message of every
                # worker that sent one: a flood from one peer hides no other's silence.
                heard_all_until = self.clock()
                if self.front in ready:
                    self._drain(self.front, self._on_client_message)
                now = self.clock()
                if now - last_tick >= TICK_S:
                    last_tick = now
                    self._tick(now, heard_all_until)
                    if watch_parent is not None and os.getppid() != watch_parent:
                        log.error("parent process died; shutting the cluster down")
                        break
                self._send_held()
                self._guarded("outbox", self.outbox.flush)
        finally:
            self.close()

    def _tick(self, now: float, heard_all_until: float) -> None:
        """The periodic work; each step guarded on its own, so one that fails skips only
        itself (and is tried again next tick)."""
        events: list = []
        self._guarded("tick", lambda: events.extend(
            s.WorkerExited(d, e, r) for d, e, r in self.supervisor.poll()))
        self._guarded("tick", lambda: events.extend(self.supervisor.node_events()))
        events += self._later
        self._later = []
        for event in events:  # one at a time: a failing one costs no other its handling
            self._guarded("tick", functools.partial(self._feed, event))
        self._guarded("tick", lambda: self._feed(s.Tick(heard_all_until)))
        self._guarded("tick", lambda: self._ping_workers(now))

    def _guarded(self, where: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as exc:  # a bug in one step must not take the cluster down
            self.internal_errors += 1
            self.peers.error(where, _describe(exc)[:60], "error in the scheduler's %s step "
                             "(%s); it goes on", where, _describe(exc), exc_info=True)

    def _drain(self, sock: zmq.Socket, handler) -> bool:
        """Handle waiting messages; True if the socket is now empty. Their events are fed to
        the state together at the end, so one placement pass serves the whole drain."""
        self._held = []
        self._answered.clear()
        try:
            handled = 0  # messages, a pack's each counted
            while handled < DRAIN_BATCH:
                try:
                    frames = p.recv_frames(sock)
                except zmq.Again:
                    return True
                handled += 1
                if len(frames) < 2:
                    continue
                ident = frames[0].bytes
                messages = self._unpack(sock is self.front, ident, frames[1:])
                handled += len(messages) - 1
                for message in messages:
                    try:
                        handler(ident, message)
                    except Exception as exc:  # a bug in handling one message fails it only
                        self._failed_to_handle(sock is self.front, ident, message, exc)
            return False
        finally:
            self._flush()
            self._held = None
            self._send_held()

    def _unpack(self, from_client: bool, ident: bytes, frames: list) -> list[list]:
        """The messages in what a peer sent (several, if a pack); none if it is a broken
        pack, which is logged and answered with a typed error."""
        try:
            return p.unpack(frames)
        except ProtocolError as exc:
            who = f"{'client' if from_client else 'worker'} {ident.hex()[:16]}"
            self.peers.warning(who, "bad", "%s: bad message: %s", who, exc)
            if from_client:
                self._reply(ident, p.error_reply(None, exc))
            else:
                self._to_worker(ident, p.error_reply(None, exc))
            return []

    def _send_held(self) -> None:
        """Send what this step made for each peer (several messages in one pack)."""
        self._to_workers.send(self._failed_send)
        self._to_clients.send(self._failed_send)

    def _failed_send(self, ident: bytes, exc: Exception) -> None:
        self.internal_errors += 1
        self.peers.error(f"peer {ident.hex()[:16]}", "send", "could not send to %s (%s); "
                         "the cluster goes on", ident.hex()[:16], _describe(exc), exc_info=True)

    def _flush(self) -> None:
        """Feed the events held so far (before a reply that must see them). Each event is
        handled, and reported to ``on_change``, on its own: one that fails costs no other its
        answer, and a client's task that could not be taken is answered with an error."""
        held, self._held = self._held, None
        if held:
            actions, failed = self.state.handle_each(held)
            self._execute(actions)
            for event, exc in failed:
                self._failed_event(event, exc)
            if self.on_change is not None:
                for event in held:
                    if not isinstance(event, (s.Tick, s.ClientHeard)):
                        try:
                            self.on_change(self, event)
                        except Exception as exc:
                            self._failed_event(event, exc)
        if held is not None:
            self._held = []

    def _failed_event(self, event: s.Event, exc: Exception) -> None:
        self.internal_errors += 1
        client = event.client if isinstance(event, s.TaskSubmitted) else None
        who = f"client {client.hex()[:16]}" if client else "events"
        self.peers.error(who, "internal", "%s: the scheduler failed to handle %s (%s); the "
                         "cluster goes on", who, type(event).__name__, _describe(exc),
                         exc_info=exc)
        if isinstance(event, s.TaskSubmitted) and client is not None:
            key = event.key
            if key not in self.state.tasks and key not in self._answered:
                try:
                    self._reply(key[0], p.Failure(task_id=key[1], error=FanoutError(
                        f"the scheduler failed to take this task ({_describe(exc)}); it "
                        f"goes on serving")))
                except Exception:  # answering failed too: the log line above says it all
                    pass

    def _failed_to_handle(self, from_client: bool, ident: bytes, frames: list,
                          exc: Exception) -> None:
        """Log it (once per peer and period), and answer the sender with a typed error if
        nothing answered that message yet and nothing will."""
        self._flush()  # so the state knows of what this drain held
        self.internal_errors += 1
        who = f"{'client' if from_client else 'worker'} {ident.hex()[:16]}"
        self.peers.error(who, "internal", "%s: the scheduler failed to handle a message "
                         "(%s); it was answered with an error, and the cluster goes on", who,
                         _describe(exc), exc_info=True)
        if not from_client:
            return
        error = FanoutError(f"the scheduler failed to handle this message "
                            f"({_describe(exc)}); it goes on serving")
        t, ref = p.peek_ids(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
        try:
            if t in (p.Submit.TYPE, p.Generate.TYPE) and ref is not None:
                key = (ident, ref)
                if key not in self.state.tasks and key not in self._answered:
                    self._reply(ident, p.Failure(task_id=ref, error=error))
            elif t in (p.StatusRequest.TYPE, p.Shutdown.TYPE) and ref is not None:
                self._reply(ident, p.Reply(req_id=ref, error=error))
            elif t == p.Hello.TYPE:
                self._reply(ident, p.error_reply(None, error))
        except Exception:  # answering failed too: the log line above says it all
            pass

    def _feed(self, *events: s.Event) -> None:
        if self._held is not None:  # in a drain: fed together at its end
            self._held.extend(events)
            return
        self._feed_now(*events)

    def _feed_now(self, *events: s.Event) -> None:
        """Feed at once (after what is held), letting an error reach the message's handler."""
        self._flush()
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
            self._to_workers.put(ident, ping)

    # -- clients --

    def _reply(self, ident: bytes, msg: p.Message) -> None:
        if ident in self._forgotten:
            return  # dropped with its backlog: it must say hello again
        if isinstance(msg, (p.Result, p.Completion, p.Failure)):
            self._answered.add((ident, msg.task_id))
        self._to_clients.put(ident, p.encode(msg))

    def _backlog(self, ident: bytes) -> int | None:
        """Bytes of answers waiting for ``ident``; None once it has been refused so often
        for not reading them that it is forgotten (its tasks cancelled, its answers dropped:
        it must say hello again)."""
        backlog = self.outbox.backlog(ident)
        if backlog <= self.config.scheduler.max_client_backlog_bytes:
            self._unread_refusals.pop(ident, None)
            return backlog
        refused = self._unread_refusals[ident] = self._unread_refusals.get(ident, 0) + 1
        if refused <= MAX_UNREAD_REFUSALS:
            return backlog
        del self._unread_refusals[ident]
        self._to_clients.send_to(ident, self._failed_send)  # as far as ZMQ's queue takes them
        dropped = self.outbox.forget(ident)
        self._forgotten[ident] = None
        while len(self._forgotten) > MAX_FORGOTTEN:
            del self._forgotten[next(iter(self._forgotten))]
        who = ident.hex()[:16]
        self.peers.warning(f"client {who}", "unread", "client %s: sent %d submits while %d "
                           "answers (%d bytes, more than scheduler.max_client_backlog_bytes) "
                           "waited for it to read them; forgotten, its tasks cancelled, until "
                           "it says hello again", who, MAX_UNREAD_REFUSALS, dropped, backlog)
        self._later.append(s.ClientBye(ident))
        return None

    def _on_client_message(self, ident: bytes, frames: list) -> None:
        who = ident.hex()[:16]
        try:
            msg = self.front_decoder.decode(frames)
        except ProtocolError as exc:
            self.peers.warning(f"client {who}", "bad", "client %s: bad message: %s", who, exc)
            if exc.msg_type in (p.Submit.TYPE, p.Generate.TYPE) and exc.ref is not None:
                self._reply(ident, p.Failure(task_id=exc.ref, error=exc))
            else:
                self._reply(ident, p.error_reply(exc.ref, exc))
            return
        sc = self.config.scheduler
        if ident in self._forgotten and not isinstance(msg, p.Hello):
            self.peers.warning(f"client {who}", "forgotten", "client %s: message dropped: it "
                               "was forgotten for not reading its answers", who)
            return
        if isinstance(msg, p.Hello):
            if not _token_ok(sc.token, msg.token):
                self.peers.warning(f"client {who}", "token", "client %s: refused: wrong or "
                                   "missing token", who)
                self._reply(ident, p.error_reply(None, Unauthorized(
                    "this cluster needs a token: pass token= to runtime.connect() or set "
                    "FANOUT_TOKEN")))
                return
            self._forgotten.pop(ident, None)
            self._feed_now(s.ClientHello(ident, msg.keepalive_s, msg.previous))
            self._reply(ident, p.Welcome(version=p.PROTOCOL_VERSION, cluster=self.info()))
            return
        if sc.token and ident not in self.state.clients:  # they said hello with the token
            self._flush()  # a hello earlier in this drain counts
        if sc.token and ident not in self.state.clients:
            self._reply(ident, p.error_reply(getattr(msg, "req_id", None), Unauthorized(
                "say hello with the cluster token first")))
            return
        if isinstance(msg, p.Bye):
            self._feed(s.ClientBye(ident))
            return
        heard = s.ClientHeard(ident)  # fed with the message's own event: one handle() each
        match msg:
            case p.Submit() | p.Generate():
                backlog = self._backlog(ident)
                if backlog is None:
                    return
                limit = msg.request.get("max_tokens") if isinstance(msg, p.Generate) else None
                self._feed(heard, s.TaskSubmitted(
                    (ident, msg.task_id), msg.model,
                    msg.inputs if isinstance(msg, p.Submit) else msg.request, msg.timeout_s,
                    generate=isinstance(msg, p.Generate),
                    stream=isinstance(msg, p.Generate) and msg.stream, client=ident,
                    max_tokens=limit if isinstance(limit, int) else None,
                    nbytes=p.frames_size(frames), backlog=backlog))
            case p.Cancel():
                self._feed(heard, s.TaskCancelled((ident, msg.task_id)))
            case p.StatusRequest():
                self._feed(heard)
                self._flush()
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
            task_timeout_s=self.config.scheduler.task_timeout_s,
            max_task_timeout_s=self.config.scheduler.max_task_timeout_s,
            models=tuple(sorted(self.state.orders)), internal_errors=self.internal_errors,
            backlog_bytes=self.outbox.total_bytes)

    def status(self) -> Status:
        """The cluster's status, as a ``status`` request gets it."""
        return self.state.snapshot(self.info())

    # -- workers --

    def _to_worker(self, ident: bytes, msg: p.Message) -> None:
        self._to_workers.put(ident, p.encode(msg))

    def _on_worker_message(self, ident: bytes, frames: list) -> None:
        who = ident.hex()[:16]
        try:
            msg = self.back_decoder.decode(frames)
        except ProtocolError as exc:
            self.peers.warning(f"worker {who}", "bad", "worker %s: bad message: %s", who, exc)
            self._to_worker(ident, p.error_reply(None, exc))  # it stops, and is restarted
            self._fail_unreadable(ident, frames, exc)
            return
        if isinstance(msg, p.Register):
            refusal = self._refuse_registration(ident, msg)
            if refusal is not None:
                self.peers.warning(f"worker {who}", "register", "worker %s: registration as "
                                   "%s refused: %s", who, msg.device, refusal)
                self._to_worker(ident, p.error_reply(None, ProtocolError(refusal)))
                return
            self._workers = {i: w for i, w in self._workers.items() if w[0] != msg.device}
            self._flush()  # what its earlier incarnation said comes first
            self._workers[ident] = (msg.device, msg.epoch)
            self._routes[msg.device] = ident
            self._to_worker(ident, p.Welcome(version=p.PROTOCOL_VERSION))
            self._feed(s.WorkerRegistered(msg.device, msg.epoch, msg.pid, msg.node, msg.models))
            return
        registered = self._workers.get(ident)
        if registered is None:
            self.peers.warning(f"worker {who}", "unregistered", "message from unregistered "
                               "worker %s dropped", who)
            return
        device, epoch = registered
        match msg:
            case p.Heartbeat():
                self._feed(s.WorkerHeartbeat(device, epoch, msg.peak_running, msg.cpu_s,
                                             msg.cores, msg.node_cpu_s))
            case p.ModelState():
                self._feed(s.ModelStateChanged(device, epoch, msg.model, msg.load))
            case p.Done():
                self._feed(s.TaskSucceeded(device, epoch, msg.attempt, msg.outputs,
                                           msg.service_s, msg.batch))
            case p.Tokens():
                self._feed(s.TaskTokens(device, epoch, msg.attempt, msg.ids, msg.text,
                                        msg.tool_calls, msg.logprobs))
            case p.Generated():
                self._feed(s.TaskSucceeded(device, epoch, msg.attempt, {
                    "finish_reason": msg.finish_reason, "prompt_tokens": msg.prompt_tokens,
                    "completion_tokens": msg.completion_tokens}, msg.service_s))
            case p.Failed():
                self._feed(s.TaskFailed(device, epoch, msg.attempt, msg.kind,
                                        msg.message[:MAX_ERROR_CHARS], msg.service_s))

    def _fail_unreadable(self, ident: bytes, frames: list, exc: ProtocolError) -> None:
        """A registered worker's message about a run could not be read (its result, say, or
        tokens out of range): that run fails here, with what was wrong, and is re-run
        elsewhere at once. What it sent reaches nobody."""
        registered = self._workers.get(ident)
        attempt = p.peek_attempt(frames[0].bytes if hasattr(frames[0], "bytes") else frames[0])
        if registered is None or attempt is None:
            return
        device, epoch = registered
        self._feed(s.TaskFailed(device, epoch, attempt, "protocol", (
            f"{device} sent a message about this run that could not be read "
            f"({exc.message}); the worker was told to stop, and is restarted")[:MAX_ERROR_CHARS]))

    def _refuse_registration(self, ident: bytes, msg: p.Register) -> str | None:
        """Why a worker may not register as it asks, or None. Only the incarnation this
        scheduler started may, from one connection."""
        view = self.state.workers.get(msg.device)
        if view is None:
            return f"device {msg.device!r} is not in this cluster's config"
        if msg.epoch != view.epoch:
            return (f"epoch {msg.epoch} of {msg.device} is not the one this scheduler started "
                    f"({view.epoch})")
        current = self._routes.get(msg.device)
        if current is not None and current != ident \
                and self._workers.get(current) == (msg.device, msg.epoch):
            return f"{msg.device} (epoch {msg.epoch}) is registered from another connection"
        return None

    def _route(self, device: str, epoch: int) -> bytes | None:
        ident = self._routes.get(device)
        return ident if ident is not None and self._workers.get(ident) == (device, epoch) \
            else None

    # -- actions --

    def _execute(self, actions: list) -> None:
        for a in actions:  # each on its own: one that fails costs no other action
            try:
                self._carry_out(a)
            except Exception as exc:
                self._failed_action(a, exc)

    def _failed_action(self, a, exc: Exception) -> None:
        self.internal_errors += 1
        self.peers.error("actions", type(a).__name__, "error while carrying out %s (%s); "
                         "the cluster goes on", type(a).__name__, _describe(exc), exc_info=True)
        if isinstance(a, s.StartWorker):  # counts as an exit: restarted with its backoff
            self._later.append(s.WorkerExited(a.device, a.epoch,
                                              f"could not start: {_describe(exc)}"))
        elif isinstance(a, (s.Deliver, s.Reject)):  # the answer must still reach its caller
            ident, task_id = a.key
            if (ident, task_id) not in self._answered:
                try:
                    self._reply(ident, p.Failure(task_id=task_id, error=FanoutError(
                        f"the scheduler could not send this task's answer "
                        f"({_describe(exc)})")))
                except Exception:
                    pass

    def _carry_out(self, a) -> None:
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
                ident = self._route(a.device, a.epoch)
                if ident is not None:  # else its worker is gone: lost, and re-run, on a tick
                    self._to_worker(ident, run)
            case s.StreamChunk():
                ident, task_id = a.key
                self._reply(ident, p.Chunk(task_id=task_id, text=a.text, device=a.device,
                                           previous_device=a.previous_device,
                                           tool_calls=a.tool_calls, logprobs=a.logprobs))
            case s.CancelAttempt():
                ident = self._route(a.device, a.epoch)
                if ident is not None:
                    self._to_worker(ident, p.CancelRun(attempt=a.attempt))
            case s.Deliver():
                ident, task_id = a.key
                attempts = list(a.attempts)
                timing = {"submitted_at": a.submitted_at, "started_at": a.started_at,
                          "finished_at": a.finished_at}
                if a.generation is None:
                    self._reply(ident, p.Result(task_id=task_id, device=a.device,
                                                outputs=a.payload, service_s=a.service_s,
                                                attempts=attempts, **timing))
                    return
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
                # What it was told last (its tasks cancelled) goes as far as ZMQ's queue
                # takes it; the rest nobody will read.
                self._to_clients.send_to(a.client, self._failed_send)
                self.outbox.forget(a.client)
                if a.goodbye:
                    log.debug("client %s %s (%d unfinished tasks cancelled)", who, a.reason,
                              a.cancelled)
                else:
                    self.peers.warning(f"client {who}", "silent", "client %s %s; cancelled "
                                       "its %d unfinished tasks", who, a.reason, a.cancelled)
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
        self._send_held()
        try:
            self.outbox.flush()
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
    # The launcher reads that one line, then nobody reads the pipe: anything else printed
    # here or by the workers (who inherit it) goes to stderr, so a chatty engine never blocks.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    proc.serve(watch_parent=args.watch_parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
