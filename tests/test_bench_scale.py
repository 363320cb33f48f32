"""`fanout bench scale --quick` as a user runs it: what it prints and leaves, not its speed."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytest.importorskip("ray", reason="fanout bench scale starts Ray nodes: pip install 'ray[default]'")

from .conftest import in_session, wait_for  # noqa: E402


@pytest.fixture(scope="module")
def quick():
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "bench", "scale", "--quick"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its session id names everything it starts
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, proc.pid


def section(out: str, title: str) -> str:
    return out.split(f"\n{title} (", 1)[1].split("\n\n", 1)[0]


def test_it_exits_cleanly_and_prints_the_hardware(quick):
    code, out, _ = quick
    assert code == 0, out
    assert re.search(r"^hardware: .*\b\d+ cores\b.*; CPU: .+; Ray \d+\.\d+", out, re.M), out
    assert re.search(r"^note: the nodes share this machine's \d+ cores", out, re.M), out


@pytest.mark.parametrize("title", ["no-op", "MiniLM"])
def test_each_node_count_has_a_positive_throughput_and_a_ratio_to_one_node(quick, title):
    _, out, _ = quick
    rows = re.findall(r"^  Ray launcher, (\d) nodes?\s+([\d.]+)\s+([\d.]+)x", section(out, title),
                      re.M)
    assert [n for n, _, _ in rows] == ["1", "2", "3"], out
    assert all(float(rate) > 0 for _, rate, _ in rows), out
    assert float(rows[0][2]) == 1.0
    name = re.escape(title)
    assert re.search(rf"^scaling vs 1 node, {name}: 2 nodes [\d.]+x, 3 nodes [\d.]+x$", out,
                     re.M), out
    assert re.search(rf"^Ray / local launcher, {name}: [\d.]+x the time per task "
                     rf"\([+-][\d.]+ µs/task\)$", out, re.M), out


def test_the_data_path_rows_give_both_launchers_in_us_per_task(quick):
    _, out, _ = quick
    for launcher in ("local", "Ray"):
        assert re.search(rf"^  no-op, {launcher} launcher\s+[\d.]+\s+[\d.]+\s+[\d.]+x$", out,
                         re.M), out


def test_nothing_it_started_is_left_running(quick):
    _, _, pid = quick
    wait_for(lambda: not in_session(pid), timeout=20,
             what=f"the processes of the bench's session to exit: {in_session(pid)}")
