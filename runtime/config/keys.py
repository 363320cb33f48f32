"""CurveZMQ key files: the check of their contents, reading, writing (mode 0600).

A file holds the keys of one party (``CurveKeys.role``): the cluster's (every key), a
client's, or a worker's. Key material is never echoed in an error. Generating keys needs
libzmq and lives in ``runtime.wire.security``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .schema import CurveKeys

Z85_KEY_RE = re.compile(r"[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")
KEY_NAMES = tuple(f.name for f in fields(CurveKeys))
# The keys each kind of file holds: exactly these (the cluster's worker pair may be missing:
# files written before there was one; the scheduler then makes one at start).
ROLE_KEYS: dict[str, frozenset[str]] = {
    "cluster": frozenset(KEY_NAMES),
    "client": frozenset({"server_public", "client_public", "client_secret"}),
    "worker": frozenset({"server_public", "worker_public", "worker_secret"}),
}
_OLD_CLUSTER = ROLE_KEYS["cluster"] - {"worker_public", "worker_secret"}
CLIENT_FILE_SUFFIX = ".client"
WORKER_FILE_SUFFIX = ".worker"


def check_keys(where: str, data: Any, roles: tuple[str, ...] = ("cluster", "client",
                                                                "worker")) -> CurveKeys:
    """The keys in ``data`` (a key file's JSON) if they are a whole cluster, client or worker
    set of one of ``roles``; else ``ConfigError`` naming ``where``."""
    if isinstance(data, dict):  # a part as plain data names the keys it lacks as None
        data = {k: v for k, v in data.items() if v is not None}
    names = set(data) if isinstance(data, dict) else set()
    role = next((r for r, need in ROLE_KEYS.items() if names == need), None)
    if role is None and names == _OLD_CLUSTER:
        role = "cluster"
    if role is None or not all(isinstance(data[k], str) and Z85_KEY_RE.fullmatch(data[k])
                               for k in names):
        raise ConfigError(f"{where}: must hold the keys of a cluster ({', '.join(KEY_NAMES)}), "
                          f"a client (server_public, client_public, client_secret) or a "
                          f"worker, each 40 Z85 characters; write a key file with "
                          f"`fanout keys FILE`")
    if role not in roles:
        raise ConfigError(f"{where}: holds a {role}'s keys; {_ROLE_ADVICE[roles[0]]}")
    return CurveKeys(**{k: data[k] for k in names})


_ROLE_ADVICE = {
    "cluster": "a scheduler needs the cluster's key file (the one `fanout keys FILE` wrote as "
               "FILE), which holds its secret key",
    "client": f"a client needs the client key file (`fanout keys FILE` writes it as "
              f"FILE{CLIENT_FILE_SUFFIX}) or the cluster's",
}


def write_keys(path: str | os.PathLike[str], keys: CurveKeys, *, overwrite: bool = False) -> Path:
    """Write a key file readable by its owner only (0600); an existing file is kept unless
    ``overwrite``. Returns the absolute path."""
    path = Path(path).expanduser().absolute()
    text = json.dumps({k: v for k, v in dataclasses.asdict(keys).items() if v is not None},
                      indent=2) + "\n"
    try:
        if not overwrite:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_fd(fd, text)
            except BaseException:
                path.unlink()  # no half-written key file left to be mistaken for a good one
                raise
            return path
        # A new file renamed over the old: never a moment with half a file or looser modes.
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            _write_fd(fd, text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return path
    except FileExistsError:
        raise ConfigError(f"{path}: a key file is already there; replace it with `fanout keys "
                          f"--force` (clients holding the old keys will then be refused)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the key file: {exc.strerror or exc}") from None


def _write_fd(fd: int, text: str) -> None:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(f.fileno(), 0o600)  # mkstemp and umask may differ; the mode is the point
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read_keys(path: str | os.PathLike[str],
              roles: tuple[str, ...] = ("cluster", "client", "worker")) -> CurveKeys:
    """The keys in a key file, of one of ``roles``; ConfigError naming the file (never the
    key material)."""
    label = os.fspath(Path(path).expanduser())
    try:
        with open(label, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{label}: cannot read the key file ({detail}); write one with "
                          f"`fanout keys {label}`") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return check_keys(f"{label}: key file", data, roles)


def resolve_keys(keys: CurveKeys | str | os.PathLike[str] | None) -> CurveKeys | None:
    """``keys`` as given to a client: the keys, a key file's path, or None; only the client
    part of them is kept (a client never needs, so never holds, the others' secrets)."""
    if isinstance(keys, CurveKeys):
        if keys.client_secret is None:
            raise ConfigError(f"these keys are a {keys.role}'s; {_ROLE_ADVICE['client']}")
        return keys.for_clients()
    if keys is None:
        return None
    if isinstance(keys, (str, os.PathLike)):
        return read_keys(keys, ("client", "cluster")).for_clients()
    raise ConfigError(f"keys must be CurveKeys or the path of a key file, got "
                      f"{type(keys).__name__}")
