"""The CUDA event clock's logic, on CPU: the one place a fake (a fake CUDA event) is used.

The fake GPU is a timeline: work queued by a module moves `now`; an event records `now` and is done
once the GPU got there (`done_until`). Every call on a fake event notes the thread it came from, so the
tests can say where events are recorded (the training thread) and where they are read (the sender).
"""

from __future__ import annotations

import math
import threading

import torch
from torch import nn

from harness.ports import free_port
from harness.waiting import wait_for
from modtrack.agent import ModuleTracker
from modtrack.agent.clocks import CpuClock, CudaEventClock, make_clock
from modtrack.agent.identity import Identity
from modtrack.agent.transport import Transport

torch.set_num_threads(1)

IDENTITY = Identity(job="j", rank=0, local_rank=0, world_size=1, group_rank=0, host="h", pid=1)


class FakeGpu:
    """A GPU timeline: `now` is where queued work will end (ms); events up to `done_until` are done."""

    def __init__(self):
        self.now = 0.0
        self.done_until = math.inf
        self.records = 0
        self.threads: dict[str, set[int]] = {"record": set(), "query": set(), "read": set(), "synchronize": set()}

    def event(self):
        return FakeEvent(self)

    def note(self, what: str) -> None:
        self.threads[what].add(threading.get_ident())


class FakeEvent:
    def __init__(self, gpu):
        self.gpu, self.t = gpu, None

    def record(self):
        self.gpu.note("record")
        self.gpu.records += 1
        self.t = self.gpu.now

    def _done(self):
        return self.t is not None and self.t <= self.gpu.done_until

    def query(self):
        self.gpu.note("query")
        return self._done()

    def synchronize(self):
        self.gpu.note("synchronize")
        self.gpu.done_until = max(self.gpu.done_until, self.t)

    def elapsed_time(self, end):
        self.gpu.note("read")
        if not (self._done() and end._done()):
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


def sender(clock, **kw) -> Transport:
    """A real transport whose collector is not there: its sender thread aggregates all the same."""
    kw.setdefault("flush_interval_s", 0.01)
    return Transport(f"127.0.0.1:{free_port()}", IDENTITY, clock_kind="cuda", backoff_initial_s=5, **kw).start()


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


class KernelTwice(nn.Module):
    def __init__(self, gpu):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.kernel = Kernel(gpu)

    def forward(self, x):
        return self.kernel(self.kernel(self.lin(x)))


def test_each_call_of_a_module_called_twice_has_its_window_on_the_gpus_clock():
    """Collective timing on CUDA sends each call's window of a module called several times (call_windows): read
    from the events like every module time, so each call of Kernel spans its own 5 ms of GPU work (forward) and
    7 ms (backward), one right after the other on the GPU's timeline, whatever the host did."""
    gpu = FakeGpu()
    model, records = KernelTwice(gpu), []
    with ModuleTracker(on_step=records.append, clock=CudaEventClock(gpu.event)) as t:
        t.call_windows = True
        run_steps(t, model, 2)
        kernel = t.module_names.index("KernelTwice.kernel")
    for phase, ms in (("forward", 5.0), ("backward", 7.0)):
        cols = records[-1].phases[phase]
        assert cols.module_id[cols.calls > 1].tolist() == [kernel]
        start, end = cols.call_start_ns, cols.call_end_ns
        assert ((end - start) / 1e6).tolist() == [ms, ms] and start[1] == end[0]
        at = cols.module_id.tolist().index(kernel)
        assert (start[0], end[1]) == (cols.first_start_ns[at], cols.last_end_ns[at])


def test_one_event_per_boundary_and_none_allocated_after_the_first_steps():
    gpu = FakeGpu()
    clock = CudaEventClock(gpu.event)
    records = []

    def aggregate(record):  # what the sender does, a step at a time
        records.append(record.build())

    with ModuleTracker(on_step=aggregate, clock=clock) as t:
        run_steps(t, Model(gpu), 3)
        created, before = clock.created, gpu.records
        run_steps(t, Model(gpu), 1)
        per_step = gpu.records - before
        run_steps(t, Model(gpu), 100)
    # 3 modules x 4 window ends is 12 timestamps, but calls that start or end at the same place share one:
    # the step's reference, pass start and end, 6 forward stamps, the backward's 4 distinct nodes
    assert per_step <= 13, per_step
    assert clock.created == created  # 100 more steps, not one more event: blocks come back to the pool
    assert t.counters["hook_errors"] == 0 and records[-1].backward_ns == 7_000_000


def test_events_are_recorded_on_the_training_thread_and_read_only_on_the_sender():
    gpu = FakeGpu()
    clock = CudaEventClock(gpu.event)
    transport = sender(clock)
    try:
        with ModuleTracker(on_step=transport.submit, clock=clock) as t:
            run_steps(t, Model(gpu), 5)
            wait_for(lambda: transport.stats["queued"] == 5 and not transport._raw, what="5 steps aggregated")
        trainer, sending = threading.get_ident(), transport._thread.ident
        assert gpu.threads["record"] == {trainer}
        assert gpu.threads["read"] == {sending} and gpu.threads["query"] == {sending}
        assert gpu.threads["synchronize"] == set()  # nobody waited for the GPU
        built = list(transport._queue)
        assert [r.step for r in built] == [0, 1, 2, 3, 4]
        assert all(r.forward_ns == 5_000_000 and r.backward_ns == 7_000_000 for r in built)
    finally:
        transport.close(timeout_s=0.1)


def test_steps_wait_in_order_for_a_lagging_gpu_and_are_aggregated_once_it_passes_them():
    gpu = FakeGpu()
    gpu.done_until = -1.0  # the GPU lags: nothing is done yet
    clock = CudaEventClock(gpu.event)
    transport = sender(clock)
    try:
        with ModuleTracker(on_step=transport.submit, clock=clock) as t:
            run_steps(t, Model(gpu), 3)
            wakes = transport.stats["wakes"]
            wait_for(lambda: transport.stats["wakes"] >= wakes + 3, what="the sender woke three times")
            assert len(transport._raw) == 3 and not transport._queue  # not built: the GPU has not passed them
            assert t.counters["steps"] == 3  # the training thread handed them over all the same
            gpu.done_until = math.inf
            wait_for(lambda: len(transport._queue) == 3, what="3 steps aggregated")
        assert [r.step for r in transport._queue] == [0, 1, 2]
        assert all(r.backward_ns == 7_000_000 for r in transport._queue)
        assert gpu.threads["synchronize"] == set()
    finally:
        transport.close(timeout_s=0.1)


def test_a_gpu_that_never_catches_up_costs_no_memory_step_after_step():
    gpu = FakeGpu()
    gpu.done_until = -1.0
    clock = CudaEventClock(gpu.event)
    transport = sender(clock, raw_size=4)
    try:
        with ModuleTracker(on_step=transport.submit, clock=clock) as t:
            run_steps(t, Model(gpu), 10)
            created = clock.created
            run_steps(t, Model(gpu), 40)
            assert len(transport._raw) <= 4 and transport.counters["reports_dropped"] >= 40
            assert clock.created == created  # dropped steps gave their events back
    finally:
        transport.close(timeout_s=0.1)


def test_close_never_waits_and_a_reader_of_a_step_the_gpu_has_not_passed_waits_for_it():
    gpu = FakeGpu()
    gpu.done_until = -1.0
    t = ModuleTracker(clock=CudaEventClock(gpu.event))
    with t:
        run_steps(t, Model(gpu), 3)
        assert t.counters["steps"] == 3
    assert gpu.threads["synchronize"] == set() and t.counters["hook_errors"] == 0
    assert t.last_step()[("Model.kernel", "backward")]["inclusive_ms"] == 7.0  # the reader waited
    assert gpu.threads["synchronize"] == {threading.get_ident()}


def test_make_clock():
    assert isinstance(make_clock("cpu"), CpuClock) and make_clock("cpu").durations == "thread"
    assert make_clock("wall").kind == "cpu" and make_clock("wall").durations == "wall"
    assert make_clock("auto").kind == ("cuda" if torch.cuda.is_available() else "cpu")
    custom = CudaEventClock(FakeGpu().event)
    assert make_clock(custom) is custom


def test_events_that_cannot_be_read_time_nothing_and_are_counted_not_raised():
    gpu = FakeGpu()

    class BrokenEvent(FakeEvent):
        def elapsed_time(self, end):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    clock = CudaEventClock(lambda: BrokenEvent(gpu))
    records = []
    with ModuleTracker(on_step=records.append, clock=clock) as t:
        run_steps(t, Model(gpu), 3)
        for r in records:
            r.build()
    assert t.counters["unresolved_steps"] == 3 and t.counters["hook_errors"] == 0
    assert all(r.phases == {} and r.forward_ns == 0 and r.end_ns > r.start_ns for r in records)
    with ModuleTracker(on_step=lambda r: r.build(), clock=clock) as t:
        run_steps(t, Model(gpu), 2)  # the block opened last above holds one event: it grows once
        created = clock.created
        run_steps(t, Model(gpu), 10)
    assert clock.created == created  # events that could not be read went back to the pool all the same
