"""Finding and downloading one pinned wheel from a package index, with the standard library.

No pip needed (uv's venvs have none): the index's simple API (PEP 691 JSON, else the PEP 503
HTML page) lists the files; the wheel is streamed to disk with progress lines and checked
against the pinned sha256. The indexes are pip's own (``PIP_INDEX_URL``,
``PIP_EXTRA_INDEX_URL``, pip.conf) or uv's (``UV_INDEX_URL``, ``UV_DEFAULT_INDEX``), else
PyPI, so a mirror configured for the installs also serves the models.
"""
from __future__ import annotations

import configparser
import hashlib
import html.parser
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import env
from ..errors import ConfigError

PYPI = "https://pypi.org/simple"
TIMEOUT_S = 60.0  # per network read; a stalled download fails instead of hanging
PROGRESS_EVERY_S = 1.0
CHUNK = 1 << 20
SIMPLE_JSON = "application/vnd.pypi.simple.v1+json"

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Wheel:
    """A file the index lists: where it is, and what it says of it."""

    filename: str
    url: str
    sha256: str | None
    size: int | None


def normalize(name: str) -> str:
    """A project name as the simple API spells it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def indexes() -> list[str]:
    """The package indexes to ask, in order: the configured main index, then the extras."""
    main, extra = env.package_index_urls()
    conf = _pip_conf()
    main = main or conf.get("index-url") or PYPI
    extra = extra or conf.get("extra-index-url", "")
    urls = [main] + [u for u in extra.split() if u]
    return list(dict.fromkeys(u.rstrip("/") for u in urls))


def _pip_conf() -> dict[str, str]:
    """The [global] settings of pip's config files (later files win, as in pip)."""
    files = [Path("/etc/xdg/pip/pip.conf"), Path("/etc/pip.conf"),
             Path.home() / ".pip" / "pip.conf", Path.home() / ".config" / "pip" / "pip.conf",
             Path(sys.prefix) / "pip.conf"]
    if sys.platform == "win32":
        files = [Path(os.environ.get("PROGRAMDATA", "C:/ProgramData")) / "pip" / "pip.ini",
                 Path(os.environ.get("APPDATA", "")) / "pip" / "pip.ini",
                 Path(sys.prefix) / "pip.ini"]
    override = env.get("PIP_CONFIG_FILE")
    if override:
        files.append(Path(override))
    parser = configparser.ConfigParser()
    for f in files:
        try:
            parser.read(f, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue  # pip would complain about a broken file; we just ask the next index
    return dict(parser["global"]) if parser.has_section("global") else {}


def find(package: str, version: str, index: str) -> Wheel:
    """The pure-Python wheel of ``package==version`` on ``index`` (``ConfigError`` if none)."""
    page = f"{index}/{normalize(package)}/"
    try:
        body, kind, base = _get(page, SIMPLE_JSON)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{page}: {_why(exc)}") from None
    files = _files_json(body, base) if kind.startswith(SIMPLE_JSON) else _files_html(body, base)
    project = "[-_.]".join(re.escape(part) for part in normalize(package).split("-"))
    want = re.compile(rf"{project}-{re.escape(version)}-.*\.whl", re.IGNORECASE)
    for wheel in files:
        if want.fullmatch(wheel.filename):
            return wheel
    raise ConfigError(f"{page}: no wheel of {package} {version} listed "
                      f"({len(files)} files for the project)")


def _get(url: str, accept: str) -> tuple[bytes, str, str]:
    if url.startswith("file:"):
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        if path.is_dir():
            path = path / "index.html"
        return path.read_bytes(), "text/html", path.parent.as_uri() + "/"
    request = urllib.request.Request(url, headers={"Accept": f"{accept}, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as r:  # noqa: S310 - an index URL
        return r.read(), r.headers.get("Content-Type", ""), r.geturl()


def _files_json(body: bytes, base: str) -> list[Wheel]:
    data = json.loads(body)
    return [Wheel(f["filename"], urllib.parse.urljoin(base, f["url"]),
                  (f.get("hashes") or {}).get("sha256"), f.get("size"))
            for f in data.get("files", []) if isinstance(f, dict) and "filename" in f]


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((self._href, data.strip()))
            self._href = None


def _files_html(body: bytes, base: str) -> list[Wheel]:
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    out = []
    for href, text in parser.links:
        url, _, fragment = urllib.parse.urljoin(base, href).partition("#")
        digest = fragment[len("sha256="):] if fragment.startswith("sha256=") else None
        name = text or urllib.parse.unquote(url.rsplit("/", 1)[-1])
        out.append(Wheel(name, url, digest, None))
    return out


def download(wheel: Wheel, dest: Path, sha256: str | None, say: ProgressFn) -> Path:
    """Stream ``wheel`` into ``dest`` (a folder), saying how far it got about once a second;
    the file's sha256 must be ``sha256`` (pinned) or, if None, the one the index lists."""
    expected = sha256 or wheel.sha256
    target = dest / wheel.filename
    digest = hashlib.sha256()
    started = last = time.monotonic()
    done = 0
    try:
        if wheel.url.startswith("file:"):
            src = open(urllib.request.url2pathname(urllib.parse.urlparse(wheel.url).path), "rb")
            total = wheel.size
        else:
            src = urllib.request.urlopen(wheel.url, timeout=TIMEOUT_S)  # noqa: S310
            total = wheel.size or int(src.headers.get("Content-Length") or 0) or None
        with src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY_S:
                    last = now
                    say(_progress(wheel.filename, done, total, now - started))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"downloading {wheel.url} failed after {done} bytes: "
                          f"{_why(exc)}") from None
    say(_progress(wheel.filename, done, total, time.monotonic() - started))
    if expected and digest.hexdigest() != expected:
        target.unlink()
        raise ConfigError(f"{wheel.filename}: sha256 {digest.hexdigest()} is not the expected "
                          f"{expected}; the index served another file (a broken mirror?)")
    return target


def _progress(name: str, done: int, total: int | None, elapsed: float) -> str:
    rate = done / elapsed / 1e6 if elapsed > 0 else 0.0
    of = f" of {total / 1e6:.1f} MB ({100 * done / total:.0f}%)" if total else " MB"
    return f"  {name}: {done / 1e6:.1f}{of}, {rate:.1f} MB/s"


def _why(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        return f"{exc.reason}"
    return f"{type(exc).__name__}: {exc}"
