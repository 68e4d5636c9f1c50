"""The collector's Prometheus metrics, with a cardinality bound that does not grow with the model.

Per job the series are: a handful per rank (step time, sync wait, clock offset, last report, agent
counters), one per host that is a node suspect, and for straggler episodes only the active ones,
at most `top_k` per job (the costliest): never one series per module per rank. Closed episodes,
forgotten jobs and recovered hosts drop their series at once.

Ingest only stores the latest numbers (the step matrix's arrays, a few dict entries per report);
series are built when Prometheus scrapes, by a prometheus-client custom collector (families built
from that state at collect time), so a step costs O(1) here whatever the world size. The
collector's own failure counters (evaluation errors, late reports, dropped alert changes, store
write errors, ...) are read from the stages at scrape time too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modtrack.collector.records import AGENT_COUNTERS, Episode, StepMatrix

DEFAULT_TOP_K = 20


@dataclass
class FailureCounts:
    """The collector's own failures, each counted where it happens, all exported."""

    eval_errors: int = 0  # steps (or merge ticks) whose evaluation raised: no verdict for them
    late_reports: int = 0  # reports for steps already evaluated (stored, not merged)
    ingest_rejected: int = 0  # agent messages refused (by reason in modtrack_ingest_rejected_total)
    alert_changes_dropped: int = 0  # episode changes the alert inbox had no room for
    store_write_errors: int = 0  # store commits that failed and were rolled back
    jobs_forgotten: int = 0  # finished jobs dropped from memory after --job-retention-s (not a failure)


_FAILURE_HELP = {
    "eval_errors": "Steps whose evaluation failed (no verdict for them).",
    "late_reports": "Step reports that arrived after their step was evaluated (stored, not merged).",
    "alert_changes_dropped": "Episode changes dropped because the alert inbox was full.",
    "store_write_errors": "Store transactions that failed and were rolled back.",
    "jobs_forgotten": "Finished jobs dropped from memory after the job retention (kept in SQLite).",
}


@dataclass
class _Rank:
    host: str
    labels: tuple = ()  # job, rank, host label values, built once (scrapes at 4096 ranks add up)
    rank_labels: tuple = ()  # job, rank
    reports: int = 0
    last_report_s: float = 0.0
    clock_offset_ms: float = 0.0
    counters: dict = field(default_factory=dict)


@dataclass
class _Job:
    ranks: dict[int, _Rank] = field(default_factory=dict)
    missing: set[int] = field(default_factory=set)
    last_step: int = -1
    matrix: StepMatrix | None = None  # the latest merged step: per-rank step time and sync wait
    stragglers: list[Episode] = field(default_factory=list)  # active, costliest first, <= top_k
    stragglers_active: int = 0  # before the top-k cut
    suspect_hosts: set[str] = field(default_factory=set)
    attempt: int = 0
    duplicates: dict[str, int] = field(default_factory=dict)  # reason -> reports stored but not merged


MODULES_PER_EPISODE = 5  # listed entries exported per active episode: the bound is top_k x this per job


class CollectorMetrics:
    """Owns a CollectorRegistry; the collector feeds it, `/metrics` serves exposition()."""

    def __init__(self, top_k: int = DEFAULT_TOP_K):
        self.top_k = top_k
        self.registry = CollectorRegistry()
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()  # scrapes may come from another thread
        self._ingested = 0
        self._rejected: dict[str, int] = {}  # reason -> count
        self._deliveries: dict[str, int] = {}  # webhook outcome -> count
        self._retries = 0  # webhook POSTs tried again after a failed attempt
        self.failures: Callable[[], FailureCounts] | None = None  # the collector's counters, read at scrape
        self.verdict_lag = Histogram(
            "modtrack_verdict_lag_seconds",
            "From a step's last report arriving to the detector's verdict on it.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.registry.register(_StateCollector(self))

    # -- fed by the collector ---------------------------------------------------------------
    def observe_step(self, matrix: StepMatrix, lag_s: float) -> None:
        with self._lock:
            job = self._job(matrix.job)
            attempt = int(getattr(matrix, "attempt", 0) or 0)
            if attempt != job.attempt:
                job.attempt, job.last_step = attempt, -1
            job.matrix = matrix
            job.last_step = max(job.last_step, int(matrix.step))
        self.verdict_lag.observe(max(lag_s, 0.0))

    def observe_rank(self, job: str, rank: int, host: str, clock_offset_ms: float, counters: dict) -> None:
        """One report arrived from this rank; `counters` are the agent's cumulative counters."""
        with self._lock:
            state = self._job(job)
            r = state.ranks.get(rank)
            if r is None or r.host != host:
                r = state.ranks[rank] = _new_rank(job, rank, host, r)
            r.reports += 1
            r.last_report_s = time.time()
            r.clock_offset_ms = float(clock_offset_ms)
            r.counters = {k: int(counters.get(k, 0)) for k in AGENT_COUNTERS}
            state.missing.discard(rank)
            self._ingested += 1

    def set_episodes(self, job: str, episodes: list[Episode]) -> None:
        """Replace the job's episode series with its active episodes (top-k stragglers by cost)."""
        active = [e for e in episodes if e.state == "active"]
        ranked = sorted((e for e in active if e.rank >= 0), key=lambda e: e.cost_ms_per_step, reverse=True)
        with self._lock:
            state = self._job(job)
            state.stragglers = ranked[: self.top_k]
            state.stragglers_active = len(ranked)
            state.suspect_hosts = {e.host for e in active if e.rank < 0}

    def count_duplicate(self, job: str, reason: str, n: int = 1) -> None:
        """A report stored but not merged: "late" (its step was already evaluated) or "conflict" (a
        different report with the same (attempt, step, rank) was stored first)."""
        with self._lock:
            d = self._job(job).duplicates
            d[reason] = d.get(reason, 0) + n

    def set_duplicates(self, job: str, reason: str, n: int) -> None:
        with self._lock:
            self._job(job).duplicates[reason] = n

    def mark_rank_missing(self, job: str, rank: int, host: str) -> None:
        with self._lock:
            state = self._job(job)
            if rank not in state.ranks:
                state.ranks[rank] = _new_rank(job, rank, host)
            state.missing.add(rank)

    def forget_job(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def count_rejected(self, reason: str) -> None:
        """An agent message refused (bad token, malformed, unknown rank...): keep reasons few."""
        with self._lock:
            self._rejected[reason] = self._rejected.get(reason, 0) + 1

    def count_alert_delivery(self, outcome: str) -> None:
        """A built-in webhook delivery ended: sent, failed or dropped."""
        with self._lock:
            self._deliveries[outcome] = self._deliveries.get(outcome, 0) + 1

    def count_alert_retry(self) -> None:
        with self._lock:
            self._retries += 1

    def exposition(self) -> tuple[bytes, str]:
        """The text for /metrics: the lag histogram, every job's series, the collector's counters."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _job(self, job: str) -> _Job:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _Job()
        return state


class _StateCollector(Collector):
    """The families built from CollectorMetrics' state when the registry is collected."""

    def __init__(self, metrics: CollectorMetrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # built at scrape time only (no collect() when registering)

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        f = _families()
        with m._lock:
            for name, job in m._jobs.items():
                _job_samples(name, job, f)
            f["ingested"].add_metric([], m._ingested)
            for reason, n in sorted(m._rejected.items()):
                f["rejected"].add_metric([reason], n)
            for outcome, n in sorted(m._deliveries.items()):
                f["deliveries"].add_metric([outcome], n)
            f["retries"].add_metric([], m._retries)
        yield from f.values()
        counts = m.failures() if m.failures is not None else FailureCounts()
        for name, help_text in _FAILURE_HELP.items():
            yield CounterMetricFamily(f"modtrack_{name}", help_text, value=getattr(counts, name))


def _job_samples(name: str, job: _Job, f: dict) -> None:
    for r in job.ranks.values():
        if r.reports:  # a rank marked missing before it ever reported has no clock yet
            f["offset"].add_metric(r.labels, r.clock_offset_ms / 1e3)
            f["last"].add_metric(r.labels, r.last_report_s)
        f["received"].add_metric(r.rank_labels, r.reports)
        for k in AGENT_COUNTERS:
            f[k].add_metric(r.rank_labels, r.counters.get(k, 0))
    m = job.matrix
    if m is not None:
        wall_s = (np.asarray(m.wall_ms, dtype=np.float64) / 1e3).tolist()
        sync_s = (np.asarray(m.sync_wait_ms, dtype=np.float64) / 1e3).tolist()
        for i, rank in enumerate(np.asarray(m.ranks).tolist()):
            known = job.ranks.get(rank)
            labels = known.labels if known is not None and known.host == m.hosts[i] else (name, str(rank), m.hosts[i])
            f["step"].add_metric(labels, wall_s[i])
            f["sync"].add_metric(labels, sync_s[i])
    f["missing"].add_metric([name], len(job.missing))
    if job.last_step >= 0:
        f["last_step"].add_metric([name], job.last_step)
    f["n_active"].add_metric([name], job.stragglers_active)
    f["attempt"].add_metric([name], job.attempt)
    for reason, n in sorted(job.duplicates.items()):
        f["duplicates"].add_metric([name, reason], n)
    seen = set()
    for e in job.stragglers:
        labels = (name, str(e.rank), e.host, e.module, e.phase)
        if labels in seen:
            continue  # one series per label set, the costliest episode's
        seen.add(labels)
        f["slowdown"].add_metric(labels, e.slowdown)
        f["cost"].add_metric(labels, e.cost_ms_per_step / 1e3)
        f["excess"].add_metric(labels, e.excess_ms / 1e3)
        for entry in e.modules[:MODULES_PER_EPISODE]:
            entry_labels = (name, str(e.rank), e.host, entry["module"], entry["phase"])
            f["module_excess"].add_metric(entry_labels, entry["excess_ms"] / 1e3)
    for host in sorted(job.suspect_hosts):
        f["node"].add_metric([name, host], 1)


def _new_rank(job: str, rank: int, host: str, old: _Rank | None = None) -> _Rank:
    r = _Rank(host, (job, str(rank), host), (job, str(rank)))
    if old is not None:  # same rank, new host (a restarted pod): keep its counts
        r.reports, r.last_report_s, r.clock_offset_ms, r.counters = (
            old.reports,
            old.last_report_s,
            old.clock_offset_ms,
            old.counters,
        )
    return r


_RANK, _JOB_RANK, _JOB = ("job", "rank", "host"), ("job", "rank"), ("job",)
_FAMILIES = {  # key: (family type, name, help, labels)
    "step": (GaugeMetricFamily, "modtrack_step_seconds", "Wall time of the rank's latest merged step.", _RANK),
    "sync": (
        GaugeMetricFamily,
        "modtrack_sync_wait_seconds",
        "Time the rank waited in the gradient all-reduce in its latest merged step.",
        _RANK,
    ),
    "offset": (
        GaugeMetricFamily,
        "modtrack_clock_offset_seconds",
        "The rank's clock offset to the collector (collector = agent + offset).",
        _RANK,
    ),
    "last": (
        GaugeMetricFamily,
        "modtrack_rank_last_report_timestamp_seconds",
        "Unix time of the rank's latest report.",
        _RANK,
    ),
    "missing": (GaugeMetricFamily, "modtrack_ranks_missing", "Ranks of the job that stopped reporting.", _JOB),
    "last_step": (GaugeMetricFamily, "modtrack_last_step", "Latest step merged for the job.", _JOB),
    "slowdown": (
        GaugeMetricFamily,
        "modtrack_straggler_slowdown_ratio",
        "Active straggler: the rank's time over its peers' median.",
        (*_RANK, "module", "phase"),
    ),
    "cost": (
        GaugeMetricFamily,
        "modtrack_straggler_cost_seconds_per_step",
        "Active straggler: step time the job loses to it.",
        (*_RANK, "module", "phase"),
    ),
    "excess": (
        GaugeMetricFamily,
        "modtrack_straggler_excess_seconds_per_step",
        "Active straggler: the rank's own excess time per slow step over its peers' median, all places.",
        (*_RANK, "module", "phase"),
    ),
    "module_excess": (
        GaugeMetricFamily,
        "modtrack_straggler_module_excess_seconds",
        f"Active straggler: excess per slow step in each listed module x phase (at most "
        f"{MODULES_PER_EPISODE} per episode).",
        (*_RANK, "module", "phase"),
    ),
    "attempt": (
        GaugeMetricFamily,
        "modtrack_job_attempt",
        "The job's latest attempt (torchelastic restarts, 0 first).",
        _JOB,
    ),
    "duplicates": (
        CounterMetricFamily,
        "modtrack_reports_duplicate",
        "Reports stored but not merged, by reason (late: step already evaluated; conflict: another "
        "report had the same attempt, step and rank).",
        ("job", "reason"),
    ),
    "n_active": (
        GaugeMetricFamily,
        "modtrack_straggler_episodes_active",
        "Active rank episodes of the job (the per-episode series keep the costliest top-k).",
        _JOB,
    ),
    "node": (
        GaugeMetricFamily,
        "modtrack_node_suspect",
        "1 while the host's ranks straggle together.",
        ("job", "host"),
    ),
    "received": (CounterMetricFamily, "modtrack_reports_received", "Step reports received from the rank.", _JOB_RANK),
    **{
        k: (CounterMetricFamily, f"modtrack_agent_{k}", f"The agent's own count of {k.replace('_', ' ')}.", _JOB_RANK)
        for k in AGENT_COUNTERS
    },
    "ingested": (CounterMetricFamily, "modtrack_ingest_records", "Step reports ingested, all jobs.", ()),
    "rejected": (CounterMetricFamily, "modtrack_ingest_rejected", "Agent messages refused, by reason.", ("reason",)),
    "deliveries": (
        CounterMetricFamily,
        "modtrack_alert_webhook_deliveries",
        "Built-in webhook deliveries, by outcome (dropped: a full queue let the oldest go).",
        ("outcome",),
    ),
    "retries": (
        CounterMetricFamily,
        "modtrack_alert_webhook_retries",
        "Built-in webhook POSTs tried again after a failed attempt.",
        (),
    ),
}


def _families() -> dict:
    return {key: kind(name, text, labels=list(labels)) for key, (kind, name, text, labels) in _FAMILIES.items()}
