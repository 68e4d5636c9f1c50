"""The CUDA event clock's logic, on CPU: the one place a fake (a fake CUDA event) is used."""

from __future__ import annotations

import math

import torch
from torch import nn

from modtrack.agent import ModuleTracker
from modtrack.agent.clocks import CpuClock, CudaEventClock, make_clock
from modtrack.agent.tracker import MAX_PENDING_STEPS

torch.set_num_threads(1)


class FakeGpu:
    """A GPU timeline: `now` is where queued work will end (ms); events up to `done_until` are done."""

    def __init__(self):
        self.now = 0.0
        self.done_until = math.inf

    def event(self):
        return FakeEvent(self)


class FakeEvent:
    def __init__(self, gpu):
        self.gpu, self.t = gpu, None

    def record(self):
        self.t = self.gpu.now

    def query(self):
        return self.t is not None and self.t <= self.gpu.done_until

    def synchronize(self):
        self.gpu.done_until = max(self.gpu.done_until, self.t)

    def elapsed_time(self, end):
        if not (self.query() and end.query()):
            raise RuntimeError("event not complete")
        return end.t - self.t


class GpuWork(torch.autograd.Function):
    """Queues `fw` ms of GPU work in forward and `bw` ms in backward; the host does nothing."""

    @staticmethod
    def forward(ctx, x, gpu, fw, bw):
        gpu.now += fw
        ctx.gpu, ctx.bw = gpu, bw
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        ctx.gpu.now += ctx.bw
        return grad, None, None, None


class Kernel(nn.Module):
    def __init__(self, gpu):
        super().__init__()
        self.gpu = gpu

    def forward(self, x):
        return GpuWork.apply(x, self.gpu, 5.0, 7.0)


class Model(nn.Module):
    def __init__(self, gpu):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.kernel = Kernel(gpu)

    def forward(self, x):
        return self.kernel(self.lin(x))


def run_steps(tracker, model, n):
    for _ in range(n):
        model(torch.randn(2, 4)).sum().backward()
        tracker.step()


def test_module_times_are_gpu_times_from_events_not_host_times():
    gpu = FakeGpu()
    model, records = Model(gpu), []
    with ModuleTracker(on_step=records.append, clock=CudaEventClock(gpu.event)) as t:
        run_steps(t, model, 2)
        s = t.last_step()
    assert t.clock_kind == "cuda"
    assert s[("Model.kernel", "forward")]["inclusive_ms"] == 5.0
    assert s[("Model.kernel", "backward")]["inclusive_ms"] == 7.0
    assert s[("Model", "forward")]["inclusive_ms"] == 5.0 and s[("Model", "forward")]["self_ms"] == 0.0
    assert s[("Model.lin", "forward")]["inclusive_ms"] == 0.0  # host work only: no GPU time
    r = records[-1]
    assert r.forward_ns == 5_000_000 and r.backward_ns == 7_000_000
    assert r.end_ns > r.start_ns  # step boundaries stay on the host clock


def test_unresolved_steps_are_carried_and_handed_over_in_order_with_events_pooled():
    gpu = FakeGpu()
    clock = CudaEventClock(gpu.event)
    model, records = Model(gpu), []
    with ModuleTracker(on_step=records.append, clock=clock) as t:
        gpu.done_until = -1.0  # the GPU lags: nothing is done yet
        run_steps(t, model, 2)
        assert records == [] and t.counters["steps"] == 0
        gpu.done_until = math.inf
        run_steps(t, model, 1)
        assert [r.step for r in records] == [0, 1, 2]
        assert t.last_step()[("Model.kernel", "backward")]["inclusive_ms"] == 7.0
        created = clock.created
        run_steps(t, model, 20)
        assert clock.created == created  # every event came back to the pool


def test_a_gpu_that_never_catches_up_drops_the_oldest_steps_not_memory():
    gpu = FakeGpu()
    gpu.done_until = -1.0
    clock = CudaEventClock(gpu.event)
    with ModuleTracker(clock=clock) as t:
        run_steps(t, Model(gpu), MAX_PENDING_STEPS + 5)
        assert t.counters["steps_dropped"] == 5 and len(t._pending) == MAX_PENDING_STEPS


def test_close_waits_once_for_the_gpu_and_flushes_every_step():
    gpu = FakeGpu()
    gpu.done_until = -1.0
    t = ModuleTracker(clock=CudaEventClock(gpu.event))
    with t:
        run_steps(t, Model(gpu), 3)
        assert t.counters["steps"] == 0
    assert t.counters["steps"] == 3 and t.counters["hook_errors"] == 0


def test_make_clock():
    assert isinstance(make_clock("cpu"), CpuClock) and make_clock("cpu").durations == "thread"
    assert make_clock("wall").kind == "cpu" and make_clock("wall").durations == "wall"
    assert make_clock("auto").kind == ("cuda" if torch.cuda.is_available() else "cpu")
    custom = CudaEventClock(FakeGpu().event)
    assert make_clock(custom) is custom
