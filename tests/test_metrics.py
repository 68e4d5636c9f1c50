"""What Prometheus sees on /metrics: per-rank series, active episodes only, a bounded cardinality."""

from prometheus_client.parser import text_string_to_metric_families

from harness.metrics_samples import episode, matrix
from modtrack.collector.outputs.metrics import CollectorMetrics
from modtrack.collector.records import Episode


def scrape(metrics: CollectorMetrics) -> dict:
    """{(sample name, sorted label items): value} from the text exposition."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def series(samples: dict, name: str) -> dict:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_per_rank_step_time_sync_wait_and_agent_counters_in_seconds():
    m = CollectorMetrics()
    for rank in range(4):
        m.observe_rank(
            "train",
            rank,
            f"node{rank // 2}",
            clock_offset_ms=2.0 * rank,
            counters={"reports_dropped": rank, "reconnects": 1},
        )
    m.observe_step(matrix(), lag_s=0.3)
    s = scrape(m)
    key = (("host", "node1"), ("job", "train"), ("rank", "3"))
    assert s[("modtrack_step_seconds", key)] == 0.13
    assert s[("modtrack_sync_wait_seconds", key)] == 0.02
    assert s[("modtrack_clock_offset_seconds", key)] == 0.006
    assert s[("modtrack_agent_reports_dropped_total", (("job", "train"), ("rank", "3")))] == 3
    assert s[("modtrack_agent_reconnects_total", (("job", "train"), ("rank", "3")))] == 1
    assert s[("modtrack_reports_received_total", (("job", "train"), ("rank", "0")))] == 1
    assert s[("modtrack_ingest_records_total", ())] == 4
    assert s[("modtrack_last_step", (("job", "train"),))] == 7
    assert s[("modtrack_verdict_lag_seconds_count", ())] == 1
    assert len(series(s, "modtrack_rank_last_report_timestamp_seconds")) == 4


def test_closed_episodes_and_recovered_hosts_lose_their_series():
    m = CollectorMetrics()
    host_episode = episode(rank=-1, host="node3", ranks=[6, 7])
    m.set_episodes("train", [episode(), host_episode])
    s = scrape(m)
    labels = (("host", "node0"), ("job", "train"), ("module", "Net.blocks.1.mlp"), ("phase", "backward"), ("rank", "1"))
    assert s[("modtrack_straggler_slowdown_ratio", labels)] == 2.5
    assert s[("modtrack_straggler_cost_seconds_per_step", labels)] == 0.012
    assert series(s, "modtrack_node_suspect") == {(("host", "node3"), ("job", "train")): 1}
    # the host episode is not a rank straggler series
    assert len(series(s, "modtrack_straggler_slowdown_ratio")) == 1

    m.set_episodes("train", [episode(state="resolved"), episode(rank=-1, host="node3", state="resolved")])
    s = scrape(m)
    assert series(s, "modtrack_straggler_slowdown_ratio") == {}
    assert series(s, "modtrack_straggler_cost_seconds_per_step") == {}
    assert series(s, "modtrack_node_suspect") == {}
    assert s[("modtrack_straggler_episodes_active", (("job", "train"),))] == 0


def test_episode_series_keep_only_the_costliest_top_k():
    m = CollectorMetrics(top_k=5)
    m.set_episodes("train", [episode(rank=r, module=f"Net.layer{r}", cost=float(r)) for r in range(100)])
    s = scrape(m)
    kept = {dict(labels)["rank"] for labels in series(s, "modtrack_straggler_slowdown_ratio")}
    assert kept == {"95", "96", "97", "98", "99"}
    assert s[("modtrack_straggler_episodes_active", (("job", "train"),))] == 100


def test_series_count_does_not_grow_with_the_number_of_modules():
    def count(n_modules):
        m = CollectorMetrics()
        for rank in range(8):
            m.observe_rank("train", rank, "node0", 0.0, {})
        m.observe_step(matrix(n_ranks=8, n_modules=n_modules, hosts=["node0"] * 8), lag_s=0.1)
        return len(scrape(m))

    assert count(2000) == count(1)


def test_missing_ranks_counted_until_they_report_again():
    m = CollectorMetrics()
    m.observe_rank("train", 0, "node0", 0.0, {})
    m.mark_rank_missing("train", 1, "node0")
    m.mark_rank_missing("train", 1, "node0")
    assert scrape(m)[("modtrack_ranks_missing", (("job", "train"),))] == 1
    m.observe_rank("train", 1, "node0", 0.0, {})
    assert scrape(m)[("modtrack_ranks_missing", (("job", "train"),))] == 0


def test_jobs_are_independent_and_forgetting_one_removes_its_series():
    m = CollectorMetrics()
    m.observe_rank("a", 0, "n", 0.0, {})
    m.observe_rank("b", 0, "n", 0.0, {})
    m.set_episodes("a", [episode()])
    m.set_episodes("b", [])
    assert len(series(scrape(m), "modtrack_straggler_slowdown_ratio")) == 1
    m.forget_job("a")
    s = scrape(m)
    assert all(dict(labels).get("job") != "a" for (_, labels) in s)
    assert ("modtrack_reports_received_total", (("job", "b"), ("rank", "0"))) in s


def test_rejections_and_webhook_outcomes_are_counted():
    m = CollectorMetrics()
    m.count_rejected("bad_token")
    m.count_rejected("bad_token")
    m.count_alert_delivery("failed")
    s = scrape(m)
    assert s[("modtrack_ingest_rejected_total", (("reason", "bad_token"),))] == 2
    assert s[("modtrack_alert_webhook_deliveries_total", (("outcome", "failed"),))] == 1


def test_odd_label_values_are_escaped_and_parse_back():
    m = CollectorMetrics()
    job = 'team "a"\\exp\n2'
    m.observe_rank(job, 0, "node0", 0.0, {})
    m.set_episodes(
        job,
        [
            Episode(
                job=job,
                rank=0,
                host="node0",
                module='Net.blocks["x"]',
                phase="forward",
                slowdown=1.5,
                first_step=1,
                last_step=2,
                state="active",
                cost_ms_per_step=1.0,
            )
        ],
    )
    s = scrape(m)
    assert s[("modtrack_reports_received_total", (("job", job), ("rank", "0")))] == 1
    (labels,) = series(s, "modtrack_straggler_slowdown_ratio")
    assert dict(labels)["module"] == 'Net.blocks["x"]'


def test_a_rank_that_moves_host_keeps_its_counts_under_the_new_host():
    m = CollectorMetrics()
    m.observe_rank("train", 0, "node0", 0.0, {})
    m.observe_rank("train", 0, "node7", 0.0, {})
    s = scrape(m)
    assert s[("modtrack_reports_received_total", (("job", "train"), ("rank", "0")))] == 2
    assert list(series(s, "modtrack_rank_last_report_timestamp_seconds")) == [
        (("host", "node7"), ("job", "train"), ("rank", "0"))
    ]
