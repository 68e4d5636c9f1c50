"""Straggler episodes in Alertmanager's shapes: one alert, and the webhook payload (version 4).

Receivers that already understand Alertmanager (chat bridges, incident tools, Alertmanager's own
webhook receivers) then take modtrack's built-in alerts with no new code. The fingerprint is the
one Alertmanager computes for the same labels, so the two paths deduplicate alike.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from urllib.parse import quote

from modtrack.collector.records import Episode, entry_without_ratio

STRAGGLER_ALERT = "ModtrackStraggler"
NODE_SUSPECT_ALERT = "ModtrackNodeSuspect"
# Alertmanager writes this endsAt for an alert that is still firing.
ZERO_TIME = "0001-01-01T00:00:00Z"

_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_MASK = (1 << 64) - 1


def fingerprint(labels: dict[str, str]) -> str:
    """Alertmanager's alert fingerprint: FNV-1a 64 over sorted name, 0xff, value, 0xff."""
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in part.encode() + b"\xff":
                h = ((h ^ byte) * _FNV_PRIME) & _MASK
    return f"{h:016x}"


def rfc3339(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert_labels(episode: Episode) -> dict[str, str]:
    """What identifies the alert: a rank's episode per module and phase; a host's with no rank."""
    labels = {"job": episode.job, "host": episode.host, "module": episode.module, "phase": episode.phase}
    if episode.rank < 0:
        labels.update(alertname=NODE_SUSPECT_ALERT, severity="critical")
    else:
        labels.update(alertname=STRAGGLER_ALERT, severity="warning", rank=str(episode.rank))
    return labels


def _cost_text(episode: Episode) -> str:
    text = f"{episode.cost_ms_per_step:.1f} ms per step"
    return text + (f" ({episode.cost_pct:.1f}% of step time)" if episode.cost_pct else "")


def _how_slow(episode: Episode) -> tuple[str, str]:
    """(summary words, description words): a ratio to its peers, or where they spend nothing there at all (a
    rank's garbage collection: its peers' median is 0) its excess, which a ratio cannot give."""
    top = entry_without_ratio(episode.module, episode.phase, episode.modules)
    if top is not None:
        more = f"{top['excess_ms']:.1f} ms more per step than"
        return f"spends {more} its peers", f"spends {more} the median of its peers"
    ratio = f"{episode.slowdown:.2f}x slower"
    return f"is {ratio}", f"computes {ratio} than the median of its peers"


def alert_annotations(episode: Episode) -> dict[str, str]:
    where = f"{episode.module} ({episode.phase})"
    since = f"steps {episode.first_step}-{episode.last_step}"
    if episode.rank < 0:
        ranks = ", ".join(str(r) for r in episode.ranks) or "all"
        summary = (
            f"Node suspect: host {episode.host} (ranks {ranks}) is {episode.slowdown:.2f}x slower "
            f"in {where}, costing {_cost_text(episode)}"
        )
        description = (
            f"In job {episode.job}, the ranks on host {episode.host} straggle together in "
            f"{where} over {since}: a node problem (thermal throttling, a bad GPU or NIC, a "
            f"noisy neighbour) rather than one rank's data. The job loses {_cost_text(episode)}."
        )
    else:
        short, long = _how_slow(episode)
        summary = f"Rank {episode.rank} on host {episode.host} {short} in {where}, costing {_cost_text(episode)}"
        description = (
            f"In job {episode.job}, rank {episode.rank} on {episode.host} {long} in {where} over {since}, "
            f"while the others wait for it in the next collective. The job loses {_cost_text(episode)}."
        )
    annotations = {"summary": summary, "description": description}
    if episode.cause:
        annotations["summary"] = f"{summary}; cause: {episode.cause}"
        annotations["cause"] = episode.cause
    if episode.explanation:  # GPU health: what the culprit's GPU says
        annotations["summary"] += f"; GPU: {episode.explanation}"
        annotations["explanation"] = episode.explanation
    if episode.modules:  # every place the rank is slow, costliest first
        annotations["modules"] = "; ".join(
            f"{e['module']} ({e['phase']}) +{e['excess_ms']:.1f} ms" for e in episode.modules[:10]
        ) + (f"; and {len(episode.modules) - 10} more" if len(episode.modules) > 10 else "")
        annotations["excess_ms_per_step"] = f"{episode.excess_ms:.1f}"
    return annotations


def dashboard_link(dashboard_url: str, job: str) -> str:
    return f"{dashboard_url.rstrip('/')}/?job={quote(job, safe='')}"


def episode_to_alert(
    episode: Episode, dashboard_url: str, starts_at: float | None = None, ends_at: float | None = None
) -> dict:
    """One alert as Alertmanager shows it. Times are epoch seconds; unknown start means now."""
    labels = alert_labels(episode)
    resolved = episode.state != "active"
    now = time.time()
    return {
        "status": "resolved" if resolved else "firing",
        "labels": labels,
        "annotations": alert_annotations(episode),
        "startsAt": rfc3339(starts_at if starts_at is not None else now),
        "endsAt": rfc3339(ends_at if ends_at is not None else now) if resolved else ZERO_TIME,
        "generatorURL": dashboard_link(dashboard_url, episode.job),
        "fingerprint": fingerprint(labels),
    }


def webhook_payload(alerts: list[dict], receiver: str, external_url: str) -> dict:
    """Alertmanager's webhook body (version 4) for one group of alerts, grouped by alertname and job."""
    group_names = ("alertname", "job")
    first = alerts[0]["labels"]
    group_labels = {k: first[k] for k in group_names if k in first}

    def common(key: str) -> dict[str, str]:
        items = set(alerts[0][key].items())
        for alert in alerts[1:]:
            items &= set(alert[key].items())
        return dict(sorted(items))

    group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in group_labels.items()) + "}"
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": "firing" if any(a["status"] == "firing" for a in alerts) else "resolved",
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common("labels"),
        "commonAnnotations": common("annotations"),
        "externalURL": external_url,
        "alerts": alerts,
    }
