"""The collector under the conditions a long-lived one meets: a rank joining while a step is being
evaluated, failures counted where Prometheus reads them, finished jobs leaving memory but not SQLite,
and a data directory written by the previous schema.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import urllib.request

import grpc
import numpy as np
import pytest

from harness.collector_thread import CollectorThread
from harness.http import get_json, post
from harness.waiting import wait_for
from modtrack.collector.pipeline.merge import RankState
from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos import modtrack_pb2_grpc as pb_grpc

MODULES = ["Net", "Net.a", "Net.b"]


class Rank:
    """One agent's stream as plain gRPC: a Hello, then whatever is sent; acks are collected."""

    def __init__(self, target: str, job: str, rank: int, world_size: int, clock_kind=pb.CLOCK_KIND_CPU):
        self.channel = grpc.insecure_channel(target)
        self.outgoing: queue.Queue = queue.Queue()
        self.acks: list[int] = []
        self.responses = pb_grpc.CollectorStub(self.channel).Stream(iter(self.outgoing.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        hello = pb.Hello(
            protocol_version=1,
            job=job,
            rank=rank,
            world_size=world_size,
            host=f"host{rank}",
            pid=1000 + rank,
            module_names=MODULES,
            session="s",
            clock_kind=clock_kind,
        )
        self.outgoing.put(pb.AgentMessage(hello=hello))

    def _read(self) -> None:
        try:
            for msg in self.responses:
                if msg.WhichOneof("body") == "ack":
                    self.acks.append(msg.ack.step)
        except grpc.RpcError:
            pass

    def report(self, step: int, self_ms=(1.0, 2.0, 3.0), wall_ms: int = 100) -> None:
        ns = [int(ms * 1e6) for ms in self_ms]
        rep = pb.StepReport(step=step, start_ns=step * 10**9, end_ns=step * 10**9 + wall_ms * 1_000_000)
        for phase in (pb.PHASE_FORWARD, pb.PHASE_BACKWARD):
            rep.phases.append(
                pb.PhaseStats(
                    phase=phase,
                    module_id=range(len(ns)),
                    calls=[1] * len(ns),
                    inclusive_ns=ns,
                    self_ns=ns,
                    first_start_ns=[1000] * len(ns),
                    last_end_ns=[1000 + n for n in ns],
                )
            )
        self.outgoing.put(pb.AgentMessage(report=rep))

    def close(self) -> None:
        self.outgoing.put(None)
        self.reader.join(10)
        self.channel.close()


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def job_row(url: str, job: str) -> dict:
    return next((j for j in get_json(f"{url}/api/v1/jobs")["jobs"] if j["job"] == job), {})


@pytest.fixture
def served(tmp_path):
    c = CollectorThread(tmp_path / "data", watermark_s=0.3)
    try:
        yield c
    finally:
        c.stop()


def test_a_hello_during_the_first_evaluation_loses_no_verdict(served, monkeypatch):
    """Rank 1 says Hello while the evaluation thread works on step 0 of rank 0 (forced: the
    evaluation thread waits inside the step until the Hello is in). The step is still evaluated,
    and no evaluation error is counted."""
    from modtrack.collector.pipeline import detector as detector_module

    c = served.collector
    joined = threading.Event()
    late: list[Rank] = []

    def hello_now():
        """On the evaluation thread, once: rank 1 connects and the loop takes its Hello."""
        if joined.is_set() or threading.current_thread() is served.thread:
            return
        joined.set()
        late.append(Rank(served.grpc_target, "race", 1, 2))
        wait_for(lambda: 1 in c.merger.jobs["race"].ranks, what="rank 1's Hello")

    class HookedRank(RankState):
        """Rank 0's state: the first read of its clock kind off the loop thread lets rank 1 in."""

        def __getattribute__(self, name):
            if name == "clock_kind":
                hello_now()
            return super().__getattribute__(name)

    observe = detector_module.Detector.observe

    def hooked_observe(self, matrix):
        hello_now()  # an evaluation that reads no rank state still sees the Hello arrive mid-step
        return observe(self, matrix)

    monkeypatch.setattr(detector_module.Detector, "observe", hooked_observe)
    rank0 = Rank(served.grpc_target, "race", 0, 2, clock_kind=pb.CLOCK_KIND_CUDA)  # so no look at ranks stops early
    try:
        wait_for(lambda: "race" in c.merger.jobs and 0 in c.merger.jobs["race"].ranks, what="rank 0's Hello")
        c.merger.jobs["race"].ranks[0].__class__ = HookedRank
        rank0.report(0)  # world size 2 with one rank known: evaluated at the watermark
        wait_for(
            lambda: job_row(served.url, "race").get("last_evaluated_step") is not None or c.eval_errors,
            what="step 0's evaluation",
        )
        assert joined.is_set(), "the Hello was not forced into the evaluation"
        assert c.eval_errors == 0
        assert job_row(served.url, "race")["last_evaluated_step"] == 0
    finally:
        rank0.close()
        for r in late:
            r.close()


def metric(text: str, name: str, **labels) -> float | None:
    """One sample's value from a /metrics text, or None."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


def test_every_failure_counter_is_in_metrics(served, monkeypatch):
    """A step whose evaluation raises, a report after its step was evaluated, a refused stream and
    a failed store commit each show in /metrics; the failed step is still marked evaluated, and the
    next step gets its verdict."""
    from modtrack.collector.pipeline import detector as detector_module

    c = served.collector
    observe = detector_module.Detector.observe

    def observe_failing_step_1(self, matrix):
        if matrix.step == 1:
            raise RuntimeError("injected: the detector fails on step 1")
        return observe(self, matrix)

    monkeypatch.setattr(detector_module.Detector, "observe", observe_failing_step_1)
    rank = Rank(served.grpc_target, "counted", 0, 1)
    bad = Rank(served.grpc_target, "", 0, 1)  # a Hello without a job: refused
    try:
        for step in range(3):
            rank.report(step)
        wait_for(lambda: job_row(served.url, "counted").get("last_evaluated_step") == 2, what="steps 0-2 evaluated")
        rank.report(1)  # step 1 again, after it was evaluated: late
        wait_for(lambda: rank.acks and rank.acks[-1] >= 2 and c.merger.late_reports >= 1, what="the late report")

        def failing_write():  # a store transaction that fails and is rolled back
            raise sqlite3.OperationalError("injected: disk I/O error")

        async def write():
            with pytest.raises(sqlite3.OperationalError):
                await c.writer.call(failing_write)

        asyncio.run_coroutine_threadsafe(write(), served.loop).result(10)
        wait_for(lambda: c.writer.errors >= 1, what="the failed commit")
        text = get_text(f"{served.url}/metrics")
        assert metric(text, "modtrack_eval_errors_total") == 1
        assert metric(text, "modtrack_late_reports_total") == 1
        assert metric(text, "modtrack_ingest_rejected_total", reason="invalid_argument") == 1
        assert metric(text, "modtrack_store_write_errors_total") == 1
        assert metric(text, "modtrack_alert_changes_dropped_total") == 0
        assert metric(text, "modtrack_jobs_forgotten_total") == 0
        assert metric(text, "modtrack_last_step", job="counted") == 2  # step 2 was evaluated after the failure
    finally:
        rank.close()
        bad.close()


def test_a_finished_job_leaves_memory_and_stays_queryable(tmp_path):
    """A job ends; after the retention its in-memory state is gone (its /metrics series too, and
    they do not come back on a later tick), the API answers from SQLite, and the same job coming
    back carries on with the same module ids and steps."""
    served = CollectorThread(tmp_path / "data", watermark_s=0.3, job_retention_s=0.5, retention_every_s=0.1)
    c = served.collector
    try:
        rank = Rank(served.grpc_target, "done", 0, 1)
        for step in range(3):
            rank.report(step)
        wait_for(lambda: job_row(served.url, "done").get("last_evaluated_step") == 2, what="steps evaluated")
        rank.report(1, wall_ms=150)  # another report of step 1: late, and refused by the store (a conflict)
        wait_for(
            lambda: metric(get_text(f"{served.url}/metrics"), "modtrack_reports_duplicate_total", reason="conflict"),
            what="the conflicting report counted",
        )
        assert (
            "done" in c.evaluator.detectors
            and metric(get_text(f"{served.url}/metrics"), "modtrack_last_step", job="done") == 2
        )
        assert post(served.url, "/api/v1/jobs/done/sampling?every=5")[0] == 200  # sampled mode, in memory
        assert job_row(served.url, "done")["sample_every"] == 5
        rank.close()
        wait_for(lambda: "done" not in c.merger.jobs, timeout=10, what="the job to be forgotten")
        wait_for(lambda: "done" not in c.evaluator.detectors, what="the detector to be forgotten")
        wait_for(lambda: "done" not in c.store.duplicates, what="the store's count of the job's duplicates dropped")
        assert "done" not in c.ingest.streams
        assert job_row(served.url, "done")["sample_every"] is None  # the sampling set over the API went with it
        assert not [key for key in c.evaluator.episode_ids if key[0] == "done"]
        other = Rank(served.grpc_target, "other", 0, 1)  # evaluated on a tick after the forgetting
        other.report(0)
        wait_for(lambda: job_row(served.url, "other").get("last_evaluated_step") == 0, what="another job's step")
        other.close()
        text = get_text(f"{served.url}/metrics")
        assert [line for line in text.splitlines() if 'job="done"' in line] == []
        assert metric(text, "modtrack_jobs_forgotten_total") >= 1

        row = job_row(served.url, "done")
        assert (row["state"], row["last_step"], row["last_evaluated_step"]) == ("stopped", 2, 2)
        steps = get_json(f"{served.url}/api/v1/jobs/done/steps?last=10")["steps"]
        assert [s["step"] for s in steps] == [0, 1, 2]
        modules = get_json(f"{served.url}/api/v1/jobs/done/modules?step=2")["modules"]
        assert {(m["module"], m["phase"]) for m in modules} == {
            (n, p) for n in MODULES for p in ("forward", "backward")
        }

        again = Rank(served.grpc_target, "done", 0, 1)  # the job comes back: read back from SQLite
        again.report(3, self_ms=(4.0, 5.0, 6.0))
        wait_for(lambda: job_row(served.url, "done").get("last_evaluated_step") == 3, what="step 3 evaluated")
        assert c.merger.jobs["done"].names == MODULES  # the same job-wide ids, not a second table
        modules = get_json(f"{served.url}/api/v1/jobs/done/modules?step=3")["modules"]
        assert {m["module"]: m["ms_by_rank"]["0"] for m in modules if m["phase"] == "forward"} == {
            "Net": 4.0,
            "Net.a": 5.0,
            "Net.b": 6.0,
        }
        again.close()
    finally:
        served.stop()


# The schema as the collector wrote it before schema versions (user_version 0), frozen here.
SCHEMA_BEFORE_VERSIONS = """
CREATE TABLE IF NOT EXISTS jobs (
  job TEXT PRIMARY KEY, world_size INTEGER NOT NULL, created_ns INTEGER NOT NULL,
  last_evaluated_step INTEGER);
CREATE TABLE IF NOT EXISTS ranks (
  job TEXT NOT NULL, rank INTEGER NOT NULL, local_rank INTEGER, group_rank INTEGER,
  host TEXT, pid INTEGER, session TEXT, torch_version TEXT, agent_version TEXT,
  clock_kind INTEGER, clock_offset_ns INTEGER, rtt_ns INTEGER, last_seen_ns INTEGER,
  state TEXT NOT NULL DEFAULT 'live', reports_dropped INTEGER DEFAULT 0,
  reconnects INTEGER DEFAULT 0, hook_errors INTEGER DEFAULT 0, send_errors INTEGER DEFAULT 0,
  PRIMARY KEY (job, rank));
CREATE TABLE IF NOT EXISTS modules (
  job TEXT NOT NULL, module_id INTEGER NOT NULL, name TEXT NOT NULL,
  PRIMARY KEY (job, module_id));
CREATE TABLE IF NOT EXISTS steps (
  job TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL,
  start_ns INTEGER, end_ns INTEGER, forward_ns INTEGER, backward_ns INTEGER,
  optimizer_ns INTEGER, data_ns INTEGER, backward_tail_ns INTEGER, recompute_ns INTEGER,
  m_phase BLOB, m_module BLOB, m_calls BLOB, m_inclusive BLOB, m_self BLOB,
  m_first_start BLOB, m_last_end BLOB,
  UNIQUE (job, step, rank));
CREATE TABLE IF NOT EXISTS episodes (
  id INTEGER PRIMARY KEY, job TEXT NOT NULL, rank INTEGER NOT NULL, host TEXT,
  module TEXT, phase TEXT, slowdown REAL, first_step INTEGER, last_step INTEGER,
  state TEXT, cost_ms_per_step REAL, cost_pct REAL, ranks TEXT, updated_ns INTEGER);
CREATE INDEX IF NOT EXISTS episodes_by_job ON episodes (job, state);
CREATE TABLE IF NOT EXISTS captures (
  capture_id TEXT PRIMARY KEY, job TEXT NOT NULL, steps INTEGER, requested_ns INTEGER,
  ranks INTEGER);
CREATE TABLE IF NOT EXISTS traces (
  job TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, capture_id TEXT,
  t_module BLOB, t_phase BLOB, t_start BLOB, t_end BLOB, t_depth BLOB,
  PRIMARY KEY (job, step, rank));
"""


def module_blobs(self_ns: np.ndarray) -> tuple[bytes, ...]:
    """A step row's module columns (phase, module, calls, inclusive, self, first start, last end) for the three
    modules, forward, called once, inclusive = self."""
    return (
        np.full(3, 1, np.uint8).tobytes(),
        np.arange(3, dtype=np.uint32).tobytes(),
        np.ones(3, np.uint32).tobytes(),
        self_ns.tobytes(),
        self_ns.tobytes(),
        np.zeros(3, np.int64).tobytes(),
        self_ns.tobytes(),
    )


def write_old_data_dir(data_dir) -> None:
    """A data directory as the previous collector left it: one job, two ranks, two steps, an episode."""
    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / "modtrack.sqlite3")
    conn.executescript(SCHEMA_BEFORE_VERSIONS)
    conn.execute("INSERT INTO jobs VALUES ('old', 2, 1, 1)")
    for rank in range(2):
        conn.execute(
            "INSERT INTO ranks (job, rank, host, state, clock_kind) VALUES ('old', ?, ?, 'live', 1)",
            (rank, f"host{rank}"),
        )
    conn.executemany("INSERT INTO modules VALUES ('old', ?, ?)", list(enumerate(MODULES)))
    for step in range(2):
        for rank in range(2):
            self_ns = np.array([1, 2, 3 + rank * 3], np.int64) * 1_000_000  # rank 1 slow in Net.b
            conn.execute(
                "INSERT INTO steps VALUES ('old', ?, ?, ?, ?, 0, 0, 0, 0, 1000000, 0, ?, ?, ?, ?, ?, ?, ?)",
                (rank, step, step * 10**9, step * 10**9 + 100_000_000, *module_blobs(self_ns)),
            )
    conn.execute(
        "INSERT INTO episodes VALUES (7, 'old', 1, 'host1', 'Net.b', 'forward', 2.0, 0, 1, 'active', 3.0, 3.0, '[]', 1)"
    )
    conn.commit()
    conn.close()


def test_a_data_directory_of_the_previous_schema_opens_and_reads_back(tmp_path):
    from modtrack.collector.store import schema

    write_old_data_dir(tmp_path / "data")
    served = CollectorThread(tmp_path / "data")
    try:
        url = served.url
        assert job_row(url, "old") == {
            "job": "old",
            "world_size": 2,
            "ranks_reporting": 0,
            "last_step": 1,
            "last_evaluated_step": 1,
            "attempt": 0,  # the migration keeps every older row as attempt 0
            "state": "stopped",
            "sample_every": None,  # sampled mode never set through the API
        }
        steps = get_json(f"{url}/api/v1/jobs/old/steps?last=10")["steps"]
        assert [(s["step"], [r["host"] for r in s["ranks"]]) for s in steps] == [
            (0, ["host0", "host1"]),
            (1, ["host0", "host1"]),
        ]
        modules = get_json(f"{url}/api/v1/jobs/old/modules?step=1")["modules"]
        assert {m["module"]: m["ms_by_rank"] for m in modules} == {
            "Net": {"0": 1.0, "1": 1.0},
            "Net.a": {"0": 2.0, "1": 2.0},
            "Net.b": {"0": 3.0, "1": 6.0},
        }
        (episode,) = get_json(f"{url}/api/v1/jobs/old/stragglers")["stragglers"]
        assert (episode["id"], episode["rank"], episode["module"], episode["state"]) == (7, 1, "Net.b", "active")
    finally:
        served.stop()
    conn = sqlite3.connect(tmp_path / "data" / "modtrack.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION
    conn.close()


def test_a_data_directory_of_a_newer_schema_is_refused(tmp_path):
    from modtrack.collector.store import schema
    from modtrack.collector.store.sqlite import Store

    (tmp_path / "data").mkdir()
    conn = sqlite3.connect(tmp_path / "data" / "modtrack.sqlite3")
    conn.execute(f"PRAGMA user_version = {schema.VERSION + 1}")
    conn.close()
    with pytest.raises(schema.SchemaError, match="newer than this collector"):
        Store(str(tmp_path / "data"))


def write_v2_data_dir(data_dir) -> None:
    """A data directory as the collector of schema version 2 left it (attempts, verdict causes; no GPU
    explanations yet): its tables made by its own migrations, which are never edited, then its rows."""
    from modtrack.collector.store import schema

    data_dir.mkdir(parents=True)
    conn = sqlite3.connect(data_dir / "modtrack.sqlite3")
    for migration in schema.MIGRATIONS[:2]:
        migration(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute(
        "INSERT INTO jobs (job, world_size, created_ns, last_evaluated_step, attempt) VALUES ('v2', 2, 1, 0, 1)"
    )
    for rank in range(2):
        conn.execute(
            "INSERT INTO ranks (job, rank, host, state, clock_kind, attempt) VALUES ('v2', ?, ?, 'live', 2, 1)",
            (rank, f"host{rank}"),
        )
    conn.executemany("INSERT INTO modules VALUES ('v2', ?, ?)", list(enumerate(MODULES)))
    for rank in range(2):
        self_ns = np.array([1, 2, 3 + rank * 3], np.int64) * 1_000_000
        conn.execute(
            "INSERT INTO steps (job, attempt, rank, step, start_ns, end_ns, m_phase, m_module, m_calls, m_inclusive, "
            "m_self, m_first_start, m_last_end) VALUES ('v2', 1, ?, 0, 0, 100000000, ?, ?, ?, ?, ?, ?, ?)",
            (rank, *module_blobs(self_ns)),
        )
    conn.execute(
        "INSERT INTO episodes (id, job, rank, host, module, phase, slowdown, first_step, last_step, state, "
        "cost_ms_per_step, cost_pct, ranks, updated_ns, attempt, cause, excess_ms, modules) VALUES (4, 'v2', 1, "
        "'host1', 'Net.b', 'forward', 2.0, 0, 0, 'resolved', 3.0, 3.0, '[]', 1, 1, 'compute in 1 module', 3.0, "
        """'[{"module": "Net.b", "phase": "forward", "excess_ms": 3.0, "slowdown": 2.0}]')"""
    )
    conn.commit()
    conn.close()


def test_a_data_directory_of_schema_version_2_opens_and_reads_back(tmp_path):
    """The schema before this one: every row served as it was, and the new column empty."""
    from modtrack.collector.store import schema

    write_v2_data_dir(tmp_path / "data")
    served = CollectorThread(tmp_path / "data")
    try:
        url = served.url
        row = job_row(url, "v2")
        assert (row["attempt"], row["last_step"], row["last_evaluated_step"], row["state"]) == (1, 0, 0, "stopped")
        modules = get_json(f"{url}/api/v1/jobs/v2/modules?step=0")["modules"]
        assert {m["module"]: m["ms_by_rank"] for m in modules} == {
            "Net": {"0": 1.0, "1": 1.0},
            "Net.a": {"0": 2.0, "1": 2.0},
            "Net.b": {"0": 3.0, "1": 6.0},
        }
        (episode,) = get_json(f"{url}/api/v1/jobs/v2/stragglers")["stragglers"]
        assert (episode["id"], episode["attempt"], episode["cause"], episode["explanation"]) == (
            4,
            1,
            "compute in 1 module",
            "",
        )
        assert [(m["module"], m["excess_ms"]) for m in episode["modules"]] == [("Net.b", 3.0)]
    finally:
        served.stop()
    conn = sqlite3.connect(tmp_path / "data" / "modtrack.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION
    conn.close()


def test_a_data_directory_of_schema_version_5_serves_its_steps_with_no_gc_pauses(tmp_path):
    """The schema before GC pauses (and the loop's own code) were reported: its steps are served as they were, with
    GC pauses and host time of 0, and the directory is migrated to the newest schema."""
    from modtrack.collector.store import schema

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / "modtrack.sqlite3")
    for migration in schema.MIGRATIONS[:5]:
        migration(conn)
    conn.execute("PRAGMA user_version = 5")
    conn.execute("INSERT INTO jobs (job, world_size, created_ns, last_evaluated_step) VALUES ('v5', 2, 1, 0)")
    for rank in range(2):
        conn.execute("INSERT INTO ranks (job, rank, host, state) VALUES ('v5', ?, ?, 'live')", (rank, f"host{rank}"))
        conn.execute(
            "INSERT INTO steps (job, attempt, rank, step, start_ns, end_ns, forward_ns, backward_ns, optimizer_ns, "
            "data_ns, backward_tail_ns, recompute_ns, clock_offset_ns) VALUES ('v5', 0, ?, 0, 0, 100000000, 0, 0, "
            "3000000, 0, 0, 0, 0)",
            (rank,),
        )
    conn.commit()
    conn.close()
    served = CollectorThread(data_dir)
    try:
        (step,) = get_json(f"{served.url}/api/v1/jobs/v5/steps?last=10")["steps"]
        assert [
            (r["rank"], r["optimizer_ms"], r["gc_ms"], r["gc_collections"], r["host_ms"], r["host_wait_ms"])
            for r in step["ranks"]
        ] == [
            (0, 3.0, 0.0, 0, 0.0, 0.0),
            (1, 3.0, 0.0, 0, 0.0, 0.0),
        ]
    finally:
        served.stop()
    conn = sqlite3.connect(data_dir / "modtrack.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.VERSION == 8
    conn.close()
