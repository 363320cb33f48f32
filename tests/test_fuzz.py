"""Fuzzed messages on both of the scheduler's sockets, from peers with no credentials, the
wrong ones and the right ones: no process dies or restarts, no exception reaches a handler's
guard, a peer that has not proven itself hears nothing, the log stays short, and a fan-out
after it all is correct. ``fanout bench chaos`` runs the same with 10,000 messages a peer.
"""
from __future__ import annotations

import contextlib

import pytest

from runtime import cli
from runtime.bench import chaos
from runtime.bench.fuzz import fuzz_cluster

MESSAGES = 400  # a peer; the bench sends 10,000


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    key_file = folder / "cluster.keys"
    with contextlib.redirect_stdout(None):
        assert cli.main(["keys", str(key_file)]) == 0
    return folder, chaos._models(folder), chaos.fuzz_plans(key_file)


@pytest.mark.parametrize("kind", ["keys", "token", "open"])
def test_fuzzed_messages_on_both_sockets_crash_nothing_and_reach_only_who_may_hear(
        kind, plans, clusters, capfd):
    folder, models, plan = plans
    scheduler, cluster_line, peers = plan[kind]
    cluster = clusters.start(chaos._config(folder, models, kind, scheduler,
                                           cluster_line).read_text())
    report = fuzz_cluster(cluster, cluster.client(), peers, MESSAGES, seed=11)
    print("\n".join(report.lines()))
    assert report.crashed == [] and report.internal_errors == 0
    for row in report.rows:
        assert row.count.sent == MESSAGES
        if row.peer.heard:  # a typed answer to what it may send
            assert row.count.replies > MESSAGES // 2, row
        else:
            assert row.count.replies == 0, row
    assert report.rss_mb[1] - report.rss_mb[0] < 30, report.rss_mb
    status = cluster.status()
    assert all(w["state"] == "up" for w in status["workers"])
    log = [line for line in capfd.readouterr().err.splitlines() if " WARNING " in line
           or " ERROR " in line]
    # Rate-limited per peer and kind: far fewer lines than messages.
    assert len(log) < 8 * len(peers), f"{len(log)} lines, e.g. {log[:5]}"
