"""`fanout bench placement --quick --plot` as a user runs it: what it prints and draws, not
its speed (the figures are measured by the full run)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    png = tmp_path_factory.mktemp("bench") / "timeline.png"
    run = subprocess.run([sys.executable, "-m", "runtime.cli", "bench", "placement", "--quick",
                          "--plot", str(png)], capture_output=True, text=True, timeout=300)
    return run.returncode, run.stdout + run.stderr, png


def test_it_exits_cleanly_and_prints_the_hardware(quick):
    code, out, _ = quick
    assert code == 0, out
    assert re.search(r"^hardware: .*\b\d+ cores\b", out, re.M), out


@pytest.mark.parametrize("title", ["(b) fault-slowed CPU workers, the slow (50 ms) device "
                                   "preferred", "(b) fault-slowed CPU workers, the fast device "
                                   "preferred", "(a) the QNN HTP backend"])
def test_each_regime_prints_every_device_alone_the_fluid_bound_and_the_ratios(quick, title):
    _, out, _ = quick
    section = out.split(title, 1)[1].split("\n\n", 1)[0]
    assert re.search(r"^ +20 +[\d.]+ s +~?[\d.]+ s +~?[\d.]+ s +[\d.]+ s +[\d.]+x +[\d.]+x  \w",
                     section, re.M), section


def test_the_qnn_regime_says_what_it_shows(quick):
    _, out, _ = quick
    assert re.search(r"npu0 takes [\d.]+ s a task and keeps [\d.]+ of this machine's \d+ cores",
                     out) or "skipped: not ready" in out.split("(a) the QNN HTP backend")[1]


def test_the_failover_fanout_is_held_to_the_new_fluid_bound(quick):
    _, out, _ = quick
    assert re.search(r"the new fluid bound is [\d.]+ s .*: [\d.]+x \(target <= 1\.20x\)", out)


def test_the_npu_failure_is_drawn(quick):
    _, out, png = quick
    if "NPU failure" in out and "skipped" not in out.split("NPU failure", 1)[1][:300]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"timeline written to {png}" in out
