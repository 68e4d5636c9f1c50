"""`python -m modtrack.collector query`: tables, --json, and one-line errors with non-zero exits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from harness.collector_thread import CollectorThread
from harness.evaluated import wait_evaluated
from harness.http import get
from harness.ports import free_port
from harness.slow_job import run_slow_job


def query(*args, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modtrack.collector", "query", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def busy(collector):
    """A collector holding a 4-rank job whose rank 2 straggles."""
    run_slow_job(collector, range(10))
    wait_evaluated(collector.url, 9)
    return collector


def test_tables(busy):
    out = query("jobs", "--url", busy.url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["JOB", "WORLD", "REPORTING", "LAST_STEP", "ATTEMPT", "STATE", "DETAIL"]
    assert lines[1].split()[:4] == ["train", "4", "4", "9"] and lines[1].split()[-1] == "-"  # sampling never set

    out = query("sampling", "--url", busy.url, "--job", "train")
    assert out.returncode == 1 and "sampling needs --every N" in out.stderr

    out = query("stragglers", "--url", busy.url, "--job", "train")
    assert out.returncode == 0, out.stderr
    header, first = out.stdout.splitlines()[:2]
    assert header.split()[:4] == ["RANK", "HOST", "MODULE", "PHASE"]
    assert first.split()[:3] == ["2", "host2", "Net.blocks.1"] and "active" in first
    assert header.split()[-1] == "CAUSE" and first.endswith("compute in 1 module")

    out = query("steps", "--url", busy.url, "--last", "2")  # the only job is the default
    assert out.returncode == 0, out.stderr
    rows = out.stdout.splitlines()[1:]
    assert len(rows) == 8 and rows[0].split()[:3] == ["8", "0", "host0"]

    out = query("modules", "--url", busy.url, "--job", "train")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "job train step 9 (self time, ms)"
    slow = [line.split() for line in lines if line.startswith("Net.blocks.1 ")]
    assert [r[4] for r in slow] == ["2", "2"]  # SLOWEST_RANK, forward and backward


def test_json_is_the_api_answer(busy):
    for what, path in [
        ("jobs", "/api/v1/jobs"),
        ("stragglers", "/api/v1/jobs/train/stragglers"),
        ("steps", "/api/v1/jobs/train/steps?last=3"),
    ]:
        out = query(what, "--url", busy.url, "--job", "train", "--last", "3", "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == get(busy.url, path)[1]


def test_errors_are_one_line_and_non_zero(collector):
    out = query("steps", "--url", collector.url, "--job", "nope")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: 404 from {collector.url}/api/v1/jobs/nope/steps?last=10: unknown job 'nope'"
    ]
    out = query("jobs", "--url", f"http://127.0.0.1:{free_port()}")  # a port nobody listens on
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "cannot reach the collector" in out.stderr and "refused" in out.stderr.lower()


def test_token_file(tmp_path):
    c = CollectorThread(tmp_path / "data", token="tok")
    try:
        (tmp_path / "t").write_text("tok\n")
        assert query("jobs", "--url", c.url, "--token-file", str(tmp_path / "t")).returncode == 0
        out = query("jobs", "--url", c.url)
        assert out.returncode == 1 and "401" in out.stderr and "bearer token" in out.stderr
    finally:
        c.stop()


def test_a_verdict_without_a_ratio_shows_its_excess_not_a_slowdown():
    """Garbage collection: its peers' median is 0, so the entry has no slowdown; the table says '-', not 1.00x."""
    from modtrack.collector.api.query_cli import _render_stragglers

    gc_entry = {"module": "(garbage collection)", "phase": "gc", "excess_ms": 41.5, "slowdown": None}
    verdict = dict(rank=2, host="vm", module="(garbage collection)", phase="gc", slowdown=1.0, excess_ms=41.5,
                   first_step=17, last_step=44, state="active", cost_ms_per_step=38.2, cause="garbage collection",
                   modules=[gc_entry])  # fmt: skip
    (row,) = [line for line in _render_stragglers([verdict]).splitlines() if line.startswith("2 ")]
    assert "(garbage collection)" in row and "41.5" in row and "garbage collection" in row
    assert "1.00x" not in row and " - " in row
