"""SQLite store (WAL) under --data-dir: jobs, ranks, steps, module tables, episodes, traces.

One row per (job, rank, step), never one row per module: a step's per-module figures are
stored columnar, one BLOB per column (numpy .tobytes()), so 1,024 ranks x 1,000 columns per
second stays 1,024 inserts per second. All writes go through StoreWriter's single thread,
batched into one transaction every few tens of milliseconds; reads open one connection per
thread, which WAL lets run beside the writer.
"""
from __future__ import annotations

import asyncio
import json
import os
import queue
import sqlite3
import threading
import time

import numpy as np
from modtrack.collector.records import MODULE_COLUMNS, STEP_FIGURES, TRACE_COLUMNS, Episode, StepRow

SCHEMA = """
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

_INSERT_STEP = (
    f"INSERT OR IGNORE INTO steps (job, rank, step, {', '.join(STEP_FIGURES)}, "
    f"{', '.join('m_' + name for name, _ in MODULE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * (3 + len(STEP_FIGURES) + len(MODULE_COLUMNS)))})")
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
        self.conn().executescript(SCHEMA)

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
        conn.executemany(
            "UPDATE ranks SET last_seen_ns = ?, state = 'live', reports_dropped = ?, "
            "reconnects = ?, hook_errors = ?, send_errors = ? WHERE job = ? AND rank = ?",
            [(now, c.get("reports_dropped", 0), c.get("reconnects", 0), c.get("hook_errors", 0),
              c.get("send_errors", 0), job, rank) for (job, rank), c in seen.items()])

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


class StoreWriter:
    """The single writer thread: gathers work for `batch_s`, runs it in one transaction,
    commits, then resolves each caller's asyncio future (ingest acks only after that)."""

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop, batch_s: float = 0.05):
        self.store = store
        self.loop = loop
        self.batch_s = batch_s
        self.errors = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="modtrack-store-writer", daemon=True)
        self._thread.start()

    def steps(self, rows: list[StepRow]) -> asyncio.Future:
        return self._put(("steps", rows))

    def call(self, fn, *args) -> asyncio.Future:
        """Run store method `fn(*args)` in the next transaction."""
        return self._put(("call", (fn, args)))

    def _put(self, item) -> asyncio.Future:
        fut = self.loop.create_future()
        self._queue.put((item, fut))
        return fut

    def call_threadsafe(self, fn, *args) -> None:
        """From a thread other than the loop's: fire and forget."""
        self._queue.put((("call", (fn, args)), None))

    def close(self) -> None:
        """Commits what is queued, then ends the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            # Sleep out the batch window, then take what came: the loop's puts wake no one,
            # where a get() per item woke this thread (and took the GIL) once per report.
            time.sleep(self.batch_s)
            batch = [first]
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
        self.store.close()

    def _commit(self, batch) -> None:
        conn = self.store.conn()
        error = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            rows = []  # consecutive reports go in one executemany; order is kept
            for (kind, payload), _ in batch:
                if kind == "steps":
                    rows.extend(payload)
                    continue
                if rows:
                    self.store.insert_steps(rows)
                    rows = []
                fn, args = payload
                fn(*args)
            if rows:
                self.store.insert_steps(rows)
            conn.execute("COMMIT")
        except Exception as exc:  # keep serving; the callers see the error, agents replay
            error = exc
            self.errors += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        futures = [fut for _, fut in batch if fut is not None]
        if futures:  # one wake-up of the loop per commit, not one per report
            self.loop.call_soon_threadsafe(_resolve, futures, error)


def _resolve(futures: list[asyncio.Future], error) -> None:
    for fut in futures:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)
