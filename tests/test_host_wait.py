"""The part of the loop's own code a rank spent blocked (StepReport.host_wait_ns): under FSDP gradient clipping
all-reduces the gradients' norm, so a rank slow before the clip and its peers, which wait there for it, spend the
same wall time in their code. The truth is the test's own clocks: a `time.sleep` (blocked, as in a collective's
wait) or a busy wait (the rank's own code) of known length where the loop's code runs."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from modtrack.agent import ModuleTracker

torch.set_num_threads(1)

CODE_S = 0.030


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Batches(IterableDataset):
    def __init__(self, fetch_s: float = 0.0):
        self.fetch_s = fetch_s

    def __iter__(self):
        while True:
            time.sleep(self.fetch_s)  # with workers, the training thread waits for this: data loading, no host wait
            yield torch.randn(8, 16)


def train(batches, where: str, clock: str = "cpu", steps: int = 7):
    """Records, and per step the test's clock around the loop's code: (blocked, busy) seconds; odd steps block
    (a clip's all-reduce waiting for a peer), even ones compute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records, truth = [], []
    with ModuleTracker(on_step=records.append, clock=clock) as t:
        for i in range(steps):
            x = next(batches)
            loss = model(x).sum()
            start = time.perf_counter_ns()
            code = time.sleep if i % 2 else busy
            if where == "before backward":
                code(CODE_S)
            loss.backward()
            if where == "before the optimizer":
                code(CODE_S)
            opt.step()
            opt.zero_grad()
            truth.append((time.perf_counter_ns() - start, i % 2))
    assert t.counters["hook_errors"] == 0, t.counters
    return [r.build() for r in records], truth


@pytest.mark.parametrize("where", ["before backward", "before the optimizer"])
@pytest.mark.parametrize("loader", ["dataloader", "iterator", "dataloader with workers"])
def test_a_blocked_stretch_of_the_loops_code_is_its_wait_and_a_busy_one_is_not(where, loader):
    if loader == "iterator":
        batches = iter(Batches())
    else:
        workers = 1 if loader == "dataloader with workers" else 0
        batches = iter(DataLoader(Batches(0.01 if workers else 0.0), batch_size=None, num_workers=workers))
    records, truth = train(batches, where)
    computing = []
    for record, (took, blocked) in zip(records[1:], truth[1:]):
        assert record.host_ns >= CODE_S * 1e9, record.host_ns  # both kinds are the loop's own code
        assert record.host_wait_ns <= record.host_ns
        if blocked:  # the sleep, and as much of the rest as the thread was off its core (the test's clock brackets)
            assert 0.9 * CODE_S * 1e9 <= record.host_wait_ns <= took + 1_000_000, (record.host_wait_ns, took)
        else:  # computing: no wait (a preemption on shared cores is one, a few ms now and then)
            assert record.host_wait_ns < 0.5 * CODE_S * 1e9, (record.host_wait_ns, record.host_ns)
            computing.append(record.host_wait_ns)
    assert sorted(computing)[len(computing) // 2] < 0.1 * CODE_S * 1e9, computing


def test_a_worker_waited_for_is_data_loading_not_a_wait_in_the_loops_code():
    """The training thread blocks in next() while a worker loads the batch: that is data loading's."""
    batches = iter(DataLoader(Batches(0.04), batch_size=None, num_workers=1, prefetch_factor=1))
    records, _ = train(batches, "none")
    assert max(r.data_ns - r.host_ns for r in records[2:]) > 0.02e9  # the steps did wait for their batches
    assert all(r.host_wait_ns < 0.005e9 for r in records[1:]), [(r.host_wait_ns, r.data_ns) for r in records]


def test_on_wall_durations_nothing_is_stamped_and_the_wait_reads_zero():
    """Wall durations hold the waits already (as CUDA events): the field reads 0, as from agents before it."""
    records, _ = train(iter(Batches()), "before the optimizer", clock="wall")
    assert all(r.host_wait_ns == 0 for r in records)
    assert all(r.host_ns >= CODE_S * 1e9 for r in records[1:])
