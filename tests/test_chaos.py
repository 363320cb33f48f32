"""Chaos, short (``fanout bench chaos`` runs it long): workers killed and stopped through a
fan-out, ten times the queue's worth of work at once, and a host cut off mid fan-out.
"""
from __future__ import annotations

import pytest

from runtime.bench import chaos, hosts


def test_a_fan_out_through_killed_and_stopped_workers_is_answered_once_and_correctly(capsys):
    report = chaos.kill_and_stop(300, seed=3, every_s=0.5)
    assert report.faults.get("SIGKILL", 0) + report.faults.get("SIGSTOP", 0) >= 3, report
    assert report.correct == 300 and report.wrong == 0 and not report.errors, report
    assert report.unmatched == 0  # no answer came twice
    assert report.rss_mb[1] - report.rss_mb[0] < 30


def test_ten_times_the_queue_is_answered_overloaded_past_it_and_correctly_within(capsys):
    report = chaos.overload(queue=200, factor=10, seed=5)
    assert report.wrong == 0 and report.unmatched == 0, report
    assert set(report.errors) <= {"overloaded"}, report
    assert report.correct + report.errors.get("overloaded", 0) == 2000  # each answered
    assert report.correct >= 100 and report.errors["overloaded"] >= 1000
    assert report.rss_mb[1] - report.rss_mb[0] < 30


@pytest.mark.skipif(hosts.missing() is not None, reason=hosts.missing() or "")
def test_a_host_cut_off_mid_fan_out_loses_nothing_and_every_process_attached_through_ray_exits(
        capsys):
    pytest.importorskip("ray", reason="needs Ray: pip install 'fanout-runtime[ray]'")
    report = chaos.lost_host(600, hang=0.02, heartbeat_timeout=2.5, wait_node_s=60)
    assert report.correct == 600 and report.wrong == 0 and not report.errors, report.lines()
    assert report.unmatched == 0
    # the cut-off host's worker had tasks in hand: they were re-run on the head's
    assert report.lost_attempts >= 1 and len(report.lost_devices) == 1, report.lines()
    assert len(report.served) == 2 and report.lost_devices[0] in report.served
    assert report.exit_s is not None and report.exit_s < 10, "\n".join(report.log[-60:])
    assert report.up_exit_s is not None, "\n".join(report.log[-60:])
    assert report.head_left == 0
    # its worker exits once the scheduler is silent, its actor's process soon after
    assert report.node_clear_s is not None, report.lines()
