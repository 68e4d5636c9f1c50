"""The SQLite schema, versioned with `PRAGMA user_version`, and the migrations between versions.

MIGRATIONS is a plain ordered list: entry i takes a data directory from version i to i + 1, in
one transaction with the version bump, so a collector stopped half-way leaves the old version
intact. A change of the tables is a new function appended here (never an edit of an old one);
a data directory is opened by running every migration past its version. Version 0 is both a
new file and a data directory written before versions existed: its tables are version 1's,
which is why version 1 creates them only if they are not there.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

V1_TABLES = (
    """
    CREATE TABLE IF NOT EXISTS jobs (
      job TEXT PRIMARY KEY, world_size INTEGER NOT NULL, created_ns INTEGER NOT NULL,
      last_evaluated_step INTEGER)""",
    """
    CREATE TABLE IF NOT EXISTS ranks (
      job TEXT NOT NULL, rank INTEGER NOT NULL, local_rank INTEGER, group_rank INTEGER,
      host TEXT, pid INTEGER, session TEXT, torch_version TEXT, agent_version TEXT,
      clock_kind INTEGER, clock_offset_ns INTEGER, rtt_ns INTEGER, last_seen_ns INTEGER,
      state TEXT NOT NULL DEFAULT 'live', reports_dropped INTEGER DEFAULT 0,
      reconnects INTEGER DEFAULT 0, hook_errors INTEGER DEFAULT 0, send_errors INTEGER DEFAULT 0,
      PRIMARY KEY (job, rank))""",
    """
    CREATE TABLE IF NOT EXISTS modules (
      job TEXT NOT NULL, module_id INTEGER NOT NULL, name TEXT NOT NULL,
      PRIMARY KEY (job, module_id))""",
    """
    CREATE TABLE IF NOT EXISTS steps (
      job TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL,
      start_ns INTEGER, end_ns INTEGER, forward_ns INTEGER, backward_ns INTEGER,
      optimizer_ns INTEGER, data_ns INTEGER, backward_tail_ns INTEGER, recompute_ns INTEGER,
      m_phase BLOB, m_module BLOB, m_calls BLOB, m_inclusive BLOB, m_self BLOB,
      m_first_start BLOB, m_last_end BLOB,
      UNIQUE (job, step, rank))""",
    """
    CREATE TABLE IF NOT EXISTS episodes (
      id INTEGER PRIMARY KEY, job TEXT NOT NULL, rank INTEGER NOT NULL, host TEXT,
      module TEXT, phase TEXT, slowdown REAL, first_step INTEGER, last_step INTEGER,
      state TEXT, cost_ms_per_step REAL, cost_pct REAL, ranks TEXT, updated_ns INTEGER)""",
    """
    CREATE INDEX IF NOT EXISTS episodes_by_job ON episodes (job, state)""",
    """
    CREATE TABLE IF NOT EXISTS captures (
      capture_id TEXT PRIMARY KEY, job TEXT NOT NULL, steps INTEGER, requested_ns INTEGER,
      ranks INTEGER)""",
    """
    CREATE TABLE IF NOT EXISTS traces (
      job TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, capture_id TEXT,
      t_module BLOB, t_phase BLOB, t_start BLOB, t_end BLOB, t_depth BLOB,
      PRIMARY KEY (job, step, rank))""",
)


class SchemaError(RuntimeError):
    """The data directory cannot be opened by this collector (written by a newer one)."""


def _v1_tables(conn: sqlite3.Connection) -> None:
    for statement in V1_TABLES:
        conn.execute(statement)


def migrate_attempts(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2: torchelastic attempts, and verdicts with every place a culprit is slow.

    A restarted attempt's steps start again at 0: steps and traces are keyed by (job, attempt,
    step, rank) (SQLite cannot change a UNIQUE key in place: the tables are rebuilt, rows kept as
    attempt 0). jobs and ranks say the newest attempt; episodes gain attempt, cause, excess_ms and
    modules (JSON list of {module, phase, excess_ms, slowdown})."""
    _run_statements(
        conn,
        """
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE ranks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE episodes ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE episodes ADD COLUMN cause TEXT NOT NULL DEFAULT '';
ALTER TABLE episodes ADD COLUMN excess_ms REAL NOT NULL DEFAULT 0;
ALTER TABLE episodes ADD COLUMN modules TEXT NOT NULL DEFAULT '[]';
CREATE TABLE steps_v1 (
  job TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, rank INTEGER NOT NULL, step INTEGER NOT NULL,
  start_ns INTEGER, end_ns INTEGER, forward_ns INTEGER, backward_ns INTEGER,
  optimizer_ns INTEGER, data_ns INTEGER, backward_tail_ns INTEGER, recompute_ns INTEGER,
  m_phase BLOB, m_module BLOB, m_calls BLOB, m_inclusive BLOB, m_self BLOB,
  m_first_start BLOB, m_last_end BLOB,
  UNIQUE (job, attempt, step, rank));
INSERT INTO steps_v1 (job, rank, step, start_ns, end_ns, forward_ns, backward_ns, optimizer_ns, data_ns,
  backward_tail_ns, recompute_ns, m_phase, m_module, m_calls, m_inclusive, m_self, m_first_start, m_last_end)
  SELECT job, rank, step, start_ns, end_ns, forward_ns, backward_ns, optimizer_ns, data_ns,
  backward_tail_ns, recompute_ns, m_phase, m_module, m_calls, m_inclusive, m_self, m_first_start, m_last_end
  FROM steps;
DROP TABLE steps;
ALTER TABLE steps_v1 RENAME TO steps;
CREATE TABLE traces_v1 (
  job TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, rank INTEGER NOT NULL, step INTEGER NOT NULL,
  capture_id TEXT, t_module BLOB, t_phase BLOB, t_start BLOB, t_end BLOB, t_depth BLOB,
  PRIMARY KEY (job, attempt, step, rank));
INSERT INTO traces_v1 (job, rank, step, capture_id, t_module, t_phase, t_start, t_end, t_depth)
  SELECT job, rank, step, capture_id, t_module, t_phase, t_start, t_end, t_depth FROM traces;
DROP TABLE traces;
ALTER TABLE traces_v1 RENAME TO traces;
""",
    )


def _run_statements(conn: sqlite3.Connection, script: str) -> None:
    """A script statement by statement, inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def migrate_gpu_explanation(conn: sqlite3.Connection) -> None:
    """Version 2 -> 3: GPU health: an episode says what its culprit's GPU explains ("" when nothing)."""
    conn.execute("ALTER TABLE episodes ADD COLUMN explanation TEXT NOT NULL DEFAULT ''")


def migrate_heartbeat_errors(conn: sqlite3.Connection) -> None:
    """Version 3 -> 4: the agent counts its heartbeat's errors (AgentCounters.heartbeat_errors); a rank's row
    keeps it beside the other agent counters."""
    conn.execute("ALTER TABLE ranks ADD COLUMN heartbeat_errors INTEGER DEFAULT 0")


def migrate_collectives(conn: sqlite3.Connection) -> None:
    """Version 4 -> 5: collective timing is kept, so a stored job is judged again as the collector judged it.
    A `collectives` table (one row per rank, step and process group: the wire's CollectiveStats, with the clock
    offset the rank had then); steps gain each call's window of the modules called several times (m_call_*,
    NULL where none came) and the rank's clock offset; ranks say whether module durations hold collective
    waits (Hello.wall_durations). Rows stored before have no collective stats (NULL offsets: 0)."""
    _run_statements(
        conn,
        """
CREATE TABLE collectives (
  job TEXT NOT NULL, attempt INTEGER NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL,
  grp TEXT NOT NULL, ranks_hash INTEGER NOT NULL, backend TEXT, group_size INTEGER, count INTEGER,
  total_ns INTEGER, wait_ns INTEGER, bytes INTEGER, active_measured INTEGER, unlisted INTEGER,
  clock_offset_ns INTEGER, c_seq BLOB, c_issue BLOB, c_active BLOB,
  PRIMARY KEY (job, attempt, step, rank, grp, ranks_hash));
ALTER TABLE steps ADD COLUMN m_call_owner BLOB;
ALTER TABLE steps ADD COLUMN m_call_start BLOB;
ALTER TABLE steps ADD COLUMN m_call_end BLOB;
ALTER TABLE steps ADD COLUMN clock_offset_ns INTEGER;
ALTER TABLE ranks ADD COLUMN wall_durations INTEGER DEFAULT 0
""",
    )


def migrate_gc(conn: sqlite3.Connection) -> None:
    """Version 5 -> 6: the agent reports each step's full GC pauses (StepReport.gc_ns, gc_collections), a
    step-level cause the detector judges like the optimizer. Rows stored before had none reported: 0."""
    _run_statements(
        conn,
        """
ALTER TABLE steps ADD COLUMN gc_ns INTEGER NOT NULL DEFAULT 0;
ALTER TABLE steps ADD COLUMN gc_collections INTEGER NOT NULL DEFAULT 0
""",
    )


def migrate_host(conn: sqlite3.Connection) -> None:
    """Version 6 -> 7: the agent reports the training loop's own code between each step's phases (StepReport.host_ns),
    per micro-batch under gradient accumulation. Rows stored before had none reported: 0 (the merge then works the
    gap between forward and backward out of the module stamps, as it did)."""
    _run_statements(conn, "ALTER TABLE steps ADD COLUMN host_ns INTEGER NOT NULL DEFAULT 0")


def migrate_host_wait(conn: sqlite3.Connection) -> None:
    """Version 7 -> 8: the agent reports the part of each step's host time its training thread was blocked
    (StepReport.host_wait_ns: gradient clipping's all-reduce under FSDP, a barrier). Rows stored before: 0."""
    _run_statements(conn, "ALTER TABLE steps ADD COLUMN host_wait_ns INTEGER NOT NULL DEFAULT 0")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _v1_tables,
    migrate_attempts,
    migrate_gpu_explanation,
    migrate_heartbeat_errors,
    migrate_collectives,
    migrate_gc,
    migrate_host,
    migrate_host_wait,
]
VERSION = len(MIGRATIONS)


def version_of(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the file to VERSION, one migration per transaction; returns VERSION. `conn` is in
    autocommit mode (isolation_level=None), as the store opens it."""
    version = version_of(conn)
    if version > VERSION:
        raise SchemaError(
            f"the data directory has schema version {version}, newer than this collector's "
            f"{VERSION}: run a newer modtrack, or another --data-dir"
        )
    for number in range(version, VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[number](conn)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return VERSION
