"""Chaos, short (``fanout bench chaos`` runs it long): workers killed and stopped through a
fan-out, and ten times the queue's worth of work at once.
"""
from __future__ import annotations

from runtime.bench import chaos


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
