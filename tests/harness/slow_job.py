"""A 4-rank job of fake ranks in which rank 2 is 1.5x slower in Net.blocks.1 (forward and backward)
and the others wait for it: what the HTTP API and the query CLI tests read back."""

from __future__ import annotations

from harness.fake_rank import FakeRank, report

SLOW_RANK, SLOW_MODULE = 2, 3  # rank 2 is 1.5x slower in Net.blocks.1, forward and backward


def slow_rank_ms(rank: int, step: int) -> list[float]:
    ms = [1.0, 2.0, 3.0, 4.0, 5.0]
    ms = [m * (1 + 0.01 * ((rank + step) % 3)) for m in ms]  # a little jitter
    if rank == SLOW_RANK:
        ms[SLOW_MODULE] *= 1.5
    return ms


def sync_of(rank: int) -> float:
    return 1.0 if rank == SLOW_RANK else 6.0  # the others wait for the slow one


def run_slow_job(collector, steps, job="train", world=4):
    """Stream `steps` of the job to `collector` (anything with a grpc_target); wait for the acks."""
    ranks = [FakeRank(collector.grpc_target, job, i, world) for i in range(world)]
    try:
        for step in steps:
            for i, r in enumerate(ranks):
                r.report(report(step, slow_rank_ms(i, step), sync_ms=sync_of(i)))
        for r in ranks:
            r.wait_ack(steps[-1])
    finally:
        for r in ranks:
            r.close()
