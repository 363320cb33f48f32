"""The Python client: ``AsyncClient`` does the work on asyncio; ``Client`` is its sync face.

``Client`` runs one ``AsyncClient`` on a private event loop thread. Its sync methods block on
that loop, and its ``a*`` methods await it from the caller's own loop, so each operation is
written once.

A reply the client cannot read fails the call it answers with ``ProtocolError``; the reader
goes on, so other calls are not left waiting.

Clients always come back: every call honours its timeout (sending included: a full send
queue waits within it); libzmq pings the scheduler (ZMTP heartbeats), so a scheduler that
died, stopped or became unreachable is noticed within ``LIVENESS_TIMEOUT_S`` and every
unfinished call fails with ``ClusterUnavailable``; the client connects again under a new
routing id (the scheduler may still hold the lost connection under the old one) and says
hello again, naming the lost connection so that its tasks are cancelled, as it says hello
after its own event loop stalled; ``close()`` takes at most ``CLOSE_WITHIN_S``.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import os
import queue
import secrets
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from .. import env
from ..config.keys import resolve_keys
from ..config.schema import CurveKeys
from ..env import DEFAULT_ADDRESS
from ..errors import (
    Attempt,
    ClusterUnavailable,
    FanoutError,
    InvalidInput,
    ProtocolError,
)
from ..wire import protocol as p
from ..wire import security
from ..wire.generation import TokenLogprob, ToolCall, build_request
from ..wire.status import ClusterInfo, Status
from .loopthread import END, LoopThread, pump

log = logging.getLogger("fanout.client")

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Plain ints: an int & a zmq enum flag goes through the enum's Python code, several times a reply.
_EVENTS, _POLLIN, _POLLOUT = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.POLLOUT)
KEEPALIVE_S = 1.0  # how often a client says it is still there
# Silent longer than this (its event loop stalled), a client says hello again before anything
# else: the scheduler may have forgotten it (it does after 5 keepalives, at least 2 s).
REHELLO_AFTER_S = 2 * KEEPALIVE_S
LIVENESS_IVL_S = 0.5  # libzmq pings the scheduler this often (ZMTP heartbeats)...
LIVENESS_TIMEOUT_S = 1.5  # ...and drops the connection when no answer came for this long
ANSWER_MARGIN_S = 5.0  # past a task's deadline, how long its answer may take to arrive
CLOSE_WITHIN_S = 1.0  # close() never takes longer
BAD_REPLY_LOG_S = 10.0  # at most one log line this often about replies that cannot be read
BYE_LINGER_MS = 250  # how long closing may wait for the goodbye to leave
# Refused this long from the first try: nothing listens (a scheduler that is restarting binds
# again within this), so connect() says so instead of waiting out its whole timeout.
REFUSED_FOR_S = 0.5
# A fan-out sends its submits in batches of up to this many (packs of several messages):
# enough to pay a socket trip once for dozens of tasks, few enough that the first go at once.
FAN_BATCH = 64


@dataclass
class TaskResult:
    """One task's answer: the outputs, the device that served it and every failed try.

    ``submitted_at``, ``started_at``, ``finished_at``: when the scheduler accepted the task,
    dispatched the attempt that served it, and answered, on the scheduler's clock (seconds;
    compare them with each other and with the attempts' ``started_at``/``ended_at``).
    """

    outputs: dict[str, np.ndarray]
    device: str
    attempts: list[Attempt] = field(default_factory=list)
    service_s: float = 0.0
    submitted_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0

    @property
    def failed_over(self) -> bool:
        return bool(self.attempts)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass
class TextCompletion:
    """A finished generation: its text, the tools it called, why it stopped, token counts,
    and where it ran. ``parsed`` is the answer as the pydantic model given as
    ``response_format``, when one was."""

    text: str
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: dict  # prompt_tokens, completion_tokens, total_tokens
    device: str
    attempts: list[Attempt] = field(default_factory=list)
    service_s: float = 0.0
    submitted_at: float = 0.0  # on the scheduler's clock, as in TaskResult
    started_at: float = 0.0
    finished_at: float = 0.0
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # with logprobs=True
    parsed: Any = None

    @property
    def failed_over(self) -> bool:
        return bool(self.attempts)


@dataclass
class TextChunk:
    """Streamed text and whole tool calls. ``previous_device`` is set on the first chunk after
    a failover moved the stream to another device; the last chunk carries ``finish_reason``
    and ``usage``."""

    text: str
    device: str
    previous_device: str | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    attempts: list[Attempt] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _calls(wire: list) -> list[ToolCall]:
    return [ToolCall.from_wire(c) for c in wire]


def _logprobs(wire: list) -> list[TokenLogprob]:
    return [TokenLogprob.from_wire(x) for x in wire]


def _with_ids(calls: list[ToolCall], ids: dict[int, str]) -> list[ToolCall]:
    """Each call with its id: one per index of the answer, as OpenAI's ``call_...``."""
    return [dataclasses.replace(c, id=ids.setdefault(c.index, f"call_{uuid.uuid4().hex[:24]}"))
            for c in calls]


def _model_class(params: dict) -> tuple[Any, dict]:
    """A pydantic model class given as ``response_format``, and the params with its JSON
    schema in its place (the shape OpenAI's ``.parse()`` sends)."""
    fmt = params.get("response_format")
    if not (isinstance(fmt, type) and hasattr(fmt, "model_json_schema")):
        return None, params
    schema = {"type": "json_schema", "json_schema": {
        "name": fmt.__name__[:64], "schema": fmt.model_json_schema(), "strict": True}}
    return fmt, {**params, "response_format": schema}


def _as_arrays(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, dict) or not inputs:
        raise InvalidInput(f"inputs must be a non-empty dict of name -> array, got "
                           f"{type(inputs).__name__}")
    out = {}
    for name, value in inputs.items():
        arr = np.asarray(value)
        if p.dtype_name(arr.dtype) not in p.ALLOWED_DTYPES:
            raise InvalidInput(f"input {name!r} has dtype {arr.dtype}; allowed: "
                               f"{', '.join(sorted(p.ALLOWED_DTYPES))}")
        out[str(name)] = arr
    return out


class AsyncClient:
    """A connection to a scheduler, used from one event loop.

    ``keys``: the cluster's CurveZMQ keys (``CurveKeys`` or a key file's path) when its
    config has ``cluster.keys``; the connection is then encrypted and authenticated."""

    def __init__(self, address: str = DEFAULT_ADDRESS, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 keys: CurveKeys | str | os.PathLike[str] | None = None):
        self.address = address
        self.token = token
        self.keys = resolve_keys(keys)
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        # The same socket without futures, used on the loop's own thread: sends and reads of
        # what has already arrived cost no future, no callback and no wake-up each.
        self._raw: zmq.Socket = zmq.Socket.shadow(self.sock.underlying)
        self._room = asyncio.Event()  # set while the socket can take a message
        self._later: collections.deque[list] = collections.deque()  # to go when there is room
        self.sock.setsockopt(zmq.LINGER, 0)
        # Our own routing id, unguessable: nobody can claim it, nor predict the next. Each
        # connection has its own (``_connect_anew``).
        self._route = _new_route()
        self.sock.setsockopt(zmq.ROUTING_ID, self._route)
        self.sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        # Queue only to a connection that completed its handshake: nothing sent while the
        # scheduler is away reaches a new one before our hello.
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, int(LIVENESS_IVL_S * 1000))
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(LIVENESS_TIMEOUT_S * 1000))
        if self.keys is not None:
            security.apply_client(self.sock, self.keys)
        elif token is not None:  # checked at the handshake: without keys, the token is all
            security.apply_plain(self.sock, security.PLAIN_CLIENT, token)
        # A Result wraps a worker's outputs of up to the limit in a header of its own.
        self.decoder = p.Decoder(p.SCHEDULER_TO_CLIENT, max_message_bytes + p.ENVELOPE_BYTES)
        self.max_message_bytes = max_message_bytes
        self._pending: dict[str, asyncio.Future | _Slot] = {}
        self._streams: dict[str, asyncio.Queue] = {}
        self._keepalive: asyncio.Task | None = None
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._reader: asyncio.Task | None = None
        self._hello: asyncio.Future | None = None
        self._watcher: asyncio.Task | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._rehello: asyncio.Task | None = None
        self.cluster: ClusterInfo | None = None  # the scheduler's, once connected
        self._welcomed = False
        self._closed = False
        self._up = False  # a connection has completed its handshake and not dropped since
        self._lost: asyncio.Future | None = None  # done when that connection drops
        self._lost_why = ""
        self._last_sent = 0.0  # loop time of the last message sent
        self.reconnects = 0  # connections made again after one was lost
        # The routing id of the connection lost last, until a welcome on the next one: the
        # scheduler may still hold tasks sent on it (their calls failed here when it was
        # lost), and cancels them when our hello names it.
        self._previous: bytes | None = None
        self.unmatched = 0  # answers for tasks not waiting (late or duplicate): should stay 0
        self.unreadable = 0  # replies that could not be read: should stay 0
        self._unreadable_logged_at = -BAD_REPLY_LOG_S

    async def connect(self, timeout: float = 10.0) -> AsyncClient:
        loop = asyncio.get_running_loop()
        self._hello = loop.create_future()
        self._lost = loop.create_future()
        # A refused CurveZMQ handshake is silent on the data socket: its monitor tells; it
        # goes on telling when the connection drops and when it is made again.
        monitor = self.sock.get_monitor_socket(
            security.HANDSHAKE_EVENTS | zmq.EVENT_CONNECTED | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_DISCONNECTED)
        self._monitor = monitor
        self._watcher = asyncio.create_task(self._watch(monitor))
        self.sock.connect(self.address)
        self._reader = asyncio.create_task(self._read())
        # Sent once a connection is made (IMMEDIATE): the wait for it is within the timeout.
        hello = asyncio.ensure_future(self._send(self._hello_msg(), None, hello=True))
        try:
            cluster: ClusterInfo = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
            self.cluster = cluster
            self._welcomed = True
            self._last_sent = loop.time()
            self.max_message_bytes = min(self.max_message_bytes,
                                         cluster.max_message_bytes or 2**62)
            self._keepalive = asyncio.create_task(self._keep_alive())
        except TimeoutError:
            await self.close()
            raise ClusterUnavailable(f"no Fanout scheduler answered at {self.address} within "
                                     f"{timeout:g} s; start one with `fanout up`") from None
        except FanoutError:
            await self.close()
            raise
        finally:
            hello.cancel()
        return self

    def _hello_msg(self) -> p.Hello:
        return p.Hello(version=p.PROTOCOL_VERSION, role="client", token=self.token,
                       keepalive_s=KEEPALIVE_S, previous=self._previous)

    async def _watch(self, monitor) -> None:
        """The connection's life, from the socket's monitor: before the first welcome, fail
        it with a typed error when the handshake is refused or nothing listens; after it,
        fail every unfinished call when the connection drops, and say hello again when it
        is made again."""
        have_keys, hung_up, asked = self.keys is not None, 0, False
        have_token = self.token is not None
        loop = asyncio.get_running_loop()
        refused_since: float | None = None
        try:
            while True:
                wait = None if refused_since is None or self._welcomed else max(
                    0.0, refused_since + REFUSED_FOR_S - loop.time())
                try:
                    event = parse_monitor_message(
                        await asyncio.wait_for(monitor.recv_multipart(), wait))
                except TimeoutError:
                    self._fail_hello(ClusterUnavailable(
                        f"nothing is running at {self.address} (connection refused); start "
                        f"a cluster with `fanout up`, or check the address"))
                    refused_since = None
                    continue
                kind, value = int(event["event"]), int(event["value"])
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    refused_since = None
                    self._connection_made()
                    continue
                if kind == zmq.EVENT_DISCONNECTED:
                    self._connection_dropped()
                    continue
                if kind == zmq.EVENT_CONNECTED:
                    refused_since = None
                    continue
                if kind == zmq.EVENT_CONNECT_RETRIED:
                    refused_since = refused_since or loop.time()
                    continue
                if self._welcomed:
                    continue  # a refused reconnection: the next one is tried
                err = security.handshake_error(kind, value, self.address, have_keys,
                                               have_token)
                hung_up += kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                mismatch = kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL \
                    and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
                if err is None and (mismatch or hung_up >= security.NO_DETAIL_TRIES) \
                        and not asked:
                    asked = True  # once per connect: the answer will not change
                    mechanism = await security.server_mechanism(self.address)
                    err = security.mechanism_error(mechanism, self.address, have_keys,
                                                   have_token)
                if err is not None:
                    self._fail_hello(err)
        except (zmq.ZMQError, asyncio.CancelledError):
            return
        finally:
            if not self.sock.closed:
                self.sock.disable_monitor()
            monitor.close(linger=0)

    def _connection_made(self) -> None:
        if self._up:
            return
        self._up = True
        self._room.set()  # a sender waiting for a connection tries again
        if self._lost is None or self._lost.done():
            self._lost = asyncio.get_running_loop().create_future()
        if self._welcomed and not self._closed:  # made again: the scheduler may be a new one
            self.reconnects += 1
            log.info("reconnected to the scheduler at %s; saying hello again", self.address)
            self._rehello = asyncio.create_task(self._say_hello_again())

    def _connection_dropped(self) -> None:
        if not self._up:
            return
        self._up = False
        self._lost_why = (f"the connection to the scheduler at {self.address} was lost (it "
                          f"stopped, or did not answer for {LIVENESS_TIMEOUT_S:g} s)")
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        if self._welcomed:
            log.warning("%s; its unfinished calls fail, and this client reconnects by itself",
                        self._lost_why)
            self._fail_unfinished(ClusterUnavailable(
                f"{self._lost_why}; the call's task may or may not have run"))
            if not self._closed:
                self._connect_anew()

    def _connect_anew(self) -> None:
        """Connect again under a new routing id. The scheduler may still hold the lost
        connection, and not know it is lost (a link that died without a word, or a backlog
        it reads late): a ROUTER refuses a second connection under a routing id it holds,
        and never reads from it, so a reconnection under the same one could be stuck for
        good. Our hello on the new connection names the old one (``previous``)."""
        self._previous = self._route
        self._route = _new_route()
        try:
            self.sock.disconnect(self.address)  # ends libzmq's own reconnecting, old id
        except zmq.ZMQError as exc:
            log.debug("disconnecting from %s: %s", self.address, exc)
        self.sock.setsockopt(zmq.ROUTING_ID, self._route)
        self.sock.connect(self.address)

    def _fail_unfinished(self, err: FanoutError) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
        for stream in self._streams.values():
            stream.put_nowait(err)

    async def _say_hello_again(self) -> None:
        try:
            await self._send(self._hello_msg(), LIVENESS_TIMEOUT_S, hello=True)
        except (zmq.ZMQError, FanoutError) as exc:
            log.debug("hello to %s after reconnecting failed: %s", self.address, exc)

    def _fail_hello(self, err: FanoutError) -> None:
        if self._hello is not None and not self._hello.done():
            self._hello.set_exception(err)

    async def _send(self, msg: p.Message, timeout: float | None = None,
                    hello: bool = False) -> None:
        """Send ``msg``; when the send queue is full, wait for room at most ``timeout``, and
        never past the loss of the connection (``ClusterUnavailable`` either way)."""
        self._check_up()
        await self._send_frames(self._encode(msg), timeout, hello)

    async def _send_many(self, msgs: list[p.Message],
                         timeout: float | None = None) -> list[FanoutError | None]:
        """Send ``msgs`` in order, several to a pack; for each, None once sent, or the
        error that kept it from going (a message too large, or the connection lost)."""
        errors: list[FanoutError | None] = [None] * len(msgs)
        try:
            self._check_up()
        except FanoutError as exc:
            return [exc] * len(msgs)
        encoded, which = [], []
        for i, msg in enumerate(msgs):
            try:
                encoded.append(self._encode(msg))
                which.append(i)
            except FanoutError as exc:
                errors[i] = exc
        at = 0
        for group in p.pack_groups(encoded):
            try:
                await self._send_frames(p.pack(group), timeout)
            except FanoutError as exc:
                for i in which[at:]:  # neither this pack nor any after it went
                    errors[i] = exc
                break
            at += len(group)
        return errors

    def _check_up(self) -> None:
        if self._closed:
            raise ClusterUnavailable("this client is closed")
        if self._welcomed and not self._up:
            raise ClusterUnavailable(f"{self._lost_why or 'not connected'}; reconnecting, "
                                     f"try again shortly")

    def _encode(self, msg: p.Message) -> list:
        """``msg``'s frames, within the cluster's limits (``InvalidInput`` if not)."""
        frames = p.encode(msg)
        size = p.frames_size(frames)
        if size > self.max_message_bytes:
            raise InvalidInput(f"message of {size} bytes exceeds the cluster's limit of "
                               f"{self.max_message_bytes} bytes (scheduler.max_message_bytes)")
        if p.frames_size(frames[:1]) > p.MAX_HEADER_BYTES:  # the scheduler could not say which
            raise InvalidInput(f"the request's header is {p.frames_size(frames[:1])} bytes, "
                               f"over the limit of {p.MAX_HEADER_BYTES}: text or parameters "
                               f"that large do not fit a request (tensors do, as arrays)")
        return frames

    async def _send_frames(self, frames: list, timeout: float | None = None,
                           hello: bool = False) -> None:
        """Send one multipart message (a message, or a pack of several), as ``_send``."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._welcomed and not hello and now - self._last_sent > REHELLO_AFTER_S:
            await self._send(self._hello_msg(), timeout, hello=True)  # we may be forgotten
        deadline = None if timeout is None else now + timeout
        while True:
            if self._later:
                self._send_later()
            try:
                if self._later:  # earlier messages still wait: keep the order
                    raise zmq.Again()
                p.send_frames(self._raw, frames, nonblocking=True)
                break
            except zmq.Again:  # the queue to the scheduler is full: wait for room, in bounds
                self._room.clear()
                self._drain()  # a send may have taken the descriptor's wake-up: look now
                if not self._room.is_set():
                    await self._wait_or_lose(asyncio.ensure_future(self._room.wait()),
                                             _left(deadline, loop), "sending")
        if int(self._raw.getsockopt(_EVENTS)) & _POLLIN:  # the send took its wake-up
            loop.call_soon(self._drain)
        self._last_sent = now

    def _send_later(self) -> None:
        """Send the messages left to go when there is room (cancels, goodbyes), in order."""
        while self._later:
            try:
                self._raw.send_multipart(self._later[0], zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed: nobody to tell
                self._later.clear()
                return
            self._later.popleft()

    async def _wait_or_lose(self, fut: asyncio.Future, timeout: float | None, what: str):
        """``fut``'s result, unless the connection is lost or ``timeout`` passes first (the
        future is cancelled then: nothing was queued, so nothing is sent)."""
        lost = self._lost if self._lost is not None else asyncio.get_running_loop(
            ).create_future()
        done, _ = await asyncio.wait({fut, lost}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if fut in done:
            return fut.result()
        fut.cancel()
        if lost in done:
            raise ClusterUnavailable(f"{self._lost_why} while {what}")
        raise ClusterUnavailable(f"the scheduler at {self.address} did not take the message "
                                 f"within {timeout:g} s ({what}); is it overloaded or stopped?")

    async def _read(self) -> None:
        """Read replies as they arrive: when the socket's descriptor signals, every reply
        waiting, with no future or task per reply. Ends when cancelled."""
        loop = asyncio.get_running_loop()
        try:
            fd = int(self._raw.getsockopt(zmq.FD))
            loop.add_reader(fd, self._drain)
        except zmq.ZMQError:
            return
        try:
            self._drain()
            await loop.create_future()  # until cancelled
        except asyncio.CancelledError:
            return
        finally:
            loop.remove_reader(fd)

    def _drain(self, most: int = 1000) -> None:
        """Take the replies waiting (at most ``most``, then again soon: others get the loop),
        and wake senders waiting for room."""
        try:
            for _ in range(most):
                events = int(self._raw.getsockopt(_EVENTS))
                if events & _POLLOUT:
                    if self._later:
                        self._send_later()
                    self._room.set()
                if not events & _POLLIN:
                    return
                self._take(p.recv_frames(self._raw))
            asyncio.get_running_loop().call_soon(self._drain)
        except zmq.ZMQError:  # closed, or nothing after all
            return

    def _take(self, frames: list) -> None:
        """Read the replies in what came (several, if a pack) and hand each to whoever
        waits for it."""
        try:
            replies = p.unpack(frames)
        except ProtocolError as exc:
            self._unreadable(exc, None, None)
            return
        for reply in replies:
            self._take_one(reply)

    def _take_one(self, frames: list) -> None:
        """Read one reply and hand it to whoever waits for it."""
        msg = None
        try:
            msg = self.decoder.decode(frames)
            self._dispatch(msg)
        except ProtocolError as exc:
            self._unreadable(exc, exc.ref, exc.msg_type)
        except Exception as exc:  # a bug here must not end the reader: calls would hang
            log.exception("error while handling a reply from %s", self.address)
            self._unreadable(ProtocolError(f"{type(exc).__name__}: {exc}"),
                             _reply_id(msg), msg.TYPE if msg is not None else None)

    def _unreadable(self, exc: ProtocolError, ref: str | None, msg_type: str | None) -> None:
        """Fail the call a reply that cannot be read was for (by its id, else the hello
        while one is waiting); log it, at most once per ``BAD_REPLY_LOG_S``."""
        self.unreadable += 1
        now = time.monotonic()
        if now - self._unreadable_logged_at >= BAD_REPLY_LOG_S:
            log.warning("a reply from the scheduler at %s could not be read (%d such "
                        "replies so far): %s", self.address, self.unreadable, exc)
            self._unreadable_logged_at = now
        error = ProtocolError(f"the scheduler's reply{f' to {ref}' if ref else ''} could not "
                              f"be read: {exc.message}")
        error.ref, error.msg_type = ref, msg_type
        fut = self._pending.pop(ref, None) if ref is not None else None
        if fut is not None and not fut.done():
            fut.set_exception(error)
        elif ref is not None and ref in self._streams:
            self._streams[ref].put_nowait(error)
        elif (ref is None or msg_type == p.Welcome.TYPE) and self._hello is not None \
                and not self._hello.done():
            self._hello.set_exception(error)

    async def _keep_alive(self) -> None:
        """Tell the scheduler we are here; if we vanish, it cancels our tasks."""
        while not self._closed:
            await asyncio.sleep(KEEPALIVE_S)
            if not self._up:
                continue  # nothing to tell while away; the reconnection says hello
            try:
                await self._send(p.KeepAlive(), KEEPALIVE_S)
            except ClusterUnavailable:
                continue
            except (zmq.ZMQError, FanoutError):
                return

    def _dispatch(self, msg: p.Message) -> None:
        stream = self._streams.get(getattr(msg, "task_id", None))  # type: ignore[arg-type]
        if stream is not None:
            match msg:
                case p.Chunk():
                    stream.put_nowait(TextChunk(msg.text, msg.device, msg.previous_device,
                                                tool_calls=_calls(msg.tool_calls),
                                                logprobs=_logprobs(msg.logprobs)))
                case p.Completion():
                    stream.put_nowait(TextChunk("", msg.device, None, msg.finish_reason,
                                                msg.usage, list(msg.attempts)))
                    stream.put_nowait(END)
                case p.Failure():
                    stream.put_nowait(msg.error)
            return
        match msg:
            case p.Welcome():
                if msg.cluster is None:
                    raise ProtocolError("welcome: no cluster information for a client")
                self._up = True  # a welcome proves a connection, whatever the monitor says yet
                self._previous = None  # the scheduler has read our hello that named it
                if self._hello and not self._hello.done():
                    self._hello.set_result(msg.cluster)
                elif self._welcomed:  # welcomed again after a reconnection: maybe a new one
                    self.cluster = msg.cluster
            case p.Result() | p.Completion() | p.Failure():
                fut = self._pending.pop(msg.task_id, None)
                if fut is None or fut.done():
                    self.unmatched += 1
                elif isinstance(msg, p.Failure):
                    fut.set_exception(msg.error)
                else:
                    fut.set_result(_answer(msg))
            case p.Reply():
                if msg.req_id is None:  # an error about a message we sent without an id
                    if self._hello and not self._hello.done() and msg.error:
                        self._hello.set_exception(msg.error)
                    return
                fut = self._pending.pop(msg.req_id, None)
                if fut is not None and not fut.done():
                    if msg.error:
                        fut.set_exception(msg.error)
                    else:
                        fut.set_result(msg.body)

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def _request(self, msg_for_id, timeout: float | None) -> Any:
        check_timeout(timeout, None)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        req_id = self._new_id()
        fut = loop.create_future()
        self._pending[req_id] = fut
        try:
            await self._send(msg_for_id(req_id), timeout)
            return await asyncio.wait_for(fut, _left(deadline, loop))
        except TimeoutError:
            raise ClusterUnavailable(f"the scheduler at {self.address} did not answer within "
                                     f"{timeout:g} s") from None
        finally:
            self._pending.pop(req_id, None)

    async def ainfer(self, model: str, inputs: dict[str, Any],
                     timeout: float | None = None) -> TaskResult:
        """Run one task; raises the task's ``FanoutError`` if it failed everywhere."""
        arrays = _as_arrays(inputs)
        check_timeout(timeout, self._max_timeout())
        return await self._task(lambda tid: p.Submit(task_id=tid, model=model, inputs=arrays,
                                                     timeout_s=timeout), timeout)

    async def agenerate(self, model: str, messages_or_prompt: Any, *,
                        timeout: float | None = None, **params) -> TextCompletion:
        """Generate a completion for chat messages (a list of {role, content}) or a prompt.

        ``params``: max_tokens, temperature (0 = greedy), top_p, stop, seed, ignore_eos,
        presence_penalty, frequency_penalty, logprobs; tools (OpenAI's function tools),
        tool_choice ("none", "auto", "required" or a tool's name), parallel_tool_calls;
        response_format (OpenAI's json_object / json_schema, or a pydantic model class).
        """
        model_class, params = _model_class(params)
        request = build_request(messages_or_prompt, params)
        check_timeout(timeout, self._max_timeout())
        completion = await self._task(lambda tid: p.Generate(task_id=tid, model=model,
                                                             request=request,
                                                             timeout_s=timeout), timeout)
        completion.tool_calls = _with_ids(completion.tool_calls, {})
        if model_class is not None and completion.finish_reason == "stop":
            completion.parsed = model_class.model_validate_json(completion.text)
        return completion

    async def astream(self, model: str, messages_or_prompt: Any, *,
                      timeout: float | None = None, **params):
        """Yield ``TextChunk``s as tokens come; leaving the loop early cancels the
        generation. A tool call comes whole, in one chunk, once the model has written it."""
        _, params = _model_class(params)
        request = build_request(messages_or_prompt, params)
        call_ids: dict[int, str] = {}
        check_timeout(timeout, self._max_timeout())
        loop = asyncio.get_running_loop()
        wait = self._answer_within(timeout)
        deadline = None if wait is None else loop.time() + wait
        task_id = self._new_id()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[task_id] = queue
        finished = False
        try:
            await self._send(p.Generate(task_id=task_id, model=model, request=request,
                                        stream=True, timeout_s=timeout), wait)
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), _left(deadline, loop))
                except TimeoutError:
                    raise ClusterUnavailable(f"no end of stream {task_id} from "
                                             f"{self.address} within {wait:g} s") from None
                if item is END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    # An unreadable chunk ends the stream here, not the generation there.
                    finished = not isinstance(item, ProtocolError)
                    raise item
                if item.tool_calls:
                    item.tool_calls = _with_ids(item.tool_calls, call_ids)
                yield item
        finally:
            self._streams.pop(task_id, None)
            if not finished:
                await self._send_quietly(p.Cancel(task_id=task_id))

    async def agenerate_many(self, model: str, chats: Iterable[Any], *,
                             return_exceptions: bool = False, timeout: float | None = None,
                             window: int = 1024, **params) -> list:
        """The fan-out call for chats: one generation per item, results in input order."""
        return await self._gather([
            lambda c=c: self.agenerate(model, c, timeout=timeout, **params) for c in chats],
            return_exceptions, window)

    def _max_timeout(self) -> float:
        return (self.cluster.max_task_timeout_s if self.cluster is not None else 0.0) \
            or MAX_TIMEOUT_S

    def _answer_within(self, timeout: float | None) -> float | None:
        """How long a task's answer may take: the scheduler enforces its deadline (ours, or
        its default), the margin covers the way back."""
        own = timeout or (self.cluster.task_timeout_s if self.cluster is not None else 0.0)
        return own + ANSWER_MARGIN_S if own else None

    async def _task(self, make_msg, timeout: float | None):
        loop = asyncio.get_running_loop()
        wait = self._answer_within(timeout)
        deadline = None if wait is None else loop.time() + wait
        task_id = self._new_id()
        fut = loop.create_future()
        self._pending[task_id] = fut
        try:
            await self._send(make_msg(task_id), wait)
            return await asyncio.wait_for(asyncio.shield(fut), _left(deadline, loop))
        except asyncio.CancelledError:
            if not fut.done():
                await self._send_quietly(p.Cancel(task_id=task_id))
            raise
        except TimeoutError:
            raise ClusterUnavailable(f"no answer for task {task_id} from {self.address}") from None
        finally:
            self._pending.pop(task_id, None)

    async def _send_quietly(self, msg: p.Message) -> None:
        """Send when there is room (a cancel, a goodbye); never wait for it."""
        if self._closed or not self._up:
            return
        try:
            frames = p.encode(msg)
            if not self._later:
                self._raw.send_multipart(frames, zmq.NOBLOCK, copy=False)
                return
        except zmq.Again:
            pass
        except (zmq.ZMQError, FanoutError):
            return
        self._later.append(frames)  # a full queue: it goes when room is made

    async def amap(self, model: str, inputs: Iterable[dict[str, Any]], *,
                   return_exceptions: bool = False, timeout: float | None = None,
                   window: int = 1024) -> list:
        """The fan-out call: one task per item, results in input order.

        At most ``window`` tasks are outstanding at once, so a long list does not overflow
        the scheduler's queue. With ``return_exceptions`` a failed item yields its error in
        its place; otherwise the first error is raised after every task has ended.
        """
        check_timeout(timeout, self._max_timeout())
        results = await _Fan(self, model, timeout, max(1, window)).run(list(inputs))
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    @staticmethod
    async def _gather(calls: list, return_exceptions: bool, window: int) -> list:
        gate = asyncio.Semaphore(max(1, window))

        async def one(call):
            async with gate:
                return await call()

        results = await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    async def astatus(self, timeout: float = 10.0) -> dict:
        """The cluster's status as plain data (JSON-able)."""
        return await self._request(lambda rid: p.StatusRequest(req_id=rid), timeout)

    async def acluster_status(self, timeout: float = 10.0) -> Status:
        """The cluster's status, typed; ``ProtocolError`` if the reply is not one."""
        return Status.from_wire(await self.astatus(timeout))

    async def ashutdown(self, timeout: float = 10.0) -> None:
        await self._request(lambda rid: p.Shutdown(req_id=rid), timeout)

    async def close(self) -> None:
        """Say goodbye if there is room to, fail what is unfinished, release the socket:
        within ``CLOSE_WITHIN_S`` whatever the scheduler's state."""
        if self._closed:
            return
        # Goodbye: the scheduler stops our unfinished work at once, frees its slots, and
        # does not wait for our keepalives to stop before it forgets us.
        said_bye = self._welcomed and self._up  # a client never welcomed has nothing to end
        if said_bye:
            await self._send_quietly(p.Bye())
        self._closed = True
        self._lost_why = "the client was closed"
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)  # wakes the calls waiting for room to send
        self._fail_unfinished(ClusterUnavailable("the client was closed"))
        tasks = [t for t in (self._keepalive, self._rehello, self._watcher, self._reader)
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.wait(tasks, timeout=CLOSE_WITHIN_S / 4)
            if self._monitor is not None and not self._monitor.closed:  # or term() would wait
                self.sock.disable_monitor()
                self._monitor.close(linger=0)
        except zmq.ZMQError as exc:
            log.debug("closing the monitor of the client to %s: %s", self.address, exc)
        finally:  # whatever happened, the sockets go: a context left open hangs its collector
            self.sock.close(linger=BYE_LINGER_MS if said_bye else 0)
            self.ctx.term()


MAX_TIMEOUT_S = 7 * 86400.0  # a task's timeout past this is InvalidInput (the scheduler's own
# bound, scheduler.max_task_timeout_s, is told in its welcome and is usually lower)


def _new_route() -> bytes:
    """A routing id of 128 random bits: nobody can claim a client's, nor predict the next."""
    return b"C" + secrets.token_bytes(16)


def check_timeout(timeout: Any, limit: float | None) -> None:
    """``InvalidInput`` unless ``timeout`` is None or a finite number of seconds in
    (0, limit]: an unbounded wait would never come back."""
    if timeout is None:
        return
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not math.isfinite(
            timeout) or timeout <= 0:
        raise InvalidInput(f"timeout must be a positive number of seconds, got {timeout!r:.40}")
    if limit is not None and timeout > limit:
        raise InvalidInput(f"timeout of {timeout:g} s is more than this cluster allows "
                           f"({limit:g} s, scheduler.max_task_timeout_s)")


def _left(deadline: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    return None if deadline is None else max(0.0, deadline - loop.time())


class _Fan:
    """One ``amap``: its submits go out as the window allows, and each answer lands in its
    place straight from the reader (a ``_Slot`` per task, no future, callback or timer: one
    sweep per fan expires the tasks past their answer time, oldest first); being cancelled
    cancels its unanswered tasks at the scheduler."""

    def __init__(self, client: AsyncClient, model: str, timeout: float | None, window: int):
        self.client, self.model, self.timeout, self.window = client, model, timeout, window
        self.wait = client._answer_within(timeout)  # how long each answer may take
        self.loop = asyncio.get_running_loop()
        self.open: dict[str, _Slot] = {}  # task id -> its place, while unanswered
        self.due: dict[str, float] = {}  # task id -> when it expires, oldest first
        self.sweeper: asyncio.TimerHandle | None = None  # at the oldest open task's expiry
        self.room = asyncio.Event()
        self.room.set()
        self.all_done = self.loop.create_future()
        self.results: list = []
        self.left = 0

    async def run(self, items: list) -> list:
        self.results = [None] * len(items)
        self.left = len(items) + 1  # the sending itself counts until it is over
        try:
            i = 0
            while i < len(items):
                while len(self.open) >= self.window:
                    self.room.clear()
                    await self.room.wait()
                batch: list[tuple[str, p.Submit]] = []  # sent together: packs of submits
                while i < len(items) and len(self.open) < self.window \
                        and len(batch) < FAN_BATCH:
                    submit = self._prepare(i, items[i])
                    i += 1
                    if submit is not None:
                        batch.append(submit)
                if batch:
                    await self._submit(batch)
            self._one_done()
            await asyncio.shield(self.all_done)
        except asyncio.CancelledError:
            for task_id in list(self.open):
                await self.client._send_quietly(p.Cancel(task_id=task_id))
            raise
        finally:
            if self.sweeper is not None:
                self.sweeper.cancel()
            for task_id in self.open:
                self.client._pending.pop(task_id, None)
        return self.results

    def _prepare(self, i: int, inputs: Any) -> tuple[str, p.Submit] | None:
        """Item ``i``'s task, open and waiting for its answer (or None: its inputs are bad,
        and that is its result)."""
        client = self.client
        try:
            arrays = _as_arrays(inputs)
        except FanoutError as exc:
            self.results[i] = exc
            self._one_done()
            return None
        task_id = client._new_id()
        client._pending[task_id] = self.open[task_id] = _Slot(self, i, task_id)
        if self.wait is not None:  # the scheduler's deadline, and the way back
            self.due[task_id] = expires = self.loop.time() + self.wait
            if self.sweeper is None:
                self.sweeper = self.loop.call_at(expires, self._sweep)
        return task_id, p.Submit(task_id=task_id, model=self.model, inputs=arrays,
                                 timeout_s=self.timeout)

    async def _submit(self, batch: list[tuple[str, p.Submit]]) -> None:
        """Send the batch's submits; a task whose submit could not go fails with why."""
        errors = await self.client._send_many([submit for _, submit in batch], self.wait)
        for (task_id, _), error in zip(batch, errors):
            if error is not None:
                slot = self.open.get(task_id)
                if slot is not None:
                    slot.set_exception(error)

    def _sweep(self) -> None:
        """Fail the open tasks whose answer time is up; wake again at the next one's."""
        self.sweeper = None
        now, expired, following = self.loop.time(), [], None
        for task_id, expires in self.due.items():
            if expires > now:
                following = expires
                break
            expired.append(task_id)
        for task_id in expired:
            slot = self.open.get(task_id)
            if slot is not None:
                slot.set_exception(ClusterUnavailable(
                    f"no answer for task {task_id} from {self.client.address}"))
        if following is not None:
            self.sweeper = self.loop.call_at(following, self._sweep)

    def _land(self, i: int, task_id: str, answer: Any) -> None:
        """Task ``task_id``'s answer (a result or the exception it failed with), once."""
        if self.open.pop(task_id, None) is None:
            return
        self.due.pop(task_id, None)
        self.client._pending.pop(task_id, None)
        self.results[i] = answer
        self.room.set()
        self._one_done()

    def _one_done(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.all_done.done():
            self.all_done.set_result(None)


class _Slot:
    """Where a fan's task's answer goes: what the reader and the client's shutdown call on a
    future (``done``, ``set_result``, ``set_exception``), landing it in the fan at once."""

    __slots__ = ("fan", "i", "task_id")

    def __init__(self, fan: _Fan, i: int, task_id: str) -> None:
        self.fan, self.i, self.task_id = fan, i, task_id

    def done(self) -> bool:
        return self.task_id not in self.fan.open

    def set_result(self, result: Any) -> None:
        self.fan._land(self.i, self.task_id, result)

    def set_exception(self, exc: BaseException) -> None:
        self.fan._land(self.i, self.task_id, exc)


def _reply_id(msg: p.Message | None) -> str | None:
    ref = getattr(msg, "task_id", None) or getattr(msg, "req_id", None)
    return ref if isinstance(ref, str) else None


def _answer(msg: p.Result | p.Completion) -> TaskResult | TextCompletion:
    times = (msg.submitted_at, msg.started_at, msg.finished_at)
    if isinstance(msg, p.Result):
        return TaskResult(dict(msg.outputs), msg.device, list(msg.attempts), msg.service_s,
                          *times)
    return TextCompletion(msg.text, msg.finish_reason, msg.usage, msg.device,
                          list(msg.attempts), msg.service_s, *times,
                          tool_calls=_calls(msg.tool_calls), logprobs=_logprobs(msg.logprobs))


_OPEN: weakref.WeakSet[Client] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    """Close the clients still open when the interpreter exits, while their loop threads
    still run: later (a ``__del__`` in the interpreter's teardown) a daemon thread is frozen,
    and each close would wait its whole ``CLOSE_WITHIN_S`` for nothing."""
    for client in list(_OPEN):
        try:
            client.close()
        except Exception as exc:  # exiting anyway: nothing to do but say so
            log.debug("closing the client to %s at exit: %s", client.address, exc)


class Client:
    """The sync client, and ``a*`` twins usable from any event loop. Thread-safe.

    ``keys``: the cluster's CurveZMQ keys or key file (default: the file ``FANOUT_KEYS``
    names, if set)."""

    def __init__(self, address: str | None = None, token: str | None = None,
                 timeout: float = 10.0,
                 keys: CurveKeys | str | os.PathLike[str] | None = None):
        self.address = address or env.get(env.ENV_ADDRESS) or env.DEFAULT_ADDRESS
        token = token if token is not None else env.get(env.ENV_TOKEN)
        keys = resolve_keys(keys if keys is not None else env.get(env.ENV_KEYS))
        self._loop = LoopThread("fanout-client")
        try:
            self._async = AsyncClient(self.address, token, keys=keys)
            self._call(self._async.connect(timeout))
        except BaseException:
            self._loop.stop()
            raise
        _OPEN.add(self)

    # Every method below hands a coroutine of the AsyncClient to the private loop.
    def _submit(self, coro) -> concurrent.futures.Future:
        try:
            return self._loop.submit(coro)
        except RuntimeError:  # the loop is stopped
            raise ClusterUnavailable("this client is closed; connect again") from None

    @property
    def closed(self) -> bool:
        return self._loop.closed

    def _call(self, coro):
        # A caller that gives up (Ctrl-C) cancels the work on the loop too, which tells the
        # scheduler to stop its tasks and free their slots.
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    async def _await(self, coro):
        return await asyncio.wrap_future(self._submit(coro))

    @property
    def cluster(self) -> ClusterInfo:
        """The scheduler this client is connected to."""
        assert self._async.cluster is not None  # set by connect(), in __init__
        return self._async.cluster

    @property
    def unmatched(self) -> int:
        """Answers that arrived for no waiting task; exactly-once delivery keeps this 0."""
        return self._async.unmatched

    @property
    def unreadable(self) -> int:
        """Replies that could not be read (each failed its call with ``ProtocolError``)."""
        return self._async.unreadable

    def infer(self, model: str, inputs: dict[str, Any],
              timeout: float | None = None) -> TaskResult:
        return self._call(self._async.ainfer(model, inputs, timeout))

    def submit(self, model: str, inputs: dict[str, Any],
               timeout: float | None = None) -> concurrent.futures.Future:
        """Start one task; the future resolves to a ``TaskResult`` or raises its error."""
        return self._submit(self._async.ainfer(model, inputs, timeout))

    def map(self, model: str, inputs: Sequence[dict[str, Any]], *,
            return_exceptions: bool = False, timeout: float | None = None,
            window: int = 1024) -> list:
        return self._call(self._async.amap(model, inputs, return_exceptions=return_exceptions,
                                           timeout=timeout, window=window))

    async def ainfer(self, model: str, inputs: dict[str, Any],
                     timeout: float | None = None) -> TaskResult:
        return await self._await(self._async.ainfer(model, inputs, timeout))

    async def amap(self, model: str, inputs: Sequence[dict[str, Any]], *,
                   return_exceptions: bool = False, timeout: float | None = None,
                   window: int = 1024) -> list:
        return await self._await(self._async.amap(model, inputs,
                                                  return_exceptions=return_exceptions,
                                                  timeout=timeout, window=window))

    def generate(self, model: str, messages_or_prompt: Any, *, timeout: float | None = None,
                 **params) -> TextCompletion:
        return self._call(self._async.agenerate(model, messages_or_prompt, timeout=timeout,
                                                **params))

    async def agenerate(self, model: str, messages_or_prompt: Any, *,
                        timeout: float | None = None, **params) -> TextCompletion:
        return await self._await(self._async.agenerate(model, messages_or_prompt,
                                                       timeout=timeout, **params))

    def generate_many(self, model: str, chats: Sequence[Any], *, return_exceptions: bool = False,
                      timeout: float | None = None, window: int = 1024, **params) -> list:
        """The fan-out call for chats: results in input order."""
        return self._call(self._async.agenerate_many(
            model, chats, return_exceptions=return_exceptions, timeout=timeout, window=window,
            **params))

    async def agenerate_many(self, model: str, chats: Sequence[Any], *,
                             return_exceptions: bool = False, timeout: float | None = None,
                             window: int = 1024, **params) -> list:
        return await self._await(self._async.agenerate_many(
            model, chats, return_exceptions=return_exceptions, timeout=timeout, window=window,
            **params))

    def stream(self, model: str, messages_or_prompt: Any, *, timeout: float | None = None,
               **params) -> Iterator[TextChunk]:
        """Yield ``TextChunk``s as tokens come; closing the generator early cancels the task."""
        items: queue.SimpleQueue = queue.SimpleQueue()
        pumping = self._submit(pump(self._async.astream(model, messages_or_prompt,
                                                        timeout=timeout, **params), items.put))
        try:
            while (item := items.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            pumping.cancel()  # the stream's own cleanup tells the scheduler to cancel

    async def astream(self, model: str, messages_or_prompt: Any, *,
                      timeout: float | None = None, **params) -> AsyncIterator[TextChunk]:
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(items.put_nowait, item)

        pumping = self._submit(pump(
            self._async.astream(model, messages_or_prompt, timeout=timeout, **params), put))
        try:
            while (item := await items.get()) is not END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            pumping.cancel()

    def status(self, timeout: float = 10.0) -> dict:
        return self._call(self._async.astatus(timeout))

    async def astatus(self, timeout: float = 10.0) -> dict:
        return await self._await(self._async.astatus(timeout))

    def cluster_status(self, timeout: float = 10.0) -> Status:
        """The status, typed: ``.workers``, each with ``.models``; see ``runtime.wire.status``."""
        return self._call(self._async.acluster_status(timeout))

    async def acluster_status(self, timeout: float = 10.0) -> Status:
        return await self._await(self._async.acluster_status(timeout))

    def shutdown_cluster(self, timeout: float = 10.0) -> None:
        """Ask the scheduler to stop the whole cluster (what ``fanout down`` does)."""
        self._call(self._async.ashutdown(timeout))

    def close(self) -> None:
        """Close within ``CLOSE_WITHIN_S``, whatever state the scheduler is in."""
        if self._loop.closed:
            return
        try:
            closing = self._loop.submit(self._async.close())
        except RuntimeError:  # the loop stopped meanwhile
            return
        try:
            closing.result(CLOSE_WITHIN_S)
        except concurrent.futures.TimeoutError:
            # Its own thread finishes releasing the sockets, then stops: never another
            # thread (libzmq sockets are not thread-safe), and never the caller's time.
            log.warning("closing the client to %s takes over %g s; its thread finishes it",
                        self.address, CLOSE_WITHIN_S)
            closing.add_done_callback(lambda _: self._loop.stop())
            return
        except Exception as exc:
            log.debug("closing the client to %s: %s", self.address, exc)
        self._loop.stop(timeout=CLOSE_WITHIN_S / 4)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
