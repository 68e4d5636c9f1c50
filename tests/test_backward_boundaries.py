"""A call whose input is the output of the last autograd node made before it gets no identity view: its backward
ends at that node's pre-hook. That must be the same boundary the view gives.

Why it is: on one device the autograd engine runs the nodes of a graph task in decreasing sequence number
(the order they were made in, reversed), so the node made last before a call runs right after every node
made from the call's start on, which is the moment the call's input views would have fired. These tests run
the same models with views everywhere (as a torch without sequence numbers would) and with the shortcut, and
compare the order of every backward start and end of every call: the shortcut may stamp at one instant what
views stamped one view node apart, and nothing else; and it must have skipped most views.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.real_models import MODELS, build, loss_of
from modtrack.agent import tracker as tracker_module
from modtrack.agent.step_accumulator import B_END, B_START
from modtrack.agent.tracker import ModuleTracker

torch.set_num_threads(1)


def backward_instants(log) -> list[set]:
    """The step's backward starts and ends, ("start" | "end", row index), grouped by the instant they were
    stamped at, in time order."""
    at: dict = {}
    for i, row in enumerate(log.rows):
        if row[B_START]:
            at.setdefault(row[B_START], set()).add(("start", i))
            at.setdefault(row[B_END], set()).add(("end", i))
    return [at[stamp] for stamp in sorted(at)]


def merged_into(coarse: list[set], fine: list[set]) -> bool:
    """True when every instant of `coarse` is a run of consecutive instants of `fine`, in the same order: the
    shortcut stamps at one node what views stamped a view node apart, and moves nothing past anything else."""
    it = iter(fine)
    for instant in coarse:
        got: set = set()
        while got < instant or not got:
            got |= next(it, {("missing",)})
        if got != instant:
            return False
    return next(it, None) is None


def run(model_fn, monkeypatch, views_everywhere: bool, steps: int = 3, seed_parents: bool = True):
    """The event order of the last of `steps` steps, and how many identity views the tracker made."""
    made = [0]
    view_inputs, view_one = ModuleTracker._view_inputs, ModuleTracker._view_one

    def counted_views(self, call, args, kwargs):
        result = view_inputs(self, call, args, kwargs)
        made[0] += result is not None
        return result

    def counted_view_one(self, call, x):
        made[0] += 1
        return view_one(self, call, x)

    with monkeypatch.context() as m:
        m.setattr(ModuleTracker, "_view_inputs", counted_views)
        m.setattr(ModuleTracker, "_view_one", counted_view_one)
        if views_everywhere:
            m.setattr(tracker_module, "_next_sequence_nr", None)
        model, step = model_fn()
        logs = []

        def keep(record):
            logs.append(record._source[0])

        with ModuleTracker(on_step=keep, clock="cpu", seed_parents=seed_parents) as t:
            for _ in range(steps):
                made[0] = 0
                step()
                t.step()
        assert t.counters["hook_errors"] == 0 and t.counters["backward_ends_at_pass_end"] == 0, t.counters
    return backward_instants(logs[-1]), made[0]


def real_model(name: str, reentrant=None):
    def make():
        model, batch = build(name, reentrant)
        return model, lambda: loss_of(model, batch).backward()

    return make


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(16, 16), nn.ReLU())])
    x = torch.randn(4, 16)
    return model, lambda: model(x).sum().backward()


CASES = {"mlp": mlp, **{name: real_model(name) for name in MODELS}}
CASES.update({f"{name}-reentrant-{r}": real_model(name, r) for name in ("llama", "encoder") for r in (False, True)})


@pytest.mark.parametrize("case", list(CASES))
def test_skipping_a_view_never_moves_a_backward_boundary(case, monkeypatch):
    with_views, views_made = run(CASES[case], monkeypatch, views_everywhere=True)
    shortcut, views_left = run(CASES[case], monkeypatch, views_everywhere=False)
    assert sum(map(len, with_views)) > 20
    assert merged_into(shortcut, with_views), (shortcut, with_views)
    assert views_left < 0.6 * views_made, (views_left, views_made)


@pytest.mark.parametrize("case", ["mlp", "llama", "bert", "t5", "llama-reentrant-True"])
def test_the_agents_tracker_without_the_seeds_bookkeeping_keeps_every_boundary(case, monkeypatch):
    """agent.track() runs ModuleTracker(seed_parents=False): fewer node hooks, HF outputs walked without pytree.
    Every backward start and end must fall at the same instant, in the same order, as with the seed's bookkeeping."""
    with_seed, _ = run(CASES[case], monkeypatch, views_everywhere=False)
    without, _ = run(CASES[case], monkeypatch, views_everywhere=False, seed_parents=False)
    assert sum(map(len, with_seed)) > 20
    assert without == with_seed
