"""A full garbage collection is the step's, not the module's that happened to run when it struck.

Each pause is a real `gc.collect()` over a heap of small objects, timed by the test itself around the call (the
truth); the tracker must leave it out of every module window it fell in, and of data loading, and report it as
the step's gc_ns.
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from torch import nn

from modtrack.agent.report_codec import encode_report
from modtrack.agent.step_accumulator import step_summary
from modtrack.agent.tracker import ModuleTracker


@pytest.fixture(scope="module")
def heap():
    """Enough tracked objects that a full collection takes tens of ms (~20-70 ms on the development VM)."""
    objects = [[] for _ in range(600_000)]
    yield objects
    del objects


class Collecting(nn.Module):
    """A Linear whose forward (or, through an autograd Function, backward) runs a full collection when asked."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.forward_gc = self.backward_gc = False
        self.took_ns: list[int] = []

    def forward(self, x):
        if self.forward_gc:
            self.took_ns.append(timed_collect())
        out = self.lin(x)
        return _CollectInBackward.apply(out, self) if self.backward_gc else out


class _CollectInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.owner.took_ns.append(timed_collect())
        return grad, None


def timed_collect(generation: int = 2) -> int:
    start = time.perf_counter_ns()
    gc.collect(generation)
    return time.perf_counter_ns() - start


def run(steps: int, setup, clock: str = "cpu"):
    """`steps` steps of Sequential(Linear, Collecting, Linear); setup(k, net) arms step k. (records, names, net)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), Collecting(), nn.Linear(8, 1))
    records: list = []
    with ModuleTracker(on_step=records.append, clock=clock) as tracker:
        for k in range(steps):
            setup(k, net)
            net(torch.randn(4, 8)).sum().backward()
            tracker.step()
        names = tracker.module_names
        errors = tracker.counters["hook_errors"]
    assert errors == 0
    return [r.build() for r in records], names, net


@pytest.mark.parametrize("clock", ["cpu", "wall"])
def test_a_full_collection_in_a_forward_is_the_steps_gc_time_not_the_modules(heap, clock):
    def setup(k, net):
        net[1].forward_gc = k >= 2

    records, names, net = run(4, setup, clock)
    pauses = net[1].took_ns
    assert len(pauses) == 2 and min(pauses) > 10e6, pauses  # the heap makes each pause long
    for record in records[:2]:
        assert (record.gc_ns, record.gc_collections) == (0, 0)
    for record, took in zip(records[2:], pauses, strict=True):
        assert record.gc_collections == 1
        assert record.gc_ns == pytest.approx(took, rel=0.05)  # the test's own clock around gc.collect()
        s = step_summary(record, names)
        for name in ("Sequential", "Sequential.1", "Sequential.1.lin"):  # the module that ran it, and its caller
            assert s[(name, "forward")]["inclusive_ms"] < 0.1 * took / 1e6, (name, s[(name, "forward")], took)
        assert record.forward_ns >= took  # the step's forward is wall time: the pause is in it
        assert record.data_ns < 0.1 * took


def test_a_full_collection_in_a_backward_is_left_out_of_the_modules_backward(heap):
    def setup(k, net):
        net[1].backward_gc = k == 1

    records, names, net = run(3, setup)
    (took,) = net[1].took_ns
    record = records[1]
    assert record.gc_collections == 1 and record.gc_ns == pytest.approx(took, rel=0.05)
    s = step_summary(record, names)
    for name in ("Sequential", "Sequential.1"):
        assert s[(name, "backward")]["inclusive_ms"] < 0.1 * took / 1e6, (name, s[(name, "backward")], took)
    assert record.backward_ns >= took


def test_a_full_collection_while_loading_data_is_not_data_loading(heap):
    def setup(k, net):
        if k == 1:
            net[1].took_ns.append(timed_collect())  # between steps: the next batch's loading

    records, _, net = run(3, setup)
    (took,) = net[1].took_ns
    record = records[1]
    assert record.gc_collections == 1 and record.gc_ns == pytest.approx(took, rel=0.05)
    assert record.data_ns < 0.1 * took, (record.data_ns, took)
    assert records[1].wall_ns >= took


def test_young_collections_and_other_threads_collections_are_not_counted(heap):
    def setup(k, net):
        if k == 1:
            timed_collect(0)
            timed_collect(1)
            other = threading.Thread(target=timed_collect)
            other.start()
            other.join()

    records, _, _ = run(2, setup)
    assert all((r.gc_ns, r.gc_collections) == (0, 0) for r in records)


def test_the_report_carries_the_pauses_and_the_tracker_leaves_gc_callbacks_as_it_found_them(heap):
    before = list(gc.callbacks)

    def setup(k, net):
        net[1].forward_gc = k == 1

    records, _, net = run(2, setup)
    assert gc.callbacks == before
    report = encode_report(records[1], {}).report
    assert report.gc_collections == 1 and report.gc_ns == records[1].gc_ns > 0
    assert encode_report(records[0], {}).report.gc_ns == 0
