"""The tracker is a guest: 5,000 steps must not grow live hook handles nor Python memory."""

from __future__ import annotations

import gc
import tracemalloc

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from modtrack.agent import ModuleTracker

torch.set_num_threads(1)


def live_handles() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, RemovableHandle))


def test_5000_steps_keep_handles_and_memory_flat():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    x = torch.randn(2, 4)
    records = []

    def keep_last(record):
        records[:] = [record]

    def train(steps):
        for _ in range(steps):
            model(x).sum().backward()
            t.step()

    with ModuleTracker(on_step=keep_last, clock="cpu") as t:
        train(200)  # warm up: names learned, numpy and torch caches filled
        gc.collect()
        handles_before = live_handles()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        train(5000)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        handles_after = live_handles()
        assert t.counters["steps"] == 5200 and t.counters["hook_errors"] == 0
    assert handles_after <= handles_before
    assert growth < 64 * 1024, f"{growth} bytes more after 5,000 steps"
