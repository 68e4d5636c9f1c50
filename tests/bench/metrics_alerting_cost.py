"""What metrics and alerting cost the collector: per step, per scrape, per episode change.

Prints the median cost of CollectorMetrics.observe_step and observe_rank, the time and size of
one /metrics exposition, for 8 to 4096 ranks, and how long AlertDispatcher.episode_changed takes
while its only webhook receiver is down.

    python tests/bench/metrics_alerting_cost.py
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from modtrack.collector.outputs.alerting import AlertDispatcher
from modtrack.collector.outputs.metrics import CollectorMetrics
from modtrack.collector.records import Episode, StepMatrix

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared harness
from harness.ports import free_port


def timed(fn, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def metrics_costs(n_ranks: int, n_modules: int = 200, n_episodes: int = 50) -> dict:
    m = CollectorMetrics()
    hosts = [f"node{r // 8}" for r in range(n_ranks)]
    for r in range(n_ranks):
        m.observe_rank("job", r, hosts[r], 0.5, {"reports_dropped": 0})
    matrix = StepMatrix(
        "job",
        1,
        np.arange(n_ranks),
        hosts,
        np.arange(n_modules),
        np.ones(n_modules, np.int64),
        np.ones((n_ranks, n_modules)),
        np.full(n_ranks, 100.0),
        np.full(n_ranks, 5.0),
    )
    m.set_episodes(
        "job",
        [
            Episode("job", r, hosts[r], f"Net.layer{r}", "forward", 1.5, 1, 9, "active", float(r))
            for r in range(min(n_episodes, n_ranks))
        ],
    )
    m.observe_step(matrix, 0.1)
    body = m.exposition()[0]
    return {
        "observe_step_us": timed(lambda: m.observe_step(matrix, 0.1), 2000) * 1e6,
        "observe_rank_us": timed(lambda: m.observe_rank("job", 3, hosts[3], 0.5, {"reconnects": 1}), 2000) * 1e6,
        "scrape_ms": timed(m.exposition, 20) * 1e3,
        "series": sum(1 for line in body.splitlines() if line and not line.startswith(b"#")),
        "bytes": len(body),
    }


async def dispatcher_cost() -> float:
    down = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
    d = AlertDispatcher([down], "http://dash", backoff_s=5)
    await d.start()
    eps = [Episode("job", r % 64, "node0", f"Net.layer{r}", "backward", 2.0, 1, 9, "active", 10.0) for r in range(5000)]
    it = iter(eps)
    cost = timed(lambda: d.episode_changed(next(it)), 5000)
    await d.stop(drain_s=0.1)
    return cost * 1e6


def main() -> None:
    logging.getLogger("modtrack.alerts").setLevel(logging.ERROR)  # one "opened" line per episode otherwise
    print(f"{'ranks':>6} {'observe_step us':>16} {'observe_rank us':>16} {'scrape ms':>10} {'series':>7} {'KiB':>7}")
    for n in (8, 64, 512, 4096):
        c = metrics_costs(n)
        print(
            f"{n:>6} {c['observe_step_us']:>16.1f} {c['observe_rank_us']:>16.1f} {c['scrape_ms']:>10.1f} "
            f"{c['series']:>7} {c['bytes'] / 1024:>7.0f}"
        )
    print(f"episode_changed with the webhook receiver down: {asyncio.run(dispatcher_cost()):.1f} us median")


if __name__ == "__main__":
    main()
