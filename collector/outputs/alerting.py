"""Built-in alerting for clusters without Prometheus: a log line per episode, and webhooks.

The detector calls episode_changed() on ingest's hot path, so it only copies the episode onto a
queue. One task turns changes into opened/closed transitions (log line + Alertmanager v4 payload);
each webhook URL has its own bounded queue and sender task, so a receiver that is down or slow
only delays its own deliveries. Sends retry with exponential backoff; when a queue is full the
oldest payload is dropped and counted rather than holding memory or blocking anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time

import aiohttp

from modtrack.collector.outputs.alert_payload import (
    alert_labels,
    episode_to_alert,
    fingerprint,
    rfc3339,
    webhook_payload,
)
from modtrack.collector.records import Episode
from modtrack.protos.backoff import backoff_delays

log = logging.getLogger("modtrack.alerts")

RECEIVER = "modtrack"
INBOX_SIZE = 10_000  # episode changes not yet routed; the router drains it at once, unless stalled
# Statuses worth retrying; any other 4xx means the payload will never be accepted.
_RETRYABLE_4XX = {408, 425, 429}


@dataclasses.dataclass
class _Firing:
    starts_at: float
    last_sent: float


class _Webhook:
    """One receiver: a bounded queue of payloads and the task that POSTs them in order."""

    def __init__(self, url: str, queue_size: int):
        self.url = url
        self.queue: asyncio.Queue = asyncio.Queue(queue_size)
        self.task: asyncio.Task | None = None
        self.stats = {"sent": 0, "failed": 0, "retries": 0, "dropped": 0}

    def offer(self, body: bytes) -> bool:
        """Queue a payload; True when the oldest queued one was dropped for it."""
        dropped = self.queue.full()
        if dropped:
            self.queue.get_nowait()
            self.queue.task_done()
            self.stats["dropped"] += 1
        self.queue.put_nowait(body)
        return dropped


class AlertDispatcher:
    """Logs episode transitions and POSTs them to webhooks in Alertmanager's payload shape."""

    def __init__(
        self,
        webhook_urls: list[str],
        dashboard_url: str,
        *,
        queue_size: int = 1000,
        timeout_s: float = 5.0,
        max_attempts: int = 6,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        repeat_interval_s: float = 3600.0,
        metrics=None,
    ):
        self.dashboard_url = dashboard_url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.repeat_interval_s = repeat_interval_s
        self.metrics = metrics  # CollectorMetrics or None: delivery outcomes become counters
        self.webhooks = [_Webhook(url, queue_size) for url in webhook_urls]
        self.dropped_changes = 0
        self._inbox: asyncio.Queue = asyncio.Queue(INBOX_SIZE)
        self._firing: dict[str, _Firing] = {}
        self._active: dict[str, dict] = {}  # fingerprint -> alert, for the API
        self._loop_thread: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._router: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._router = asyncio.create_task(self._route(), name="modtrack-alert-router")
        for hook in self.webhooks:
            hook.task = asyncio.create_task(self._deliver(hook), name=f"modtrack-webhook {hook.url}")

    def episode_changed(self, episode: Episode) -> None:
        """Never blocks: copy the episode (the detector keeps mutating it) and enqueue it."""
        snapshot = dataclasses.replace(episode, ranks=list(episode.ranks))
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._enqueue, snapshot)
        else:
            self._enqueue(snapshot)

    def _enqueue(self, episode: Episode) -> None:
        try:
            self._inbox.put_nowait(episode)
        except asyncio.QueueFull:
            self.dropped_changes += 1
            self._count("dropped")

    def forget_job(self, job: str) -> None:
        """A job that left memory (finished, past its retention) stops firing: its alerts are resolved, sent as
        resolved to the webhooks and leave /api/v1/alerts. Runs on the event loop, as the router does."""
        now = time.time()
        for fp in [fp for fp, alert in self._active.items() if alert["labels"].get("job") == job]:
            alert = self._active.pop(fp)
            self._firing.pop(fp, None)
            resolved = dict(alert, status="resolved", endsAt=rfc3339(now))
            log.warning("alert resolved: %s (the job was forgotten)", alert["annotations"]["summary"])
            self._send(resolved)

    def active_alerts(self) -> list[dict]:
        """The alerts firing now, as Alertmanager lists them."""
        return list(self._active.values())

    async def stop(self, drain_s: float = 2.0) -> None:
        """Give pending deliveries up to drain_s, then cancel the tasks and close the client."""
        if self._router is None:
            return
        try:
            await asyncio.wait_for(self._drain(), drain_s)
        except asyncio.TimeoutError:
            pass
        tasks = [self._router, *(h.task for h in self.webhooks if h.task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self._router = None

    async def _drain(self) -> None:
        await self._inbox.join()
        for hook in self.webhooks:
            await hook.queue.join()

    async def _route(self) -> None:
        while True:
            episode = await self._inbox.get()
            try:
                self._transition(episode)
            except Exception:  # a bad episode must not stop alerting for the others
                log.exception("alert routing failed for %r", episode)
            finally:
                self._inbox.task_done()

    def _transition(self, episode: Episode) -> None:
        fp = fingerprint(alert_labels(episode))
        now = time.time()
        seen = self._firing.get(fp)
        if episode.state == "active":
            if seen is None:
                seen = self._firing[fp] = _Firing(starts_at=now, last_sent=now)
                log.warning("alert opened: %s", episode_to_alert(episode, self.dashboard_url)["annotations"]["summary"])
            elif now - seen.last_sent < self.repeat_interval_s:
                self._active[fp] = episode_to_alert(episode, self.dashboard_url, starts_at=seen.starts_at)
                return  # still firing, already told
            seen.last_sent = now
            alert = episode_to_alert(episode, self.dashboard_url, starts_at=seen.starts_at)
            self._active[fp] = alert
        elif seen is not None:
            del self._firing[fp]
            self._active.pop(fp, None)
            alert = episode_to_alert(episode, self.dashboard_url, starts_at=seen.starts_at, ends_at=now)
            log.warning(
                "alert resolved: %s (steps %d-%d)",
                alert["annotations"]["summary"],
                episode.first_step,
                episode.last_step,
            )
        else:
            return  # resolved before we ever saw it open: nothing to take back
        self._send(alert)

    def _send(self, alert: dict) -> None:
        if self.webhooks:
            body = json.dumps(webhook_payload([alert], RECEIVER, self.dashboard_url)).encode()
            for hook in self.webhooks:
                if hook.offer(body):
                    self._count("dropped")

    async def _deliver(self, hook: _Webhook) -> None:
        while True:
            body = await hook.queue.get()
            try:
                outcome = await self._post_with_retries(hook, body)
                hook.stats[outcome] += 1
                self._count(outcome)
            finally:
                hook.queue.task_done()

    async def _post_with_retries(self, hook: _Webhook, body: bytes) -> str:
        delays = backoff_delays(self.backoff_s, self.max_backoff_s)
        for attempt in range(self.max_attempts):
            if attempt:
                hook.stats["retries"] += 1
                if self.metrics is not None:
                    self.metrics.count_alert_retry()
                await asyncio.sleep(next(delays))
            assert self._session is not None, "delivering before start()"
            try:
                async with self._session.post(
                    hook.url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    if resp.status < 300:
                        return "sent"
                    if 400 <= resp.status < 500 and resp.status not in _RETRYABLE_4XX:
                        log.error("webhook %s refused the alert: HTTP %d", hook.url, resp.status)
                        return "failed"
                    reason = f"HTTP {resp.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason = repr(exc)
            log.info("webhook %s attempt %d failed: %s", hook.url, attempt + 1, reason)
        log.error("webhook %s: giving up after %d attempts", hook.url, self.max_attempts)
        return "failed"

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.count_alert_delivery(outcome)
