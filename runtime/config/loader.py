"""Loading a config: YAML in, the dataclasses of ``schema.py`` out, every error at once.

Validation errors are ``ConfigError`` and quote the file, the field path and the bad value.
The environment is read here (from the mapping the caller passes), through one override
helper (``_Parser.overridden``: the file's value unless an env var is set, and which it was),
and in ``runtime.env``; nowhere else. Key files are read by ``keys.read_keys`` only.
"""
from __future__ import annotations

import difflib
import importlib.resources
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..env import ENV_ADDRESS, ENV_API_KEY, ENV_HOME, ENV_KEYS, ENV_TOKEN
from ..errors import ConfigError
from .keys import check_keys, read_keys
from .schema import (
    ADDRESS_FORMS,
    AUTO_DEVICES,
    BACKENDS,
    DEVICE_KINDS,
    LAUNCHERS,
    LLM_BATCH_CAPACITY,
    PACKAGED_PREFIX,
    ClusterConfig,
    Config,
    CurveKeys,
    DeviceConfig,
    FaultConfig,
    HttpConfig,
    ModelConfig,
    SchedulerConfig,
    is_loopback,
    split_address,
)

log = logging.getLogger("fanout.config")


DiscoverFn = Callable[[], "list[dict[str, Any]]"]

_NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")
_MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MISSING = object()


@dataclass(frozen=True)
class Sourced:
    """A config value and where it came from: the field, or the env var that overrode it."""

    value: Any
    where: str  # "scheduler.token" or "scheduler.token (from env FANOUT_TOKEN)"
    from_env: bool

_TOP_KEYS = ("cluster", "scheduler", "http", "devices", "models", "model_cache")
_DEVICE_KEYS = tuple(f.name for f in fields(DeviceConfig))
_MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))
_FAULT_KEYS = tuple(f.name for f in fields(FaultConfig))
_SCHEDULER_KEYS = tuple(f.name for f in fields(SchedulerConfig))
# Which backend can drive which kind of device; anything else would silently run elsewhere.
_BACKEND_KINDS = {"qnn": ("npu", "gpu"), "onnxruntime": ("cpu",),
                  "openvino": DEVICE_KINDS, "openvino-genai": DEVICE_KINDS}
# http field -> (type, low, high), besides max_body_bytes
_HTTP_BOUNDS: dict[str, tuple[type, float, float]] = {
    "max_generations": (int, 1, 4096),
    "max_connections": (int, 1, 65536),
    "header_timeout_s": (float, 0.1, 3600.0),
    "body_timeout_s": (float, 0.1, 3600.0),
}
# scheduler field -> (type, low, high); addresses and token are checked on their own.
_SCHEDULER_BOUNDS: dict[str, tuple[type, float, float]] = {
    "max_queue": (int, 1, 1_000_000),
    "max_queue_bytes": (int, 1024 ** 2, 1024 ** 4),
    "max_client_share": (float, 0.01, 1.0),
    "max_client_backlog_bytes": (int, 1024, 1024 ** 4),
    "task_timeout_s": (float, 0.1, 86400.0),
    "max_task_timeout_s": (float, 1.0, 604800.0),
    "heartbeat_interval_s": (float, 0.05, 10.0),
    "heartbeat_timeout_s": (float, 0.1, 3600.0),
    "load_timeout_s": (float, 0.1, 86400.0),
    "max_attempts": (int, 1, 32),
    "breaker_threshold": (int, 1, 1000),
    "breaker_cooldown_s": (float, 0.0, 3600.0),
    "restart_backoff_s": (float, 0.01, 30.0),
    "max_message_bytes": (int, 1024, 4 * 1024 ** 3),
}


def load_config(path: str | os.PathLike[str] | None = None, *,
                env: Mapping[str, str] | None = None,
                discover: DiscoverFn | None = None) -> Config:
    """Read, validate and resolve a config file (None = the embedded ``configs/local.yaml``).

    env: the environment to read FANOUT_TOKEN, FANOUT_HOME and FANOUT_ADDRESS from
      (default ``os.environ``); the only place the runtime reads the environment.
    discover: returns this machine's devices for ``devices: auto`` (the launchers pass
      ``runtime.backends.discovery.discover``; without it ``auto`` is a ConfigError).
    Raises ConfigError naming the file, the field path and the bad value.
    """
    if path is None:
        resource = importlib.resources.files("runtime") / "configs" / "local.yaml"
        label = str(resource)
        base_dir = os.path.dirname(os.path.abspath(label)) if isinstance(resource, Path) else None
        try:
            text = resource.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read the embedded default config: {exc}") from exc
    else:
        label = os.fspath(path)
        base_dir = os.path.dirname(os.path.abspath(label))
        try:
            with open(label, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{label}: cannot read config file: {exc}") from exc
    raw = _parse_yaml(text, label)
    env = os.environ if env is None else env
    return _Parser(label, base_dir, env, discover, from_dict=False).parse(raw)


def load_cluster_section(path: str | os.PathLike[str] | None = None, *,
                         env: Mapping[str, str] | None = None) -> ClusterConfig:
    """Only the ``cluster`` section of a config file: what a launcher needs before it can
    resolve the rest (under Ray, ``devices: auto`` is discovered on the cluster's nodes)."""
    if path is None:
        return ClusterConfig()
    label = os.fspath(path)
    try:
        with open(label, encoding="utf-8") as f:
            raw = _parse_yaml(f.read(), label)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label}: cannot read config file: {exc}") from exc
    parser = _Parser(label, os.path.dirname(os.path.abspath(label)),
                     os.environ if env is None else env, None, from_dict=False)
    section = raw.get("cluster", {}) if isinstance(raw, Mapping) else {}
    cluster = parser.cluster(section)
    if parser.errors or cluster is None:
        raise ConfigError("\n".join(parser.errors))
    return cluster


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """The inverse of ``config_to_dict``: validated again, but neither env nor paths are
    re-resolved."""
    label = d.get("source") if isinstance(d, Mapping) else None
    label = label if isinstance(label, str) else "<config dict>"
    return _Parser(label, None, {}, None, from_dict=True).parse(d)


# -- YAML ---------------------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not last-one-wins."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:
            continue  # unhashable key: construct_mapping reports it
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r}", key_node.start_mark)
    return loader.construct_mapping(node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _parse_yaml(text: str, label: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{context}: {problem}" if context else problem
        raise ConfigError(f"{label}: {where}invalid YAML: {detail}") from None


# -- validation ---------------------------------------------------------------------------------

def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _plain(value: Any) -> bool:
    """Data that survives msgpack/JSON unchanged (no dates, sets, tuples or non-string keys)."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt_num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


class _Parser:
    """One pass over a raw mapping: collects every error, then builds the dataclasses."""

    def __init__(self, label: str, base_dir: str | None, env: Mapping[str, str],
                 discover: DiscoverFn | None, *, from_dict: bool) -> None:
        self.label = label
        self.base_dir = base_dir
        self.env = env
        self.discover = discover
        self.from_dict = from_dict
        self.errors: list[str] = []
        self.auto = False

    def error(self, path: str, message: str, value: Any = _MISSING) -> None:
        got = "" if value is _MISSING else f", got {_show(value)}"
        self.errors.append(f"{self.label}: {path}: {message}{got}")

    def parse(self, raw: Any) -> Config:
        if raw is None:
            raise ConfigError(f"{self.label}: the config is empty; it needs at least 'devices'")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{self.label}: the config must be a mapping with keys "
                              f"{', '.join(_TOP_KEYS)}, got {_show(raw)}")
        allowed = _TOP_KEYS + (("source",) if self.from_dict else ())
        self.keys("", raw, allowed, required=("devices",))
        scheduler = self.scheduler(raw.get("scheduler", {}))
        devices = self.devices(raw.get("devices", _MISSING))
        models = self.models(raw.get("models", []))
        model_cache = self.model_cache(raw)
        http = self.http(raw.get("http", {}))
        cluster = self.cluster(raw.get("cluster", {}))
        if devices is not None and models is not None:
            self.cross_check(devices, models)
            if self.auto:
                models = [m for m in models if m.devices or not self._listed.get(m.name)]
        if self.errors:
            raise ConfigError("\n".join(self.errors))
        assert scheduler is not None and devices is not None and models is not None
        assert http is not None and cluster is not None
        return Config(devices=devices, models=models, scheduler=scheduler, http=http,
                      cluster=cluster, model_cache=model_cache, source=self.label)

    # -- generic checks: each returns the accepted value, or None after recording an error --

    def keys(self, path: str, d: Mapping[str, Any], allowed: tuple[str, ...],
             required: tuple[str, ...] = ()) -> None:
        where = path or "(top level)"
        for key in d:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                did = f"did you mean {hint[0]!r}? " if hint else ""
                self.error(where, f"unknown key {_show(key)} ({did}allowed: {', '.join(allowed)})")
        for key in required:
            if key not in d:
                self.error(where, f"missing required key {key!r}")

    def mapping(self, path: str, v: Any) -> Mapping[str, Any] | None:
        if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
            return v
        self.error(path, "must be a mapping with string keys", v)
        return None

    def integer(self, path: str, v: Any, lo: int, hi: int) -> int | None:
        if _is_int(v) and lo <= v <= hi:
            return int(v)
        self.error(path, f"must be an integer {lo}..{hi}", v)
        return None

    def number(self, path: str, v: Any, lo: float, hi: float) -> float | None:
        if _is_number(v) and lo <= v <= hi:
            return float(v)
        self.error(path, f"must be a number {_fmt_num(lo)}..{_fmt_num(hi)}", v)
        return None

    def string(self, path: str, v: Any, what: str = "a non-empty string") -> str | None:
        if isinstance(v, str) and v.strip():
            return v
        self.error(path, f"must be {what}", v)
        return None

    def boolean(self, path: str, v: Any) -> bool | None:
        if isinstance(v, bool):
            return v
        self.error(path, "must be true or false", v)
        return None

    def name_list(self, path: str, v: Any, pattern: re.Pattern[str], what: str) -> list[str] | None:
        if not isinstance(v, list):
            self.error(path, f"must be a list of {what} names", v)
            return None
        ok = True
        for i, item in enumerate(v):
            if not (isinstance(item, str) and pattern.fullmatch(item)):
                self.error(f"{path}[{i}]", f"must be a {what} name", item)
                ok = False
            elif item in v[:i]:
                self.error(f"{path}[{i}]", f"{what} listed twice", item)
                ok = False
        return list(v) if ok else None

    def plain_options(self, path: str, v: Any) -> dict[str, Any] | None:
        d = self.mapping(path, v)
        if d is None:
            return None
        ok = True
        for key, value in d.items():
            if not _plain(value):
                self.error(f"{path}.{key}", "must be plain data (strings, numbers, booleans, "
                           "null, lists, mappings with string keys)", value)
                ok = False
        return dict(d) if ok else None

    def overridden(self, section: str, d: Mapping, key: str, env_name: str | None,
                   default: Any = None) -> Sourced:
        """``key`` of the section ``d`` (or ``default``), unless the env var ``env_name`` is
        set; with where it came from, for error messages."""
        path = f"{section}.{key}" if section else key
        if env_name is not None and self.env.get(env_name):
            return Sourced(self.env[env_name], f"{path} (from env {env_name})", True)
        return Sourced(d.get(key, default), path, False)

    def address(self, where: str, v: Any) -> tuple[str, str | None] | None:
        """(address, host) with host None for ipc://."""
        parsed = split_address(v)
        if parsed is None:
            self.error(where, f"must be {ADDRESS_FORMS}", v)
        return parsed

    # -- sections -------------------------------------------------------------------------------

    def scheduler(self, raw: Any) -> SchedulerConfig | None:
        d = self.mapping("scheduler", raw)
        if d is None:
            return None
        self.keys("scheduler", d, _SCHEDULER_KEYS)
        values: dict[str, Any] = {}
        ok = True
        for key, (kind, lo, hi) in _SCHEDULER_BOUNDS.items():
            if key in d:
                check = self.integer if kind is int else self.number
                value = check(f"scheduler.{key}", d[key], lo, hi)  # type: ignore[arg-type]
                ok = ok and value is not None
                values[key] = value
        defaults = SchedulerConfig()
        interval = values.get("heartbeat_interval_s", defaults.heartbeat_interval_s)
        timeout = values.get("heartbeat_timeout_s", defaults.heartbeat_timeout_s)
        if interval is not None and timeout is not None and not timeout > 2 * interval:
            self.error("scheduler.heartbeat_timeout_s", "must be greater than 2 * "
                       f"heartbeat_interval_s = {_fmt_num(2 * interval)}", timeout)
            ok = False

        queue_bytes = values.get("max_queue_bytes", defaults.max_queue_bytes)
        message_bytes = values.get("max_message_bytes", defaults.max_message_bytes)
        if queue_bytes is not None and message_bytes is not None \
                and queue_bytes < message_bytes:
            where = "max_queue_bytes" if "max_queue_bytes" in d else "max_message_bytes"
            self.error(f"scheduler.{where}", f"max_queue_bytes must be at least "
                       f"max_message_bytes = {message_bytes} (a task that could never be "
                       f"queued)", d.get(where, queue_bytes))
            ok = False

        default_s = values.get("task_timeout_s", defaults.task_timeout_s)
        longest = values.get("max_task_timeout_s", defaults.max_task_timeout_s)
        if default_s is not None and longest is not None and default_s > longest:
            self.error("scheduler.task_timeout_s", "must be at most max_task_timeout_s = "
                       f"{_fmt_num(longest)}", default_s)
            ok = False

        token = self.secret(self.overridden("scheduler", d, "token", ENV_TOKEN))
        ok = ok and token is not _MISSING
        values["token"] = token = None if token is _MISSING else token
        if "worker_token" in d:  # the scheduler makes it for its workers' configs
            if not self.from_dict:
                self.error("scheduler.worker_token", "is made by the scheduler at every start; "
                           "remove it from the config file")
                ok = False
            else:
                worker_token = self.secret(Sourced(d["worker_token"],
                                                   "scheduler.worker_token", False))
                ok = ok and worker_token is not _MISSING
                values["worker_token"] = None if worker_token is _MISSING else worker_token

        for key in ("address", "worker_address"):
            address = self.overridden("scheduler", d, key,
                                      ENV_ADDRESS if key == "address" else None,
                                      getattr(defaults, key))
            parsed = self.address(address.where, address.value)
            if parsed is None:
                ok = False
                continue
            values[key], host = parsed
            # A worker's config (it has the worker token) binds nothing: no token to need.
            if host is not None and not is_loopback(host) and token is None \
                    and values.get("worker_token") is None:
                self.error(address.where, f"binds non-loopback host {host} and so needs a "
                           f"token: set scheduler.token or env {ENV_TOKEN}", address.value)
                ok = False
        return SchedulerConfig(**values) if ok else None

    def http(self, raw: Any) -> HttpConfig | None:
        d = self.mapping("http", raw)
        if d is None:
            return None
        self.keys("http", d, tuple(f.name for f in fields(HttpConfig)))
        defaults = HttpConfig()
        ok = True
        enabled = d.get("enabled", defaults.enabled)
        if not isinstance(enabled, bool):
            self.error("http.enabled", "must be true or false", enabled)
            ok = False
        size = self.integer("http.max_body_bytes", d.get("max_body_bytes",
                                                          defaults.max_body_bytes),
                            1024, 1 << 30)
        bounds = {name: self.integer(f"http.{name}", d.get(name, getattr(defaults, name)),
                                     int(lo), int(hi)) if kind is int else
                  self.number(f"http.{name}", d.get(name, getattr(defaults, name)), lo, hi)
                  for name, (kind, lo, hi) in _HTTP_BOUNDS.items()}
        ok = ok and None not in bounds.values()
        key = self.secret(self.overridden("http", d, "api_key", ENV_API_KEY))
        ok = ok and key is not _MISSING
        key = None if key is _MISSING else key
        address = d.get("address", defaults.address)
        m = re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+|\*):(\d{1,5})", address) \
            if isinstance(address, str) else None
        if m is None or int(m.group(2)) > 65535:
            self.error("http.address", "must be HOST:PORT (port 0..65535)", address)
            ok = False
        elif enabled and key is None and not is_loopback(m.group(1).strip("[]")):
            self.error("http.address", f"binds non-loopback host {m.group(1)} and so needs an "
                       f"API key: set http.api_key or env {ENV_API_KEY}", address)
            ok = False
        if size is None or not ok:
            return None
        return HttpConfig(address=address, api_key=key, enabled=enabled, max_body_bytes=size,
                          **bounds)  # type: ignore[arg-type]  # each checked for its type

    def cluster(self, raw: Any) -> ClusterConfig | None:
        d = self.mapping("cluster", raw)
        if d is None:
            return None
        self.keys("cluster", d, tuple(f.name for f in fields(ClusterConfig)))
        before = len(self.errors)
        launcher = d.get("launcher", "local")
        if launcher not in LAUNCHERS:
            self.error("cluster.launcher", f"must be one of {', '.join(LAUNCHERS)}", launcher)
        address = d.get("address")
        if address is not None and not (isinstance(address, str) and (
                address in ("auto", "local") or address.startswith("ray://")
                or re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}", address))):
            self.error("cluster.address", "must be auto, local, ray://HOST:PORT or HOST:PORT",
                       address)
        name = d.get("name", ClusterConfig.name)
        if not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
            self.error("cluster.name", "must match [a-z0-9_-]{1,32}", name)
        sourced = self.overridden("cluster", d, "keys", ENV_KEYS)
        keys, where = sourced.value, sourced.where
        parsed_keys = None
        if isinstance(keys, Mapping) and self.from_dict:
            parsed_keys = self.curve_keys(where, keys)  # a scheduler's, or a worker's part
        elif keys is not None:
            path = self.string(where, keys, "the path of a key file")
            if path is not None:
                try:
                    parsed_keys = read_keys(self.path(path), ("cluster",))
                except ConfigError as exc:  # names the file, never the key material
                    self.errors.append(f"{self.label}: {where}: {exc.message}")
        if len(self.errors) > before:
            return None
        return ClusterConfig(launcher=launcher, address=address, name=name, keys=parsed_keys)

    def secret(self, sourced: Sourced) -> Any:
        """A token or API key: None, a non-empty string, or _MISSING after an error that
        names only its type (a secret is never echoed)."""
        value = sourced.value
        if value is not None and not (isinstance(value, str) and value.strip()):
            self.error(sourced.where, f"must be a non-empty string, got a {type(value).__name__}")
            return _MISSING
        return value

    def curve_keys(self, where: str, data: Any) -> CurveKeys | None:
        try:
            return check_keys(where, data, ("cluster", "worker"))
        except ConfigError as exc:  # its message names ``where`` and never the key material
            self.errors.append(f"{self.label}: {exc.message}")
            return None

    def path(self, value: str) -> str:
        """A path from the file, relative to the file's folder (from a dict: as resolved)."""
        if self.base_dir is None:
            return value
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def devices(self, raw: Any) -> list[DeviceConfig] | None:
        if raw is _MISSING:
            return None  # reported by keys()
        path = "devices"
        if raw == AUTO_DEVICES and not self.from_dict:
            self.auto = True
            raw = self.run_discover()
            if raw is None:
                return None
            path = "devices (auto)"
        if not isinstance(raw, list) or not raw:
            self.error(path, f"must be a non-empty list of devices or {AUTO_DEVICES!r}", raw)
            return None
        parsed = [self.device(f"{path}[{i}]", item) for i, item in enumerate(raw)]
        return self.unique_names(path, parsed, "device")

    def unique_names(self, path: str, parsed: list, what: str) -> list | None:
        """The parsed items, or None if any failed to parse or a name repeats (each reported)."""
        seen: dict[str, int] = {}
        for i, item in enumerate(parsed):
            if item is None:
                continue
            if item.name in seen:
                self.error(f"{path}[{i}].name",
                           f"duplicate {what} name (also {path}[{seen[item.name]}])", item.name)
            seen.setdefault(item.name, i)
        if any(item is None for item in parsed) or len(seen) != len(parsed):
            return None
        return parsed

    def run_discover(self) -> list[Any] | None:
        if self.discover is None:  # the config layer does not import the engines
            self.error("devices", "device discovery is not available here; load the config "
                       "through runtime.start() or `fanout up`, or list the devices",
                       AUTO_DEVICES)
            return None
        try:
            return list(self.discover())
        except Exception as exc:  # any failure of discovery is a config the runtime cannot use
            self.error("devices", f"device discovery failed: {type(exc).__name__}: {exc}",
                       AUTO_DEVICES)
            return None

    def device(self, path: str, raw: Any) -> DeviceConfig | None:
        d = self.mapping(path, raw)
        if d is None:
            return None
        before = len(self.errors)
        self.keys(path, d, _DEVICE_KEYS, required=("name", "kind", "backend"))
        name, kind, backend = d.get("name"), d.get("kind"), d.get("backend")
        if "name" in d and not (isinstance(name, str) and _NAME_RE.fullmatch(name)):
            self.error(f"{path}.name", "must match [a-z0-9_-]{1,32}", name)
        if "kind" in d and kind not in DEVICE_KINDS:
            self.error(f"{path}.kind", f"must be one of {', '.join(DEVICE_KINDS)}", kind)
        if "backend" in d and backend not in BACKENDS:
            self.error(f"{path}.backend", f"must be one of {', '.join(BACKENDS)}", backend)
        elif backend in BACKENDS and kind in DEVICE_KINDS and kind not in _BACKEND_KINDS[backend]:
            self.error(f"{path}.kind", f"backend {backend} drives only "
                       f"{' or '.join(_BACKEND_KINDS[backend])} devices", kind)
        fallback = self.name_list(f"{path}.fallback", d.get("fallback", []), _NAME_RE, "device")
        options = self.plain_options(f"{path}.options", d.get("options", {}))
        batches = (backend == "openvino-genai" and kind in ("cpu", "gpu") and
                   (options or {}).get("continuous_batching", True) is not False)
        capacity = self.integer(f"{path}.capacity",
                                d.get("capacity", LLM_BATCH_CAPACITY if batches else 1), 1, 256)
        prefetch = d.get("prefetch")
        if prefetch is not None:
            prefetch = self.integer(f"{path}.prefetch", prefetch, 0, 4096)
        if backend in ("openvino", "openvino-genai") and options and "device" in options:
            self.string(f"{path}.options.device", options["device"], "an OpenVINO device name")
        faults = self.faults(f"{path}.faults", d["faults"]) if d.get("faults") is not None else None
        resources = self.resources(f"{path}.resources", d.get("resources", {}))
        per_node = self.boolean(f"{path}.per_node", d.get("per_node", False))
        if len(self.errors) > before:
            return None
        # Each check returned None only after recording an error, and there was none.
        return DeviceConfig(name=name, kind=kind, backend=backend,  # type: ignore[arg-type]
                            capacity=capacity, fallback=fallback,  # type: ignore[arg-type]
                            prefetch=prefetch, options=options, faults=faults,  # type: ignore[arg-type]
                            resources=resources, per_node=per_node)  # type: ignore[arg-type]

    def resources(self, path: str, raw: Any) -> dict[str, float] | None:
        d = self.mapping(path, raw)
        if d is None:
            return None
        ok = True
        for key, value in d.items():
            if not key.strip():
                self.error(path, "resource names must be non-empty", key)
                ok = False
            # Ray's own rule: a fraction of one unit, or whole units.
            elif not (_is_number(value) and 0 < value <= 1e6
                      and (value <= 1 or float(value).is_integer())):
                self.error(f"{path}.{key}", "must be a number 0 < x <= 1e6, whole above 1",
                           value)
                ok = False
        return {k: float(v) for k, v in d.items()} if ok else None

    def faults(self, path: str, raw: Any) -> FaultConfig | None:
        d = self.mapping(path, raw)
        if d is None:
            return None
        before = len(self.errors)
        self.keys(path, d, _FAULT_KEYS)
        fail_after = d.get("fail_after")
        if fail_after is not None:
            fail_after = self.integer(f"{path}.fail_after", fail_after, 0, 2**31 - 1)
        fail_every = self.integer(f"{path}.fail_every", d.get("fail_every", 0), 0, 2**31 - 1)
        fail_after_tokens, garble_after_tokens = (
            None if d.get(key) is None else self.integer(f"{path}.{key}", d[key], 0, 2**31 - 1)
            for key in ("fail_after_tokens", "garble_after_tokens"))
        fail_load = self.boolean(f"{path}.fail_load", d.get("fail_load", False))
        hang_s = self.number(f"{path}.hang_s", d.get("hang_s", 0.0), 0.0, 3600.0)
        models = self.name_list(f"{path}.models", d.get("models", []), _MODEL_NAME_RE, "model")
        message = self.string(f"{path}.message", d.get("message", FaultConfig.message))
        if len(self.errors) > before:
            return None
        return FaultConfig(fail_after=fail_after, fail_every=fail_every,  # type: ignore[arg-type]
                           fail_load=fail_load,  # type: ignore[arg-type]
                           hang_s=hang_s, models=models, message=message,  # type: ignore[arg-type]
                           fail_after_tokens=fail_after_tokens,
                           garble_after_tokens=garble_after_tokens)

    def models(self, raw: Any) -> list[ModelConfig] | None:
        if not isinstance(raw, list):
            self.error("models", "must be a list of models", raw)
            return None
        parsed = [self.model(f"models[{i}]", item) for i, item in enumerate(raw)]
        return self.unique_names("models", parsed, "model")

    def model(self, path: str, raw: Any) -> ModelConfig | None:
        d = self.mapping(path, raw)
        if d is None:
            return None
        before = len(self.errors)
        self.keys(path, d, _MODEL_KEYS, required=("name", "source"))
        name = d.get("name")
        if "name" in d and not (isinstance(name, str) and _MODEL_NAME_RE.fullmatch(name)):
            self.error(f"{path}.name", "must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}", name)
        source = self.source(f"{path}.source", d["source"]) if "source" in d else None
        tokenizer = (self.source(f"{path}.tokenizer", d["tokenizer"])
                     if d.get("tokenizer") is not None else None)
        devices = self.name_list(f"{path}.devices", d.get("devices", []), _NAME_RE, "device")
        options: dict[str, dict[str, Any]] = {}
        raw_options = self.mapping(f"{path}.options", d.get("options", {}))
        for device, opts in (raw_options or {}).items():
            where = f"{path}.options.{device}"
            if not _NAME_RE.fullmatch(device):
                self.error(where, "keys of options must be device names", device)
            value = self.model_options(where, opts)
            if value is not None:
                options[device] = value
        if len(self.errors) > before:
            return None
        return ModelConfig(name=name, source=source, devices=devices, options=options,  # type: ignore[arg-type]
                           tokenizer=tokenizer)

    def source(self, path: str, raw: Any) -> str | None:
        source = self.string(path, raw, f"{PACKAGED_PREFIX}NAME or a path")
        if source is None:
            return None
        if source.startswith(PACKAGED_PREFIX):
            if not re.fullmatch(r"[A-Za-z0-9._-]+", source[len(PACKAGED_PREFIX):]):
                self.error(path, f"must be {PACKAGED_PREFIX}NAME", source)
                return None
            return source
        return self.path(source)

    def model_options(self, path: str, raw: Any) -> dict[str, Any] | None:
        opts = self.plain_options(path, raw)
        if opts is None:
            return None
        ok = True
        if "shapes" in opts:
            shapes = opts["shapes"]
            if not isinstance(shapes, dict) or not shapes:
                self.error(f"{path}.shapes", "must map input names to shapes like [1, 32]", shapes)
                ok = False
            else:
                for inp, shape in shapes.items():
                    if not (isinstance(shape, list) and shape and all(
                            _is_int(x) and 1 <= x <= 1 << 24 for x in shape)):
                        self.error(f"{path}.shapes.{inp}", "must be a non-empty list of "
                                   "positive integers (a static shape)", shape)
                        ok = False
        if "pad" in opts and not isinstance(opts["pad"], bool):
            self.error(f"{path}.pad", "must be true or false", opts["pad"])
            ok = False
        if "max_batch" in opts and not (_is_int(opts["max_batch"])
                                        and 1 <= opts["max_batch"] <= 4096):
            self.error(f"{path}.max_batch", "must be an integer 1..4096 (1: no batching)",
                       opts["max_batch"])
            ok = False
        if "max_delay_ms" in opts and not (_is_number(opts["max_delay_ms"])
                                           and 0 <= opts["max_delay_ms"] <= 10_000):
            self.error(f"{path}.max_delay_ms", "must be a number of milliseconds 0..10000",
                       opts["max_delay_ms"])
            ok = False
        warmup = opts.get("warmup", True)
        if not isinstance(warmup, bool) and not (isinstance(warmup, dict) and all(
                isinstance(shape, list) and shape and all(_is_int(x) and 1 <= x <= 1 << 24
                                                          for x in shape)
                for shape in warmup.values())):
            self.error(f"{path}.warmup", "must be true, false or map input names to the "
                       "shapes of the warm-up input, like {input_ids: [1, 64]}", warmup)
            ok = False
        return opts if ok else None

    def model_cache(self, raw: Mapping) -> str | None:
        cache = self.overridden("", raw, "model_cache", ENV_HOME)
        if cache.value is None:
            return None
        value = self.string(cache.where, cache.value, "a path")
        if value is None or cache.from_env:  # a path from env is the caller's, not the file's
            return None if value is None else os.path.abspath(os.path.expanduser(value))
        return self.path(value)

    # -- references between sections ----------------------------------------------------------

    def cross_check(self, devices: list[DeviceConfig], models: list[ModelConfig]) -> None:
        device_names = [dev.name for dev in devices]
        model_names = [m.name for m in models]
        dev_path = "devices (auto)" if self.auto else "devices"
        for i, dev in enumerate(devices):
            for j, other in enumerate(dev.fallback):
                where = f"{dev_path}[{i}].fallback[{j}]"
                if other == dev.name:
                    self.error(where, "a device cannot fall back to itself", other)
                elif other not in device_names:
                    self.error(where, "names no declared device "
                               f"(declared: {', '.join(device_names)})", other)
            for j, model in enumerate(dev.faults.models if dev.faults else ()):
                if model not in model_names:
                    self.error(f"{dev_path}[{i}].faults.models[{j}]", "names no declared model "
                               f"(declared: {', '.join(model_names) or 'none'})", model)
        self._listed = {m.name: list(m.devices) for m in models}
        for i, m in enumerate(models):
            # With discovered devices a config may name devices other machines have: keep the rest.
            if self.auto:
                listed = m.devices
                m.devices = [name for name in listed if name in device_names]
                m.options = {k: v for k, v in m.options.items() if k in device_names}
                if listed and not m.devices:
                    # Not an error: the config serves what this machine can (an LLM needs
                    # openvino-genai, which not every platform has).
                    log.warning("%s: model %s is not served here: none of its devices %s was "
                                "discovered (found: %s)", self.label, m.name, listed,
                                ", ".join(device_names))
                continue
            for j, name in enumerate(m.devices):
                if name not in device_names:
                    self.error(f"models[{i}].devices[{j}]", "names no declared device "
                               f"(declared: {', '.join(device_names)})", name)
            for name in m.options:
                if name not in device_names:
                    self.error(f"models[{i}].options.{name}", "names no declared device "
                               f"(declared: {', '.join(device_names)})", name)
