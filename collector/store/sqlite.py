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
import logging
import os
import sqlite3
import threading
import time

import numpy as np

from modtrack.collector.ingest.collectives_parse import GroupStep
from modtrack.collector.records import (
    AGENT_COUNTERS,
    CALL_COLUMNS,
    MODULE_COLUMNS,
    STEP_FIGURES,
    TRACE_COLUMNS,
    Episode,
    StepRow,
)
from modtrack.collector.store import schema

log = logging.getLogger("modtrack.collector.store")

_BLOB_COLUMNS = MODULE_COLUMNS + CALL_COLUMNS  # a step's per-module (and per-call) columns, stored as m_<name>
_INSERT_STEP = (
    f"INSERT OR IGNORE INTO steps (job, attempt, rank, step, {', '.join(STEP_FIGURES)}, "
    f"{', '.join('m_' + name for name, _ in _BLOB_COLUMNS)}, clock_offset_ns) "
    f"VALUES ({', '.join('?' * (5 + len(STEP_FIGURES) + len(_BLOB_COLUMNS)))})"
)
_COLLECTIVE_FIELDS = (
    "grp, ranks_hash, backend, group_size, count, total_ns, wait_ns, bytes, active_measured, unlisted, "
    "clock_offset_ns, c_seq, c_issue, c_active"
)
_INSERT_COLLECTIVE = (
    f"INSERT OR IGNORE INTO collectives (job, attempt, rank, step, {_COLLECTIVE_FIELDS}) VALUES ({', '.join('?' * 18)})"
)
# The ranks table has one column per agent counter, named as the wire names it.
_UPDATE_RANK_SEEN = (
    "UPDATE ranks SET last_seen_ns = ?, state = 'live', "
    + ", ".join(f"{name} = ?" for name in AGENT_COUNTERS)
    + " WHERE job = ? AND rank = ?"
)
_INSERT_TRACE = (
    "INSERT OR IGNORE INTO traces (job, attempt, rank, step, capture_id, t_module, t_phase, t_start, "
    "t_end, t_depth) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: an Ack promises the report survives a crash of the host, not only of the process.
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _blobs(row, names_types, offset: int) -> dict:
    return {
        name: (np.frombuffer(row[offset + i], dtype) if row[offset + i] is not None else np.zeros(0, dtype))
        for i, (name, dtype) in enumerate(names_types)
    }


_EPISODE_COLUMNS = (
    "id, job, rank, host, module, phase, slowdown, first_step, last_step, state, "
    "cost_ms_per_step, cost_pct, ranks, attempt, cause, excess_ms, modules, explanation"
)


def _episode(row) -> Episode:
    (
        eid,
        job,
        rank,
        host,
        module,
        phase,
        slowdown,
        first,
        last,
        state,
        cost,
        pct,
        ranks,
        attempt,
        cause,
        excess,
        modules,
        explanation,
    ) = row
    return Episode(
        job=job,
        rank=rank,
        host=host,
        module=module,
        phase=phase,
        slowdown=slowdown,
        first_step=first,
        last_step=last,
        state=state,
        cost_ms_per_step=cost,
        cost_pct=pct or 0.0,
        ranks=json.loads(ranks or "[]"),
        id=eid,
        attempt=attempt or 0,
        cause=cause or "",
        excess_ms=excess or 0.0,
        modules=json.loads(modules or "[]"),
        explanation=explanation or "",
    )


class Store:
    """Reads from any thread (one connection each); writes only from StoreWriter's thread."""

    def __init__(self, data_dir: str):
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "modtrack.sqlite3")
        self._local = threading.local()
        self._opened: list[tuple[threading.Thread, sqlite3.Connection]] = []  # every thread's, for close()
        self._opened_lock = threading.Lock()
        self._retained_from: dict[tuple[str, int], int] = {}  # (job, attempt) -> steps below this already trimmed
        self.duplicates: dict[str, int] = {}  # job -> reports refused as already stored (same key)
        self.schema_version = schema.migrate(self.conn())

    def conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
            with self._opened_lock:
                ended = [c for thread, c in self._opened if not thread.is_alive()]  # a thread gone: its one too
                self._opened = [(t, c) for t, c in self._opened if t.is_alive()] + [(threading.current_thread(), conn)]
            for old in ended:
                old.close()
        return conn

    def close(self) -> None:
        """Close the connection of every thread (the writer's, the readers'), which checkpoints the WAL into
        the database file; a later conn() opens a new one."""
        with self._opened_lock:
            opened, self._opened = self._opened, []
            self._local = threading.local()
        for _, conn in opened:
            conn.close()

    # --- writes (StoreWriter's thread, inside its transaction) ---------------------------
    def upsert_job(self, job: str, world_size: int, attempt: int = 0) -> None:
        self.conn().execute(
            "INSERT INTO jobs (job, world_size, created_ns, attempt) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (job) DO UPDATE SET world_size = excluded.world_size, "
            "last_evaluated_step = CASE WHEN excluded.attempt > attempt THEN NULL ELSE last_evaluated_step END, "
            "attempt = MAX(attempt, excluded.attempt)",
            (job, world_size, time.time_ns(), attempt),
        )

    def upsert_rank(self, job: str, rank: int, info: dict) -> None:
        cols = ["job", "rank", *info]
        self.conn().execute(
            f"INSERT INTO ranks ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))}) "
            f"ON CONFLICT (job, rank) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in info),
            (job, rank, *info.values()),
        )

    def add_modules(self, job: str, first_id: int, names: list[str]) -> None:
        self.conn().executemany(
            "INSERT OR IGNORE INTO modules (job, module_id, name) VALUES (?, ?, ?)",
            [(job, first_id + i, name) for i, name in enumerate(names)],
        )

    def set_evaluated(self, job: str, step: int, attempt: int = 0) -> None:
        self.conn().execute(
            "UPDATE jobs SET last_evaluated_step = MAX(COALESCE(last_evaluated_step, -1), ?) "
            "WHERE job = ? AND attempt = ?",
            (step, job, attempt),
        )

    def upsert_episode(self, ep: Episode) -> None:
        self.conn().execute(
            "INSERT INTO episodes (id, job, rank, host, module, phase, slowdown, first_step, "
            "last_step, state, cost_ms_per_step, cost_pct, ranks, updated_ns, attempt, cause, excess_ms, modules, "
            "explanation) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET "
            "host = excluded.host, slowdown = excluded.slowdown, last_step = excluded.last_step, "
            "state = excluded.state, cost_ms_per_step = excluded.cost_ms_per_step, "
            "cost_pct = excluded.cost_pct, ranks = excluded.ranks, updated_ns = excluded.updated_ns, "
            "cause = excluded.cause, excess_ms = excluded.excess_ms, modules = excluded.modules, "
            "explanation = excluded.explanation",
            (
                ep.id,
                ep.job,
                ep.rank,
                ep.host,
                ep.module,
                ep.phase,
                float(ep.slowdown),
                int(ep.first_step),
                int(ep.last_step),
                ep.state,
                float(ep.cost_ms_per_step),
                float(ep.cost_pct),
                json.dumps([int(r) for r in ep.ranks]),
                time.time_ns(),
                int(ep.attempt),
                ep.cause,
                float(ep.excess_ms),
                json.dumps(ep.modules),
                ep.explanation,
            ),
        )

    def add_capture(self, capture_id: str, job: str, steps: int, ranks: int) -> None:
        self.conn().execute(
            "INSERT OR IGNORE INTO captures (capture_id, job, steps, requested_ns, ranks) VALUES (?, ?, ?, ?, ?)",
            (capture_id, job, steps, time.time_ns(), ranks),
        )

    def insert_steps(self, rows: list[StepRow]) -> None:
        """INSERT OR IGNORE: a report replayed after a reconnect changes nothing."""
        conn = self.conn()
        before = conn.total_changes
        conn.executemany(_INSERT_STEP, [r.sql_row() for r in rows])
        if conn.total_changes - before < len(rows):  # some (job, attempt, step, rank) were stored already
            self._count_duplicates(rows)
        collectives = [c for r in rows if r.collectives for c in r.collective_rows()]
        if collectives:
            conn.executemany(_INSERT_COLLECTIVE, collectives)
        traces = [r.trace_row() for r in rows if r.trace is not None]
        if traces:
            conn.executemany(_INSERT_TRACE, traces)
        seen = {}
        for r in rows:  # one last-seen update per rank per batch, not per report
            seen[(r.job, r.rank)] = r.counters
        now = time.time_ns()
        conn.executemany(
            _UPDATE_RANK_SEEN,
            [(now, *(c.get(name, 0) for name in AGENT_COUNTERS), job, rank) for (job, rank), c in seen.items()],
        )

    def _count_duplicates(self, rows: list[StepRow]) -> None:
        """Which rows were refused as already stored: a replay after reconnect, or a lost report."""
        conn = self.conn()
        for r in rows:
            end = conn.execute(
                "SELECT end_ns FROM steps WHERE job = ? AND attempt = ? AND step = ? AND rank = ?",
                (r.job, r.attempt, r.step, r.rank),
            ).fetchone()
            if end is not None and end[0] != int(r.figures["end_ns"]):  # another report with the same key
                if r.job not in self.duplicates:
                    log.warning(
                        "job %r rank %d attempt %d step %d: a different report with the same attempt, "
                        "step and rank is stored already; this one is refused (logged once per job)",
                        r.job,
                        r.rank,
                        r.attempt,
                        r.step,
                    )
                self.duplicates[r.job] = self.duplicates.get(r.job, 0) + 1

    def drop_old_module_blobs(self, job: str, keep_steps: int) -> int:
        """Retention: module blobs of steps older than the newest keep_steps evaluated ones become NULL; the
        step-level figures stay forever. Counted from the job's last evaluated step, not its newest stored row:
        one rank's report far ahead of its peers' (valid at the edge, up to MAX_STEPS_AHEAD) is never evaluated,
        and must not age the whole job's history."""
        conn = self.conn()
        row = conn.execute("SELECT last_evaluated_step, attempt FROM jobs WHERE job = ?", (job,)).fetchone()
        if row is None or row[0] is None:
            return 0
        newest, attempt = row
        cutoff = newest - keep_steps + 1
        lo = self._retained_from.get((job, attempt), -1)  # only the steps not trimmed before: no rescans
        cur = conn.execute(
            "UPDATE steps SET "
            + ", ".join(f"m_{n} = NULL" for n, _ in _BLOB_COLUMNS)
            + " WHERE job = ? AND attempt = ? AND step >= ? AND step < ? AND m_module IS NOT NULL",
            (job, attempt, lo, cutoff),
        )
        conn.execute(  # each collective's sequence number and times go too; the step's sums stay
            "UPDATE collectives SET c_seq = NULL, c_issue = NULL, c_active = NULL "
            "WHERE job = ? AND attempt = ? AND step >= ? AND step < ? AND c_seq IS NOT NULL",
            (job, attempt, lo, cutoff),
        )
        self._retained_from[(job, attempt)] = max(lo, cutoff)
        return cur.rowcount

    # --- reads --------------------------------------------------------------------------
    def jobs(self) -> list[dict]:
        rows = self.conn().execute(
            "SELECT j.job, j.world_size, j.last_evaluated_step, j.attempt, "
            "(SELECT MAX(step) FROM steps s WHERE s.job = j.job AND s.attempt = j.attempt) "
            "FROM jobs j ORDER BY j.job"
        )
        return [
            {"job": job, "world_size": ws, "last_evaluated_step": ev, "attempt": attempt, "last_step": last}
            for job, ws, ev, attempt, last in rows
        ]

    def last_stored_step(self, job: str, attempt: int) -> int | None:
        return (
            self.conn()
            .execute("SELECT MAX(step) FROM steps WHERE job = ? AND attempt = ?", (job, attempt))
            .fetchone()[0]
        )

    def latest_attempt(self, job: str) -> int:
        row = self.conn().execute("SELECT attempt FROM jobs WHERE job = ?", (job,)).fetchone()
        return 0 if row is None else row[0]

    def job(self, job: str) -> dict | None:
        """One row of jobs(), or None."""
        row = (
            self.conn()
            .execute(
                "SELECT job, world_size, last_evaluated_step, attempt, "
                "(SELECT MAX(step) FROM steps s WHERE s.job = j.job AND s.attempt = j.attempt) "
                "FROM jobs j WHERE job = ?",
                (job,),
            )
            .fetchone()
        )
        if row is None:
            return None
        return {
            "job": row[0],
            "world_size": row[1],
            "last_evaluated_step": row[2],
            "attempt": row[3],
            "last_step": row[4],
        }

    def forget_job(self, job: str) -> None:
        """Writer thread: drop what is held in memory for a job that left the collector's memory."""
        for key in [key for key in self._retained_from if key[0] == job]:  # every attempt of the job
            del self._retained_from[key]
        self.duplicates.pop(job, None)

    def job_exists(self, job: str) -> bool:
        return self.conn().execute("SELECT 1 FROM jobs WHERE job = ?", (job,)).fetchone() is not None

    def last_evaluated_step(self, job: str) -> int | None:
        row = self.conn().execute("SELECT last_evaluated_step FROM jobs WHERE job = ?", (job,)).fetchone()
        return None if row is None else row[0]

    def ranks(self, job: str) -> list[dict]:
        cur = self.conn().execute("SELECT * FROM ranks WHERE job = ? ORDER BY rank", (job,))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur]

    def module_names(self, job: str) -> list[str]:
        """Job-wide id -> name (ids are dense from 0)."""
        rows = self.conn().execute("SELECT module_id, name FROM modules WHERE job = ? ORDER BY module_id", (job,))
        return [name for _, name in rows]

    def last_steps(self, job: str, last: int, attempt: int | None = None) -> list[tuple]:
        """(step, rank, *STEP_FIGURES) for the newest `last` steps of an attempt (the latest), ascending."""
        attempt = self.latest_attempt(job) if attempt is None else attempt
        return (
            self.conn()
            .execute(
                f"SELECT step, rank, {', '.join(STEP_FIGURES)} FROM steps WHERE job = ? AND attempt = ? AND step IN "
                "(SELECT DISTINCT step FROM steps WHERE job = ? AND attempt = ? ORDER BY step DESC LIMIT ?) "
                "ORDER BY step, rank",
                (job, attempt, job, attempt, last),
            )
            .fetchall()
        )

    def step_modules(self, job: str, step: int, attempt: int | None = None) -> dict[int, dict]:
        """rank -> MODULE_COLUMNS arrays for one step (empty arrays once retention dropped them), and the
        CALL_COLUMNS where the rank sent call windows."""
        attempt = self.latest_attempt(job) if attempt is None else attempt
        rows = self.conn().execute(
            f"SELECT rank, {', '.join('m_' + n for n, _ in _BLOB_COLUMNS)} FROM steps "
            "WHERE job = ? AND attempt = ? AND step = ? ORDER BY rank",
            (job, attempt, step),
        )
        out = {}
        for row in rows:
            out[row[0]] = _blobs(row, MODULE_COLUMNS, 1)
            if row[1 + len(MODULE_COLUMNS)] is not None:
                out[row[0]].update(_blobs(row, CALL_COLUMNS, 1 + len(MODULE_COLUMNS)))
        return out

    def clock_offsets(self, job: str, attempt: int) -> dict[tuple[int, int], int]:
        """(step, rank) -> the rank's clock offset when its report of the step came in (0 where not stored)."""
        rows = self.conn().execute(
            "SELECT step, rank, clock_offset_ns FROM steps WHERE job = ? AND attempt = ?", (job, attempt)
        )
        return {(step, rank): offset or 0 for step, rank, offset in rows}

    def collective_stats(self, job: str, attempt: int, last: int | None = None) -> list[tuple[int, int, GroupStep]]:
        """(rank, clock offset then, stats) of every stored collective stats row of an attempt (or of its `last`
        steps), in step order; the per-collective columns are empty once retention dropped them."""
        newest = "(SELECT MAX(step) FROM collectives WHERE job = ? AND attempt = ?)"
        rows = self.conn().execute(
            f"SELECT rank, step, {_COLLECTIVE_FIELDS} FROM collectives WHERE job = ? AND attempt = ? "
            + ("" if last is None else f"AND step > {newest} - ? ")
            + "ORDER BY step, rank, grp",
            (job, attempt) if last is None else (job, attempt, job, attempt, last),
        )
        out = []
        for (
            rank,
            step,
            group,
            ranks_hash,
            backend,
            size,
            count,
            total,
            wait,
            nbytes,
            measured,
            unlisted,
            offset,
            *cols,
        ) in rows:
            seq, issue, active = (
                np.frombuffer(c, dtype) if c is not None else np.zeros(0, dtype)
                for c, dtype in zip(cols, (np.uint64, np.int64, np.int64))
            )
            stats = GroupStep(
                step,
                group,
                backend,
                size,
                int(np.int64(ranks_hash).astype(np.uint64)),
                count,
                total,
                wait,
                int(np.int64(nbytes).astype(np.uint64)),
                bool(measured),
                unlisted,
                seq,
                issue,
                active if cols[2] is not None else None,
            )
            out.append((rank, offset or 0, stats))
        return out

    def episodes(self, job: str | None = None, state: str | None = None, attempt: int | None = None) -> list[Episode]:
        """Episodes, active first; with a job and no attempt, those of the job's latest attempt."""
        sql = f"SELECT {_EPISODE_COLUMNS} FROM episodes WHERE 1 = 1"
        args = []
        if job is not None:
            sql += " AND job = ? AND attempt = ?"
            args += [job, self.latest_attempt(job) if attempt is None else attempt]
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        sql += " ORDER BY state = 'active' DESC, last_step DESC, id"
        return [_episode(row) for row in self.conn().execute(sql, args)]

    def max_episode_id(self) -> int:
        return self.conn().execute("SELECT COALESCE(MAX(id), 0) FROM episodes").fetchone()[0]

    def trace_calls(self, job: str, from_step: int, to_step: int, attempt: int | None = None) -> dict[int, list[dict]]:
        """rank -> [{"step", "capture_id", TRACE_COLUMNS arrays...}] for captured steps in
        [from_step, to_step] of an attempt (the latest); module ids are job-wide (see module_names)."""
        attempt = self.latest_attempt(job) if attempt is None else attempt
        out: dict[int, list[dict]] = {}
        rows = self.conn().execute(
            "SELECT rank, step, capture_id, t_module, t_phase, t_start, t_end, t_depth FROM traces "
            "WHERE job = ? AND attempt = ? AND step BETWEEN ? AND ? ORDER BY rank, step",
            (job, attempt, from_step, to_step),
        )
        for row in rows:
            out.setdefault(row[0], []).append({"step": row[1], "capture_id": row[2], **_blobs(row, TRACE_COLUMNS, 3)})
        return out

    def rank_clocks(self, job: str) -> dict[int, dict]:
        """rank -> {"host", "clock_offset_ns", "rtt_ns"}: collector_ns = agent_ns + offset."""
        rows = self.conn().execute("SELECT rank, host, clock_offset_ns, rtt_ns FROM ranks WHERE job = ?", (job,))
        return {r: {"host": h, "clock_offset_ns": o or 0, "rtt_ns": rtt} for r, h, o, rtt in rows}
