"""The wire protocol between clients, the scheduler and workers.

A message is a ZMQ multipart message: one msgpack header frame, then one frame per numpy
array (sent without copying). The header is a map with ``v`` (protocol version), ``t`` (the
message type) and the type's fields; arrays are described in the header as
``[name, dtype, shape]`` in frame order. No pickle, ever.

No frame is larger than ``FRAME_BYTES``: an array's bytes go in as many frames as that takes
(the count follows from its dtype and shape). So every socket can refuse larger frames
(ZMQ's MAXMSGSIZE is per frame), and a peer that has not authenticated can make libzmq
buffer at most one such frame per connection, whatever the message limit is.

Each socket has one decoder that knows the message types allowed on it: a wrong message
fails at decode with ``ProtocolError``, not deep in a handler. Every field is checked against
its type hint (``records.py``), nested records too (attempts, errors, model load states), so
a handler never meets a malformed one. New fields get defaults; existing ones never change
meaning.

A sender with several messages for one peer at once (a drain's answers, a fan-out's submits,
a worker's finished runs) sends them as one *pack*: a header ``{"v", "t": "pack", "n": [the
frame count of each message]}``, then their frames in order. Each message's own trip through
libzmq's pipes and wake-ups is the largest cost left of a small task; a pack pays it once.
The receiver splits a pack (``unpack``) and handles each message as if it had come alone, so
a bad one fails only itself. A pack holds 2 to ``PACK_MESSAGES`` messages and at most
``PACK_BYTES`` besides its header, and never a pack; a larger message goes alone.
"""
from __future__ import annotations

import typing
from dataclasses import MISSING, dataclass, field, fields
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal

import msgpack
import msgspec
import numpy as np
import zmq

from ..errors import Attempt, ErrorKind, FanoutError, ProtocolError, brief
from . import typed
from .generation import FinishReason
from .records import Check, plain, reader
from .status import ClusterInfo, ModelLoad

PROTOCOL_VERSION = 4  # 3: arrays split into frames of at most FRAME_BYTES; 4: packs
MAX_HEADER_BYTES = 1024 * 1024
FRAME_BYTES = 1024 * 1024  # the largest array frame
# Sockets refuse frames over this (MAXMSGSIZE); between the limits, a header is answered
# with a typed error.
MAX_FRAME_BYTES = 2 * max(MAX_HEADER_BYTES, FRAME_BYTES)
# What a hop may add around a payload it forwards (a worker's Run around a client's inputs, a
# client's Result around a worker's outputs): its receiver allows the limit plus this.
ENVELOPE_BYTES = 64 * 1024
# Numeric dtypes only: object/str/void arrays could smuggle anything through.
ALLOWED_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
     "float16", "float32", "float64"])


@dataclass
class Message:
    TYPE: ClassVar[str] = ""
    ARRAYS: ClassVar[str | None] = None  # name of the field that holds arrays, if any


# ---- client <-> scheduler ----------------------------------------------------------------

@dataclass
class Hello(Message):
    TYPE = "hello"
    version: int
    role: Literal["client", "worker"]
    token: str | None = None
    name: str = ""
    keepalive_s: float | None = None  # the client pings this often; silence cancels its tasks
    # The routing id of the client's connection before this one (each connection has its
    # own): the tasks sent on that one are cancelled, their calls having already failed.
    previous: bytes | None = None


@dataclass
class KeepAlive(Message):
    TYPE = "keepalive"


@dataclass
class Bye(Message):
    """The client closes: the scheduler cancels its unfinished tasks and forgets it."""

    TYPE = "bye"


@dataclass
class Welcome(Message):
    TYPE = "welcome"
    version: int
    cluster: ClusterInfo | None = None  # to clients: the scheduler they reached


@dataclass
class Submit(Message):
    TYPE = "submit"
    ARRAYS = "inputs"
    task_id: str
    model: str
    inputs: dict = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass
class Generate(Message):
    """A chat or prompt completion; ``request`` holds messages or prompt and the parameters."""

    TYPE = "generate"
    task_id: str
    model: str
    request: dict = field(default_factory=dict)
    stream: bool = False
    timeout_s: float | None = None


@dataclass
class Chunk(Message):
    """Streamed text of a generation; the first chunk from a new device says so."""

    TYPE = "chunk"
    task_id: str
    text: str
    device: str
    previous_device: str | None = None  # set when the stream moved here from another device
    tool_calls: list = field(default_factory=list)  # whole calls: {index, name, arguments}
    logprobs: list = field(default_factory=list)  # [token, logprob] per token of the chunk


@dataclass
class Completion(Message):
    TYPE = "completion"
    task_id: str
    text: str
    finish_reason: str
    device: str
    usage: dict = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    service_s: float = 0.0
    submitted_at: float = 0.0  # on the scheduler's clock, as in Result
    started_at: float = 0.0
    finished_at: float = 0.0
    tool_calls: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)


@dataclass
class Cancel(Message):
    TYPE = "cancel"
    task_id: str


@dataclass
class StatusRequest(Message):
    TYPE = "status"
    req_id: str


@dataclass
class Shutdown(Message):
    TYPE = "shutdown"
    req_id: str


@dataclass
class Result(Message):
    TYPE = "result"
    ARRAYS = "outputs"
    task_id: str
    device: str
    outputs: dict = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    service_s: float = 0.0
    # On the scheduler's clock: accepted, its last attempt dispatched, answered.
    submitted_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0


@dataclass
class Failure(Message):
    TYPE = "failure"
    task_id: str
    error: FanoutError


@dataclass
class Reply(Message):
    """The answer to a request that is not a task (status, shutdown) or to a bad message."""

    TYPE = "reply"
    req_id: str | None
    body: dict = field(default_factory=dict)
    error: FanoutError | None = None


# ---- worker <-> scheduler ----------------------------------------------------------------

@dataclass
class Register(Message):
    TYPE = "register"
    version: int
    device: str
    epoch: int
    pid: int
    node: str
    token: str | None = None
    models: dict[str, ModelLoad] = field(default_factory=dict)


@dataclass
class ModelState(Message):
    TYPE = "model_state"
    model: str
    load: ModelLoad


@dataclass
class Heartbeat(Message):
    TYPE = "heartbeat"
    in_flight: int = 0
    peak_running: int = 0  # most engine runs ever at once in this worker process
    cpu_s: float | None = None  # CPU seconds this worker process has used
    cores: int = 0  # cores it may run on
    node_cpu_s: float | None = None  # CPU seconds all processes of its machine have used


@dataclass
class Run(Message):
    TYPE = "run"
    ARRAYS = "inputs"
    attempt: int
    model: str
    inputs: dict = field(default_factory=dict)
    timeout_s: float | None = None


@dataclass
class RunGenerate(Message):
    TYPE = "run_generate"
    attempt: int
    model: str
    request: dict = field(default_factory=dict)
    prefix_ids: list = field(default_factory=list)  # already streamed: continue after these
    prefix_text: str = ""
    timeout_s: float | None = None
    prefix_calls: int = 0  # whole tool calls already streamed


# What a worker streams is passed on as it came: to the client, and as the prefix of a re-run
# on another device. So it is checked here, where it arrives: a broken one fails its worker's
# message (the worker is told, and restarted), never the client's stream or another device.
MAX_TOKEN_ID = 1 << 31  # an int32 vocabulary index; engines take prefix ids as int64
_CALL_KEYS = frozenset(("index", "name", "arguments"))


def _wire_call(d: dict) -> bool:
    # Types only: what a model named is its answer (constrained decoding keeps it to the
    # tools offered; without it, the caller sees what the model wrote).
    index = d.get("index", 0)
    return (d.keys() <= _CALL_KEYS and isinstance(d.get("name"), str)
            and isinstance(d.get("arguments"), str)
            and type(index) is int and 0 <= index < MAX_TOKEN_ID)


TokenId = Annotated[int, Check(lambda v: 0 <= v < MAX_TOKEN_ID, "a token id in [0, 2^31)")]
WireToolCall = Annotated[dict, Check(_wire_call, "a tool call {index, name, arguments}")]
WireLogprob = tuple[str, float]  # [token, log-probability]: the reader refuses nan and inf


@dataclass
class Tokens(Message):
    TYPE = "tokens"
    attempt: int
    ids: list[TokenId] = field(default_factory=list)
    text: str = ""
    tool_calls: list[WireToolCall] = field(default_factory=list)
    logprobs: list[WireLogprob] = field(default_factory=list)


@dataclass
class Generated(Message):
    TYPE = "generated"
    attempt: int
    finish_reason: FinishReason
    prompt_tokens: int = 0
    completion_tokens: int = 0
    service_s: float = 0.0


@dataclass
class CancelRun(Message):
    TYPE = "cancel_run"
    attempt: int


@dataclass
class Done(Message):
    TYPE = "done"
    ARRAYS = "outputs"
    attempt: int
    outputs: dict = field(default_factory=dict)
    service_s: float = 0.0
    batch: int = 1  # tasks of the engine call it ran in (service_s is that call's)


@dataclass
class Failed(Message):
    TYPE = "failed"
    attempt: int
    kind: ErrorKind
    message: str
    service_s: float = 0.0


@dataclass
class Ping(Message):
    TYPE = "ping"


@dataclass
class Stop(Message):
    TYPE = "stop"


CLIENT_TO_SCHEDULER = frozenset([Hello, KeepAlive, Bye, Submit, Generate, Cancel,
                                 StatusRequest, Shutdown])
SCHEDULER_TO_CLIENT = frozenset([Welcome, Result, Chunk, Completion, Failure, Reply])
WORKER_TO_SCHEDULER = frozenset([Register, ModelState, Heartbeat, Done, Tokens, Generated,
                                 Failed])
SCHEDULER_TO_WORKER = frozenset([Welcome, Run, RunGenerate, CancelRun, Ping, Stop, Reply])

@dataclass(frozen=True)
class _Field:
    name: str
    read: Any  # records.Reader
    required: bool
    plain: bool  # a record: written as plain data
    where: str  # how an error names it: "TYPE.field"


_FIELDS: dict[str, tuple[_Field, ...]] = {}


def _fields(cls: type[Message]) -> tuple[_Field, ...]:
    """How each header field of ``cls`` is checked and written (worked out once per type)."""
    plan = _FIELDS.get(cls.TYPE)
    if plan is None:
        plan = _FIELDS[cls.TYPE] = _plan(cls)
    return plan


_AS_IS = (int, float, str, bool, bytes, dict, list, type(None))  # msgpack writes these unchanged


def _plan(cls: type[Message]) -> tuple[_Field, ...]:
    hints = typing.get_type_hints(cls, include_extras=True)  # keep each Annotated's Check
    out = []
    for f in fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        as_is = (tp in _AS_IS or typing.get_origin(tp) is Literal
                 or typing.get_origin(tp) is UnionType and all(a in _AS_IS for a in args))
        out.append(_Field(f.name, reader(tp),
                          f.default is MISSING and f.default_factory is MISSING, not as_is,
                          f"{cls.TYPE}.{f.name}"))
    return tuple(out)


_DTYPE_NAMES: dict[np.dtype, str] = {}  # numpy works a dtype's name out anew at each ask
_ITEMSIZES = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}


def dtype_name(dtype: np.dtype) -> str:
    """``dtype.name``, remembered: numpy works it out in Python at every ask."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


# ---- packs ---------------------------------------------------------------------------------

PACK_MESSAGES = 256
PACK_BYTES = 64 * 1024
# Every pack header starts so (a map of three: v, t, then n): telling a pack from a message
# costs one comparison. A header laid out otherwise is no pack: the decoder refuses its type.
_PACK_HEAD = (b"\x83" + msgpack.packb("v") + msgpack.packb(PROTOCOL_VERSION)
              + msgpack.packb("t") + msgpack.packb("pack") + msgpack.packb("n"))


def packed(messages: list[list]) -> list[list]:
    """The multipart messages that carry ``messages`` (each a list of frames) in order:
    packs where several fit together, a message alone as itself."""
    return [pack(group) for group in pack_groups(messages)]


def pack_groups(messages: list[list]) -> list[list[list]]:
    """``messages`` cut, in order, into the groups that each go as one pack: at most
    ``PACK_MESSAGES`` messages and ``PACK_BYTES`` bytes; a larger message is a group alone."""
    groups: list[list[list]] = []
    group: list[list] = []
    size = 0
    for frames in messages:
        n = frames_size(frames)
        if group and (len(group) == PACK_MESSAGES or size + n > PACK_BYTES):
            groups.append(group)
            group, size = [], 0
        group.append(frames)
        size += n
    if group:
        groups.append(group)
    return groups


def pack(group: list[list]) -> list:
    """One multipart message for a group of ``pack_groups``: a pack, or its one message."""
    if len(group) == 1:
        return group[0]
    return ([_PACK_HEAD + msgpack.packb([len(frames) for frames in group])]
            + [frame for frames in group for frame in frames])


def unpack(frames: list) -> list[list]:
    """The messages ``frames`` carries: those of a pack, else ``[frames]`` itself.
    ``ProtocolError`` for a pack whose header does not describe its frames or is out of
    bounds (none of its messages is handled then: their borders are unknown)."""
    if not frames:
        return [frames]
    head = _buffer(frames[0])
    if len(head) < len(_PACK_HEAD) or head[:len(_PACK_HEAD)] != _PACK_HEAD:
        return [frames]
    try:
        counts = msgpack.unpackb(bytes(head[len(_PACK_HEAD):]), max_array_len=PACK_MESSAGES)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"pack: unreadable frame counts ({type(exc).__name__}; at most "
                            f"{PACK_MESSAGES} messages)") from None
    if (not isinstance(counts, list) or len(counts) < 2
            or not all(type(n) is int and 1 <= n <= len(frames) for n in counts)):
        raise ProtocolError(f"pack: frame counts must be 2 to {PACK_MESSAGES} positive "
                            f"integers, got {brief(counts)}")
    if sum(counts) != len(frames) - 1:
        raise ProtocolError(f"pack: its frame counts add up to {sum(counts)}, but "
                            f"{len(frames) - 1} frames follow the header")
    size = frames_size(frames) - len(head)
    if size > PACK_BYTES:
        raise ProtocolError(f"pack: {size} bytes of messages, over the limit of {PACK_BYTES} "
                            f"(a larger message goes alone)")
    out, at = [], 1
    for n in counts:
        out.append(frames[at:at + n])
        at += n
    return out


# ---- sockets ---------------------------------------------------------------------------------

_MORE, _NOBLOCK = int(zmq.SNDMORE), int(zmq.NOBLOCK)
# pyzmq's compiled send, without the Python layer around it (which only adds the DRAFT
# routing_id and group arguments): a third of the cost of a small frame. With copy False it
# copies a frame under the socket's copy threshold and sends a larger one without a copy.
_SEND = zmq.backend.Socket.send


def send_frames(sock: zmq.Socket, frames: list, nonblocking: bool = False) -> None:
    """``sock.send_multipart(frames, copy=False)`` (``zmq.NOBLOCK`` if ``nonblocking``), with
    plain integer flags: pyzmq's own combines its enum flags in Python for every frame, which
    is half the cost of sending a small message. A multipart message is atomic, as there:
    ``zmq.Again`` (or a ROUTER's ``EHOSTUNREACH``) comes from its first frame or not at all.
    ``sock`` is a plain ``zmq.Socket`` (not an asyncio one, whose send this would bypass)."""
    last = _NOBLOCK if nonblocking else 0
    more = last | _MORE
    for frame in frames[:-1]:
        _SEND(sock, frame, more, False)
    _SEND(sock, frames[-1], last, False)


def recv_frames(sock: zmq.Socket) -> list:
    """``sock.recv_multipart(zmq.NOBLOCK, copy=False)``, reading whether more follows from
    each frame (pyzmq asks the socket, through its enums, per frame). ``zmq.Again`` when no
    message waits; a message's later frames are there once its first is."""
    frame = sock.recv(_NOBLOCK, copy=False)
    frames = [frame]
    while frame.more:
        frame = sock.recv(_NOBLOCK, copy=False)
        frames.append(frame)
    return frames


# ---- encoding ----------------------------------------------------------------------------

def encode(msg: Message) -> list:
    """Frames for ``msg``: the header, then the arrays' buffers (no copies for contiguous
    arrays). The four messages of a task's round trip are written through their typed
    headers (``typed.py``, in C); a Result with attempts, and every other type, field by
    field. Either way the header is a msgpack map of the same fields and values."""
    buffers: list = []
    fast = typed.TYPES.get(msg.TYPE)
    if fast is not None and not getattr(msg, "attempts", None):
        kwargs = {name: getattr(msg, name) for name in _FAST_FIELDS[msg.TYPE]}
        arrays = typing.cast(str, msg.ARRAYS)  # each of the four carries arrays
        kwargs[arrays] = _specs(getattr(msg, arrays), buffers)
        return [_TYPED_ENCODE(fast(v=PROTOCOL_VERSION, **kwargs))] + buffers
    return _encode_fields(msg)


def _encode_fields(msg: Message) -> list:
    """``encode``, field by field."""
    buffers: list = []
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": msg.TYPE}
    for f in _fields(type(msg)):
        value = getattr(msg, f.name)
        if f.name == msg.ARRAYS:
            header[f.name] = _specs(value, buffers)
        else:
            header[f.name] = plain(value) if f.plain else value
    return [msgpack.packb(header, use_bin_type=True)] + buffers


_TYPED_ENCODE = msgspec.msgpack.Encoder().encode
# The fields each typed header is written from (its arrays aside), as the message has them.
_FAST_FIELDS = {t: tuple(n for n in cls.__struct_fields__ if n not in ("v", "inputs", "outputs"))
                for t, cls in typed.TYPES.items()}


def _specs(arrays: dict, buffers: list) -> list:
    """The descriptions of ``arrays`` for a header; their buffers appended to ``buffers``."""
    specs = []
    for name, arr in arrays.items():
        if isinstance(arr, RawArray):
            specs.append([name, arr.dtype, list(arr.shape)])
            buffers.extend(arr.frames)
            continue
        arr = np.ascontiguousarray(arr)
        dtype = dtype_name(arr.dtype)
        if dtype not in ALLOWED_DTYPES:
            raise ProtocolError(f"array {name!r} has dtype {arr.dtype}; allowed: "
                                f"{', '.join(sorted(ALLOWED_DTYPES))}")
        if not arr.dtype.isnative:  # the wire's arrays are little-endian, as every host's
            arr = arr.astype(arr.dtype.newbyteorder("="))
        specs.append([name, dtype, list(arr.shape)])
        buffers.extend(_chunks(arr))
    return specs


def _chunks(arr: np.ndarray) -> list:
    """The bytes of a contiguous array as views of at most ``FRAME_BYTES`` (no copies)."""
    if not arr.size:
        return [b""]
    data = memoryview(arr.data).cast("B")  # native and C-contiguous: its bytes, as one flat view
    if len(data) <= FRAME_BYTES:
        return [data]
    return [data[i:i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]


def frame_count(nbytes: int) -> int:
    """How many frames carry an array of ``nbytes`` bytes."""
    return max(1, -(-nbytes // FRAME_BYTES))


def _buffer(frame) -> Any:
    # type(), not hasattr(): asking a zmq.Frame for .buffer makes a memoryview each time
    return frame.buffer if type(frame) is zmq.Frame else frame


class RawArray:
    """An array still in its received frames: the scheduler forwards it without decoding.
    (A slotted class: one is made per array a task carries, and a frozen dataclass costs
    several times as much to make.)"""

    __slots__ = ("dtype", "shape", "frames")

    def __init__(self, dtype: str, shape: tuple[int, ...], frames: tuple) -> None:
        self.dtype = dtype
        self.shape = shape
        self.frames = frames  # zmq.Frame or bytes, each at most FRAME_BYTES

    def __repr__(self) -> str:
        return f"RawArray({self.dtype}{list(self.shape)}, {len(self.frames)} frame(s))"

    def __eq__(self, other: object) -> bool:
        return type(other) is RawArray and (self.dtype, self.shape, self.frames) == (
            other.dtype, other.shape, other.frames)

    def __hash__(self) -> int:
        return hash((self.dtype, self.shape, self.frames))

    @property
    def nbytes(self) -> int:
        return sum(_frame_len(f) for f in self.frames)

    def to_numpy(self) -> np.ndarray:
        if len(self.frames) == 1:  # the common case: a view of the frame, no copy
            return np.frombuffer(_buffer(self.frames[0]), dtype=self.dtype).reshape(self.shape)
        whole = np.empty(self.nbytes, np.uint8)
        at = 0
        for frame in self.frames:
            chunk = np.frombuffer(_buffer(frame), np.uint8)
            whole[at:at + len(chunk)] = chunk
            at += len(chunk)
        return whole.view(self.dtype).reshape(self.shape)


def _frame_len(frame) -> int:
    kind = type(frame)
    if kind is zmq.Frame or kind is bytes:
        return len(frame)
    return memoryview(frame).nbytes  # a view's len() counts items, not bytes


def frames_size(frames: list) -> int:
    size = 0
    for frame in frames:  # _frame_len inlined: this runs for every message, several times
        kind = type(frame)
        size += len(frame) if kind is zmq.Frame or kind is bytes else memoryview(frame).nbytes
    return size


def result_bytes(outputs: dict[str, np.ndarray]) -> int:
    """At least the size of the ``Done`` that carries ``outputs``: their bytes, plus the most
    the header can take (its fixed fields, then each array's name, dtype and shape)."""
    return 128 + sum(arr.nbytes + len(name.encode()) + 24 + 9 * arr.ndim
                     for name, arr in outputs.items())


class Decoder:
    """Decodes the messages one socket may receive; anything else is a ``ProtocolError``."""

    def __init__(self, allowed: frozenset, max_bytes: int, decode_arrays: bool = True):
        self.allowed = {cls.TYPE: cls for cls in allowed}
        self.max_bytes = max_bytes
        self.decode_arrays = decode_arrays
        self._typed = typed.Reader(set(self.allowed))  # the hot messages' fast path

    def decode(self, frames: list) -> Message:
        """The message, or ``ProtocolError`` whose ``ref`` is the task or request id when the
        header was readable, so the sender can be told which of its messages failed."""
        fast = self._fast(frames)
        if fast is not None:
            return fast
        header: Any = None
        try:
            header = self._header(frames)
            size = frames_size(frames)
            if size > self.max_bytes:
                raise ProtocolError(f"message of {size} bytes is larger than the limit of "
                                    f"{self.max_bytes} bytes (scheduler.max_message_bytes)")
            return self._message(header, frames)
        except ProtocolError as exc:
            if isinstance(header, dict):
                ref = header.get("task_id", header.get("req_id"))
                exc.ref = ref if isinstance(ref, str) else None
                exc.msg_type = header.get("t") if isinstance(header.get("t"), str) else None
            elif exc.ref is None and frames:
                exc.msg_type, exc.ref = peek_ids(_head_bytes(frames[0]))
            raise

    def _fast(self, frames: list) -> Message | None:
        """The message read through its typed header (``typed.py``), or None: then the full
        path reads it (and says what is wrong, if anything)."""
        if not frames:
            return None
        head = _buffer(frames[0])
        if len(head) > MAX_HEADER_BYTES:
            return None
        got = self._typed.read(head)
        if got is None or frames_size(frames) > self.max_bytes:
            return None
        t, kwargs = got
        cls = self.allowed[t]
        if kwargs.pop("v") != PROTOCOL_VERSION:
            return None
        if cls.ARRAYS in kwargs:
            try:
                kwargs[cls.ARRAYS] = self._arrays(cls, kwargs[cls.ARRAYS], frames[1:])
            except ProtocolError:
                return None
        elif len(frames) > 1:
            return None
        return cls(**kwargs)

    @staticmethod
    def _header(frames: list) -> dict:
        if not frames:
            raise ProtocolError("empty message")
        head = _head_bytes(frames[0])
        if len(head) > MAX_HEADER_BYTES:
            raise ProtocolError(f"header of {len(head)} bytes exceeds the limit of "
                                f"{MAX_HEADER_BYTES} bytes (large data goes in arrays)")
        try:
            header = msgpack.unpackb(head, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises several unrelated types for garbage
            raise ProtocolError(f"undecodable header: {type(exc).__name__}: "
                                f"{brief(str(exc))}") from None
        if not isinstance(header, dict):
            raise ProtocolError("header is not a map")
        return header

    def _message(self, header: dict, frames: list) -> Message:
        version = header.get("v")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {brief(version)} is not supported "
                                f"(this peer speaks {PROTOCOL_VERSION}); upgrade both sides")
        t = header.get("t")
        cls = self.allowed.get(t) if isinstance(t, str) else None
        if cls is None:
            raise ProtocolError(f"unexpected message type {brief(t)} on this socket")
        kwargs: dict[str, Any] = {}
        for f in _fields(cls):
            if f.name not in header:
                if f.required:
                    raise ProtocolError(f"{cls.TYPE}: missing field {f.name!r}")
                continue
            value = header[f.name]
            if f.name == cls.ARRAYS:
                value = self._arrays(cls, value, frames[1:])
            else:
                value = f.read(value, f.where)
            kwargs[f.name] = value
        if cls.ARRAYS is None and len(frames) > 1:
            raise ProtocolError(f"{cls.TYPE}: unexpected {len(frames) - 1} data frames")
        if cls.ARRAYS is not None and cls.ARRAYS not in header and len(frames) > 1:
            raise ProtocolError(f"{cls.TYPE}: data frames without array descriptions")
        return cls(**kwargs)

    def _arrays(self, cls, specs, data: list) -> dict:
        if not isinstance(specs, list) or len(specs) > len(data) or (not specs and data):
            raise ProtocolError(f"{cls.TYPE}: {len(data)} data frames but array list is "
                                f"{brief(specs)}")
        out: dict[str, Any] = {}
        at = 0
        for spec in specs:
            if (not isinstance(spec, list) or len(spec) != 3 or not isinstance(spec[0], str)
                    or not isinstance(spec[1], str) or not isinstance(spec[2], list)):
                raise ProtocolError(f"{cls.TYPE}: bad array description {brief(spec)}")
            name, dtype, shape = spec
            expected = _ITEMSIZES.get(dtype)
            if expected is None:
                raise ProtocolError(f"{cls.TYPE}: array {brief(name)} has dtype {brief(dtype)}; "
                                    f"allowed: {', '.join(sorted(ALLOWED_DTYPES))}")
            bad = len(shape) > 32
            if not bad:
                for d in shape:
                    if type(d) is not int or not 0 <= d < _MAX_DIM:
                        bad = True
                        break
                    expected *= d
            if bad:
                raise ProtocolError(f"{cls.TYPE}: array {brief(name)} has bad shape "
                                    f"{brief(shape)}")
            if name in out:
                raise ProtocolError(f"{cls.TYPE}: array {brief(name)} appears twice")
            # The common case, one frame of the right size, costs one length to check.
            frame = data[at] if at < len(data) else None
            if expected <= FRAME_BYTES and frame is not None and _frame_len(frame) == expected:
                at += 1
                if self.decode_arrays:
                    out[name] = np.frombuffer(_buffer(frame), dtype=dtype).reshape(shape)
                else:
                    out[name] = RawArray(dtype, tuple(shape), (frame,))
                continue
            count = frame_count(expected)
            frames = data[at:at + count]
            at += count
            got = sum(_frame_len(fr) for fr in frames)
            if got != expected or any(_frame_len(fr) > FRAME_BYTES for fr in frames) \
                    or len(frames) != count:
                raise ProtocolError(f"{cls.TYPE}: array {brief(name)} {dtype}{shape} "
                                    f"needs {expected} bytes in {count} frame(s) of at "
                                    f"most {FRAME_BYTES}, got {got} in {len(frames)}")
            raw = RawArray(dtype, tuple(shape), tuple(frames))
            out[name] = raw.to_numpy() if self.decode_arrays else raw
        if at != len(data):
            raise ProtocolError(f"{cls.TYPE}: {len(data) - at} data frames more than the "
                                f"arrays described need")
        return out


_MAX_DIM = 2**40


def _head_bytes(frame) -> bytes:
    return frame.bytes if type(frame) is zmq.Frame else bytes(frame)


def peek_field(head: bytes, name: str) -> Any:
    """One top-level scalar field of a header, read without decoding the rest (None if it
    is not there or cannot be read)."""
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(head), 1))
        unpacker.feed(head)
        for _ in range(min(unpacker.read_map_header(), 64)):
            if unpacker.unpack() == name:
                value = unpacker.unpack()
                return value if isinstance(value, (int, float, str)) else None
            unpacker.skip()
    except Exception:  # broken before the field
        pass
    return None


def peek_ids(head: bytes) -> tuple[str | None, str | None]:
    """The type and the task or request id of a header that cannot be decoded whole (too
    large, or broken past those fields), read without building its other values, so that the
    sender's call can be failed by its id instead of left waiting."""
    found: dict[str, str] = {}
    try:
        unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(head), 1))
        unpacker.feed(head)
        for _ in range(min(unpacker.read_map_header(), 64)):
            key = unpacker.unpack()
            if key in ("t", "task_id", "req_id"):
                value = unpacker.unpack()
                if isinstance(value, str) and len(value) <= 256:
                    found[key] = value
            else:
                unpacker.skip()
    except Exception:  # a header broken before the fields: nothing more can be told
        pass
    return found.get("t"), found.get("task_id", found.get("req_id"))


def peek_attempt(head: bytes) -> int | None:
    """The attempt a worker's header names (``peek_field``), if it is an int."""
    attempt = peek_field(head, "attempt")
    return attempt if type(attempt) is int else None


def error_reply(req_id: str | None, exc: Exception) -> Reply:
    return Reply(req_id=req_id,
                 error=exc if isinstance(exc, FanoutError) else FanoutError(str(exc)))


def _check_typed() -> None:
    """A field added to a message the fast path reads must be added to its typed header too
    (else that path would drop it): checked at import."""
    for cls in (Submit, Run, Done, Result):
        header = typed.TYPES[cls.TYPE]
        want = {"v"} | {f.name for f in fields(cls)}
        have = set(header.__struct_fields__)
        if have != want:
            raise TypeError(f"wire/typed.py's {cls.TYPE} header has fields {sorted(have)}, "
                            f"the message {sorted(want)}")
        # A field a header leaves out takes the typed default: it must be the message's.
        typed_defaults = {
            f.name: f.default if f.default_factory is msgspec.NODEFAULT else f.default_factory()
            for f in msgspec.structs.fields(header)}
        for f in fields(cls):
            if f.name == cls.ARRAYS:
                continue
            default = f.default if f.default_factory is MISSING else f.default_factory()
            typed_default = typed_defaults[f.name]
            if default is not MISSING and typed_default != default:
                raise TypeError(f"wire/typed.py's {cls.TYPE}.{f.name} defaults to "
                                f"{typed_default!r}, the message's to {default!r}")


_check_typed()
