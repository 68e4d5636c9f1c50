"""The collector's Prometheus metrics, with a cardinality bound that does not grow with the model.

Per job the series are: a handful per rank (step time, sync wait, clock offset, last report, agent
counters), one per host that is a node suspect, and for straggler episodes only the active ones,
at most `top_k` per job (the costliest): never one series per module per rank. Closed episodes,
forgotten jobs and recovered hosts drop their series at once.

Ingest only stores the latest numbers (the step matrix's arrays, a few dict entries per report);
series are built when Prometheus scrapes, so a step costs O(1) here whatever the world size.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
from modtrack.collector.records import AGENT_COUNTERS, Episode, StepMatrix
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest

DEFAULT_TOP_K = 20


@dataclass
class _Rank:
    host: str
    labels: str = ""  # job, rank, host in exposition form, built once (scrapes at 4096 ranks add up)
    rank_labels: str = ""  # job, rank
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
        self.verdict_lag = Histogram(
            "modtrack_verdict_lag_seconds", "From a step's last report arriving to the detector's verdict on it.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)

    # -- fed by the collector ---------------------------------------------------------------
    def observe_step(self, matrix: StepMatrix, lag_s: float) -> None:
        with self._lock:
            job = self._job(matrix.job)
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

    def exposition(self) -> tuple[bytes, str]:
        """The text for /metrics: the registry's (the lag histogram) and every job's series."""
        return generate_latest(self.registry) + self._render().encode(), CONTENT_TYPE_LATEST

    def _job(self, job: str) -> _Job:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _Job()
        return state

    # -- exposition ---------------------------------------------------------------------------
    # The per-job families are written as text here: prometheus_client's generic formatter spends
    # ~25 us a sample, half a second per scrape at 4096 ranks, on the collector's event loop.
    def _render(self) -> str:
        f = {key: _Family(*spec) for key, spec in _FAMILIES.items()}
        with self._lock:
            for name, job in self._jobs.items():
                self._render_job(name, job, f)
            f["ingested"].add("", self._ingested)
            for reason, n in sorted(self._rejected.items()):
                f["rejected"].add(_labels(reason=reason), n)
            for outcome, n in sorted(self._deliveries.items()):
                f["deliveries"].add(_labels(outcome=outcome), n)
        return "".join(family.text() for family in f.values())

    @staticmethod
    def _render_job(name: str, job: _Job, f: dict) -> None:
        for r in job.ranks.values():
            if r.reports:  # a rank marked missing before it ever reported has no clock yet
                f["offset"].add(r.labels, r.clock_offset_ms / 1e3)
                f["last"].add(r.labels, r.last_report_s)
            f["received"].add(r.rank_labels, r.reports)
            for k in AGENT_COUNTERS:
                f[k].add(r.rank_labels, r.counters.get(k, 0))
        m = job.matrix
        if m is not None:
            wall_s = (np.asarray(m.wall_ms, dtype=np.float64) / 1e3).tolist()
            sync_s = (np.asarray(m.sync_wait_ms, dtype=np.float64) / 1e3).tolist()
            for i, rank in enumerate(np.asarray(m.ranks).tolist()):
                r = job.ranks.get(rank)
                labels = r.labels if r is not None and r.host == m.hosts[i] else \
                    _labels(job=name, rank=rank, host=m.hosts[i])
                f["step"].add(labels, wall_s[i])
                f["sync"].add(labels, sync_s[i])
        job_labels = _labels(job=name)
        f["missing"].add(job_labels, len(job.missing))
        if job.last_step >= 0:
            f["last_step"].add(job_labels, job.last_step)
        f["n_active"].add(job_labels, job.stragglers_active)
        seen = set()
        for e in job.stragglers:
            labels = _labels(job=name, rank=e.rank, host=e.host, module=e.module, phase=e.phase)
            if labels in seen:
                continue  # one series per label set, the costliest episode's
            seen.add(labels)
            f["slowdown"].add(labels, e.slowdown)
            f["cost"].add(labels, e.cost_ms_per_step / 1e3)
        for host in sorted(job.suspect_hosts):
            f["node"].add(_labels(job=name, host=host), 1)


def _new_rank(job: str, rank: int, host: str, old: _Rank | None = None) -> _Rank:
    r = _Rank(host, _labels(job=job, rank=rank, host=host), _labels(job=job, rank=rank))
    if old is not None:  # same rank, new host (a restarted pod): keep its counts
        r.reports, r.last_report_s, r.clock_offset_ms, r.counters = (old.reports, old.last_report_s,
                                                                     old.clock_offset_ms, old.counters)
    return r


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())


def _number(value) -> str:
    value = float(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _Family:
    """One metric family in the Prometheus text format (version 0.0.4)."""

    def __init__(self, name: str, kind: str, help_text: str):
        self.name = name + "_total" if kind == "counter" else name
        self.header = f"# HELP {self.name} {help_text}\n# TYPE {self.name} {kind}\n"
        self.lines: list[str] = []

    def add(self, labels: str, value) -> None:
        series = f"{self.name}{{{labels}}}" if labels else self.name
        self.lines.append(f"{series} {_number(value)}\n")

    def text(self) -> str:
        return self.header + "".join(self.lines)


_FAMILIES = {  # key: (name, type, help)
    "step": ("modtrack_step_seconds", "gauge", "Wall time of the rank's latest merged step."),
    "sync": ("modtrack_sync_wait_seconds", "gauge",
             "Time the rank waited in the gradient all-reduce in its latest merged step."),
    "offset": ("modtrack_clock_offset_seconds", "gauge",
               "The rank's clock offset to the collector (collector = agent + offset)."),
    "last": ("modtrack_rank_last_report_timestamp_seconds", "gauge", "Unix time of the rank's latest report."),
    "missing": ("modtrack_ranks_missing", "gauge", "Ranks of the job that stopped reporting."),
    "last_step": ("modtrack_last_step", "gauge", "Latest step merged for the job."),
    "slowdown": ("modtrack_straggler_slowdown_ratio", "gauge",
                 "Active straggler: the rank's time over its peers' median."),
    "cost": ("modtrack_straggler_cost_seconds_per_step", "gauge", "Active straggler: step time the job loses to it."),
    "n_active": ("modtrack_straggler_episodes_active", "gauge",
                 "Active rank episodes of the job (the per-episode series keep the costliest top-k)."),
    "node": ("modtrack_node_suspect", "gauge", "1 while the host's ranks straggle together."),
    "received": ("modtrack_reports_received", "counter", "Step reports received from the rank."),
    **{k: (f"modtrack_agent_{k}", "counter", f"The agent's own count of {k.replace('_', ' ')}.")
       for k in AGENT_COUNTERS},
    "ingested": ("modtrack_ingest_records", "counter", "Step reports ingested, all jobs."),
    "rejected": ("modtrack_ingest_rejected", "counter", "Agent messages refused, by reason."),
    "deliveries": ("modtrack_alert_webhook_deliveries", "counter", "Built-in webhook deliveries, by outcome."),
}
