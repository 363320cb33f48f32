"""The fan-out timeline (runtime/frontdoors/timeline.py) and the times results carry for it."""
from __future__ import annotations

import msgpack
import pytest

from runtime.errors import Attempt, DeviceError
from runtime.frontdoors.client import TaskResult
from runtime.frontdoors.timeline import Bar, bars, rows, timeline
from runtime.wire import protocol as p


def result(device: str, start: float, end: float, *attempts: Attempt) -> TaskResult:
    return TaskResult({}, device, list(attempts), end - start, submitted_at=100.0,
                  started_at=start, finished_at=end)


FANOUT = [
    result("cpu0", 100.0, 100.5),
    result("cpu0", 100.0, 100.6),
    result("npu0", 100.0, 100.4),
    result("cpu0", 100.5, 101.0, Attempt("npu0", "device", "reset", 100.4, 100.41),
           Attempt("ovnpu", "model_unavailable", "no driver")),  # skipped: no try, no bar
    DeviceError("failed everywhere"),  # map(return_exceptions=True) puts errors in place
]


def test_each_attempt_is_a_bar_on_its_devices_lane_and_a_failed_over_task_says_so():
    assert bars(FANOUT) == [
        Bar("cpu0", 100.0, 100.5, "served"), Bar("cpu0", 100.0, 100.6, "served"),
        Bar("npu0", 100.0, 100.4, "served"), Bar("npu0", 100.4, 100.41, "failed"),
        Bar("cpu0", 100.5, 101.0, "failed_over")]


def test_bars_that_overlap_in_time_get_rows_of_their_own():
    lane = [Bar("cpu0", 0.0, 0.5, "served"), Bar("cpu0", 0.0, 0.6, "served"),
            Bar("cpu0", 0.5, 1.0, "served")]
    assert rows(lane) == [0, 1, 0]  # the third starts as the first ends
    instant = [Bar("npu0", 1.0, 1.0, "failed"), Bar("npu0", 1.0, 1.0, "failed")]
    assert rows(instant, min_width=0.01) == [0, 1]  # as drawn, they would overlap
    short = [Bar("cpu0", 1.0, 1.001, "served"), Bar("cpu0", 1.001, 1.002, "served")]
    assert rows(short, min_width=0.01) == [0, 0]  # a served run is drawn as long as it was


def test_the_timeline_is_written_as_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="pip install 'fanout-runtime[plot]'")
    path = tmp_path / "fanout.png"
    timeline(FANOUT, path, fluid_s=0.9, marks={"npu0 failed": 0.41}, title="a fan-out")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attempts_from_an_older_peer_have_no_times_and_compare_as_before():
    old = Attempt.from_wire({"device": "npu0", "kind": "device", "message": "boom"})
    assert (old.started_at, old.ended_at) == (0.0, 0.0)
    assert old == Attempt("npu0", "device", "boom", 5.0, 6.0)  # the times are not its identity


def test_a_result_from_an_older_scheduler_decodes_with_no_times():
    frames = p.encode(p.Result(task_id="t", device="cpu0"))
    header = msgpack.unpackb(frames[0])
    for name in ("submitted_at", "started_at", "finished_at"):
        del header[name]
    msg = p.Decoder(p.SCHEDULER_TO_CLIENT, 1 << 20).decode([msgpack.packb(header)])
    assert (msg.submitted_at, msg.started_at, msg.finished_at) == (0.0, 0.0, 0.0)
