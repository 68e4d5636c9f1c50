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
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from collector.step_matrix import Episode, StepMatrix

DEFAULT_TOP_K = 20
AGENT_COUNTERS = ("reports_dropped", "reconnects", "hook_errors", "send_errors")
_RANK = ["job", "rank", "host"]
_EPISODE = ["job", "rank", "host", "module", "phase"]


@dataclass
class _Rank:
    host: str
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
        self.registry.register(self)

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
            if r is None:
                r = state.ranks[rank] = _Rank(host)
            r.host = host
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
            state.ranks.setdefault(rank, _Rank(host))
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
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def _job(self, job: str) -> _Job:
        state = self._jobs.get(job)
        if state is None:
            state = self._jobs[job] = _Job()
        return state

    # -- prometheus_client custom collector ---------------------------------------------------
    def describe(self):
        return []  # built at scrape time; nothing to check at registration

    def collect(self):
        g = {
            "step": GaugeMetricFamily("modtrack_step_seconds", "Wall time of the rank's latest merged step.", labels=_RANK),
            "sync": GaugeMetricFamily("modtrack_sync_wait_seconds",
                                      "Time the rank waited in the gradient all-reduce in its latest merged step.", labels=_RANK),
            "offset": GaugeMetricFamily("modtrack_clock_offset_seconds",
                                        "The rank's clock offset to the collector (collector = agent + offset).", labels=_RANK),
            "last": GaugeMetricFamily("modtrack_rank_last_report_timestamp_seconds",
                                      "Unix time of the rank's latest report.", labels=_RANK),
            "missing": GaugeMetricFamily("modtrack_ranks_missing", "Ranks of the job that stopped reporting.", labels=["job"]),
            "last_step": GaugeMetricFamily("modtrack_last_step", "Latest step merged for the job.", labels=["job"]),
            "slowdown": GaugeMetricFamily("modtrack_straggler_slowdown_ratio",
                                          "Active straggler: the rank's time over its peers' median.", labels=_EPISODE),
            "cost": GaugeMetricFamily("modtrack_straggler_cost_seconds_per_step",
                                      "Active straggler: step time the job loses to it.", labels=_EPISODE),
            "n_active": GaugeMetricFamily("modtrack_straggler_episodes_active",
                                          "Active rank episodes of the job (the per-episode series keep the costliest top-k).",
                                          labels=["job"]),
            "node": GaugeMetricFamily("modtrack_node_suspect", "1 while the host's ranks straggle together.",
                                      labels=["job", "host"]),
        }
        c = {
            "received": CounterMetricFamily("modtrack_reports_received", "Step reports received from the rank.",
                                            labels=["job", "rank"]),
            **{k: CounterMetricFamily(f"modtrack_agent_{k}", f"The agent's own count of {k.replace('_', ' ')}.",
                                      labels=["job", "rank"]) for k in AGENT_COUNTERS},
        }
        own = {
            "ingested": CounterMetricFamily("modtrack_ingest_records", "Step reports ingested, all jobs."),
            "rejected": CounterMetricFamily("modtrack_ingest_rejected", "Agent messages refused, by reason.",
                                            labels=["reason"]),
            "deliveries": CounterMetricFamily("modtrack_alert_webhook_deliveries",
                                              "Built-in webhook deliveries, by outcome.", labels=["outcome"]),
        }
        with self._lock:
            for name, job in self._jobs.items():
                self._collect_job(name, job, g, c)
            own["ingested"].add_metric([], self._ingested)
            for reason, n in sorted(self._rejected.items()):
                own["rejected"].add_metric([reason], n)
            for outcome, n in sorted(self._deliveries.items()):
                own["deliveries"].add_metric([outcome], n)
        yield from own.values()
        yield from g.values()
        yield from c.values()

    @staticmethod
    def _collect_job(name: str, job: _Job, g: dict, c: dict) -> None:
        for rank, r in job.ranks.items():
            labels = [name, str(rank), r.host]
            if r.reports:  # a rank marked missing before it ever reported has no clock yet
                g["offset"].add_metric(labels, r.clock_offset_ms / 1e3)
                g["last"].add_metric(labels, r.last_report_s)
            c["received"].add_metric(labels[:2], r.reports)
            for k in AGENT_COUNTERS:
                c[k].add_metric(labels[:2], r.counters.get(k, 0))
        m = job.matrix
        if m is not None:
            wall_s = np.asarray(m.wall_ms, dtype=np.float64) / 1e3
            sync_s = np.asarray(m.sync_wait_ms, dtype=np.float64) / 1e3
            for i, rank in enumerate(np.asarray(m.ranks).tolist()):
                labels = [name, str(rank), m.hosts[i]]
                g["step"].add_metric(labels, float(wall_s[i]))
                g["sync"].add_metric(labels, float(sync_s[i]))
        g["missing"].add_metric([name], len(job.missing))
        if job.last_step >= 0:
            g["last_step"].add_metric([name], job.last_step)
        g["n_active"].add_metric([name], job.stragglers_active)
        seen = set()
        for e in job.stragglers:
            labels = [name, str(e.rank), e.host, e.module, e.phase]
            if tuple(labels) in seen:
                continue  # one series per label set, the costliest episode's
            seen.add(tuple(labels))
            g["slowdown"].add_metric(labels, e.slowdown)
            g["cost"].add_metric(labels, e.cost_ms_per_step / 1e3)
        for host in sorted(job.suspect_hosts):
            g["node"].add_metric([name, host], 1)
