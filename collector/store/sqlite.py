"""SQLite store (WAL) under --data-dir: jobs, ranks, steps, module tables, episodes, traces.

One row per (job, rank, step), never one row per module: a step's per-module figures are
stored columnar, one BLOB per column (numpy .tobytes()), so 1,024 ranks x 1,000 columns per
second stays 1,024 inserts per second. All writes go through StoreWriter's single thread,
batched into one transaction every few tens of milliseconds (collector/store/writer.py); reads
open one connection per thread, which WAL lets run beside the writer. The tables and their
versions are in collector/store/schema.py.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

import numpy as np

from modtrack.collector.records import AGENT_COUNTERS, MODULE_COLUMNS, STEP_FIGURES, TRACE_COLUMNS, Episode, StepRow
from modtrack.collector.store import schema

_INSERT_STEP = (
    f"INSERT OR IGNORE INTO steps (job, rank, step, {', '.join(STEP_FIGURES)}, "
    f"{', '.join('m_' + name for name, _ in MODULE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (3 + len(STEP_FIGURES) + len(MODULE_COLUMNS)))})")
# The ranks table has one column per agent counter, named as the wire names it.
_UPDATE_RANK_SEEN = (
    "UPDATE ranks SET last_seen_ns = ?, state = 'live', "
    + ", ".join(f"{name} = ?" for name in AGENT_COUNTERS) + " WHERE job = ? AND rank = ?")
_INSERT_TRACE = (
    "INSERT OR IGNORE INTO traces (job, rank, step, capture_id, t_module, t_phase, t_start, "
    "t_end, t_depth) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: an Ack promises the report survives a crash of the host, not only of the process.
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _blobs(row, names_types, offset: int) -> dict:
    return {name: (np.frombuffer(row[offset + i], dtype) if row[offset + i] is not None
                   else np.zeros(0, dtype))
            for i, (name, dtype) in enumerate(names_types)}


def _episode(row) -> Episode:
    (eid, job, rank, host, module, phase, slowdown, first, last, state, cost, pct, ranks) = row
    return Episode(job=job, rank=rank, host=host, module=module, phase=phase, slowdown=slowdown,
                   first_step=first, last_step=last, state=state, cost_ms_per_step=cost,
                   cost_pct=pct or 0.0, ranks=json.loads(ranks or "[]"), id=eid)


class Store:
    """Reads from any thread (one connection each); writes only from StoreWriter's thread."""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "modtrack.sqlite3")
        self._local = threading.local()
        self._retained_from: dict[str, int] = {}  # job -> steps below this already trimmed
        self.schema_version = schema.migrate(self.conn())

    def conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- writes (StoreWriter's thread, inside its transaction) ---------------------------
    def upsert_job(self, job: str, world_size: int) -> None:
        self.conn().execute(
            "INSERT INTO jobs (job, world_size, created_ns) VALUES (?, ?, ?) "
            "ON CONFLICT (job) DO UPDATE SET world_size = excluded.world_size",
            (job, world_size, time.time_ns()))

    def upsert_rank(self, job: str, rank: int, info: dict) -> None:
        cols = ["job", "rank", *info]
        self.conn().execute(
            f"INSERT INTO ranks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT (job, rank) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in info),
            (job, rank, *info.values()))

    def add_modules(self, job: str, first_id: int, names: list[str]) -> None:
        self.conn().executemany(
            "INSERT OR IGNORE INTO modules (job, module_id, name) VALUES (?, ?, ?)",
            [(job, first_id + i, name) for i, name in enumerate(names)])

    def set_evaluated(self, job: str, step: int) -> None:
        self.conn().execute(
            "UPDATE jobs SET last_evaluated_step = MAX(COALESCE(last_evaluated_step, -1), ?) "
            "WHERE job = ?", (step, job))

    def upsert_episode(self, ep: Episode) -> None:
        self.conn().execute(
            "INSERT INTO episodes (id, job, rank, host, module, phase, slowdown, first_step, "
            "last_step, state, cost_ms_per_step, cost_pct, ranks, updated_ns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "host = excluded.host, slowdown = excluded.slowdown, last_step = excluded.last_step, "
            "state = excluded.state, cost_ms_per_step = excluded.cost_ms_per_step, "
            "cost_pct = excluded.cost_pct, ranks = excluded.ranks, updated_ns = excluded.updated_ns",
            (ep.id, ep.job, ep.rank, ep.host, ep.module, ep.phase, float(ep.slowdown),
             int(ep.first_step), int(ep.last_step), ep.state, float(ep.cost_ms_per_step),
             float(ep.cost_pct), json.dumps([int(r) for r in ep.ranks]), time.time_ns()))

    def add_capture(self, capture_id: str, job: str, steps: int, ranks: int) -> None:
        self.conn().execute(
            "INSERT OR IGNORE INTO captures (capture_id, job, steps, requested_ns, ranks) "
            "VALUES (?, ?, ?, ?, ?)", (capture_id, job, steps, time.time_ns(), ranks))

    def insert_steps(self, rows: list[StepRow]) -> None:
        """INSERT OR IGNORE: a report replayed after a reconnect changes nothing."""
        conn = self.conn()
        conn.executemany(_INSERT_STEP, [r.sql_row() for r in rows])
        traces = [r.trace_row() for r in rows if r.trace is not None]
        if traces:
            conn.executemany(_INSERT_TRACE, traces)
        seen = {}
        for r in rows:  # one last-seen update per rank per batch, not per report
            seen[(r.job, r.rank)] = r.counters
        now = time.time_ns()
        conn.executemany(_UPDATE_RANK_SEEN, [(now, *(c.get(name, 0) for name in AGENT_COUNTERS), job, rank)
                                             for (job, rank), c in seen.items()])

    def drop_old_module_blobs(self, job: str, keep_steps: int) -> int:
        """Retention: module blobs of steps older than the newest keep_steps become NULL; the
        step-level figures stay forever."""
        conn = self.conn()
        newest = conn.execute("SELECT MAX(step) FROM steps WHERE job = ?", (job,)).fetchone()[0]
        if newest is None:
            return 0
        cutoff = newest - keep_steps + 1
        lo = self._retained_from.get(job, -1)  # only the steps not trimmed before: no rescans
        cur = conn.execute(
            "UPDATE steps SET " + ", ".join(f"m_{n} = NULL" for n, _ in MODULE_COLUMNS)
            + " WHERE job = ? AND step >= ? AND step < ? AND m_module IS NOT NULL",
            (job, lo, cutoff))
        self._retained_from[job] = max(lo, cutoff)
        return cur.rowcount

    # --- reads --------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        rows = self.conn().execute(
            "SELECT j.job, j.world_size, j.last_evaluated_step, "
            "(SELECT MAX(step) FROM steps s WHERE s.job = j.job) FROM jobs j ORDER BY j.job")
        return [{"job": job, "world_size": ws, "last_evaluated_step": ev, "last_step": last}
                for job, ws, ev, last in rows]

    def job(self, job: str) -> dict | None:
        """One row of jobs(), or None."""
        row = self.conn().execute(
            "SELECT job, world_size, last_evaluated_step, (SELECT MAX(step) FROM steps s WHERE s.job = j.job) "
            "FROM jobs j WHERE job = ?", (job,)).fetchone()
        if row is None:
            return None
        return {"job": row[0], "world_size": row[1], "last_evaluated_step": row[2], "last_step": row[3]}

    def forget_job(self, job: str) -> None:
        """Writer thread: drop what is held in memory for a job that left the collector's memory."""
        self._retained_from.pop(job, None)

    def job_exists(self, job: str) -> bool:
        return self.conn().execute("SELECT 1 FROM jobs WHERE job = ?", (job,)).fetchone() is not None

    def last_evaluated_step(self, job: str) -> int | None:
        row = self.conn().execute(
            "SELECT last_evaluated_step FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else row[0]

    def ranks(self, job: str) -> list[dict]:
        cur = self.conn().execute("SELECT * FROM ranks WHERE job = ? ORDER BY rank", (job,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur]

    def module_names(self, job: str) -> list[str]:
        """Job-wide id -> name (ids are dense from 0)."""
        rows = self.conn().execute(
            "SELECT module_id, name FROM modules WHERE job = ? ORDER BY module_id", (job,))
        return [name for _, name in rows]

    def last_steps(self, job: str, last: int) -> list[tuple]:
        """(step, rank, *STEP_FIGURES) for the newest `last` steps, ascending."""
        return self.conn().execute(
            f"SELECT step, rank, {', '.join(STEP_FIGURES)} FROM steps WHERE job = ? AND step IN "
            "(SELECT DISTINCT step FROM steps WHERE job = ? ORDER BY step DESC LIMIT ?) "
            "ORDER BY step, rank", (job, job, last)).fetchall()

    def step_modules(self, job: str, step: int) -> dict[int, dict]:
        """rank -> MODULE_COLUMNS arrays for one step (empty arrays once retention dropped them)."""
        rows = self.conn().execute(
            f"SELECT rank, {', '.join('m_' + n for n, _ in MODULE_COLUMNS)} FROM steps "
            "WHERE job = ? AND step = ? ORDER BY rank", (job, step))
        return {row[0]: _blobs(row, MODULE_COLUMNS, 1) for row in rows}

    def episodes(self, job: str | None = None, state: str | None = None) -> list[Episode]:
        sql = ("SELECT id, job, rank, host, module, phase, slowdown, first_step, last_step, state, "
               "cost_ms_per_step, cost_pct, ranks FROM episodes WHERE 1 = 1")
        args = []
        if job is not None:
            sql += " AND job = ?"
            args.append(job)
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        sql += " ORDER BY state = 'active' DESC, last_step DESC, id"
        return [_episode(row) for row in self.conn().execute(sql, args)]

    def max_episode_id(self) -> int:
        return self.conn().execute("SELECT COALESCE(MAX(id), 0) FROM episodes").fetchone()[0]

    def trace_calls(self, job: str, from_step: int, to_step: int) -> dict[int, list[dict]]:
        """rank -> [{"step", "capture_id", TRACE_COLUMNS arrays...}] for captured steps in
        [from_step, to_step]; module ids are job-wide (see module_names)."""
        out: dict[int, list[dict]] = {}
        rows = self.conn().execute(
            "SELECT rank, step, capture_id, t_module, t_phase, t_start, t_end, t_depth FROM traces "
            "WHERE job = ? AND step BETWEEN ? AND ? ORDER BY rank, step", (job, from_step, to_step))
        for row in rows:
            out.setdefault(row[0], []).append(
                {"step": row[1], "capture_id": row[2], **_blobs(row, TRACE_COLUMNS, 3)})
        return out

    def rank_clocks(self, job: str) -> dict[int, dict]:
        """rank -> {"host", "clock_offset_ns", "rtt_ns"}: collector_ns = agent_ns + offset."""
        rows = self.conn().execute(
            "SELECT rank, host, clock_offset_ns, rtt_ns FROM ranks WHERE job = ?", (job,))
        return {r: {"host": h, "clock_offset_ns": o or 0, "rtt_ns": rtt} for r, h, o, rtt in rows}
