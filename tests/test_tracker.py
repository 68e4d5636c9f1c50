"""agent.ModuleTracker: what a user of the tracker sees, on the hard cases of issue 2."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.module_tracker import ModuleTracker as SeedTracker

from harness.ports import free_port
from modtrack.agent import ModuleTracker
from modtrack.agent.step_accumulator import step_summary

torch.set_num_threads(1)


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU())

    def forward(self, x):
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, d=8, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def train_step(model, opt, x):
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()


def keys(summary, phase):
    return {name for (name, p) in summary if p == phase}


def busy(seconds):
    """Compute for `seconds` of this thread's CPU time (however long other processes make it take)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class SlowBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bw_seconds):
        ctx.bw_seconds = bw_seconds
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        busy(ctx.bw_seconds)
        return grad * 2, None


class Slow(nn.Module):
    """Busy 20 ms in forward, 30 ms in backward."""

    def forward(self, x):
        busy(0.020)
        return SlowBackward.apply(x, 0.030)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.slow = Slow()

    def forward(self, x):
        return self.slow(self.pre(x))


def test_step_per_optimizer_step_with_every_module_timed_forward_and_backward():
    model, records = Net(), []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ModuleTracker(on_step=records.append, clock="cpu") as t:
        for _ in range(3):
            train_step(model, opt, torch.randn(4, 8))
        summary = t.last_step()
    assert t.clock_kind == "cpu" and t.counters["steps"] == 3 and t.counters["hook_errors"] == 0
    assert [r.step for r in records] == [0, 1, 2]
    names = {
        "Net",
        "Net.blocks.0",
        "Net.blocks.0.mlp",
        "Net.blocks.0.mlp.0",
        "Net.blocks.0.mlp.1",
        "Net.blocks.1",
        "Net.blocks.1.mlp",
        "Net.blocks.1.mlp.0",
        "Net.blocks.1.mlp.1",
        "Net.head",
    }
    assert keys(summary, "forward") == names
    assert keys(summary, "backward") == names  # the first layer's input needs no grad: still timed
    for stats in summary.values():
        assert stats["calls"] == 1 and stats["inclusive_ms"] >= stats["self_ms"] >= 0
    net_fw = summary[("Net", "forward")]
    children = sum(summary[(n, "forward")]["inclusive_ms"] for n in ("Net.blocks.0", "Net.blocks.1", "Net.head"))
    assert net_fw["self_ms"] == pytest.approx(net_fw["inclusive_ms"] - children, abs=1e-3)
    r = records[-1]
    assert r.forward_ns > 0 and r.backward_ns > 0 and r.optimizer_ns > 0 and r.backward_tail_ns >= 0
    assert r.forward_ns + r.backward_ns + r.optimizer_ns + r.data_ns <= r.wall_ns
    assert records[1].start_ns == records[0].end_ns
    # the name table goes out incrementally: all names with the first step, none new after
    assert records[0].first_new_module_id == 0 and records[0].new_module_names == t.module_names
    assert records[1].first_new_module_id == len(t.module_names) and records[1].new_module_names == []
    cols = r.phases["backward"]
    assert len(cols.module_id) == len(names) and (cols.last_end_ns >= cols.first_start_ns).all()


def test_node_hooks_leave_the_users_tensors_and_their_hooks_alone():
    """The tracker hooks autograd nodes through a tensor of its own: a module's output
    gets no hooks dict, and a user's tensor hook on it sees the same gradient as without tracking."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 8)
    seen: list = []

    def hook_output(mod, args, output):
        seen.append(output._backward_hooks)
        output.register_hook(lambda g: seen.append(g.clone()))

    model.blocks[0].mlp.register_forward_hook(hook_output)
    model(x).sum().backward()
    untracked = seen[-1]
    seen.clear()
    with ModuleTracker(seed_parents=False) as t:
        model(x).sum().backward()
        t.step()
        summary = t.last_step()
    assert seen[0] is None and torch.equal(seen[1], untracked)
    assert summary[("Net.blocks.0.mlp", "backward")]["calls"] == 1 and t.counters["hook_errors"] == 0


def test_parents_and_is_bw_behave_as_the_seed():
    """What code running inside a module sees (forward, and its backward ops), as with the seed."""
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fw", frozenset(tracker.parents), tracker.is_bw))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("bw", frozenset(tracker.parents), tracker.is_bw))
            return grad

    class Spied(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return Spy.apply(self.lin(x))

    def observe(tracker_cls):
        nonlocal tracker
        seen.clear()
        model = nn.Sequential(nn.Linear(8, 8), Spied(), nn.Linear(8, 8))
        with tracker_cls() as tracker:
            for _ in range(2):
                model(torch.randn(2, 8)).sum().backward()
            after = (set(tracker.parents), tracker.is_bw)
        return list(seen), after

    tracker = None
    ours = observe(ModuleTracker)
    assert ours == observe(SeedTracker)
    assert ours[0][1] == ("bw", frozenset({"Global", "Sequential", "Sequential.1"}), True)


def test_names_match_the_seed_and_ignore_ddp_wrapping():
    import torch.distributed as dist

    model = Net()
    with SeedTracker() as seed:
        seen = set()
        handles = [m.register_forward_pre_hook(lambda m, a: seen.update(seed.parents)) for m in model.modules()]
        model(torch.randn(2, 8))
        for h in handles:
            h.remove()
    with ModuleTracker() as t:
        model(torch.randn(2, 8)).sum().backward()
        t.step()
        plain_names = {n for n, _ in t.last_step()}
    assert plain_names == seen - {"Global"}

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(Net())
        with ModuleTracker() as t:
            ddp(torch.randn(2, 8)).sum().backward()
            t.step()
            ddp_summary = t.last_step()
    finally:
        dist.destroy_process_group()
    assert {n for n, _ in ddp_summary} == plain_names  # "Net...", never "DistributedDataParallel"
    assert ("Net", "backward") in ddp_summary


def test_checkpoint_and_compile_wrappers_are_stripped_from_names():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from modtrack.agent.module_names import SKIP, ModuleNames

    model = Net()
    model.blocks[1] = checkpoint_wrapper(model.blocks[1])
    names = ModuleNames()
    compiled = torch.compile(model)  # not called: only the wrapper structure matters here
    assert names.names[names.module_id(compiled)] == "Net"
    assert names.names[names.module_id(model.blocks[1].mlp[0])] == "Net.blocks.1.mlp.0"
    assert names.module_id(model.blocks[1]) == SKIP  # the checkpoint wrapper itself is not timed
    assert names.names[names.module_id(model.blocks[1]._checkpoint_wrapped_module)] == "Net.blocks.1"


def test_a_module_busy_20ms_forward_30ms_backward_is_measured_within_20_percent():
    model, records = Outer(), []
    with ModuleTracker(on_step=records.append, clock="cpu") as t:
        for _ in range(3):
            model(torch.randn(3, 4, requires_grad=True)).sum().backward()
            t.step()
    steps = [step_summary(r, t.module_names) for r in records]

    def best(name, phase, field="inclusive_ms"):  # a busy machine only ever adds time: take the best step
        return min(s[(name, phase)][field] for s in steps)

    assert best("Outer.slow", "forward") == pytest.approx(20, rel=0.2)
    assert best("Outer.slow", "backward") == pytest.approx(30, rel=0.2)
    assert best("Outer", "forward", "self_ms") < 4  # the parent's self time excludes the slow child
    assert best("Outer", "backward", "self_ms") < 6
    for s in steps:
        assert s[("Outer", "backward")]["inclusive_ms"] >= s[("Outer.slow", "backward")]["inclusive_ms"]


class Waits(nn.Module):
    """Computes 10 ms and sleeps 30 ms in forward; in backward, sleeps 30 ms then computes 10 ms."""

    def forward(self, x):
        busy(0.010)
        time.sleep(0.030)
        return SleepyBackward.apply(x)


class SleepyBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        time.sleep(0.030)
        busy(0.010)
        return grad


def run_waits(clock):
    model, records = nn.Sequential(nn.Linear(4, 4), Waits()), []
    with ModuleTracker(on_step=records.append, clock=clock) as t:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            t.step()
    return [step_summary(r, t.module_names) for r in records], records


def test_cpu_clock_counts_compute_not_sleep_and_timestamps_stay_wall():
    """A module's time is the compute its rank did: a sleep (or a preemption, or a wait in a
    collective) is not in it, a busy-wait is. Timestamps still tell wall time."""
    steps, records = run_waits("cpu")
    for s in steps:
        assert s[("Sequential.1", "forward")]["inclusive_ms"] == pytest.approx(10, abs=3)
        assert s[("Sequential.1", "backward")]["inclusive_ms"] == pytest.approx(10, abs=3)
        assert s[("Sequential", "forward")]["self_ms"] < 3  # the parent did no sleeping of its own either
    for r in records:
        fw, bw = r.phases["forward"], r.phases["backward"]
        assert (fw.last_end_ns - fw.first_start_ns).max() >= 40e6  # the call's span on the wall clock
        assert (bw.last_end_ns - bw.first_start_ns).max() >= 40e6
        assert r.forward_ns >= 40e6 and r.backward_ns >= 40e6 and r.wall_ns >= 80e6


class Twice(nn.Module):
    """Calls its child twice, with 10 ms of its own code between the calls (a wait, or a micro-batch's rest)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Waits())

    def forward(self, x):
        x = self.inner(x)
        time.sleep(0.010)
        return self.inner(x)


def test_each_call_of_a_module_called_twice_has_its_window_when_asked():
    """Where collective waits are taken out of module windows (collective timing on, wall-clock or CUDA
    durations), a module called several times in a phase sends each call's window: its first start and last end
    span the parent's code between the calls too. Truth: the calls' windows add up to the module's inclusive wall
    time, the first starts at first_start_ns and the last ends at last_end_ns, and the parent's 10 ms sleep lies
    between them. Not asked: nothing more is sent."""
    from modtrack.agent.report_codec import fill_report
    from modtrack.protos import modtrack_pb2 as pb

    model, records = Twice(), []
    with ModuleTracker(on_step=records.append, clock="wall") as t:
        t.call_windows = True
        for _ in range(2):
            model(torch.randn(2, 4)).sum().backward()
            t.step()
        t.call_windows = False
        model(torch.randn(2, 4)).sum().backward()
        t.step()
    inner = t.module_names.index("Twice.inner")
    for r in records[:2]:
        for phase in ("forward", "backward"):
            cols = r.phases[phase]
            multi = cols.calls > 1
            names = ["Twice.inner", "Twice.inner.0", "Twice.inner.1"]
            assert sorted(cols.module_id[multi].tolist()) == sorted(t.module_names.index(n) for n in names)
            at = int(np.flatnonzero(cols.module_id == inner)[0])
            first = int(np.flatnonzero(multi).tolist().index(at)) * 2  # two windows per module called twice
            start, end = cols.call_start_ns[first : first + 2], cols.call_end_ns[first : first + 2]
            assert start[0] == cols.first_start_ns[at] and end[1] == cols.last_end_ns[at]
            assert int((end - start).sum()) == pytest.approx(cols.inclusive_ns[at], rel=1e-3)  # work stamps: wall too
            assert (end - start).min() >= 39e6
            assert start[1] >= end[0] + (9e6 if phase == "forward" else 0)  # the parent's sleep is in no call
        report = pb.StepReport()
        fill_report(report, r, {})
        assert [len(p.call_start_ns) for p in report.phases] == [6, 6]  # Twice.inner and its children, twice each
    assert all(not len(c.call_start_ns) for c in records[2].phases.values())


def test_wall_clock_counts_the_sleep_too():
    steps, _ = run_waits("wall")
    for s in steps:
        assert s[("Sequential.1", "forward")]["inclusive_ms"] >= 39
        assert s[("Sequential.1", "backward")]["inclusive_ms"] >= 39
        assert s[("Sequential", "forward")]["inclusive_ms"] >= 39


def test_shared_module_called_twice_counts_two_calls_each_way():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.relu(self.shared(x)))

    with ModuleTracker() as t:
        Twice()(torch.randn(2, 4)).sum().backward()
        t.step()
        s = t.last_step()
    assert s[("Twice.shared", "forward")]["calls"] == 2
    assert s[("Twice.shared", "backward")]["calls"] == 2
    assert t.counters["hook_errors"] == 0


def test_recursive_module_counts_inclusive_time_once():
    class Recursive(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, depth=2):
            busy(0.005)
            x = self.lin(x)
            return self(x, depth - 1) if depth else x

    model, records = Recursive(), []
    with ModuleTracker(on_step=records.append) as t:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            t.step()
        assert t.parents == {"Global"}
    steps = [step_summary(r, t.module_names) for r in records]
    s = steps[-1]
    assert s[("Recursive", "forward")]["calls"] == 3
    # inclusive counts the outermost call only: 15 ms, not 15 + 10 + 5 (best step: noise only adds)
    assert min(x[("Recursive", "forward")]["inclusive_ms"] for x in steps) == pytest.approx(15, rel=0.2)
    assert min(x[("Recursive", "forward")]["self_ms"] for x in steps) == pytest.approx(15, rel=0.2)
    assert s[("Recursive.lin", "backward")]["calls"] == 3
    assert t.counters["hook_errors"] == 0


def test_no_grad_and_eval_steps_are_forward_only_and_leave_no_stuck_state():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ModuleTracker() as t:
        model.eval()
        with torch.no_grad():
            model(torch.randn(2, 8))
        t.step()
        assert keys(t.last_step(), "backward") == set() and ("Net.head", "forward") in t.last_step()
        assert t.parents == {"Global"} and not t.is_bw
        model(torch.randn(2, 8))  # grad enabled, never backwarded: forward only too
        t.step()
        assert keys(t.last_step(), "backward") == set()
        model.train()
        train_step(model, opt, torch.randn(2, 8))
        assert ("Net.head", "backward") in t.last_step()
        assert t.last_record().step == 2


def test_dict_tuple_and_nested_outputs_get_their_backward_timed():
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return {"a": self.a(x), "rest": (self.b(x), [x * 3])}

    class Top(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = Heads()

        def forward(self, x):
            out = self.heads(x)
            return out["a"].sum() + out["rest"][0].sum() + out["rest"][1][0].sum()

    with ModuleTracker() as t:
        Top()(torch.randn(2, 4, requires_grad=True)).backward()
        t.step()
        s = t.last_step()
    for name in ("Top.heads", "Top.heads.a", "Top.heads.b"):
        assert s[(name, "backward")]["calls"] == 1
    assert s[("Top.heads", "backward")]["inclusive_ms"] >= s[("Top.heads.a", "backward")]["inclusive_ms"]


def test_exception_inside_a_forward_does_not_stick_to_the_next_step():
    class Flaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.fail = True

        def forward(self, x):
            x = self.inner(x)
            if self.fail:
                raise ValueError("boom")
            return x

    model = Flaky()
    with ModuleTracker() as t:
        with pytest.raises(ValueError):
            model(torch.randn(2, 4))
        assert t.parents == {"Global"}
        t.step()
        model.fail = False
        model(torch.randn(2, 4)).sum().backward()
        t.step()
        s = t.last_step()
    assert s[("Flaky", "forward")]["calls"] == 1 and s[("Flaky.inner", "forward")]["calls"] == 1
    assert ("Flaky", "backward") in s
    assert t.counters["hook_errors"] == 0


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_reports_recompute_not_a_second_forward(reentrant):
    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.block = Block(4)

        def forward(self, x):
            x = self.pre(x)
            return checkpoint(self.block, x, use_reentrant=reentrant)

    model = Ckpt()
    with ModuleTracker() as t:
        for _ in range(2):
            model(torch.randn(2, 4, requires_grad=True)).sum().backward()
            t.step()
        s, r = t.last_step(), t.last_record()
    for name in ("Ckpt.block", "Ckpt.block.mlp.0"):
        assert s[(name, "forward")]["calls"] == 1
        assert s[(name, "recompute")]["calls"] == 1
        assert s[(name, "backward")]["calls"] == 1
    assert s[("Ckpt", "forward")]["calls"] == 1 and ("Ckpt", "recompute") not in s
    assert r.recompute_ns > 0 and r.recompute_ns <= r.backward_ns
    assert t.counters["hook_errors"] == 0


def test_a_broken_tracker_never_breaks_training():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def explode():
        raise RuntimeError("clock broke")

    def bad_consumer(record):
        raise RuntimeError("transport broke")

    with ModuleTracker(on_step=bad_consumer) as t:
        train_step(model, opt, torch.randn(2, 8))
        train_step(model, opt, torch.randn(2, 8))  # the first step ends when the second begins
        assert t.counters["on_step_errors"] == 1
        t._stamp = explode
        for _ in range(2):
            train_step(model, opt, torch.randn(2, 8))  # must not raise
        assert t.counters["hook_errors"] > 0


def test_trace_requested_from_another_thread_rides_on_the_next_steps():
    model, records = Net(), []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ModuleTracker(on_step=records.append) as t:
        train_step(model, opt, torch.randn(2, 8))
        asker = threading.Thread(target=t.request_trace, args=("cap-1", 2))
        asker.start()
        asker.join()
        for _ in range(3):
            train_step(model, opt, torch.randn(2, 8))
    assert [r.trace is not None for r in records] == [False, True, True, False]
    trace = records[1].trace
    assert trace.capture_id == "cap-1"
    n_fw = int((trace.phase == 0).sum())
    assert n_fw == 10 and int((trace.phase == 1).sum()) == 10
    assert (trace.end_ns >= trace.start_ns).all() and (trace.start_ns[1:] >= trace.start_ns[:-1]).all()
    root = trace.module_id[trace.depth == 0]
    assert {t.module_names[i] for i in root.tolist()} == {"Net"}


def test_step_by_hand_data_time_and_empty_steps():
    model = Net()
    with ModuleTracker() as t:
        model(torch.randn(2, 8)).sum().backward()
        t.step()
        t.step()  # nothing happened since: no empty step
        time.sleep(0.05)  # "data loading"
        model(torch.randn(2, 8)).sum().backward()
        t.step()
        r = t.last_record()
    assert t.counters["steps"] == 2 and r.step == 1
    assert r.data_ns >= 45e6 and r.optimizer_ns == 0


def test_close_is_idempotent_and_flushes_the_step_in_progress():
    model = Net()
    t = ModuleTracker()
    with t:
        model(torch.randn(2, 8)).sum().backward()
    t.close()
    assert t.counters["steps"] == 1 and ("Net", "backward") in t.last_step()
    before = len(torch.nn.modules.module._global_forward_pre_hooks)
    model(torch.randn(2, 8))  # hooks are gone
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == before


@pytest.mark.slow
def test_torch_compile_model_does_not_crash_and_is_timed_as_a_whole():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    compiled = torch.compile(model)
    with ModuleTracker() as t:
        for _ in range(2):
            compiled(torch.randn(2, 4)).sum().backward()
            t.step()
        s = t.last_step()
    assert s[("Sequential", "forward")]["calls"] == 1
    assert s[("Sequential", "backward")]["calls"] == 1
    assert t.counters["hook_errors"] == 0


class CompiledBlock(nn.Module):
    def __init__(self, slow: bool):
        super().__init__()
        self.a, self.b, self.slow = nn.Linear(16, 16), nn.Linear(16, 16), slow

    def forward(self, x):
        if self.slow:
            busy(0.020)
            x = SlowBackward.apply(x, 0.030)
        return x + self.b(torch.relu(self.a(x)))


def test_blocks_compiled_in_place_are_each_timed_as_one_module():
    """Regional compilation (`block.compile()`): each block runs its hooks inside compiled code, where they did
    nothing, and the blocks' time was the root's. Each block is timed around its compiled call, its busy waits (20
    ms forward, 30 ms backward: a graph break, run eagerly inside the compiled call) where they ran."""
    torch.manual_seed(0)
    model = nn.Sequential(CompiledBlock(False), CompiledBlock(True), CompiledBlock(False), nn.Linear(16, 1))
    for block in list(model)[:3]:
        block.compile(backend="eager")  # dynamo traces the call, hooks included; no code generation to wait for
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with ModuleTracker(clock="cpu") as t:
        for _ in range(3):
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
        s = t.last_step()
    assert t.counters["hook_errors"] == 0
    blocks = {(f"Sequential.{i}", phase) for i in range(4) for phase in ("forward", "backward")}
    assert {k for k in s if k[0].count(".") == 1} == blocks
    assert not any(k[0].startswith("Sequential.1.") for k in s)  # fused into the compiled block: not apart
    assert 20.0 <= s[("Sequential.1", "forward")]["self_ms"] < 20.0 * 1.15
    assert 30.0 <= s[("Sequential.1", "backward")]["self_ms"] < 30.0 * 1.15
    for name in ("Sequential", "Sequential.0", "Sequential.2"):  # the waits do not leak into the neighbours
        assert s[(name, "forward")]["self_ms"] < 2.0 and s[(name, "backward")]["self_ms"] < 2.0
    assert all(getattr(b._compiled_call_impl, "_modtrack_compiled", None) is None for b in list(model)[:3])


def test_a_loop_that_never_ends_a_step_stays_bounded(monkeypatch):
    """Inference under the launcher: no optimizer, no step(). Calls must not pile up forever."""
    import modtrack.agent.tracker

    monkeypatch.setattr(modtrack.agent.tracker, "MAX_CALLS_PER_STEP", 300)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(10)])  # 11 calls per forward
    seen = []
    with ModuleTracker(on_step=seen.append, clock="cpu") as t:
        for _ in range(200):
            model(torch.randn(2, 8, requires_grad=True))  # outputs need grad; no backward ever runs
            assert len(t._log.rows) < 300 + 11
        assert t.counters["implicit_steps"] == len(seen) >= 6
        assert t.counters["hook_errors"] == 0
    assert seen[0].phases["forward"].calls.sum() >= 300
