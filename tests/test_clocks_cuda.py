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


def test_the_sender_resolves_gpu_times_and_events_are_pooled():
    """The whole CUDA path as a job runs it: events recorded on the training thread, resolved by the sender."""
    pytest.importorskip("grpc")
    from harness.ports import free_port
    from harness.waiting import wait_for
    from modtrack.agent.clocks import CudaEventClock
    from modtrack.agent.identity import Identity
    from modtrack.agent.transport import Transport

    model = Model(cycles_for(20), cycles_for(30)).cuda()
    identity = Identity(job="j", rank=0, local_rank=0, world_size=1, group_rank=0, host="h", pid=1)
    transport = Transport(f"127.0.0.1:{free_port()}", identity, clock_kind="cuda", flush_interval_s=0.01).start()
    clock = CudaEventClock()
    try:
        with ModuleTracker(on_step=transport.submit, clock=clock) as t:
            for i in range(12):
                model(torch.randn(8, 64, device="cuda")).sum().backward()
                t.step()
                if i == 5:
                    created = clock.created
            wait_for(lambda: transport.stats["queued"] == 12 and not transport._raw, timeout=30, what="12 steps built")
            busy_id = t.module_names.index("Model.busy")
        assert clock.created == created  # steps 6-11: no event made, every one reused
        for record in list(transport._queue)[2:]:
            forward = record.phases["forward"]
            busy = forward.inclusive_ns[forward.module_id.tolist().index(busy_id)]
            assert busy / 1e6 == pytest.approx(20, rel=0.2)
            assert record.backward_ns / 1e6 == pytest.approx(30, rel=0.2)
    finally:
        transport.close(timeout_s=0.5)


def test_sampled_mode_keeps_step_figures_on_every_step():
    model = Model(cycles_for(20), cycles_for(30)).cuda()
    records = []
    with ModuleTracker(on_step=records.append, clock="cuda") as t:
        t.set_sampling(4)
        for _ in range(9):
            model(torch.randn(8, 64, device="cuda")).sum().backward()
            t.step()
    assert [r.detail for r in records] == [s % 4 == 0 for s in range(9)]
    for r in records[1:]:
        assert r.forward_ns / 1e6 == pytest.approx(20, rel=0.2) and r.backward_ns / 1e6 == pytest.approx(30, rel=0.2)
    assert bool(records[8].phases) and not records[7].phases
