"""SQLite store: one row per rank and step with columnar blobs, idempotent inserts, retention."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import numpy as np
import pytest

from harness.step_row import row
from harness.waiting import wait_for
from modtrack.collector.records import STEP_FIGURES, Episode
from modtrack.collector.store.sqlite import Store
from modtrack.collector.store.writer import StoreWriter


def write(store: Store, *calls) -> None:
    """Run (fn, *args) calls through the real single writer thread, wait for the commit."""

    async def go():
        writer = StoreWriter(store, asyncio.get_running_loop())
        try:
            await asyncio.gather(*(writer.steps(c[1]) if c[0] == "steps" else writer.call(*c) for c in calls))
        finally:
            writer.close()

    asyncio.run(go())


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path))
    try:
        yield s
    finally:
        s.close()


def test_a_step_is_one_row_with_its_module_columns(store):
    write(
        store,
        (store.upsert_job, "j", 2),
        (store.add_modules, "j", 0, ["a", "b", "c"]),
        ("steps", [row("j", r, 7, [0, 1, 2, 0], [1, 1, 1, 2], [1.0, 2.0, 3.0, 4.0 + r]) for r in range(2)]),
    )
    assert store.conn().execute("SELECT COUNT(*) FROM steps").fetchone()[0] == 2
    mods = store.step_modules("j", 7)
    assert sorted(mods) == [0, 1]
    assert mods[1]["module"].tolist() == [0, 1, 2, 0] and mods[1]["phase"].tolist() == [1, 1, 1, 2]
    assert mods[1]["self"].tolist() == [1_000_000, 2_000_000, 3_000_000, 5_000_000]
    assert store.module_names("j") == ["a", "b", "c"]
    assert store.last_steps("j", 5)[0][:4] == (7, 0, 0, 10_000_000)


def test_a_steps_gc_pauses_are_stored_and_read_back(store):
    rows = [row("j", r, 7, [0], [1], [1.0]) for r in range(2)]
    rows[1].figures["gc_ns"], rows[1].figures["gc_collections"] = 4_500_000, 3
    write(store, ("steps", rows))
    read = [dict(zip(STEP_FIGURES, figures)) for _, _, *figures in store.last_steps("j", 5)]
    assert [(r["gc_ns"], r["gc_collections"]) for r in read] == [(0, 0), (4_500_000, 3)]


def test_replayed_rows_change_nothing(store):
    write(store, ("steps", [row("j", 0, s, [0], [1], [1.0]) for s in range(3)]))
    write(store, ("steps", [row("j", 0, s, [0], [1], [9.0], wall_ms=99) for s in range(5)]))
    rows = store.last_steps("j", 10)
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert [r[3] for r in rows] == [10_000_000] * 3 + [99_000_000] * 2


def test_retention_drops_old_module_blobs_and_keeps_step_figures(store):
    write(store, (store.upsert_job, "j", 1), ("steps", [row("j", 0, s, [0, 1], [1, 1], [1.0, 2.0]) for s in range(10)]))
    write(store, (store.drop_old_module_blobs, "j", 4))  # nothing evaluated yet: nothing is old
    assert [len(store.step_modules("j", s)[0]["module"]) for s in range(10)] == [2] * 10
    write(store, (store.set_evaluated, "j", 9), (store.drop_old_module_blobs, "j", 4))
    assert len(store.last_steps("j", 100)) == 10
    assert [len(store.step_modules("j", s)[0]["module"]) for s in range(10)] == [0] * 6 + [2] * 4
    write(
        store,
        ("steps", [row("j", 0, s, [0, 1], [1, 1], [1.0, 2.0]) for s in range(10, 13)]),
        (store.set_evaluated, "j", 11),  # step 12 is stored, not evaluated: the newest 4 are counted from 11
        (store.drop_old_module_blobs, "j", 4),
    )
    assert [len(store.step_modules("j", s)[0]["module"]) for s in range(13)] == [0] * 8 + [2] * 5


def test_episodes_upsert_by_id_and_read_back(store):
    ep = Episode(
        job="j",
        rank=3,
        host="h",
        module="m",
        phase="forward",
        slowdown=1.4,
        first_step=5,
        last_step=8,
        state="active",
        cost_ms_per_step=2.5,
        cost_pct=4.0,
        id=1,
    )
    write(store, (store.upsert_episode, ep))
    ep.last_step, ep.state = 20, "resolved"
    host = Episode(
        job="j",
        rank=-1,
        host="h",
        module="m",
        phase="backward",
        slowdown=2.0,
        first_step=6,
        last_step=9,
        state="active",
        cost_ms_per_step=1.0,
        ranks=[0, 1],
        id=2,
    )
    write(store, (store.upsert_episode, ep), (store.upsert_episode, host))
    assert [(e.id, e.state, e.last_step) for e in store.episodes("j")] == [(2, "active", 9), (1, "resolved", 20)]
    assert store.episodes("j", "active")[0].ranks == [0, 1]
    assert store.max_episode_id() == 2


def test_a_failed_commit_is_reported_and_the_writer_keeps_going(store):
    async def go():
        writer = StoreWriter(store, asyncio.get_running_loop())
        try:
            with pytest.raises(sqlite3.Error):
                await writer.call(store.conn().execute, "INSERT INTO nowhere VALUES (1)")
            await writer.steps([row("j", 0, 1, [0], [1], [1.0])])
            return writer.errors
        finally:
            writer.close()

    assert asyncio.run(go()) == 1
    assert len(store.last_steps("j", 10)) == 1


def test_rows_are_compact():
    r = row("j", 0, 1, list(range(500)) * 2, [1] * 500 + [2] * 500, np.ones(1000))
    after = 4 + len(STEP_FIGURES)  # after job, attempt, rank, step and the figures
    blob_bytes = sum(len(v) for v in r.sql_row()[after : after + 7])
    assert blob_bytes == 1000 * (1 + 4 + 4 + 8 * 4)  # 41 bytes per module and phase


def test_close_closes_every_threads_connection_and_leaves_no_wal(tmp_path):
    """The writer closes the store on its own thread; the readers' connections (the API's pool) must close too,
    or the data directory keeps an open, uncheckpointed WAL after the collector stopped."""
    store = Store(str(tmp_path))
    write(store, (store.upsert_job, "j", 2))
    readers: list[sqlite3.Connection] = []
    done = threading.Event()

    def read() -> None:
        readers.append(store.conn())
        assert store.conn().execute("SELECT count(*) FROM jobs").fetchone() == (1,)
        done.wait(30)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(readers) == 2, 10, "both readers connected")
        store.close()
        for conn in readers:
            with pytest.raises(sqlite3.ProgrammingError):
                conn.execute("SELECT 1")
        assert not (tmp_path / "modtrack.sqlite3-wal").exists()  # the last close checkpointed it
        assert store.conn().execute("SELECT job FROM jobs").fetchall() == [("j",)]  # and it opens again
    finally:
        done.set()
        for t in threads:
            t.join(10)
        store.close()


def test_collective_stats_and_call_windows_are_stored_and_read_back_as_they_came(store):
    """What a replay needs to take collective waits out as the collector did: each rank's stats per step and
    group (a ranks hash over 2**63 too, NCCL's active times or none), the clock offset the rank had, and each
    call's window of a module called twice. Retention drops the per-collective columns with the module blobs."""
    from modtrack.collector.ingest.collectives_parse import GroupStep

    def stats(step, active):
        seq, issue = np.array([3, 4], np.uint64), np.array([10, 20], np.int64) + step
        group, backend = ("1", "nccl") if active is not None else ("0", "gloo")
        return GroupStep(
            step, group, backend, 2, 2**64 - 5, 2, 0, 0, 2**63 + 1, active is not None, 0, seq, issue, active
        )

    rows = []
    for step in range(3):
        r = row("j", 1, step, [0, 1], [1, 1], [1.0, 2.0])
        r.modules["calls"][1] = 2
        r.modules.update(
            call_owner=np.array([1, 1], np.uint32), call_start=np.array([5, 50]), call_end=np.array([7, 52])
        )
        r.clock_offset_ns = -123 - step
        r.collectives = [stats(step, None), stats(step - 1, np.array([5, 6], np.int64))] if step else []
        rows.append(r)
    write(store, ("steps", rows))
    mods = store.step_modules("j", 2)[1]
    assert mods["call_owner"].tolist() == [1, 1] and mods["call_start"].tolist() == [5, 50]
    assert mods["call_end"].tolist() == [7, 52]
    assert store.clock_offsets("j", 0) == {(0, 1): -123, (1, 1): -124, (2, 1): -125}
    got = store.collective_stats("j", 0)
    assert [(rank, offset, s.step, s.group) for rank, offset, s in got] == [
        (1, -124, 0, "1"),
        (1, -124, 1, "0"),
        (1, -125, 1, "1"),
        (1, -125, 2, "0"),
    ]
    assert [(s.step, s.group) for _, _, s in store.collective_stats("j", 0, last=2)] == [(1, "0"), (1, "1"), (2, "0")]
    sent = {(s.step, s.group): s for r in rows for s in r.collectives}
    for _, _, s in got:
        expected = sent[(s.step, s.group)]
        for name in ("group", "backend", "group_size", "ranks_hash", "count", "bytes", "active_measured"):
            assert getattr(s, name) == getattr(expected, name), name
        assert s.seq.tolist() == [3, 4] and s.issue_ns.tolist() == expected.issue_ns.tolist()
        assert (s.active_ns is None) or s.active_ns.tolist() == [5, 6]
    write(store, (store.upsert_job, "j", 2), (store.set_evaluated, "j", 2), (store.drop_old_module_blobs, "j", 1))
    assert "call_owner" not in store.step_modules("j", 1)[1] and "call_owner" in store.step_modules("j", 2)[1]
    assert [len(s.seq) for _, _, s in store.collective_stats("j", 0)] == [0, 0, 0, 2]
