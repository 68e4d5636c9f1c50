"""The built-in webhook: Alertmanager v4 payloads, retries, and no receiver can hold anything up."""

import asyncio
import logging
import threading
import time

from harness.ports import free_port
from harness.waiting import wait_for
from harness.webhook_receiver import WebhookReceiver
from modtrack.collector.outputs.alert_payload import ZERO_TIME, episode_to_alert, fingerprint
from modtrack.collector.outputs.alerting import AlertDispatcher
from modtrack.collector.outputs.metrics import CollectorMetrics
from modtrack.collector.records import Episode

DASHBOARD = "http://collector.example:8080"


def episode(state="active", rank=3, host="node1", **kw):
    fields = dict(
        job="train",
        rank=rank,
        host=host,
        module="Net.blocks.1.mlp",
        phase="backward",
        slowdown=2.5,
        first_step=40,
        last_step=52,
        state=state,
        cost_ms_per_step=12.3,
        cost_pct=8.1,
    )
    fields.update(kw)
    return Episode(**fields)


def closed_port_url() -> str:
    return f"http://127.0.0.1:{free_port()}/hook"


async def run_dispatcher(urls, body, **kw):
    d = AlertDispatcher(urls, DASHBOARD, **kw)
    await d.start()
    try:
        return await body(d)
    finally:
        await d.stop(drain_s=0.5)


def wait(receiver, n, timeout_s=10):
    return asyncio.to_thread(receiver.wait_for, lambda bodies: len(bodies) >= n, timeout_s)


def test_firing_then_resolved_payloads_in_alertmanager_shape(caplog):
    caplog.set_level(logging.INFO, logger="modtrack.alerts")

    async def body(d):
        d.episode_changed(episode())
        d.episode_changed(episode(last_step=53))  # still active: no second notification
        await wait(rx, 1)
        assert [a["labels"]["rank"] for a in d.active_alerts()] == ["3"]
        d.episode_changed(episode(state="resolved", last_step=60))
        return await wait(rx, 2)

    with WebhookReceiver() as rx:
        firing, resolved = asyncio.run(run_dispatcher([rx.url], body))
        assert len(rx.received) == 2  # the dispatcher stopped drained: nothing more is on its way

    for payload, status in ((firing, "firing"), (resolved, "resolved")):
        assert payload["version"] == "4"
        assert payload["status"] == status
        assert payload["receiver"] == "modtrack"
        assert payload["groupLabels"] == {"alertname": "ModtrackStraggler", "job": "train"}
        assert payload["groupKey"] == '{}:{alertname="ModtrackStraggler", job="train"}'
        assert payload["externalURL"] == DASHBOARD
        (alert,) = payload["alerts"]
        assert alert["status"] == status
        assert alert["labels"] == {
            "alertname": "ModtrackStraggler",
            "job": "train",
            "rank": "3",
            "host": "node1",
            "module": "Net.blocks.1.mlp",
            "phase": "backward",
            "severity": "warning",
        }
        assert payload["commonLabels"] == alert["labels"]
        summary = alert["annotations"]["summary"]
        for word in ("Rank 3", "node1", "Net.blocks.1.mlp", "backward", "2.50x", "12.3 ms per step", "8.1%"):
            assert word in summary
        assert alert["annotations"]["description"]
        assert alert["generatorURL"] == DASHBOARD + "/?job=train"
        assert alert["fingerprint"] == fingerprint(alert["labels"])
    assert firing["alerts"][0]["endsAt"] == ZERO_TIME
    assert resolved["alerts"][0]["startsAt"] == firing["alerts"][0]["startsAt"]
    assert resolved["alerts"][0]["endsAt"] > resolved["alerts"][0]["startsAt"]
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("alert opened: Rank 3 on host node1") for m in messages)
    assert any(m.startswith("alert resolved: Rank 3 on host node1") for m in messages)


def test_a_cause_its_peers_do_not_have_at_all_is_told_by_its_excess_not_a_ratio():
    """A rank's garbage collection: its peers' median is 0, the entry has no slowdown, and '1.00x slower' (the
    episode's placeholder) would tell a user nothing is wrong."""
    gc_entry = {"module": "(garbage collection)", "phase": "gc", "excess_ms": 41.5, "slowdown": None}
    ep = episode(
        module="(garbage collection)", phase="gc", slowdown=1.0, modules=[gc_entry], cause="garbage collection"
    )
    annotations = episode_to_alert(ep, DASHBOARD)["annotations"]
    assert annotations["summary"].startswith(
        "Rank 3 on host node1 spends 41.5 ms more per step than its peers in (garbage collection) (gc), costing 12.3 ms"
    )
    assert "x slower" not in annotations["summary"] + annotations["description"]
    assert "41.5 ms more per step than the median of its peers" in annotations["description"]
    module_entry = {"module": "Net.blocks.1.mlp", "phase": "backward", "excess_ms": 9.0, "slowdown": 2.5}
    assert (
        "is 2.50x slower in Net.blocks.1.mlp"
        in episode_to_alert(episode(modules=[module_entry]), DASHBOARD)["annotations"]["summary"]
    )


def test_host_rollup_is_one_node_suspect_alert_for_the_host():
    async def body(d):
        d.episode_changed(episode(rank=-1, host="node2", ranks=[4, 5, 6, 7]))
        return await wait(rx, 1)

    with WebhookReceiver() as rx:
        (payload,) = asyncio.run(run_dispatcher([rx.url], body))
    (alert,) = payload["alerts"]
    assert alert["labels"]["alertname"] == "ModtrackNodeSuspect"
    assert alert["labels"]["host"] == "node2"
    assert "rank" not in alert["labels"]
    assert alert["labels"]["severity"] == "critical"
    assert "ranks 4, 5, 6, 7" in alert["annotations"]["summary"]


def test_fingerprint_matches_alertmanager():
    # Alertmanager (prometheus/common model.LabelSet.Fingerprint) gives these for the same label sets.
    assert fingerprint({}) == "cbf29ce484222325"  # FNV-1a 64 offset basis: the empty label set
    a = {"alertname": "X", "job": "j"}
    assert fingerprint(a) == fingerprint(dict(reversed(list(a.items()))))
    assert fingerprint(a) != fingerprint({"alertname": "X", "job": "k"})
    assert len(fingerprint(a)) == 16


def test_down_and_slow_receivers_delay_nothing_else():
    down = closed_port_url()

    async def body(d):
        timings = []
        sent_at = time.monotonic()
        for i in range(200):
            t0 = time.perf_counter()
            d.episode_changed(episode(rank=i % 8, module=f"Net.layer{i}"))
            timings.append(time.perf_counter() - t0)
        await wait(fast, 200)
        return sent_at, sorted(timings)

    with WebhookReceiver(delay_s=5.0) as slow, WebhookReceiver() as fast:
        sent_at, timings = asyncio.run(run_dispatcher([down, slow.url, fast.url], body, timeout_s=1.0))
        assert len(fast.received) == 200
        last_arrival = fast.received[-1][0]
    median_us = timings[len(timings) // 2] * 1e6
    assert median_us < 500, f"episode_changed took {median_us:.0f} us (median)"
    # 200 alerts reach the healthy receiver long before the slow one has answered its first.
    assert last_arrival - sent_at < 4.0


def test_receiver_errors_are_retried_with_backoff():
    metrics = CollectorMetrics()

    async def body(d):
        d.episode_changed(episode())
        await wait(rx, 1)
        return d.webhooks[0].stats

    with WebhookReceiver(fail_first=2) as rx:
        stats = asyncio.run(run_dispatcher([rx.url], body, backoff_s=0.05, metrics=metrics))
        assert len(rx.received) == 1 and rx.requests == 3
    assert stats["retries"] == 2 and stats["sent"] == 1
    assert b'modtrack_alert_webhook_deliveries_total{outcome="sent"} 1.0' in metrics.exposition()[0]
    assert b"modtrack_alert_webhook_retries_total 2.0" in metrics.exposition()[0]


def test_a_refusing_receiver_is_not_retried():
    async def body(d):
        d.episode_changed(episode())
        stats = d.webhooks[0].stats
        await asyncio.to_thread(wait_for, lambda: stats["failed"], 10, "the refusal to be counted")
        return stats

    with WebhookReceiver(status=400) as rx:
        stats = asyncio.run(run_dispatcher([rx.url], body, backoff_s=0.05))
        assert rx.requests == 1
    assert stats["failed"] == 1 and stats["retries"] == 0


def test_queue_is_bounded_when_the_receiver_is_down():
    async def body(d):
        for i in range(50):
            d.episode_changed(episode(module=f"Net.layer{i}"))
        hook = d.webhooks[0]
        # every change routed: one in flight, the rest queued or dropped
        await asyncio.to_thread(
            wait_for,
            lambda: hook.stats["dropped"] + hook.queue.qsize() + 1 >= 50,
            10,
            lambda: f"all 50 changes routed: {hook.stats} queued {hook.queue.qsize()}",
        )
        return hook

    metrics = CollectorMetrics()
    hook = asyncio.run(run_dispatcher([closed_port_url()], body, queue_size=5, backoff_s=10, metrics=metrics))
    assert hook.queue.maxsize == 5
    assert hook.stats["dropped"] >= 50 - 5 - 1  # one in flight, five queued, the rest dropped
    dropped = f'modtrack_alert_webhook_deliveries_total{{outcome="dropped"}} {float(hook.stats["dropped"])}'
    assert dropped.encode() in metrics.exposition()[0]  # every payload the full queue let go


def test_episode_changed_from_another_thread():
    async def body(d):
        t = threading.Thread(target=d.episode_changed, args=(episode(),))
        t.start()
        t.join()
        return await wait(rx, 1)

    with WebhookReceiver() as rx:
        assert len(asyncio.run(run_dispatcher([rx.url], body))) == 1


def test_alert_for_the_api_keeps_given_times():
    alert = episode_to_alert(episode(state="resolved"), DASHBOARD, starts_at=0.0, ends_at=60.5)
    assert alert["startsAt"] == "1970-01-01T00:00:00.000Z"
    assert alert["endsAt"] == "1970-01-01T00:01:00.500Z"
    assert alert["status"] == "resolved"


def test_a_forgotten_job_stops_firing():
    """A job that leaves the collector's memory (finished, past its retention) resolves its alerts."""

    async def body(d):
        d.episode_changed(episode())
        d.episode_changed(episode(job="other"))
        await wait(rx, 2)
        d.forget_job("train")
        resolved = await wait(rx, 3)
        assert [a["labels"]["job"] for a in d.active_alerts()] == ["other"]
        return resolved

    with WebhookReceiver() as rx:
        resolved = asyncio.run(run_dispatcher([rx.url], body))[2]
    (alert,) = resolved["alerts"]
    assert (alert["status"], alert["labels"]["job"], alert["labels"]["rank"]) == ("resolved", "train", "3")
    assert alert["endsAt"] > alert["startsAt"]
