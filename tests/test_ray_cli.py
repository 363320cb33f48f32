"""`fanout up --ray` as a user runs it: a local Ray cluster, status through Ray, Ctrl-C."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from .conftest import in_session, wait_for

pytest.importorskip("ray", reason="needs Ray: pip install 'fanout-runtime[ray]'")


def start_up(*args: str, **popen) -> tuple[subprocess.Popen, list[str]]:
    """``fanout up ARGS --no-http`` in the background; its output lines, as they come."""
    up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", *args, "--no-http"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in up.stdout),
                     daemon=True).start()
    return up, lines


def test_up_on_ray_serves_status_through_ray_and_stops_on_ctrl_c(tmp_path):
    config = tmp_path / "ray.yaml"
    config.write_text(textwrap.dedent("""
        scheduler: {address: "tcp://127.0.0.1:0"}
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """))
    up, lines = start_up("--ray", "--config", str(config))
    try:
        wait_for(lambda: any("ready: clients connect to" in line for line in lines),
                 timeout=120, what="fanout up --ray to be ready")
        # the address it printed: on a shared machine "auto" may find a newer Ray cluster
        gcs = next(m.group(1) for line in lines
                   if (m := re.search(r"\] Ray cluster at (\S+) \(`fanout status", line)))
        status = subprocess.run([sys.executable, "-m", "runtime.cli", "status", "--ray",
                                 "--address", gcs, "--timeout", "30"], capture_output=True,
                                text=True, timeout=120)
        assert status.returncode == 0, status.stderr[-2000:]
        row = next(line.split() for line in status.stdout.splitlines()
                   if line.startswith("cpu0"))
        assert row[1:3] == ["cpu", "up"] and "/" in row[4]  # node: IP/ray-node-id
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
        assert any("stopped" in line for line in lines)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_up_from_the_cluster_section_with_ray_token_auth_on_stops_whole_on_a_group_sigterm(
        tmp_path):
    import os
    import re
    import secrets

    config = tmp_path / "ray.yaml"
    config.write_text(textwrap.dedent("""
        cluster: {launcher: ray, address: local}   # its own Ray cluster, not the tests' one
        scheduler: {address: "tcp://127.0.0.1:0"}
        devices:
          - {name: cpu, kind: cpu, backend: onnxruntime, capacity: 1, per_node: true}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """))
    auth = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    up, lines = start_up("--config", str(config), env=auth, start_new_session=True)
    try:
        wait_for(lambda: any("ready: clients connect to" in line for line in lines),
                 timeout=120, what="fanout up to be ready")
        # the workers' progress as they start, then the ready table
        assert any(re.match(r"\[.*\] cpu@[0-9a-f]{8}: worker up on ", line) for line in lines)
        gcs = next(m.group(1) for line in lines
                   if (m := re.search(r"\] Ray cluster at (\S+) \(`fanout status", line)))
        status = [sys.executable, "-m", "runtime.cli", "status", "--ray", "--address", gcs,
                  "--timeout", "30"]
        # Ray's token authentication is on: with the token, status works through Ray...
        other = dict(auth, RAY_AUTH_TOKEN=secrets.token_hex(32))
        outsider = subprocess.Popen(status[:-1] + ["4"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=other)
        asked = time.monotonic()
        ok = subprocess.run(status, capture_output=True, text=True, timeout=120, env=auth)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert any(line.startswith("cpu@") and " up " in line for line in ok.stdout.splitlines())
        # ...and with another token it is refused, with advice instead of a traceback, within
        # its --timeout 4 (Ray alone tries for 20 s), interpreter start and a busy machine aside
        out, err = outsider.communicate(timeout=120)
        assert outsider.returncode != 0
        assert time.monotonic() - asked < 4 + 8, f"refused after {time.monotonic() - asked:.0f} s"
        assert "ClusterUnavailable" in err and "RAY_AUTH_MODE=token" in err
        assert "Traceback" not in err.split("fanout status:")[-1]

        assert in_session(up.pid)  # Ray's daemons and actors run in up's session
        os.killpg(up.pid, signal.SIGTERM)  # as `kill -- -PGID`, timeout(1) or a service stop
        up.wait(timeout=60)
        wait_for(lambda: not in_session(up.pid), timeout=30,
                 what="every process of fanout up's session (Ray's included) to exit")
        assert any("stopped" in line for line in lines)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
