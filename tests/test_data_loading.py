"""A step's time outside its phases, told apart: the DataLoader's fetch is data loading, the rest of it is the
training loop's own code (an EMA update, logging, a scheduler after the optimizer step). The truth is the test's
own clock around `next()` and around the loop's code; before, all of it was data loading."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, dataloader

from modtrack.agent import ModuleTracker

torch.set_num_threads(1)

FETCH_S = 0.020  # each batch's loading
AFTER_S = 0.030  # the loop's own code after the optimizer step


def busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class SlowBatches(IterableDataset):
    """Endless batches, each computed for FETCH_S (in the worker, with workers)."""

    def __iter__(self):
        while True:
            busy(FETCH_S)
            yield torch.randn(8, 16)


def train(batches, steps: int = 6) -> tuple[list, list, list, ModuleTracker]:
    """The records of `steps` steps, and the test's own clock: each step's fetch and its code after the step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    records, fetch, after = [], [], []
    with ModuleTracker(on_step=records.append, clock="cpu") as t:
        for _ in range(steps):
            start = time.perf_counter_ns()
            x = next(batches)
            fetch.append(time.perf_counter_ns() - start)
            model(x).sum().backward()
            opt.step()
            start = time.perf_counter_ns()
            opt.zero_grad()
            busy(AFTER_S)  # an EMA update, metrics, logging
            after.append(time.perf_counter_ns() - start)
    assert t.counters["hook_errors"] == 0, t.counters
    return [r.build() for r in records], fetch, after, t


@pytest.mark.parametrize("workers", [0, 2])
def test_the_dataloaders_fetch_is_data_loading_and_the_loops_own_code_is_host_time(workers):
    loader = DataLoader(SlowBatches(), batch_size=None, num_workers=workers)
    records, fetch, after, _ = train(iter(loader))
    assert len(records) == 6
    for record, fetched, code in zip(records[1:], fetch[1:], after[:-1]):  # a step's batch, the code before it
        loading = record.data_ns - record.host_ns
        assert abs(loading - fetched) <= 0.05 * fetched + 500_000, (loading, fetched)  # the test clock brackets more
        # the loop's 30 ms and the few gaps around it (zero_grad, the batch handed over): preempted by the workers on
        # a loaded host, the agent's stretch read 3.8 ms over the test's once; taken as data loading it would read 0
        assert abs(record.host_ns - code) <= 0.15 * code + 1_000_000, (record.host_ns, code)


def test_a_batch_fetched_between_forward_and_backward_is_data_loading_too():
    """A second loader read in the middle of the step, after the forward (the targets, a teacher's outputs):
    loading, not the loop's code between forward and backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first, second = iter(DataLoader(SlowBatches(), batch_size=None)), iter(DataLoader(SlowBatches(), batch_size=None))
    records, fetch, code = [], [], []
    with ModuleTracker(on_step=records.append, clock="cpu"):
        for _ in range(5):
            start = time.perf_counter_ns()
            x = next(first)
            took = time.perf_counter_ns() - start
            out = model(x)
            start = time.perf_counter_ns()
            y = next(second)  # the targets, read after the forward
            took += time.perf_counter_ns() - start
            loss = (out - y[:, :1]).pow(2).sum()
            start = time.perf_counter_ns()
            busy(AFTER_S)  # the loop's own code between forward and backward
            code.append(time.perf_counter_ns() - start)
            loss.backward()
            fetch.append(took)
            opt.step()
            opt.zero_grad()
    for record, fetched, own in zip([r.build() for r in records][1:], fetch[1:], code[1:]):
        assert abs((record.data_ns - record.host_ns) - fetched) <= 0.05 * fetched + 300_000, (record, fetched)
        assert abs(record.host_ns - own) <= 0.10 * own + 500_000, (record.host_ns, own)


def test_a_loop_without_a_dataloader_is_told_as_before():
    """Batches from the loop's own iterator: nothing says which part is loading, so all of it is data."""
    records, fetch, after, _ = train(iter(SlowBatches()))
    for record, fetched, code in zip(records[1:], fetch[1:], after[:-1]):
        assert record.host_ns < 0.1 * (fetched + code), record.host_ns
        assert record.data_ns >= fetched + code


def test_a_dataloader_iterated_on_another_thread_waits_for_no_step():
    """A user's prefetching thread fetches ahead: the training thread never waited for those fetches."""
    ahead: list = []
    source = iter(DataLoader(SlowBatches(), batch_size=None))
    done = threading.Event()

    def prefetch():
        while not done.is_set():
            if len(ahead) < 2:
                ahead.append(next(source))
            else:
                time.sleep(0.001)

    thread = threading.Thread(target=prefetch, daemon=True)
    thread.start()

    def batches():
        while True:
            while not ahead:
                time.sleep(0.0005)
            yield ahead.pop(0)

    try:
        records, _, _, t = train(batches())
    finally:
        done.set()
        thread.join(5)
    # told as before: the loop's 30 ms after each step stay data. The gaps between the phases, stretched by the
    # prefetching thread's hold on the GIL, are all that is host time: ~4 ms a step, one step in a few twice that
    # on a busy machine; had the other thread's 20 ms fetches been taken off, each step would show ~14 ms
    host = sorted(r.host_ns for r in records[1:])
    assert host[len(host) // 2] < 0.25 * AFTER_S * 1e9, [(r.host_ns, r.data_ns) for r in records]
    assert all(r.data_ns >= AFTER_S * 1e9 for r in records[1:]), [(r.host_ns, r.data_ns) for r in records]
    assert not t.fetches.spans


def test_the_iterator_is_given_back_when_the_last_tracker_closes():
    original = dataloader._BaseDataLoaderIter.__next__
    outer = ModuleTracker()
    with outer:
        with ModuleTracker():
            assert dataloader._BaseDataLoaderIter.__next__ is not original
        assert dataloader._BaseDataLoaderIter.__next__ is not original  # the outer one still listens
    assert dataloader._BaseDataLoaderIter.__next__ is original
