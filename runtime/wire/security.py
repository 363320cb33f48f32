"""Who may connect to the scheduler: every peer is authenticated per connection, at the ZMQ
handshake, before any frame of it reaches the application.

The scheduler's ``Gate`` is a ZAP authenticator on its context with one ``Door`` per socket:
- the client socket: CURVE with the client public key (``cluster.keys``), else PLAIN with the
  token as password (``scheduler.token``), else open (NULL: loopback by default);
- the worker socket: CURVE with the worker public key, else PLAIN with a secret the scheduler
  makes at every start and hands only to the workers it starts. It is never open.
So a client's credentials (the client key pair, the token) cannot pass the worker door. A
peer refused at the handshake is logged, at most once per peer and kind per period.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import threading
from dataclasses import dataclass, field

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from ..config.schema import CurveKeys
from ..errors import Unauthorized
from .peerlog import PeerLog

log = logging.getLogger("fanout.security")

CLIENT_DOMAIN = "fanout-clients"  # the ZAP domain of the client socket
WORKER_DOMAIN = "fanout-workers"
PLAIN_CLIENT, PLAIN_WORKER = "client", "worker"  # PLAIN user names (the password is checked)
ADVICE = ("pass keys= to runtime.connect() or set FANOUT_KEYS to the cluster's client key "
          "file")
TOKEN_ADVICE = "pass token= to runtime.connect() or set FANOUT_TOKEN"
# Handshakes that fail without detail before a client asks the scheduler what it speaks.
NO_DETAIL_TRIES = 2
REFUSAL_REPORT_S = 10.0  # one log line per refused peer and kind per this many seconds

# -- key files ----------------------------------------------------------------------------------


def _pair() -> tuple[str, str]:
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def generate_keys() -> CurveKeys:
    """A new cluster: the server's, the clients' and the workers' key pairs."""
    (sp, ss), (cp, cs), (wp, ws) = _pair(), _pair(), _pair()
    return CurveKeys(server_public=sp, server_secret=ss, client_public=cp, client_secret=cs,
                     worker_public=wp, worker_secret=ws)


def with_worker_pair(keys: CurveKeys) -> CurveKeys:
    """``keys`` with a worker pair: a new one if the file had none (written before there was)."""
    if keys.worker_public is not None:
        return keys
    public, secret = _pair()
    return dataclasses.replace(keys, worker_public=public, worker_secret=secret)


# -- socket options -----------------------------------------------------------------------------


def apply_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE client of the cluster's scheduler with the client pair."""
    _apply_curve(sock, keys.server_public, keys.client_public, keys.client_secret)


def apply_worker(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE client of the scheduler's worker socket with the worker pair."""
    _apply_curve(sock, keys.server_public, keys.worker_public, keys.worker_secret)


def _apply_curve(sock: zmq.Socket, server: str, public: str | None,
                 secret: str | None) -> None:
    if public is None or secret is None:
        raise ValueError("these keys lack the pair this socket needs")
    sock.setsockopt(zmq.CURVE_SERVERKEY, server.encode())
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public.encode())
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode())


def apply_plain(sock: zmq.Socket, username: str, password: str) -> None:
    """Present ``password`` at the handshake (ZMQ PLAIN: in clear, so only without keys)."""
    sock.setsockopt(zmq.PLAIN_USERNAME, username.encode())
    sock.setsockopt(zmq.PLAIN_PASSWORD, password.encode())


# -- what a client makes of a failed handshake --------------------------------------------------

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
# ZMTP 3.0 greeting: signature (10 bytes), version (2), mechanism (20, NUL-padded), ...
_ZMTP_SIGNATURE_AND_VERSION = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00"
_ZMTP_GREETING_BYTES = 64


def handshake_error(event: int, value: int, address: str, have_keys: bool,
                    have_token: bool = False) -> Unauthorized | None:
    """The error a client raises for a handshake event that tells what went wrong, or None.

    A mechanism mismatch says only that the scheduler speaks another one, and a failure
    without detail (the peer hung up) says nothing: a scheduler drops a HELLO it cannot
    decrypt without a word. For those, ``server_mechanism`` asks the scheduler directly."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        if have_keys:
            return Unauthorized(f"the cluster at {address} refused this client's CurveZMQ key "
                                f"(ZAP status {value}): the key file is not this cluster's; "
                                f"{ADVICE}")
        return Unauthorized(f"the cluster at {address} refused this client's token (ZAP "
                            f"status {value}): this cluster needs a token, its own; "
                            f"{TOKEN_ADVICE}")
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and have_keys \
            and value != zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return mechanism_error("CURVE", address, have_keys, have_token)
    return None


def mechanism_error(mechanism: str | None, address: str, have_keys: bool,
                    have_token: bool = False) -> Unauthorized | None:
    """The error for a client with (or without) keys or a token whose scheduler speaks
    ``mechanism`` (NULL: open; PLAIN: a token; CURVE: keys), or None if they agree."""
    if mechanism == "CURVE" and not have_keys:
        return Unauthorized(f"the cluster at {address} encrypts its traffic (CurveZMQ): "
                            f"{ADVICE}")
    if mechanism == "CURVE":
        return Unauthorized(f"the CurveZMQ handshake with {address} failed: the key file is not "
                            f"this cluster's (its server key differs); {ADVICE}")
    if mechanism == "PLAIN" and have_keys:
        return Unauthorized(f"the scheduler at {address} does not encrypt its traffic (it "
                            f"checks a token instead), but this client was given CurveZMQ "
                            f"keys: connect with its token and without keys (unset "
                            f"FANOUT_KEYS), or start the cluster with cluster.keys set")
    if mechanism == "PLAIN" and not have_token:
        return Unauthorized(f"the cluster at {address} needs a token: {TOKEN_ADVICE}")
    if mechanism == "NULL" and have_keys:
        return Unauthorized(f"the scheduler at {address} does not encrypt its traffic, but this "
                            f"client was given CurveZMQ keys: connect without keys (unset "
                            f"FANOUT_KEYS), or start the cluster with cluster.keys set to the "
                            f"same key file")
    if mechanism == "NULL" and have_token:
        return Unauthorized(f"the cluster at {address} has no token, but this client was given "
                            f"one: connect without it (unset FANOUT_TOKEN), or start the "
                            f"cluster with scheduler.token set")
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


@dataclass(frozen=True)
class Door:
    """Who may connect to one scheduler socket: holders of ``curve_key``'s secret (a CURVE
    public key, Z85), or of ``password`` (PLAIN), or, with neither, anyone (NULL)."""

    domain: str
    curve_key: str | None = None
    password: str | None = field(default=None, repr=False)
    who: str = "peer"  # for log lines: "client", "worker"

    @property
    def mechanism(self) -> str:
        return "CURVE" if self.curve_key else "PLAIN" if self.password else "NULL"


class _Keeper(ThreadAuthenticator):
    """ZAP in a thread: each door's domain admits only its own credential. Never raises:
    an exception here would end the thread, and every later handshake would then hang."""

    def __init__(self, ctx: zmq.Context, doors: dict[str, Door], refusals: PeerLog):
        super().__init__(ctx, log=logging.getLogger("fanout.security.zap"))
        self.doors = doors
        self.refusals = refusals

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        request_id = msg[1] if len(msg) > 1 else b""
        try:
            ok, why = self._admit(msg)
        except Exception as exc:  # a bug here must refuse one peer, not every later one
            ok, why = False, f"internal error: {type(exc).__name__}"
        try:
            self._send_zap_reply(request_id, b"200" if ok else b"400",
                                 b"OK" if ok else why.encode()[:100])
        except zmq.ZMQError:
            pass  # the context is terminating

    def _admit(self, msg: list[bytes]) -> tuple[bool, str]:
        if len(msg) < 6 or msg[0] != b"1.0":
            return False, "bad ZAP request"
        domain, address, mechanism = (m.decode("utf-8", "replace") for m in (msg[2], msg[3],
                                                                            msg[5]))
        door = self.doors.get(domain)
        credentials = msg[6:]
        if door is None or mechanism != door.mechanism:
            return False, "not this socket's mechanism"
        if mechanism == "CURVE" and len(credentials) == 1:
            from zmq.utils import z85
            key = z85.encode(credentials[0])
            if door.curve_key and hmac.compare_digest(key, door.curve_key.encode()):
                return True, "OK"
            self.refusals.warning(f"{address}/{door.who}", "key", "refused a peer from %s on "
                                  "the %s socket: its CurveZMQ public key %s... is not the "
                                  "cluster's %s key", address, door.who,
                                  key[:8].decode(errors="replace"), door.who)
            return False, "unknown key"
        if mechanism == "PLAIN" and len(credentials) == 2:
            if door.password and hmac.compare_digest(credentials[1], door.password.encode()):
                return True, "OK"
            self.refusals.warning(f"{address}/{door.who}", "password", "refused a peer from "
                                  "%s on the %s socket: wrong or missing %s", address, door.who,
                                  "token" if door.who == "client" else "worker secret")
            return False, "wrong password"
        return False, "bad credentials"


class Gate:
    """The scheduler side: a ZAP authenticator on ``ctx`` for the doors of its sockets, and a
    log line for each peer refused during a handshake.

    Make it before binding, ``serve`` each server socket with its door before it binds, and
    ``close`` it before ``ctx.term()``."""

    def __init__(self, ctx: zmq.Context, server_secret: str | None, doors: list[Door]):
        self.server_secret = server_secret
        self._refusals = PeerLog(log, REFUSAL_REPORT_S)
        self._auth = _Keeper(ctx, {d.domain: d for d in doors}, self._refusals)
        self._auth.start()
        self._watched: list[tuple[zmq.Socket, threading.Thread]] = []  # (stop line, watcher)

    def serve(self, sock: zmq.Socket, door: Door) -> None:
        """The door's server options on ``sock``, and log its refused handshakes (before
        bind)."""
        if door.curve_key is not None:
            if self.server_secret is None:
                raise ValueError("a CURVE door needs the server's secret key")
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self.server_secret.encode())
        elif door.password is not None:
            sock.setsockopt(zmq.PLAIN_SERVER, 1)
        else:
            return  # open: no ZAP request, no handshake to fail
        sock.setsockopt(zmq.ZAP_DOMAIN, door.domain.encode())
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        # Closing a socket does not end its monitor at once, so each watcher has a stop line.
        stop_addr = f"inproc://fanout-gate-{id(self)}-{len(self._watched)}"
        stop = sock.context.socket(zmq.PAIR)
        stop.bind(stop_addr)
        listen = sock.context.socket(zmq.PAIR)
        listen.connect(stop_addr)
        thread = threading.Thread(target=self._watch, args=(monitor, listen, door), daemon=True,
                                  name="fanout-handshakes")
        thread.start()
        self._watched.append((stop, thread))

    def _watch(self, monitor: zmq.Socket, stop: zmq.Socket, door: Door) -> None:
        poller = zmq.Poller()
        poller.register(monitor, zmq.POLLIN)
        poller.register(stop, zmq.POLLIN)
        uses, lacks = {"CURVE": ("CurveZMQ", "the cluster's keys"),
                       "PLAIN": ("a token (ZMQ PLAIN)", "the token")}[door.mechanism]
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
                    self._refusals.warning(f"{where}/mechanism", "mechanism", "refused a peer "
                                           "on %s: it does not use %s (a %s without %s?)",
                                           where, uses, door.who, lacks)
                else:
                    self._refusals.warning(f"{where}/protocol", "protocol", "refused a peer "
                                           "on %s: its %s handshake failed (protocol error "
                                           "%#x)", where, door.mechanism, int(event["value"]))
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


def doors(keys: CurveKeys | None, token: str | None, worker_token: str) -> tuple[Door, Door]:
    """The client socket's door and the worker socket's: keys if the cluster has them, else
    the token (the client door stays open without one), else the workers' secret."""
    if keys is not None:
        return (Door(CLIENT_DOMAIN, curve_key=keys.client_public, who="client"),
                Door(WORKER_DOMAIN, curve_key=keys.worker_public, who="worker"))
    return (Door(CLIENT_DOMAIN, password=token, who="client"),
            Door(WORKER_DOMAIN, password=worker_token, who="worker"))
