"""kill -9 during heavy ingest: the SQLite store reopens intact and holds every acked report."""

from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from harness.collector_process import CollectorProcess
from harness.fake_rank import FakeRank, report
from harness.http import get
from harness.waiting import wait_for

MODULES = [f"Net.layers.{i}" for i in range(200)]


def pump(rank: FakeRank, stop: threading.Event) -> None:
    """Send steps as fast as the collector takes them, at most 200 ahead of the acks."""
    step = 0
    while not stop.is_set() and rank.error is None and not rank.done.is_set():
        acked = rank.acks[-1] if rank.acks else -1
        if step - acked > 200:
            time.sleep(0.002)
            continue
        rank.report(report(step, [0.5] * len(MODULES)))
        step += 1


@pytest.mark.slow
def test_kill_9_during_heavy_ingest_loses_no_acked_report(tmp_path):
    data = tmp_path / "data"
    server = CollectorProcess(data, log_path=tmp_path / "collector.log")
    ranks, pumps, stop = [], [], threading.Event()
    try:
        ranks = [FakeRank(server.grpc_target, "heavy", r, 4, modules=MODULES) for r in range(4)]
        pumps = [threading.Thread(target=pump, args=(r, stop), daemon=True) for r in ranks]
        for p in pumps:
            p.start()
        wait_for(
            lambda: all(r.acks and r.acks[-1] >= 150 for r in ranks),
            60,
            lambda: f"ingest too slow: {[r.acks[-1:] for r in ranks]} {server.log()[-2000:]}",
        )
        server.kill()  # SIGKILL mid-stream: the writer is in the middle of its batches
        stop.set()
        for r in ranks:
            r.wait_done(10)
        acked = {rank: r.acks[-1] for rank, r in enumerate(ranks)}
        print("acked before the kill", acked)
    finally:
        stop.set()
        for r in ranks:
            r.kill()
        server.kill()
    path = data / "modtrack.sqlite3"
    again = CollectorProcess(data, log_path=tmp_path / "collector2.log")  # opens the store as a restart does
    try:
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            for rank, last in acked.items():
                steps = {s for (s,) in conn.execute("SELECT step FROM steps WHERE job = 'heavy' AND rank = ?", (rank,))}
                missing = set(range(last + 1)) - steps
                assert not missing, f"rank {rank}: acked up to {last}, missing {sorted(missing)[:10]}"
            assert len(conn.execute("SELECT name FROM modules WHERE job = 'heavy'").fetchall()) == 200
        finally:
            conn.close()
        status, body = get(again.url, "/api/v1/jobs/heavy/steps?last=5")
        assert status == 200 and len(body["steps"]) == 5
    finally:
        again.terminate()
