"""On a real GPU: module times come from CUDA events (GPU work), where host time sees only launches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modtrack.agent import ModuleTracker

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def cycles_for(ms: float) -> int:
    """torch.cuda._sleep spins for a number of GPU cycles: calibrate cycles per ms once."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe = 10_000_000
    torch.cuda._sleep(probe)  # warm up
    start.record()
    torch.cuda._sleep(probe)
    end.record()
    end.synchronize()
    return int(probe * ms / start.elapsed_time(end))


class SleepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cycles):
        ctx.cycles = cycles
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        torch.cuda._sleep(ctx.cycles)
        return grad * 2, None


class GpuBusy(nn.Module):
    """20 ms of GPU work in forward, 30 ms in backward; microseconds of host work."""

    def __init__(self, fw_cycles, bw_cycles):
        super().__init__()
        self.fw_cycles, self.bw_cycles = fw_cycles, bw_cycles

    def forward(self, x):
        torch.cuda._sleep(self.fw_cycles)
        return SleepBackward.apply(x, self.bw_cycles)


class Model(nn.Module):
    def __init__(self, fw_cycles, bw_cycles):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.busy = GpuBusy(fw_cycles, bw_cycles)

    def forward(self, x):
        return self.busy(self.lin(x))


def run(clock: str, model, steps=4):
    with ModuleTracker(clock=clock) as t:
        for _ in range(steps):
            model(torch.randn(8, 64, device="cuda")).sum().backward()
            t.step()
        kind = t.clock_kind
    return kind, t.last_step(), t.counters


def test_gpu_work_is_timed_by_events_while_host_time_would_miss_it():
    model = Model(cycles_for(20), cycles_for(30)).cuda()
    kind, s, counters = run("auto", model)
    assert kind == "cuda" and counters["hook_errors"] == 0 and counters["steps"] == 4
    assert s[("Model.busy", "forward")]["inclusive_ms"] == pytest.approx(20, rel=0.2)
    assert s[("Model.busy", "backward")]["inclusive_ms"] == pytest.approx(30, rel=0.2)
    assert s[("Model", "forward")]["self_ms"] < 4
    # the host clock sees only the launch in forward
    _, host, _ = run("cpu", model)
    assert host[("Model.busy", "forward")]["inclusive_ms"] < 5
