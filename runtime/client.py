"""The Python client: ``AsyncClient`` does the work on asyncio; ``Client`` is its sync face.

``Client`` runs one ``AsyncClient`` on a private event loop thread. Its sync methods block on
that loop, and its ``a*`` methods await it from the caller's own loop, so each operation is
written once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import zmq
import zmq.asyncio

from . import protocol as p
from .config import DEFAULT_ADDRESS
from .errors import (Attempt, ClusterUnavailable, FanoutError, InvalidInput, ProtocolError,
                     error_from_wire)

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


@dataclass
class Result:
    """One task's answer: the outputs, the device that served it and every failed try."""

    outputs: dict[str, np.ndarray]
    device: str
    attempts: list[Attempt] = field(default_factory=list)
    service_s: float = 0.0

    @property
    def failed_over(self) -> bool:
        return bool(self.attempts)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


def _as_arrays(inputs: dict[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(inputs, dict) or not inputs:
        raise InvalidInput(f"inputs must be a non-empty dict of name -> array, got "
                           f"{type(inputs).__name__}")
    out = {}
    for name, value in inputs.items():
        arr = np.asarray(value)
        if arr.dtype.name not in p.ALLOWED_DTYPES:
            raise InvalidInput(f"input {name!r} has dtype {arr.dtype}; allowed: "
                               f"{', '.join(sorted(p.ALLOWED_DTYPES))}")
        out[str(name)] = arr
    return out


class AsyncClient:
    """A connection to a scheduler, used from one event loop."""

    def __init__(self, address: str = DEFAULT_ADDRESS, token: str | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        self.address = address
        self.token = token
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.decoder = p.Decoder(p.SCHEDULER_TO_CLIENT, max_message_bytes)
        self.max_message_bytes = max_message_bytes
        self._pending: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self._reader: asyncio.Task | None = None
        self._hello: asyncio.Future | None = None
        self.cluster: dict = {}
        self._closed = False
        self.unmatched = 0  # answers for tasks not waiting (late or duplicate): should stay 0

    async def connect(self, timeout: float = 10.0) -> "AsyncClient":
        self.sock.connect(self.address)
        self._reader = asyncio.create_task(self._read())
        self._hello = asyncio.get_running_loop().create_future()
        await self._send(p.Hello(version=p.PROTOCOL_VERSION, role="client", token=self.token))
        try:
            self.cluster = await asyncio.wait_for(asyncio.shield(self._hello), timeout)
            self.max_message_bytes = min(self.max_message_bytes,
                                         int(self.cluster.get("max_message_bytes") or 2**62))
        except asyncio.TimeoutError:
            await self.close()
            raise ClusterUnavailable(f"no Fanout scheduler answered at {self.address} within "
                                     f"{timeout:g} s; start one with `fanout up`") from None
        except FanoutError:
            await self.close()
            raise
        return self

    async def _send(self, msg: p.Message) -> None:
        if self._closed:
            raise ClusterUnavailable("this client is closed")
        frames = p.encode(msg)
        size = p.frames_size(frames)
        if size > self.max_message_bytes:
            raise InvalidInput(f"message of {size} bytes exceeds the cluster's limit of "
                               f"{self.max_message_bytes} bytes (scheduler.max_message_bytes)")
        await self.sock.send_multipart(frames, copy=False)

    async def _read(self) -> None:
        while True:
            try:
                frames = await self.sock.recv_multipart(copy=False)
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                msg = self.decoder.decode(frames)
            except ProtocolError:
                continue
            self._dispatch(msg)

    def _dispatch(self, msg: p.Message) -> None:
        match msg:
            case p.Welcome():
                if self._hello and not self._hello.done():
                    self._hello.set_result(msg.cluster)
            case p.Result() | p.Failure():
                fut = self._pending.pop(msg.task_id, None)
                if fut is None or fut.done():
                    self.unmatched += 1
                elif isinstance(msg, p.Result):
                    fut.set_result(Result(dict(msg.outputs), msg.device,
                                          [Attempt.from_wire(a) for a in msg.attempts],
                                          msg.service_s))
                else:
                    fut.set_exception(error_from_wire(msg.error))
            case p.Reply():
                if msg.req_id is None:  # an error about a message we sent without an id
                    if self._hello and not self._hello.done() and msg.error:
                        self._hello.set_exception(error_from_wire(msg.error))
                    return
                fut = self._pending.pop(msg.req_id, None)
                if fut is not None and not fut.done():
                    if msg.error:
                        fut.set_exception(error_from_wire(msg.error))
                    else:
                        fut.set_result(msg.body)

    def _new_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def _request(self, msg_for_id, timeout: float | None) -> Any:
        req_id = self._new_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[req_id] = fut
        try:
            await self._send(msg_for_id(req_id))
            return await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ClusterUnavailable(f"the scheduler at {self.address} did not answer within "
                                     f"{timeout:g} s") from None
        finally:
            self._pending.pop(req_id, None)

    async def ainfer(self, model: str, inputs: dict[str, Any],
                     timeout: float | None = None) -> Result:
        """Run one task; raises the task's ``FanoutError`` if it failed everywhere."""
        arrays = _as_arrays(inputs)
        task_id = self._new_id()
        fut = asyncio.get_running_loop().create_future()
        self._pending[task_id] = fut
        try:
            await self._send(p.Submit(task_id=task_id, model=model, inputs=arrays,
                                      timeout_s=timeout))
            # The scheduler enforces the deadline; the margin covers the message's way back.
            wait = None if timeout is None else timeout + 5.0
            return await asyncio.wait_for(asyncio.shield(fut), wait)
        except asyncio.CancelledError:
            if not fut.done():
                await self._send_quietly(p.Cancel(task_id=task_id))
            raise
        except asyncio.TimeoutError:
            raise ClusterUnavailable(f"no answer for task {task_id} from {self.address}") from None
        finally:
            self._pending.pop(task_id, None)

    async def _send_quietly(self, msg: p.Message) -> None:
        try:
            await self._send(msg)
        except (zmq.ZMQError, FanoutError):
            pass

    async def amap(self, model: str, inputs: Iterable[dict[str, Any]], *,
                   return_exceptions: bool = False, timeout: float | None = None,
                   window: int = 1024) -> list:
        """The fan-out call: one task per item, results in input order.

        At most ``window`` tasks are outstanding at once, so a long list does not overflow
        the scheduler's queue. With ``return_exceptions`` a failed item yields its error in
        its place; otherwise the first error is raised after every task has ended.
        """
        items = list(inputs)
        gate = asyncio.Semaphore(max(1, window))

        async def one(item):
            async with gate:
                return await self.ainfer(model, item, timeout)

        results = await asyncio.gather(*(one(i) for i in items), return_exceptions=True)
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    async def astatus(self, timeout: float = 10.0) -> dict:
        return await self._request(lambda rid: p.StatusRequest(req_id=rid), timeout)

    async def ashutdown(self, timeout: float = 10.0) -> None:
        await self._request(lambda rid: p.Shutdown(req_id=rid), timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ClusterUnavailable("the client was closed"))
        self._pending.clear()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except BaseException:
                pass
        self.sock.close(linger=0)
        self.ctx.term()


class Client:
    """The sync client, and ``a*`` twins usable from any event loop. Thread-safe."""

    def __init__(self, address: str | None = None, token: str | None = None,
                 timeout: float = 10.0):
        self.address = address or os.environ.get("FANOUT_ADDRESS") or DEFAULT_ADDRESS
        token = token if token is not None else os.environ.get("FANOUT_TOKEN")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fanout-client",
                                        daemon=True)
        self._thread.start()
        self._async = AsyncClient(self.address, token)
        try:
            self._call(self._async.connect(timeout))
        except BaseException:
            self._stop_loop()
            raise

    # Every method below hands a coroutine of the AsyncClient to the private loop.
    def _submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro):
        return self._submit(coro).result()

    async def _await(self, coro):
        return await asyncio.wrap_future(self._submit(coro))

    @property
    def cluster(self) -> dict:
        return self._async.cluster

    @property
    def unmatched(self) -> int:
        """Answers that arrived for no waiting task; exactly-once delivery keeps this 0."""
        return self._async.unmatched

    def infer(self, model: str, inputs: dict[str, Any], timeout: float | None = None) -> Result:
        return self._call(self._async.ainfer(model, inputs, timeout))

    def submit(self, model: str, inputs: dict[str, Any],
               timeout: float | None = None) -> concurrent.futures.Future:
        """Start one task; the future resolves to a ``Result`` or raises its error."""
        return self._submit(self._async.ainfer(model, inputs, timeout))

    def map(self, model: str, inputs: Sequence[dict[str, Any]], *,
            return_exceptions: bool = False, timeout: float | None = None,
            window: int = 1024) -> list:
        return self._call(self._async.amap(model, inputs, return_exceptions=return_exceptions,
                                           timeout=timeout, window=window))

    async def ainfer(self, model: str, inputs: dict[str, Any],
                     timeout: float | None = None) -> Result:
        return await self._await(self._async.ainfer(model, inputs, timeout))

    async def amap(self, model: str, inputs: Sequence[dict[str, Any]], *,
                   return_exceptions: bool = False, timeout: float | None = None,
                   window: int = 1024) -> list:
        return await self._await(self._async.amap(model, inputs,
                                                  return_exceptions=return_exceptions,
                                                  timeout=timeout, window=window))

    def status(self, timeout: float = 10.0) -> dict:
        return self._call(self._async.astatus(timeout))

    async def astatus(self, timeout: float = 10.0) -> dict:
        return await self._await(self._async.astatus(timeout))

    def shutdown_cluster(self, timeout: float = 10.0) -> None:
        """Ask the scheduler to stop the whole cluster (what ``fanout down`` does)."""
        self._call(self._async.ashutdown(timeout))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._call(self._async.close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def connect(address: str | None = None, token: str | None = None,
            timeout: float = 10.0) -> Client:
    """Attach to a running cluster (default: ``FANOUT_ADDRESS`` or tcp://127.0.0.1:8471)."""
    return Client(address, token, timeout)
