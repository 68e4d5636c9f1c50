"""Hung jobs, live: the latest heartbeat of every rank, the stall verdict, the ModtrackJobStalled alert.

Ingest hands each Heartbeat here (validated at the edge; a bad one ends its stream like a bad report);
a `running` heartbeat, a closed stream, or silence past three repeat intervals drops the rank's
entry. A task on the collector's loop takes the verdict of every job with heartbeats once a second:
an alert opens when a rank is named stuck and resolves when it is no longer (the job moved, ended, or
was killed), through the same webhooks as straggler alerts, and is listed by /api/v1/alerts. While a
job is stalled /metrics has `modtrack_job_stalled_seconds{job, rank, host, module, phase}`.
Heartbeats are not stored: a hang is about now.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

from modtrack.collector.outputs.alert_payload import ZERO_TIME, dashboard_link, fingerprint, rfc3339, webhook_payload
from modtrack.collector.outputs.alerting import RECEIVER
from modtrack.collector.pipeline.stall import PHASES, Beat, RankView, verdict
from modtrack.protos import modtrack_pb2 as pb

log = logging.getLogger("modtrack.alerts")

STALL_ALERT = "ModtrackJobStalled"
MAX_STACK_FRAMES = 64
MAX_TEXT = 1000  # characters of a module name or one stack line
MIN_STALE_S = 10.0  # a heartbeat counts this long at least after it came (the agent repeats within repeat_ms)
ALERT_FRAMES = 5  # innermost frames quoted in the alert's description


class BadHeartbeat(ValueError):
    """A heartbeat the collector refuses (ingest ends the stream with INVALID_ARGUMENT)."""


@dataclass
class _Entry:
    beat: pb.Heartbeat
    received: float  # monotonic
    owner: object  # the stream that sent it


def check_heartbeat(hb) -> None:
    if hb.running:
        return
    if hb.phase not in PHASES:
        raise BadHeartbeat(f"heartbeat: unknown phase {hb.phase!r}")
    if len(hb.module) > MAX_TEXT or len(hb.stack) > MAX_STACK_FRAMES or any(len(s) > MAX_TEXT for s in hb.stack):
        raise BadHeartbeat(
            f"heartbeat: module or stack too long (at most {MAX_STACK_FRAMES} lines of {MAX_TEXT} characters)"
        )
    if min(hb.step_ns, hb.position_ns, hb.median_step_ns) < 0 or hb.step_ns > 10**15 or hb.position_ns > 10**15:
        raise BadHeartbeat("heartbeat: durations must be between 0 and 10^15 ns")


class StallWatch:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._beats: dict[str, dict[int, _Entry]] = {}
        self._firing: dict[str, dict] = {}  # fingerprint -> alert
        self._stalled: dict[tuple, float] = {}  # labels key -> seconds, for /metrics

    # ---- fed by ingest (the event loop) -------------------------------------------------------
    def heartbeat(self, job: str, rank: int, hb, owner) -> None:
        check_heartbeat(hb)
        beats = self._beats.setdefault(job, {})
        if hb.running:
            beats.pop(rank, None)
            if not beats:
                del self._beats[job]
        else:
            beats[rank] = _Entry(hb, self._clock(), owner)

    def gone(self, job: str, rank: int, owner) -> None:
        """The rank's stream ended: its heartbeats say nothing any more."""
        beats = self._beats.get(job, {})
        entry = beats.get(rank)
        if entry is not None and entry.owner is owner:
            del beats[rank]
        if not beats:
            self._beats.pop(job, None)  # a finished job leaves nothing behind

    # ---- the verdict --------------------------------------------------------------------------
    def views(self, job: str, job_state) -> list[RankView]:
        """Every rank the job has (or should have), with its current heartbeat aged to now."""
        now = self._clock()
        beats = self._beats.get(job, {})
        known = job_state.ranks if job_state is not None else {}
        world = job_state.world_size if job_state is not None else 0
        views = []
        for rank in sorted(set(range(world)) | set(known) | set(beats)):
            info = known.get(rank)
            entry = beats.get(rank)
            beat = None
            if entry is not None:
                age = now - entry.received
                if age <= max(MIN_STALE_S, 3 * entry.beat.repeat_ms / 1000):
                    hb = entry.beat
                    beat = Beat(
                        step=hb.step,
                        phase=hb.phase,
                        module=hb.module or None,
                        seconds=hb.position_ns / 1e9 + age,
                        step_seconds=hb.step_ns / 1e9 + age,
                        stack=list(hb.stack),
                        backward_passes=hb.backward_passes,
                    )
            missing = beat is None and (info is None or info.state == "missing")
            views.append(RankView(rank, info.host if info is not None else "", missing, beat))
        return views

    def verdict(self, job: str, job_state) -> dict:
        return verdict(job, self.views(job, job_state))

    # ---- alerts and metrics -------------------------------------------------------------------
    async def run(self, jobs, alerting, every_s: float = 1.0) -> None:
        """Every second: the verdict of each job with heartbeats (or a firing alert), alerts on change.
        `jobs` is the merge's job table; `alerting` the AlertDispatcher (its webhooks)."""
        while True:
            await asyncio.sleep(every_s)
            try:
                self.evaluate(jobs, alerting)
            except Exception:
                log.exception("stall evaluation failed")

    def evaluate(self, jobs, alerting) -> None:
        watched = {job for job, beats in self._beats.items() if beats}
        watched |= {a["labels"]["job"] for a in self._firing.values()}
        now_alerts: dict[str, tuple[dict, dict, dict]] = {}
        stalled: dict[tuple, float] = {}
        for job in sorted(watched):
            answer = self.verdict(job, jobs.get(job))
            if not answer["stalled"]:
                continue
            stuck = [r for r in answer["ranks"] if r["state"] == "stuck"] or answer["ranks"][:1]
            for r in stuck:
                labels = {
                    "alertname": STALL_ALERT,
                    "severity": "critical",
                    "job": job,
                    "rank": str(r["rank"]) if r["state"] == "stuck" else "",
                    "host": r["host"],
                    "module": r["module"] or "",
                    "phase": r["phase"] or "",
                }
                now_alerts[fingerprint(labels)] = (labels, answer, r)
                stalled[tuple(labels[k] for k in ("job", "rank", "host", "module", "phase"))] = r["seconds"] or 0.0
        self._stalled = stalled
        url = alerting.dashboard_url if alerting is not None else ""
        for fp, (labels, answer, r) in now_alerts.items():
            old = self._firing.get(fp)
            alert: dict = {
                "status": "firing",
                "labels": labels,
                "annotations": _annotations(answer, r),
                "startsAt": old["startsAt"] if old else rfc3339(time.time()),
                "endsAt": ZERO_TIME,
                "generatorURL": dashboard_link(url, labels["job"]),
                "fingerprint": fp,
            }
            self._firing[fp] = alert
            if old is None:
                log.warning("alert opened: %s", alert["annotations"]["summary"])
                _post(alerting, alert)
        for fp in [fp for fp in self._firing if fp not in now_alerts]:
            alert = dict(self._firing.pop(fp), status="resolved", endsAt=rfc3339(time.time()))
            log.warning("alert resolved: %s", alert["annotations"]["summary"])
            _post(alerting, alert)

    def alerts(self) -> list[dict]:
        """The ModtrackJobStalled alerts firing now, as Alertmanager lists them."""
        return list(self._firing.values())

    def collect(self):
        """prometheus_client custom collector: one series per stuck rank while its job is stalled."""
        family = GaugeMetricFamily(
            "modtrack_job_stalled_seconds",
            "While the job is stalled: how long the stuck rank has not moved.",
            labels=["job", "rank", "host", "module", "phase"],
        )
        for labels, seconds in sorted(self._stalled.items()):
            family.add_metric(list(labels), seconds)
        yield family


def _annotations(answer: dict, r: dict) -> dict:
    where = f"{r['module']} ({r['phase']})" if r["module"] else f"{r['phase']} (outside every module)"
    if r["state"] == "stuck":
        summary = (
            f"Job {answer['job']} is stalled: rank {r['rank']} on host {r['host']} has not moved for "
            f"{r['seconds']:.0f} s in {where} at step {answer['step']}"
        )
    else:
        summary = f"Job {answer['job']} is stalled: every rank waits in {where} at step {answer['step']}"
    stack = "\n".join(r["stack"][-ALERT_FRAMES:]) or "(no stack)"
    description = (
        f"{answer['summary']}. " + f"Innermost frames of the stuck rank's training thread:\n{stack}\n"
        "Runbook: README, section When a job hangs."
    )
    return {"summary": summary, "description": description}


def _post(alerting, alert: dict) -> None:
    """Offer the alert to every webhook of the dispatcher (each has its own bounded queue)."""
    if alerting is None or not alerting.webhooks:
        return
    body = json.dumps(webhook_payload([alert], RECEIVER, alerting.dashboard_url)).encode()
    for hook in alerting.webhooks:
        hook.offer(body)
