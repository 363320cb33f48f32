"""CurveZMQ key files: the check of their contents, reading, writing (mode 0600).

Key material is never echoed in an error. Generating keys needs libzmq and lives in
``runtime.wire.security``.
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


def check_keys(where: str, data: Any) -> CurveKeys:
    """The keys in ``data`` (a key file's JSON), or ``ConfigError`` naming ``where``."""
    if not (isinstance(data, dict) and set(data) == set(KEY_NAMES)
            and all(isinstance(data[k], str) and Z85_KEY_RE.fullmatch(data[k])
                    for k in KEY_NAMES)):
        raise ConfigError(f"{where}: must hold {', '.join(KEY_NAMES)}, each 40 Z85 characters; "
                          "write a key file with `fanout keys FILE`")
    return CurveKeys(**{k: data[k] for k in KEY_NAMES})


def write_keys(path: str | os.PathLike[str], keys: CurveKeys, *, overwrite: bool = False) -> Path:
    """Write a key file readable by its owner only (0600); an existing file is kept unless
    ``overwrite``. Returns the absolute path."""
    path = Path(path).expanduser().absolute()
    text = json.dumps(dataclasses.asdict(keys), indent=2) + "\n"
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


def read_keys(path: str | os.PathLike[str]) -> CurveKeys:
    """The keys in a key file; ConfigError naming the file (never the key material)."""
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
    return check_keys(f"{label}: key file", data)


def resolve_keys(keys: CurveKeys | str | os.PathLike[str] | None) -> CurveKeys | None:
    """``keys`` as given to a client: the keys, a key file's path, or None."""
    if keys is None or isinstance(keys, CurveKeys):
        return keys
    if isinstance(keys, (str, os.PathLike)):
        return read_keys(keys)
    raise ConfigError(f"keys must be CurveKeys or the path of a key file, got "
                      f"{type(keys).__name__}")
