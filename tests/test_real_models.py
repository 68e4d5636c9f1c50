"""The tracker on models nobody on the project wrote: tiny transformers configs (random init, nothing
downloaded), nn.TransformerEncoder and a conv net.

What is checked, per step: child inclusive <= parent inclusive per phase, sum of self = root inclusive
(forward and backward), sum of backward self <= the measured backward pass, no overlapping windows;
known busy-waits injected where the old boundaries were wrong (a keyword input, a residual input, an
input shared by every decoder block) are measured and stay in their module; a module's own hooks are
inside its window; `parents` and `is_bw` as the seed's at every aten op; FlopCounterMode with
modtrack's tracker gives the seed's per-module FLOPs, on first use and on reuse.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.module_tracker import ModuleTracker as SeedTracker

from harness.real_models import MODELS, build, loss_of
from modtrack.agent import ModuleTracker

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)


def busy(seconds: float) -> None:
    """Compute for `seconds` of this thread's CPU time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class BusyBackward(torch.autograd.Function):
    """Identity in forward; busy `seconds` in backward."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        busy(ctx.seconds)
        return grad, None


# ---- invariants ---------------------------------------------------------------------------------
def closest_timed_parent(summary: dict, name: str, phase: str) -> str | None:
    while "." in name:
        name = name.rsplit(".", 1)[0]
        if (name, phase) in summary:
            return name
    return None


def check_invariants(summary: dict, record, root: str) -> None:
    recompute_self = sum(v["self_ms"] for (_, p), v in summary.items() if p == "recompute")
    for phase in ("forward", "backward"):
        cells = {m: v for (m, p), v in summary.items() if p == phase}
        for name, v in cells.items():
            parent = closest_timed_parent(summary, name, phase)
            if parent is not None:
                assert v["inclusive_ms"] <= cells[parent]["inclusive_ms"], (phase, name, parent)
        total_self = sum(v["self_ms"] for v in cells.values())
        root_ms = cells[root]["inclusive_ms"]
        assert total_self == pytest.approx(root_ms, rel=0.05), (phase, total_self, root_ms)
        if phase == "backward":  # activation checkpointing's recompute runs inside the pass, as its own phase
            assert total_self + recompute_self <= record.backward_ns / 1e6, (total_self, recompute_self, record)


# with activation checkpointing too: each checkpointed block's forward runs again inside the backward pass
CHECKPOINTED = [(name, reentrant) for name in ("llama", "encoder", "convnet") for reentrant in (False, True)]


@pytest.mark.parametrize("name,reentrant", [(name, None) for name in MODELS] + CHECKPOINTED)
def test_every_step_nests_adds_up_and_fits_in_the_backward_pass(name, reentrant):
    model, batch = build(name, reentrant)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with ModuleTracker(clock="cpu") as t:
        for _ in range(3):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
            s, r = t.last_step(), t.last_record()
            check_invariants(s, r, t.module_names[0])
    assert t.counters["steps"] == 3
    for key in ("hook_errors", "overlapping_calls", "backward_ends_at_pass_end"):
        assert t.counters[key] == 0, (key, t.counters)
    root = t.module_names[0]
    ran = [m for (m, p) in s if p == "forward" and m != root]
    untimed = [
        m
        for m in ran
        if (m, "backward") not in s
        and any(p.grad is not None for p in model.get_submodule(m.split(".", 1)[1]).parameters(recurse=False))
    ]
    assert not untimed, untimed[:5]  # every module that ran and has parameters has a backward


# ---- known durations where the old boundaries were wrong ------------------------------------------
def inject(module: nn.Module, fw: float, bw: float, kwarg: str | None = None) -> None:
    """Busy `fw` in module's forward, `bw` in its backward at its input (the last thing its backward does)."""
    forward = module.forward

    def slow_forward(*args, **kwargs):
        busy(fw)
        if kwarg is not None:
            kwargs[kwarg] = BusyBackward.apply(kwargs[kwarg], bw)
        else:
            args = (BusyBackward.apply(args[0], bw), *args[1:])
        return forward(*args, **kwargs)

    module.forward = slow_forward


CASES = {
    # Llama calls self_attn(hidden_states=...): a keyword input
    "llama-keyword": (
        "llama",
        "model.layers.1.self_attn",
        "hidden_states",
        ["model.layers.1.mlp", "model.layers.0.self_attn", "model.layers.1.input_layernorm"],
    ),
    # a GPT-2 block's input is the residual stream: read by ln_1 and by the residual add
    "gpt2-residual": ("gpt2", "transformer.h.1", None, ["transformer.h.0", "transformer.h.1.attn", "lm_head"]),
    # T5's encoder output is read by the cross-attention of every decoder block
    "t5-shared": (
        "t5",
        "decoder.block.1.layer.1.EncDecAttention",
        "key_value_states",
        ["decoder.block.0.layer.1.EncDecAttention", "decoder.block.1.layer.0", "encoder.block.1"],
    ),
}


def module_times(
    name: str, inject_into: tuple | None = None, reentrant: bool | None = None, wrapper: str | None = None
) -> dict:
    """`wrapper` "checkpoint_wrapper": Llama's decoder layers checkpointed as torchtitan does, in torch's
    CheckpointWrapper modules (`reentrant`: which implementation), not by transformers."""
    model, batch = build(name, None if wrapper else reentrant)
    if inject_into is not None:
        inject(model.get_submodule(inject_into[0]), *inject_into[1:])
    if wrapper == "checkpoint_wrapper":
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

        impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT
        model.config.use_cache = False  # a KV cache would grow again in each recompute (transformers turns it off)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=impl)
    steps = []
    with ModuleTracker(clock="cpu") as t:
        for i in range(6):
            loss_of(model, batch).backward()
            t.step()
            if i:  # the first step warms up (allocations, first-call hooks)
                steps.append(t.last_step())
    assert t.counters["overlapping_calls"] == 0
    # the median step per figure: one step's CPU time moves by a few ms on a loaded machine
    median = {
        key: {column: statistics.median(s[key][column] for s in steps) for column in ("inclusive_ms", "self_ms")}
        for key in steps[-1]
    }
    return {(m.split(".", 1)[1] if "." in m else "", p): v for (m, p), v in median.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_injected_durations_are_measured_in_their_module_and_nowhere_else(case):
    name, target, kwarg, neighbours = CASES[case]
    fw, bw = 0.020, 0.030
    base = module_times(name)
    slow = module_times(name, (target, fw, bw, kwarg))

    def added(module, phase, column="inclusive_ms"):
        return (slow[(module, phase)][column] - base[(module, phase)][column]) / 1e3

    for phase, seconds in (("forward", fw), ("backward", bw)):
        assert abs(added(target, phase) - seconds) <= 0.15 * seconds, (phase, added(target, phase))
        parent = target.rsplit(".", 1)[0]
        while (parent, phase) not in slow:  # a ModuleList is never called
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        assert added(parent, phase, "self_ms") < 0.15 * seconds, (phase, parent)
        for other in neighbours:
            assert added(other, phase) < 0.15 * seconds, (phase, other)


def test_a_modules_own_hooks_run_inside_its_window_even_when_registered_late():
    model, batch = build("llama")
    mlp = model.get_submodule("model.layers.1.mlp")
    mlp.register_forward_pre_hook(lambda mod, args: busy(0.010))
    with ModuleTracker(clock="cpu") as t:
        loss_of(model, batch).backward()
        t.step()
        mlp.register_forward_hook(lambda mod, args, out: busy(0.010))  # after modtrack met the module
        for _ in range(2):
            loss_of(model, batch).backward()
            t.step()
        s = t.last_step()
    name = f"{t.module_names[0]}.model.layers.1.mlp"
    assert s[(name, "forward")]["inclusive_ms"] == pytest.approx(20, rel=0.15)
    assert s[(name.rsplit(".", 1)[0], "forward")]["self_ms"] < 5


# ---- seed parity --------------------------------------------------------------------------------
class OpRecorder(TorchDispatchMode):
    """(op, parents, is_bw) at every aten op, as code inside the ops would see them."""

    def __init__(self, tracker):
        super().__init__()
        self.tracker = tracker
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(
            (
                str(func),
                frozenset(self.tracker.parents),
                self.tracker.is_bw,
                type(torch._C._current_autograd_node()).__name__,
                _same_shape_view(func, args, out),
            )
        )
        return out


_VIEWS = {"aten.view.default", "aten._reshape_alias.default", "aten.alias.default"}


def _same_shape_view(func, args, out) -> bool:
    return str(func) in _VIEWS and isinstance(out, torch.Tensor) and out.shape == args[0].shape


def record_ops(tracker_cls, name, reentrant):
    model, batch = build(name, reentrant)
    with tracker_cls() as tracker, OpRecorder(tracker) as recorder:
        for _ in range(2):
            loss_of(model, batch).backward()
    return recorder.ops


def comparable(ops):
    """What must match the seed, op for op.

    Left out: same-shape views (modtrack's identity views add one per input that needs a gradient, and
    their backward one reshape); in backward, the engine's gradient accumulation (`add` into an input
    buffer, AccumulateGrad's detach/copy): the views move it by one node. Forward must match in order;
    backward as a multiset (the same ops, each with the same `parents`), since the moved accumulation is
    the only reordering."""
    forward, backward = [], Counter()
    for op, parents, is_bw, node, same_shape_view in ops:
        if same_shape_view:
            continue
        if not is_bw:
            forward.append((op, parents))
        elif node != "AccumulateGrad" and op != "aten.add.Tensor":
            backward[(op, parents)] += 1
    return forward, backward


PARITY = [
    (name, reentrant) for name in MODELS for reentrant in (None, False, True) if (name, reentrant) != ("t5", True)
]  # see the README: a known limit


@pytest.mark.parametrize("name,reentrant", PARITY)
def test_parents_and_is_bw_are_the_seeds_at_every_op(name, reentrant):
    seed_fw, seed_bw = comparable(record_ops(SeedTracker, name, reentrant))
    ours_fw, ours_bw = comparable(record_ops(ModuleTracker, name, reentrant))
    assert ours_fw == seed_fw
    assert sum(seed_bw.values()) > 40
    assert ours_bw == seed_bw, (sorted(seed_bw - ours_bw, key=str)[:3], sorted(ours_bw - seed_bw, key=str)[:3])


def record_ops_of_gradients_to_a_hidden_state(tracker_cls):
    """autograd.grad and backward(inputs=...) to the first decoder layer's output: the engine hands that
    output's node its gradient without running it (the seed's tensor hooks run there)."""
    model, batch = build("llama")
    hidden: list = []
    model.model.layers[0].register_forward_hook(lambda mod, args, out: hidden.append(out))
    with tracker_cls() as tracker, OpRecorder(tracker) as recorder:
        torch.autograd.grad(loss_of(model, batch), hidden[-1])
        loss_of(model, batch).backward(inputs=[hidden[-1]])
    return recorder.ops


def test_parents_are_the_seeds_when_gradients_stop_at_a_hidden_state():
    seed_fw, seed_bw = comparable(record_ops_of_gradients_to_a_hidden_state(SeedTracker))
    ours_fw, ours_bw = comparable(record_ops_of_gradients_to_a_hidden_state(ModuleTracker))
    assert ours_fw == seed_fw and sum(seed_bw.values()) > 20
    assert ours_bw == seed_bw, (sorted(seed_bw - ours_bw, key=str)[:3], sorted(ours_bw - seed_bw, key=str)[:3])


def flop_counts(tracker_cls, name, reentrant, monkeypatch) -> list[dict]:
    monkeypatch.setattr(flop_counter, "ModuleTracker", tracker_cls)
    model, batch = build(name, reentrant)
    counter = flop_counter.FlopCounterMode(display=False)
    uses = []
    for _ in range(2):  # FlopCounterMode enters its one tracker on every `with`
        with counter:
            loss_of(model, batch).backward()
        uses.append({mod: dict(ops) for mod, ops in counter.get_flop_counts().items()})
    return uses


@pytest.mark.parametrize("name,reentrant", [p for p in PARITY if p[1] is not True or p[0] in ("llama", "bert")])
def test_flop_counter_with_modtracks_tracker_gives_the_seeds_flops_on_first_use_and_reuse(name, reentrant, monkeypatch):
    seed = flop_counts(SeedTracker, name, reentrant, monkeypatch)
    ours = flop_counts(ModuleTracker, name, reentrant, monkeypatch)
    assert ours[0] == seed[0]
    assert ours[1] == seed[1]
    assert len(ours[1]) > 5 and sum(ours[1]["Global"].values()) > 0


@pytest.mark.parametrize("wrapper", [None, "checkpoint_wrapper"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_injected_durations_under_activation_checkpointing_are_measured_once_in_their_phases(reentrant, wrapper):
    """transformers' gradient checkpointing: a decoder layer's forward runs again in backward. Its recompute is the
    recompute phase of its modules, not backward time of the module whose gradient first needed it (before: the
    whole layer's recompute, injected busy-wait included, read as `down_proj`'s backward, non-reentrant, or as the
    model's own backward, reentrant). The same with torchtitan's way, torch's `checkpoint_wrapper` around each layer.
    """
    target = "model.layers.1.mlp"
    fw, bw = 0.020, 0.030
    base = module_times("llama", reentrant=reentrant, wrapper=wrapper)
    slow = module_times("llama", (target, fw, bw, None), reentrant=reentrant, wrapper=wrapper)

    def added(key, column="inclusive_ms"):
        return (slow[key][column] - base[key][column]) / 1e3

    for phase, seconds in (("forward", fw), ("recompute", fw), ("backward", bw)):
        assert abs(added((target, phase)) - seconds) <= 0.15 * seconds, (phase, added((target, phase)))
    leaked = {key: added(key, "self_ms") for key in slow if key != (target, key[1]) and key in base}
    assert max(leaked.values()) < 0.15 * fw, sorted(leaked.items(), key=lambda kv: -kv[1])[:3]
