"""CurveZMQ for every socket of a cluster: key files, socket options, the scheduler's gate.

With ``cluster.keys`` set, the scheduler's two ROUTER sockets are CURVE servers and a ZAP
authenticator on the scheduler's context admits only the cluster's client public key; workers
and clients are CURVE clients. Without keys none of this runs and the sockets stay plain.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from ..config.schema import CurveKeys
from ..errors import Unauthorized

log = logging.getLogger("fanout.security")

ZAP_DOMAIN = "fanout"
ADVICE = "pass keys= to runtime.connect() or set FANOUT_KEYS to the cluster's key file"
# Handshakes that fail without detail before a client asks the scheduler what it speaks.
NO_DETAIL_TRIES = 2
REFUSAL_REPORT_S = 10.0  # one log line per kind of refused peer per this many seconds

# -- key files ----------------------------------------------------------------------------------


def generate_keys() -> CurveKeys:
    """A new server pair and client pair."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    return CurveKeys(server_public=server_public.decode(), server_secret=server_secret.decode(),
                     client_public=client_public.decode(), client_secret=client_secret.decode())


# -- socket options -----------------------------------------------------------------------------


def apply_server(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE server (before bind). Its context must run a ``Gate``: without a
    ZAP handler libzmq would admit any client key."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.server_secret.encode())
    sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())


def apply_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE client of the cluster's scheduler (before connect)."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret.encode())


# -- what a client makes of a failed handshake --------------------------------------------------

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# ZMTP 3.0 greeting: signature (10 bytes), version (2), mechanism (20, NUL-padded), ...
_ZMTP_SIGNATURE_AND_VERSION = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00"
_ZMTP_GREETING_BYTES = 64


def handshake_error(event: int, value: int, address: str,
                    have_keys: bool) -> Unauthorized | None:
    """The error a client raises for a handshake event that tells what went wrong, or None.

    A failure without detail (the peer hung up) says nothing: a scheduler drops a HELLO it
    cannot decrypt without a word, and one that hangs up first on a mechanism mismatch races
    its own greeting. ``server_mechanism`` then asks the scheduler directly."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL \
            and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return mechanism_error("NULL" if have_keys else "CURVE", address, have_keys)
    if not have_keys:
        return None
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return Unauthorized(f"the cluster at {address} refused this client's CurveZMQ key "
                            f"(ZAP status {value}): the key file is not this cluster's; {ADVICE}")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return mechanism_error("CURVE", address, have_keys)
    return None


def mechanism_error(mechanism: str | None, address: str, have_keys: bool) -> Unauthorized | None:
    """The error for a client with (or without) keys whose scheduler speaks ``mechanism``."""
    if mechanism == "CURVE" and not have_keys:
        return Unauthorized(f"the cluster at {address} encrypts its traffic (CurveZMQ): "
                            f"{ADVICE}")
    if mechanism == "CURVE":
        return Unauthorized(f"the CurveZMQ handshake with {address} failed: the key file is not "
                            f"this cluster's (its server key differs); {ADVICE}")
    if mechanism == "NULL" and have_keys:
        return Unauthorized(f"the scheduler at {address} does not encrypt its traffic, but this "
                            f"client was given CurveZMQ keys: connect without keys (unset "
                            f"FANOUT_KEYS), or start the cluster with cluster.keys set to the "
                            f"same key file")
    return None


async def server_mechanism(address: str, timeout: float = 2.0) -> str | None:
    """The security mechanism (``NULL``, ``CURVE``) a ZMTP 3 peer at ``address`` announces in
    its greeting, or None if it cannot be told. Sends only a signature and version, so the
    peer sees a connection that closed mid-greeting, not a refused one."""
    try:
        if address.startswith("tcp://"):
            host, port = address[len("tcp://"):].rsplit(":", 1)
            connecting = asyncio.open_connection(host.strip("[]"), int(port))
        elif address.startswith("ipc://"):
            connecting = asyncio.open_unix_connection(address[len("ipc://"):])
        else:
            return None
        reader, writer = await asyncio.wait_for(connecting, timeout)
    except (TimeoutError, OSError, ValueError):
        return None
    try:
        writer.write(_ZMTP_SIGNATURE_AND_VERSION)
        greeting = await asyncio.wait_for(reader.readexactly(_ZMTP_GREETING_BYTES), timeout)
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
    if greeting[0] != 0xFF or greeting[9] != 0x7F or greeting[10] < 3:
        return None
    return greeting[12:32].rstrip(b"\x00").decode("ascii", "replace")


# -- the scheduler's gate -----------------------------------------------------------------------


class _RefusalLog:
    """WARNING lines about refused peers, at most one per (kind, peer) per period, so a peer
    that keeps reconnecting cannot flood the log."""

    def __init__(self, period_s: float = REFUSAL_REPORT_S, clock=time.monotonic):
        self.period_s = period_s
        self.clock = clock
        self._lock = threading.Lock()
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def warn(self, kind: str, peer: str, message: str) -> None:
        now = self.clock()
        with self._lock:
            last, quiet = self._last.get((kind, peer), (None, 0))
            if last is not None and now - last < self.period_s:
                self._last[(kind, peer)] = (last, quiet + 1)
                return
            if len(self._last) > 1024:
                self._last.clear()
            self._last[(kind, peer)] = (now, 0)
        more = f" ({quiet} more since the last report)" if quiet else ""
        log.warning("%s%s", message, more)


class _KeyAuthenticator(ThreadAuthenticator):
    """ZAP in a thread: admits exactly one client public key."""

    def __init__(self, ctx: zmq.Context, member: str, refusals: _RefusalLog):
        super().__init__(ctx, log=logging.getLogger("fanout.security.zap"))
        self.member = member.encode()
        self.refusals = refusals
        self.peer = "?"

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # The callback below is told the key but not who presented it.
        self.peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        if hmac.compare_digest(key, self.member):
            return True
        self.refusals.warn("key", self.peer, f"refused a peer from {self.peer}: its CurveZMQ "
                           f"public key {key[:8].decode(errors='replace')}... is not this "
                           f"cluster's client key")
        return False


class Gate:
    """The scheduler side: a ZAP authenticator on ``ctx`` that admits only
    ``keys.client_public``, and a log line for each peer refused during a handshake.

    Make it before binding, ``serve`` each server socket before it binds, and ``close`` it
    before ``ctx.term()``."""

    def __init__(self, ctx: zmq.Context, keys: CurveKeys):
        self.keys = keys
        self._refusals = _RefusalLog()
        self._auth = _KeyAuthenticator(ctx, keys.client_public, self._refusals)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, self._auth)
        self._watched: list[tuple[zmq.Socket, threading.Thread]] = []  # (stop line, watcher)

    def serve(self, sock: zmq.Socket) -> None:
        """CURVE server options on ``sock``, and log its refused handshakes (before bind)."""
        apply_server(sock, self.keys)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        # Closing a socket does not end its monitor at once, so each watcher has a stop line.
        stop_addr = f"inproc://fanout-gate-{id(self)}-{len(self._watched)}"
        stop = sock.context.socket(zmq.PAIR)
        stop.bind(stop_addr)
        listen = sock.context.socket(zmq.PAIR)
        listen.connect(stop_addr)
        thread = threading.Thread(target=self._watch, args=(monitor, listen), daemon=True,
                                  name="fanout-handshakes")
        thread.start()
        self._watched.append((stop, thread))

    def _watch(self, monitor: zmq.Socket, stop: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(monitor, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if stop in ready:
                    return
                event = parse_monitor_message(monitor.recv_multipart())
                if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                    return
                where = event["endpoint"].decode("utf-8", "replace")
                if event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                    self._refusals.warn("plain", where, f"refused a peer on {where}: it does "
                                        f"not use CurveZMQ (a client or worker without the "
                                        f"cluster's key file)")
                else:
                    self._refusals.warn("crypto", where, f"refused a peer on {where}: its "
                                        f"CurveZMQ handshake failed (protocol error "
                                        f"{int(event['value']):#x}; a key file of another "
                                        f"cluster?)")
        except zmq.ZMQError:
            return  # the context is terminating
        finally:
            monitor.close(linger=0)
            stop.close(linger=0)

    def close(self) -> None:
        """Stop the watchers and the authenticator (before ``ctx.term()``); idempotent."""
        for stop, thread in self._watched:
            try:
                stop.send(b"", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            thread.join(timeout=5)
            stop.close(linger=0)
        self._watched.clear()
        if self._auth.pipe is not None:
            self._auth.stop()
