"""`fanout up --ray` as a user runs it: a local Ray cluster, status through Ray, Ctrl-C."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from .conftest import wait_for

pytest.importorskip("ray", reason="needs Ray: pip install 'fanout-runtime[ray]'")


def test_up_on_ray_serves_status_through_ray_and_stops_on_ctrl_c(tmp_path):
    config = tmp_path / "ray.yaml"
    config.write_text(textwrap.dedent("""
        scheduler: {address: "tcp://127.0.0.1:0"}
        devices:
          - {name: cpu0, kind: cpu, backend: onnxruntime, capacity: 1}
        models:
          - {name: minilm, source: "packaged:minilm"}
    """))
    up = subprocess.Popen([sys.executable, "-m", "runtime.cli", "up", "--ray", "--config",
                           str(config), "--no-http"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(line.rstrip() for line in up.stdout),
                     daemon=True).start()
    try:
        wait_for(lambda: any("ready: clients connect to" in line for line in lines),
                 timeout=120, what="fanout up --ray to be ready")
        status = subprocess.run([sys.executable, "-m", "runtime.cli", "status", "--ray",
                                 "--timeout", "30"], capture_output=True, text=True,
                                timeout=120)
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
