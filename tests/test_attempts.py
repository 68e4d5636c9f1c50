"""torchelastic attempts: a restarted job's steps start again at 0 and are kept, queried and judged apart.

Unit level (the merge's attempt rule, the store's migration of an older schema) and over real gRPC with
a collector in this process; the real `torchrun --max-restarts` run is in tests/test_scenarios.py.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.request

from harness.collector_thread import CollectorThread
from harness.fake_rank import FakeRank, report, stream_steps
from harness.step_row import row
from harness.waiting import wait_for
from modtrack.collector.pipeline.merge import Merger
from modtrack.collector.store.schema import MIGRATIONS, V1_TABLES
from modtrack.collector.store.sqlite import Store


def test_attempt_comes_from_the_restart_count_or_a_new_session():
    m = Merger()
    state = m.hello("j", 0, 2, "h", session="a")
    m.hello("j", 1, 2, "h", session="b")
    assert state.attempt == 0 and state.sessions[0] == (0, "a")
    m.hello("j", 0, 2, "h", session="a")  # a reconnect: the same process
    assert state.attempt == 0
    assert m.add(row("j", 0, 0, [0], [1], [1.0])) and m.add(row("j", 1, 0, [0], [1], [1.0]))
    ready, _ = m.due(0.0 + 1e9)
    assert [r.step for r in ready] == [0] and state.last_evaluated == 0

    m.hello("j", 1, 2, "h", session="c")  # a new process for rank 1: the job restarted
    assert state.attempt == 1 and state.last_evaluated == -1 and state.sessions[1] == (1, "c")
    m.hello("j", 0, 2, "h", session="d")
    assert state.sessions[0] == (1, "d") and state.attempt == 1
    r0 = row("j", 0, 0, [0], [1], [1.0])
    r0.attempt = 1
    assert m.add(r0)  # step 0 again, of the new attempt: merged, not a duplicate
    old = row("j", 1, 5, [0], [1], [1.0])  # a straggling report of attempt 0
    assert not m.add(old)

    m.hello("j", 0, 2, "h", session="e", attempt=3)  # torchelastic's count wins when sent
    assert state.attempt == 3


def test_an_old_store_is_migrated_and_keeps_every_row_as_attempt_0(tmp_path):
    conn = sqlite3.connect(tmp_path / "modtrack.sqlite3")
    for statement in V1_TABLES:  # version 1, as stores were written before attempts
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO jobs (job, world_size, created_ns, last_evaluated_step) VALUES ('j', 2, 1, 7)")
    conn.execute("INSERT INTO steps (job, rank, step, start_ns, end_ns) VALUES ('j', 0, 7, 0, 5)")
    conn.execute(
        "INSERT INTO episodes (id, job, rank, host, module, phase, slowdown, first_step, last_step, "
        "state, cost_ms_per_step, cost_pct, ranks) VALUES (1, 'j', 0, 'h', 'm', 'forward', 2.0, 1, 7, "
        "'active', 3.0, 1.0, '[]')"
    )
    conn.commit()
    conn.close()
    store = Store(str(tmp_path))
    try:
        assert store.conn().execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert store.jobs() == [{"job": "j", "world_size": 2, "last_evaluated_step": 7, "attempt": 0, "last_step": 7}]
        assert [s[:2] for s in store.last_steps("j", 10)] == [(7, 0)]
        (ep,) = store.episodes("j")
        assert (ep.attempt, ep.cause, ep.modules, ep.cost_ms_per_step) == (0, "", [], 3.0)
    finally:
        store.close()
    store = Store(str(tmp_path))  # opening again migrates nothing
    store.close()


def _metrics(collector) -> str:
    with urllib.request.urlopen(collector.url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_steps_of_both_attempts_are_stored_and_queryable(tmp_path):
    collector = CollectorThread(tmp_path)
    try:
        first = [FakeRank(collector.grpc_target, "job", r, 2, session=f"s0-{r}") for r in range(2)]
        stream_steps(first, range(6), fwd_ms_of=lambda r, s: [1.0] * 5)
        wait_for(lambda: _get(collector.url + "/api/v1/jobs")["jobs"][0]["last_evaluated_step"] == 5)
        first[0].report(report(2, [1.0] * 5))  # a replay of a step already judged: stored, counted
        first[0].wait_ack(5)
        wait_for(lambda: 'modtrack_reports_duplicate_total{job="job",reason="late"} 1.0' in _metrics(collector))
        for r in first:
            r.close()
        second = [FakeRank(collector.grpc_target, "job", r, 2, session=f"s1-{r}") for r in range(2)]
        stream_steps(second, range(4), fwd_ms_of=lambda r, s: [2.0] * 5)
        wait_for(lambda: _get(collector.url + "/api/v1/jobs")["jobs"][0]["last_evaluated_step"] == 3)
        (job,) = _get(collector.url + "/api/v1/jobs")["jobs"]
        assert job["attempt"] == 1 and job["last_step"] == 3
        latest = _get(collector.url + "/api/v1/jobs/job/steps?last=100")
        assert latest["attempt"] == 1 and [s["step"] for s in latest["steps"]] == [0, 1, 2, 3]
        before = _get(collector.url + "/api/v1/jobs/job/steps?last=100&attempt=0")
        assert [s["step"] for s in before["steps"]] == list(range(6))
        mods = _get(collector.url + "/api/v1/jobs/job/modules?step=2&attempt=0")
        assert mods["modules"][0]["ms_by_rank"] == {"0": 1.0, "1": 1.0}
        mods = _get(collector.url + "/api/v1/jobs/job/modules?step=2")
        assert mods["modules"][0]["ms_by_rank"] == {"0": 2.0, "1": 2.0}
        for r in second:
            r.close()
    finally:
        collector.stop()
