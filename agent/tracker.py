"""ModuleTracker: the seed's `torch.utils.module_tracker.ModuleTracker`, plus timing per module call.

Where a module call's window opens and closes, and why:
- forward: a pre hook registered on the module itself with prepend=True, and a post hook registered
  on it with always_call=True and kept last, so the module's own hooks (a user's, FSDP2's all-gather
  and reshard) run inside its window. A global pre hook only meets modules the first time (it
  installs the per-module hooks on the module and everything under it, and handles that first call).
- backward start: a pre-hook on the autograd node that made the module's output (the module's first
  backward node cannot run before that node did).
- backward end: the module's own gradient for its inputs. On the way in, each input tensor that
  needs a gradient (positional, keyword, nested; a leaf too) is handed to the module as an identity
  view of itself (`x.view_as(x)`, as FSDP2 hands inputs through an identity function). Only this
  module's ops consume the view, so the view's node runs once this module's input gradients are
  done, not once every consumer of `x` is (a residual stream, T5's encoder output read by every
  decoder block, q/k/v projections of one input). Most calls need no view: on one device the engine
  runs a graph task's nodes in decreasing sequence number (the reverse of the order forward made
  them), so when an input is the output of the last node made before the call starts, that node runs
  right after every node the call made, the moment its views would have fired: its pre-hook (often
  also the previous call's backward start) ends the call. A call with no such input (an embedding of
  token ids) ends when the backward of a module that is neither inside it nor around it starts, or
  when the pass ends.
- a backward pass starts when the training loop calls backward (agent/backward_call.py), before the
  engine runs FSDP's pre-backward all-gathers and the loss's backward; when that call is not seen, at its
  first module's backward start.
- the autograd engine's final callback marks the end of the backward pass; a second callback,
  queued from the first, runs after DDP's own (which waits for the gradient all-reduce): the gap is
  the backward tail.
- steps end at a global optimizer step post hook, or `step()`. Forward and backward run inside
  `optimizer.step(closure)` (LBFGS, Lightning) are forward and backward, not optimizer time.

`parents` and `is_bw` are the seed's, op for op: a module is in `parents` from its forward pre to its
post hook, and in backward from the moment the gradients of all its outputs are computed to the
moment those of all its positional inputs are (the seed's multi-grad hooks, here on the same nodes),
until the engine callback resets it. That is not always the module's own backward (see above): the
timing windows are modtrack's, `parents` is the seed's.

These hooks live on the graph's own nodes and die with the graph: no handle is kept, so memory stays
flat step after step (the seed keeps one per call until exit).

What a time means (agent/clocks.py): on CPU a call's inclusive and self time are the calling
thread's CPU time (clock="cpu", the default there), so a rank preempted by other processes or
blocked in a collective does not look slow; timestamps (timelines, step, backward pass and tail,
optimizer, data) stay wall time. clock="wall" makes durations wall time too; on CUDA, events.

Every hook is fail-open: any exception is swallowed and counted in counters["hook_errors"].
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections import OrderedDict
from functools import partial

import torch
import torch.utils.checkpoint
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten, tree_unflatten

from modtrack.agent import backward_call, data_loading, skipped_steps
from modtrack.agent import position as at  # where the rank is (issue 14: hung jobs)
from modtrack.agent.clocks import make_clock
from modtrack.agent.compiled_calls import CompiledCalls
from modtrack.agent.gc_pauses import GcPauses
from modtrack.agent.module_hooks import ModuleHooks
from modtrack.agent.module_names import ModuleNames
from modtrack.agent.outside_spans import FORWARD as OUT_FORWARD
from modtrack.agent.outside_spans import OPTIMIZER as OUT_OPTIMIZER
from modtrack.agent.outside_spans import PASS as OUT_PASS
from modtrack.agent.outside_spans import START as OUT_START
from modtrack.agent.outside_spans import OutsideSpans
from modtrack.agent.step_accumulator import (
    B_END,
    B_START,
    B_WORK_END,
    B_WORK_START,
    F_END,
    F_START,
    F_WORK_END,
    F_WORK_START,
    FORWARD,
    MID,
    PARENT,
    PHASE,
    RECOMPUTE,
    DeferredStepRecord,
    StepLog,
    step_summary,
)
from modtrack.agent.step_record import StepRecord
from modtrack.agent.teardown import ExitDrain

# What non-reentrant checkpoint raises to stop a recompute early (a torch without it never stops early).
StopRecomputation: type[BaseException] = getattr(
    torch.utils.checkpoint, "_StopRecomputationError", type("StopRecomputation", (Exception,), {})
)


logger = logging.getLogger(__name__)

_graph_task_id = torch._C._current_graph_task_id
_current_node = torch._C._current_autograd_node
_will_execute = torch._C._will_engine_execute_node
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
# The sequence number the next autograd node made on this thread will get (older torch: none; then views).
_next_sequence_nr = getattr(torch._C._autograd, "_get_sequence_nr", None)
_Tensor = torch.Tensor
_AccumulateGrad = torch._C._functions.AccumulateGrad  # type: ignore[attr-defined]
_CONTAINERS = (list, tuple, dict)

# A loop that never ends a step (inference: no optimizer, no step()) must not grow memory
# forever: past this many calls, the next return to the top level ends a step by itself.
MAX_CALLS_PER_STEP = 100_000
# Autograd nodes remembered (alive) to share one hook between the modules that meet there.
RECENT_NODES = 64

# What a node's pre-hook tells a call: its outputs' gradients (backward starts; the seed's "add"),
# its positional inputs' gradients (the seed's "pop"), its own input views' gradients (backward ends).
OUT, IN, OWN = 0, 1, 2
OWN_IN = 3  # OWN and IN at one node: a call whose input's node is where its backward ends
# What a call waits for, of one kind, when that is one node: the node whose hook fires. It counts when the
# engine runs it (a root of backward is not "run": the seed never fires for it), asked when it fires.
ONE_NODE = -1
_SCALARS = (int, float, bool, str, type(None))


class _Call:
    """One module call in flight: its row, and the gradients its backward waits for, per kind."""

    __slots__ = ("first", "last", "mod", "nodes", "row", "site", "views")

    def __init__(self, row: list, mod, site: tuple, first: int) -> None:
        self.row = row
        self.mod = mod
        self.site = site  # (module id, name, [pre hook id, post hook id], changes its input in place)
        self.first = first  # row index of this call; rows first..last are it and the calls inside it
        self.last = first
        # nodes[kind]: None (no such tensor), how many tensors (ONE_NODE: one node), or (several) the node
        # of each: nodes are kept only until the step ends or the pass is done (they hold this call: a cycle
        # through C++; see _keep); nodes[kind + 3]: gradients still to come in the graph task nodes[kind + 6].
        self.nodes: list = [None, None, None, 0, 0, 0, -2, -2, -2]
        self.views: list | None = None  # (view, its node) until the forward returns

    def arrived(self, kind: int, n: int, task: int, runs: int) -> bool:
        """n more gradients of `kind` are computed in graph task `task` (at a node the engine `runs`, or
        not: a root); True once all the engine will compute are (the seed's multi-grad hook, mode "all":
        tensors the engine will not reach are not waited for)."""
        state = self.nodes
        if state[kind + 6] != task:
            state[kind + 6] = task
            nodes = state[kind]
            kept = type(nodes)
            if kept is int:
                before = nodes if nodes >= 0 else runs
            elif kept is list:
                before = sum(map(_will_execute, nodes))
            else:
                before = int(_will_execute(nodes))
        else:
            before = state[kind + 3]
            if before <= 0:
                return False
        state[kind + 3] = before - n
        return before > 0 >= before - n  # a root of backward is not "executed": the seed never fires for it


def _holds_grad(value) -> bool:
    """Whether a tuple, list or dict holds a tensor that needs a gradient, at any depth; True too when it holds an
    object this walk does not know (the caller then flattens it as pytree does). tree_flatten costs ~5 us even on
    a pair; HF passes pairs of constants (rotary cos, sin) to every attention call."""
    for v in value.values() if type(value) is dict else value:
        if isinstance(v, _Tensor):
            if v.requires_grad:
                return True
        elif type(v) in _SCALARS:
            continue
        elif type(v) not in _CONTAINERS or _holds_grad(v):
            return True
    return False


def _grad_tensors(value, found: list) -> list:
    """The tensors of an output that need a gradient: in tuples, lists, dicts and their subclasses (HF's
    ModelOutput is an OrderedDict), other pytree nodes flattened. Not the seed's walk (it flattens registered
    types only), so only where `parents` is not kept: there it just says where backward starts."""
    if isinstance(value, _Tensor):
        if value.requires_grad:
            found.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _grad_tensors(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            _grad_tensors(v, found)
    elif type(value) in SUPPORTED_NODES:
        found += [v for v in tree_flatten(value)[0] if isinstance(v, _Tensor) and v.requires_grad]
    return found


def _leaf_node(t: _Tensor):
    """The node that receives a tensor's gradient: its grad_fn, or a leaf's gradient accumulator."""
    node = t.grad_fn
    return node if node is not None else torch.autograd.graph.get_gradient_edge(t).node


class ModuleTracker:
    """Tracks which modules run (`parents`, `is_bw`, as the seed does) and times every call.

    on_step(record) is called on the training thread once per finished step, with an
    `agent.step_record.StepRecord` whose figures are computed when first read (the transport reads them
    on its own thread, many steps at once). clock: "cpu" (durations in thread CPU time), "wall" (CPU,
    durations in wall time: for ranks with several intra-op threads), "cuda" or "auto" (cuda when
    available, else cpu). A tracker can be entered again after it exited (FlopCounterMode does).

    seed_parents=False (what `agent.track()` uses: nothing in the agent reads `parents`) skips the seed's
    bookkeeping in backward, where it costs most: the hooks on positional inputs' nodes that only pop `parents`
    (a call handed an input view needs one more node hook for that), the arrival counts behind the seed's adds,
    and the engine look-ups that tell a root from a node it runs. `parents` is then the seed's in forward and
    holds no backward entries. Timing is the same either way.
    """

    def __init__(self, on_step=None, clock: str = "auto", seed_parents: bool = True) -> None:
        self.parents: set[str] = {"Global"}
        self._seed = seed_parents
        self.counters = {
            "hook_errors": 0,
            "steps": 0,
            "on_step_errors": 0,
            "steps_dropped": 0,
            "implicit_steps": 0,
            "backward_ends_at_pass_end": 0,
            "overlapping_calls": 0,
            "inplace_inputs": 0,
        }
        self._on_step = on_step
        self._clock = make_clock(clock)
        self.clock_kind: str = self._clock.kind
        # durations in wall time (clock="wall"): a module's time holds its waits in collectives (the Hello says so)
        self.wall_durations: bool = getattr(self._clock, "durations", "") == "wall"
        # each call's window of modules called several times goes out with the step (set where collective waits
        # are taken out of module windows: collective timing on, durations that hold the waits)
        self.call_windows = False
        self._stamp = self._clock.stamp
        self._work = self._clock.work_stamp
        self._names = ModuleNames()
        self._names_sent = 0
        self._log = StepLog(time.perf_counter_ns())
        self.position = at.Position(self._log.start_host_ns)  # where the rank is (issue 14: hung jobs)
        self._stack: list[_Call] = []  # open forward calls, innermost last
        self._wrapper = None  # the outermost wrapper whose forward runs now (its window is forward time)
        self._open_backward: dict[int, list] = {}  # graph task id -> calls whose backward started there
        self._endless: list[_Call] = []  # open backward calls with no input view to end them
        self._pass: list | None = None  # the backward pass running now, an entry of log.passes
        self._backward_called_at = 0  # the training loop called backward (stamp) and no pass began yet
        self._step_due = False  # an optimizer stepped inside backward: end the step when it ends
        # perf_counter_ns of the last optimizer step's end: the step ends there, once the next thing the loop does
        # is not another optimizer's step (two optimizers, one per parameter group: Muon and AdamW)
        self._end_pending = 0
        self._stepped: list[int] = []  # id() of the optimizers stepped in this step
        self._next_trace: tuple | None = None  # (trace id,): what the step's first optimizer end decided for it
        self._optimizer_start = 0  # 0: no optimizer step open, or one paused for its closure's work
        self._in_optimizer = False
        self._outer_optimizer = 0  # id() of the optimizer whose step is open (one stepped inside it is part of it)
        self.optimizer_steps = 0  # outer optimizer steps ended (agent/skipped_steps.py tells a skipped one by it)
        self._seed_callback = False  # the seed's "reset parents" engine callback is queued
        self._recent_nodes: dict = {}  # autograd node -> the actions its one pre-hook runs
        # Carries our node hooks (a leaf's gradient accumulator keeps node.register_prehook):
        # `node._register_hook_dict(t)` adds to the node a hook that calls what is in t's `_backward_hooks` dict
        # (Tensor.register_hook does that for a non-leaf), without the RemovableHandle and OrderedDict that
        # register_prehook builds: 1.3 us less a node. No tensor of the user's gets a dict. It runs when the node
        # runs (before the node's pre hooks), and also where autograd.grad or backward(inputs=...) hands a node
        # its gradient without running it, as the seed's tensor hooks do: `parents` stays the seed's there too.
        self._hook_carrier = torch.empty(0)
        self._multi: list[_Call] = []  # calls that keep nodes (see _Call.nodes)
        self._viewed_from: dict = {}  # node of an input view we made -> node of the tensor it views
        self._step_no = 0
        self._sample_every = 1  # sampled mode: module detail on steps whose number is a multiple of this
        self._detail = True  # this step times every module (else: top-level calls only, for the step figures)
        self._last: StepRecord | None = None
        self._trace_lock = threading.Lock()
        self._trace_request: tuple[str, int] | None = None
        self._handles: list = []
        self._hooked: dict[int, weakref.ref] = {}  # id(module) -> module, for modules with our hooks
        self._module_hooks = ModuleHooks(self._enter, self._exit)
        self._compiled_calls = CompiledCalls(self._enter, self._exit)  # agent/compiled_calls.py
        self._quiet = False  # sampled mode: only top-level modules have hooks now (a step without detail)
        self._closed = False
        self.exit_drain = ExitDrain()  # destroy_process_group() waits for gloo's workers (agent/teardown.py)
        self.gc_pauses = GcPauses(self._work, self.position, self.counters)  # agent/gc_pauses.py
        self.fetches = data_loading.Fetches(self.position, self.counters)  # DataLoader fetches (agent/data_loading.py)
        # the loop's waits between the phases (agent/outside_spans.py): on the thread CPU clock only
        self.outside = OutsideSpans(self.position, self.counters, self._clock.kind == "cpu" and not self.wall_durations)

    # ---- the seed's surface -------------------------------------------------------------------
    @property
    def is_bw(self) -> bool:
        """True while a backward pass runs (as the seed: any autograd graph task on this thread)."""
        return _graph_task_id() != -1

    def __enter__(self):
        if not self._handles:
            self._closed = False
            self._log = StepLog(time.perf_counter_ns())
            self._sample_step(self._step_no, switch_hooks=False)  # no module is hooked yet
            self._log.detail = self._detail
            self.parents = {"Global"}
            self.position.new_step(self._step_no, self._log.start_host_ns)  # position: the thread that trains
            self.position.thread_id = threading.get_ident()
            self._handles = [
                register_module_forward_pre_hook(self._forward_pre),
                register_optimizer_step_pre_hook(self._optimizer_pre),
                register_optimizer_step_post_hook(self._optimizer_post),
            ]
            backward_call.add(self)
            skipped_steps.add(self)
            self.fetches.spans = []  # none left from an earlier tracking block
            self.outside.spans = []
            self.outside.begin(OUT_START)
            data_loading.add(self)
            self.exit_drain.install()
            self.gc_pauses.install()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- what the transport and users call ----------------------------------------------------
    @property
    def module_names(self) -> list[str]:
        """Module id -> name; append-only."""
        return self._names.names

    def step(self) -> None:
        """End the current step by hand (loops without an optimizer)."""
        self._end_step(self._end_pending)

    def set_sampling(self, every: int) -> None:
        """Thread-safe: from the next step on, module detail only on steps whose number is a multiple of
        `every` (the same steps on every rank); the other steps time their top-level calls only, which gives
        the step figures (forward, backward, tail, optimizer, data). 1: every step. While a step has no
        detail, `parents` holds the top-level modules only."""
        self._sample_every = max(1, int(every))

    def _sample_step(self, step_no: int, switch_hooks: bool = True) -> None:
        """Before step `step_no`: does it have module detail? Nested modules' hooks come off or back on to match."""
        detail = self._detail = step_no % self._sample_every == 0
        if not switch_hooks or detail != self._quiet or self._closed:
            return
        if detail:  # back to full detail: every module hooked again, new ones met again
            self._quiet = False
            self._handles[0] = register_module_forward_pre_hook(self._forward_pre)
            self._module_hooks.put_back(self._site_of)
        elif self._module_hooks.roots:  # a top-level module is known: it keeps the step figures coming
            self._quiet = True  # first: whatever comes off below goes back on at the next detailed step
            self._handles[0].remove()
            self._module_hooks.take_off(self._hooked)

    def last_step(self) -> dict:
        """{(module_name, phase): {"calls", "inclusive_ms", "self_ms"}} of the last finished step."""
        last = self.last_record()
        return {} if last is None else step_summary(last, self.module_names)

    def last_record(self) -> StepRecord | None:
        if self._end_pending and threading.get_ident() == self.position.thread_id:
            self._end_step(self._end_pending)  # read right after optimizer.step(): that step has ended
        return self._last

    def request_trace(self, capture_id: str, steps: int) -> None:
        """Thread-safe: the next `steps` StepRecords carry every call's start and end."""
        with self._trace_lock:
            self._trace_request = (capture_id, int(steps)) if steps > 0 else None

    def close(self) -> None:
        """Remove every hook and finish the step in progress (its CUDA events are resolved where it is built)."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        backward_call.remove(self)
        skipped_steps.remove(self)
        data_loading.remove(self)
        self.gc_pauses.remove()
        try:
            self.exit_drain.remove()  # waits for the tracked passes' gloo works first (agent/teardown.py)
        except Exception:
            self.counters["hook_errors"] += 1
        self._module_hooks.remove_all()
        self._compiled_calls.unwrap_all()
        self._quiet = False
        self._hooked.clear()
        try:
            self._end_step(self._end_pending)
        except Exception:
            self.counters["hook_errors"] += 1
            logger.debug("modtrack: error while closing", exc_info=True)

    # ---- meeting modules ----------------------------------------------------------------------
    def _forward_pre(self, mod, args):
        """Global pre hook: runs for every call, does something only the first time a module runs."""
        if id(mod) in self._hooked or _is_compiling():
            return None
        try:
            mid = self._names.module_id(mod)
            for sub in mod.modules():
                if id(sub) not in self._hooked:
                    self._install(sub)
            if mid < 0:
                return None
            site = self._site_of(mod)
            if site is None:
                return None
            result = self._enter(site, mod, args, None)  # this call's own pre hooks are already fixed
            return None if result is None else result[0]
        except Exception:
            self._hook_failed()
            return None

    def _install(self, mod) -> None:
        key = id(mod)
        hooked = self._hooked

        module_hooks, compiled_calls = self._module_hooks, self._compiled_calls

        def forget(_ref, key=key):
            hooked.pop(key, None)
            module_hooks.forget(key)
            compiled_calls.forget(key)

        hooked[key] = weakref.ref(mod, forget)
        mid = self._names.module_id(mod)
        if mid < 0:
            # A wrapper (DDP, FSDP1, checkpoint wrapper): not timed, not in `parents`; but the outermost one's
            # call is the model's forward as the user calls it. FSDP1's root all-gathers its parameters there,
            # before the module it wraps runs: a peer's wait for a slow rank is forward time, not data loading.
            self._handles += (
                mod.register_forward_pre_hook(self._wrapper_pre, prepend=True),
                mod.register_forward_hook(self._wrapper_post, always_call=True),
            )
            return
        # a module that changes its input in place (ReLU(inplace=True)) gets no view: autograd would
        # copy the gradient of the whole tensor to rebase the view; its input is its output anyway
        site = (mid, self._names.names[mid], [0, 0], getattr(mod, "inplace", False) is True)
        self._module_hooks.add(mod, site)
        self._compiled_calls.wrap(mod, site)  # compiled in place: its hooks run inside compiled code
        mod.__dict__.setdefault("_modtrack_sites", {})[id(self)] = site

    def _wrapper_pre(self, mod, args) -> None:
        try:
            if not self._stack and self._wrapper is None and _graph_task_id() == -1:
                if self._end_pending:
                    self._end_step(self._end_pending)
                self._wrapper = mod
                self.outside.end(OUT_FORWARD)
                self._log.wrapped.append([self._stamp(), 0])
        except Exception:
            self._hook_failed()

    def _wrapper_post(self, mod, args, output) -> None:
        try:
            if self._wrapper is mod:
                self._wrapper = None
                if self._log.wrapped:
                    self._log.wrapped[-1][1] = self._stamp()
                self.outside.begin(OUT_FORWARD)
        except Exception:
            self._hook_failed()

    def _site_of(self, mod):
        sites = mod.__dict__.get("_modtrack_sites")
        return None if sites is None else sites.get(id(self))

    # ---- forward ------------------------------------------------------------------------------
    def _enter(self, site: tuple, mod, args, kwargs):
        if _is_compiling() or (self._stack and not self._detail):  # sampled mode: a nested call, not timed
            return None
        try:
            mid, name = site[0], site[1]
            parents = self.parents
            recursive = name in parents
            if recursive:
                logger.info(
                    "The module hierarchy tracking seems to be broken as this Module was already "
                    "entered. %s during forward",
                    name,
                )
            parents.add(name)
            stack = self._stack
            if not stack:
                if self._end_pending:
                    self._end_step(self._end_pending)  # the next step's forward: the last one ended at its optimizer
                self._module_hooks.roots.add(id(mod))  # sampled mode keeps a top-level module's hooks on
            rows = self._log.rows
            in_backward = _graph_task_id() != -1
            if recursive and in_backward:  # a recompute while its backward runs (`parents` has it): recursive only
                recursive = any(c.mod is mod for c in stack)  # if it is open in the recompute itself
            if not stack and not in_backward:
                if self._optimizer_start:
                    self._pause_optimizer()  # a closure inside optimizer.step(): this is forward, not optimizer
                self.outside.end(OUT_FORWARD)
            # the layout of agent.step_accumulator.new_row, inlined: this runs for every call
            row = [
                mid,
                RECOMPUTE if in_backward else FORWARD,
                0,
                0,
                stack[-1].first if stack else -1,
                len(stack),
                int(recursive),
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ]
            call = _Call(row, mod, site, len(rows))
            stack.append(call)
            rows.append(row)
            position = self.position  # position: this call is the innermost open module
            position.module = mid
            position.phase = row[PHASE]
            position.entered = row
            result = None
            if _grad_enabled():
                if site[3]:
                    self._watch_inplace_inputs(call, args)
                else:
                    result = self._watch_inputs(call, args, kwargs)
            row[F_START] = self._stamp()
            row[F_WORK_START] = self._work()
            return result
        except Exception:
            self._hook_failed()
            return None

    def _watch_inputs(self, call: _Call, args, kwargs):
        """Hooks where this call's backward ends (see the docstring): at the node made last before the call,
        when an input is its output; else at identity views of every input that needs a gradient."""
        if len(args) == 1 and not kwargs:  # the common case: one tensor, no walk, no dicts
            x = args[0]
            if isinstance(x, _Tensor):
                if not x.requires_grad:
                    return None
                node = x.grad_fn
                if node is not None and _next_sequence_nr and node._sequence_nr() == _next_sequence_nr() - 1:
                    if not self._seed:
                        call.nodes[OWN] = 1
                        self._on_node(node, (OWN, call, 1))
                        return None
                    viewed_from = self._viewed_from
                    seed_node = viewed_from.get(node, node) if viewed_from else node  # the seed sees what we viewed
                    nodes = call.nodes
                    nodes[OWN] = 1
                    nodes[IN] = ONE_NODE
                    if seed_node is node:
                        actions = self._recent_nodes.get(node)
                        if actions is None:
                            self._on_node(node, (OWN_IN, call, 1))
                        else:
                            actions.append((OWN_IN, call, 1))
                    else:
                        self._on_node(node, (OWN, call, 1))
                        self._on_node(seed_node, (IN, call, 1))
                    return None
                return ((self._view_one(call, x),), kwargs)
        if _next_sequence_nr is not None:
            last = self._last_made(args, kwargs, _next_sequence_nr() - 1)
            if last is not None:
                call.nodes[OWN] = 1
                self._on_node(last, (OWN, call, 1))
                seed = self._seed_nodes(args) if self._seed else None
                if seed:
                    self._watch(call, IN, seed)
                return None
        return self._view_inputs(call, args, kwargs)

    @staticmethod
    def _last_made(args, kwargs, seq: int):
        """The node numbered `seq` (the last one made before this call) if an input (or an element of a
        tuple or list input) is its output."""
        for values in (args, kwargs.values() if kwargs else ()):
            for v in values:
                if isinstance(v, _Tensor):
                    node = v.grad_fn
                    if node is not None and node._sequence_nr() == seq:
                        return node
                elif type(v) in (list, tuple):
                    for u in v:
                        if isinstance(u, _Tensor):
                            node = u.grad_fn
                            if node is not None and node._sequence_nr() == seq:
                                return node
        return None

    def _seed_nodes(self, args) -> list:
        """The nodes of the positional inputs that need a gradient, as the seed sees them (it flattens)."""
        nodes = []
        viewed_from = self._viewed_from
        for a in args:
            leaves: list | tuple
            if isinstance(a, _Tensor):
                leaves = (a,)
            elif type(a) in _SCALARS:
                continue
            else:
                leaves = tree_flatten(a)[0]
            for t in leaves:
                if isinstance(t, _Tensor) and t.requires_grad:
                    node = _leaf_node(t)
                    nodes.append(viewed_from.get(node, node))
        return nodes

    def _view_inputs(self, call: _Call, args, kwargs):
        """Hand the module an identity view of every input that needs a gradient (see the docstring)."""
        views: dict = {}  # id(tensor) -> its view: one view per tensor, so `q is k is v` stays true
        own: list = []
        seed: list | None = [] if self._seed else None  # the seed watches positional inputs only
        if len(args) == 1 and isinstance(args[0], _Tensor):
            new_args = args if not args[0].requires_grad else (self._view(args[0], views, own, seed),)
        else:
            new_args = tuple(self._viewed(a, views, own, seed) for a in args)
        new_kwargs = kwargs
        if kwargs:
            new_kwargs = {k: self._viewed(v, views, own, None) for k, v in kwargs.items()}
        if not own:
            return None
        call.views = list(zip(views.values(), own))  # own[i] is the node of the i-th view made
        self._watch(call, OWN, own)
        if seed:
            self._watch(call, IN, seed)
        return new_args, new_kwargs

    def _view_one(self, call: _Call, x: _Tensor):
        """_view_inputs for a single positional tensor that needs a gradient."""
        node = x.grad_fn
        if node is None:
            node = _leaf_node(x)
        else:
            node = self._viewed_from.get(node, node)
        view = x.view_as(x)
        own = view.grad_fn
        self._viewed_from[own] = node
        call.views = [(view, own)]
        call.nodes[OWN] = 1
        self._on_node(own, (OWN, call, 1))
        if self._seed:
            self._keep(call, IN, node)
            self._on_node(node, (IN, call, 1))
        return view

    def _watch_inplace_inputs(self, call: _Call, args) -> None:
        """No views: the backward ends, as the seed's `parents` entry does, when the inputs' gradients are."""
        seed = [
            self._viewed_from.get(n, n)
            for n in (_leaf_node(a) for a in tree_flatten(args)[0] if isinstance(a, _Tensor) and a.requires_grad)
        ]
        if seed:
            self._watch(call, OWN, seed)
            if self._seed:
                self._watch(call, IN, list(seed))

    def _viewed(self, value, views: dict, own: list, seed: list | None):
        if isinstance(value, _Tensor):
            return self._view(value, views, own, seed) if value.requires_grad else value
        if type(value) in _CONTAINERS and value and _holds_grad(value):
            leaves, spec = tree_flatten(value)
            if any(isinstance(v, _Tensor) and v.requires_grad for v in leaves):
                return tree_unflatten([self._viewed(v, views, own, seed) for v in leaves], spec)
        return value

    def _view(self, t: _Tensor, views: dict, own: list, seed: list | None):
        view = views.get(id(t))
        node = t.grad_fn
        if node is None:
            node = _leaf_node(t)
        else:
            node = self._viewed_from.get(node, node)  # a view we gave the caller: the seed sees the original
        if seed is not None:
            seed.append(node)
        if view is None:
            view = views[id(t)] = t.view_as(t)
            own_node = view.grad_fn
            own.append(own_node)
            self._viewed_from[own_node] = node
        return view

    def _exit(self, site: tuple, mod, args, output) -> None:
        if _is_compiling() or (not self._detail and not (self._stack and self._stack[-1].mod is mod)):
            return
        try:
            work = self._work()
            now = self._stamp()
            stack = self._stack
            if stack and stack[-1].mod is mod:
                call = stack.pop()
            else:
                call = self._find_call(mod)
                if call is None:
                    return  # a call that started before a step ended
            row = call.row
            row[F_END] = now
            row[F_WORK_END] = work
            call.last = len(self._log.rows) - 1
            position = self.position  # position: back in the caller, or outside every module
            if stack:
                caller = stack[-1].row
                position.module = caller[MID]
                position.phase = caller[PHASE]
            else:
                position.module = at.NO_MODULE
                position.phase = at.BACKWARD if row[PHASE] == RECOMPUTE else at.OUTSIDE
                if row[PHASE] == FORWARD and self._wrapper is None:
                    self.outside.begin(OUT_FORWARD)
            name = site[1]
            # the seed's post hook does not run when a forward raises: non-reentrant checkpoint stops
            # its recompute that way, and the seed's `parents` keeps the name; other errors drop it
            stopped = output is None and isinstance(sys.exc_info()[1], StopRecomputation)
            if stopped:
                pass
            elif name in self.parents:
                self.parents.remove(name)
            else:
                logger.info(
                    "The Module hierarchy tracking is confused as we're exiting a Module that was "
                    "never entered. %s during forward",
                    name,
                )
            if call.views is not None:
                self._check_views(call)
            if output is not None and _grad_enabled():
                if isinstance(output, _Tensor):  # _watch_outputs for one tensor, inlined: every call
                    if output.requires_grad:
                        node = output.grad_fn
                        if node is None:
                            node = _leaf_node(output)
                        elif self._viewed_from:  # an identity module returns our view: the seed sees the original
                            node = self._viewed_from.get(node, node)
                        call.nodes[OUT] = ONE_NODE
                        self._on_node(node, (OUT, call, 1))
                else:
                    self._watch_outputs(call, output)
            # hooks registered on the module after ours still run inside its window, from its next call
            pre, post = mod._forward_pre_hooks, mod._forward_hooks
            if len(pre) > 1 or len(post) > 1:
                self._keep_hooks_outermost(pre, post, site[2])
            if not stack and len(self._log.rows) >= MAX_CALLS_PER_STEP and self._pass is None:
                self.counters["implicit_steps"] += 1
                self._end_step()
        except Exception:
            self._hook_failed()

    def _check_views(self, call: _Call) -> None:
        """A module that changed its input in place (ReLU(inplace=True)) moved our view off the graph:
        its backward then ends when the gradient of the tensor it changed is complete."""
        own = call.nodes[OWN]
        for view, node in call.views or ():
            if view.grad_fn is not node:
                self.counters["inplace_inputs"] += 1
                original = self._viewed_from.get(node)
                if original is not None:
                    if type(own) is list:
                        own[own.index(node)] = original
                    self._on_node(original, (OWN, call, 1))
        call.views = None

    @staticmethod
    def _keep_hooks_outermost(pre: OrderedDict, post: OrderedDict, ids: list) -> None:
        """Our pre hook first, our post hook last."""
        if len(pre) > 1 and next(iter(pre)) != ids[0]:
            pre.move_to_end(ids[0], last=False)
        if len(post) > 1 and next(reversed(post)) != ids[1]:
            post.move_to_end(ids[1])

    def _find_call(self, mod):
        """Hooks out of step (a step ended inside a forward): find mod's call, drop those above it."""
        stack = self._stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].mod is mod:
                call = stack[i]
                del stack[i:]
                return call
        return None

    def _watch_outputs(self, call: _Call, output) -> None:
        """Hooks where the call's backward starts (a tensor output: inlined in _exit)."""
        if type(output) is tuple and all(type(v) in _SCALARS or isinstance(v, _Tensor) for v in output):
            nodes = [_leaf_node(v) for v in output if isinstance(v, _Tensor) and v.requires_grad]
            if not nodes:
                return
        elif not self._seed:
            nodes = [_leaf_node(v) for v in _grad_tensors(output, [])]
            if not nodes:
                return
        else:
            nodes = [_leaf_node(v) for v in tree_flatten(output)[0] if isinstance(v, _Tensor) and v.requires_grad]
            if not nodes:
                return  # no_grad, eval, or an output that needs no gradient: forward only
        viewed_from = self._viewed_from
        if viewed_from:  # a module that returns (part of) its input returns our view: the seed sees the original
            nodes = [viewed_from.get(n, n) for n in nodes]
        self._watch(call, OUT, nodes)

    def _keep(self, call: _Call, kind: int, nodes) -> None:
        """What call waits for, of kind: one node or a list. One node needs no reference (one view's node:
        its hook fires when this call's backward ends, or never; one output or input node: its hook asks
        whether the engine runs it); several are kept, to ask which of them the engine will run (the
        seed's rule; an input view nothing in the call differentiates through never runs)."""
        if type(nodes) is not list:
            call.nodes[kind] = 1 if kind == OWN else ONE_NODE
            return
        call.nodes[kind] = nodes
        self._multi.append(call)

    def _watch(self, call: _Call, kind: int, nodes: list) -> None:
        if kind == OUT and not self._seed:  # only where backward starts: no arrivals counted, no node kept
            call.nodes[OUT] = ONE_NODE
            for node in dict.fromkeys(nodes):
                self._on_node(node, (OUT, call, 1))
            return
        if len(nodes) == 1:
            node = nodes[0]
            self._keep(call, kind, node)
            self._on_node(node, (kind, call, 1))
            return
        self._keep(call, kind, nodes)
        counts: dict = {}
        for node in nodes:
            counts[node] = counts.get(node, 0) + 1
        for node, n in counts.items():
            self._on_node(node, (kind, call, n))

    def _on_node(self, node, action: tuple) -> None:
        """One Python pre-hook per node: a module's output node is usually the next module's input
        node, so recent nodes are remembered and their hook gets one more action instead."""
        actions = self._recent_nodes.get(node)
        if actions is None:
            if len(self._recent_nodes) >= RECENT_NODES:
                self._recent_nodes.clear()  # bounded: only adjacent calls share nodes anyway
            actions = self._recent_nodes[node] = [action]
            hook = partial(self._node_fired, actions)
            if type(node) is _AccumulateGrad:
                node.register_prehook(hook)
            else:  # what Tensor.register_hook does underneath, with no RemovableHandle (see _hook_carrier)
                carrier = self._hook_carrier
                carrier._backward_hooks = {0: hook}
                node._register_hook_dict(carrier)
        else:
            actions.append(action)

    def _node_fired(self, actions: list, grad_outputs) -> None:
        """One stamp for all: calls that end (or start) at the same node end (or start) at the same time.
        Ends are stamped before starts (an input view would have ended its call just before this node ran);
        the seed's add and pop run in registration order, as its tensor hooks on this node would. The usual
        case of each step (a call's first arrival of one node in this graph task) is inlined: this runs at
        every call's backward."""
        try:
            task = _graph_task_id()
            seed = self._seed
            if seed:
                node = _current_node()  # the node whose hook this is
                runs = True if node is None else _will_execute(node)
            else:
                runs = True  # asked only for the seed's `parents`
            now = work = 0
            starting = None
            for kind, call, n in actions:
                state = call.nodes
                if kind == OUT:
                    row = call.row
                    if not row[B_START] and not row[B_END]:
                        if starting is None:
                            starting = [call]
                        else:
                            starting.append(call)
                    if not seed:
                        continue
                    if state[6] != task and state[OUT] == ONE_NODE:  # arrived(OUT), inlined
                        state[6] = task
                        state[3] = runs - 1
                        added = runs
                    else:
                        added = call.arrived(OUT, n, task, runs)
                    if added:
                        name = call.site[1]
                        if self._seed_callback and name not in self.parents:
                            self.parents.add(name)
                        else:
                            self._seed_add(name)
                    continue
                if kind != IN:
                    if state[8] != task and state[OWN] == n:  # arrived(OWN), inlined
                        state[8] = task
                        state[5] = 0
                        ended = True
                    else:
                        ended = call.arrived(OWN, n, task, runs)
                    if ended:
                        if not now:
                            work, now = self._work(), self._stamp()
                        self._backward_end(call, now, work, task)
                    if kind == OWN:
                        continue
                if state[7] != task and state[IN] == ONE_NODE:  # arrived(IN), inlined
                    state[7] = task
                    state[4] = runs - 1
                    popped = runs
                else:
                    popped = call.arrived(IN, n, task, runs)
                if popped:
                    name = call.site[1]
                    if name in self.parents:
                        self.parents.remove(name)
                    else:
                        self._seed_pop(name)
            if starting is not None:
                if not now:
                    work, now = self._work(), self._stamp()
                for call in starting:
                    row = call.row
                    if not row[B_START] and not row[B_END]:
                        self._backward_start(call, now, work, task)
        except Exception:
            self._hook_failed()

    # ---- the seed's `parents` in backward -----------------------------------------------------
    def _seed_add(self, name: str) -> None:
        if not self._seed_callback:
            self._seed_callback = True
            _queue_callback(self._seed_reset)
        if name in self.parents:
            logger.info(
                "The module hierarchy tracking seems to be broken as this Module was already "
                "entered. %s during backward",
                name,
            )
        self.parents.add(name)

    def _seed_pop(self, name: str) -> None:
        if name in self.parents:
            self.parents.remove(name)
        else:
            logger.info(
                "The Module hierarchy tracking is confused as we're exiting a Module that was "
                "never entered. %s during backward",
                name,
            )

    def _seed_reset(self) -> None:
        self.parents = {"Global"}
        self._seed_callback = False

    # ---- backward -----------------------------------------------------------------------------
    def _backward_start(self, call: _Call, now: int, work: int, task: int) -> None:
        try:
            open_calls = self._open_backward.get(task)
            if open_calls is None:
                open_calls = self._open_backward[task] = []
                _queue_callback(partial(self._graph_task_done, task))
                if self._pass is None:
                    self._begin_pass(now)
            open_calls.append(call)
            if self._endless:
                self._end_endless(call, now, work)
            row = call.row
            row[B_START] = now
            row[B_WORK_START] = work
            position = self.position  # position: in this module's backward
            position.module = row[MID]
            position.phase = at.BACKWARD
            position.entered = row
            if call.nodes[OWN] is None:
                self._endless.append(call)
        except Exception:
            self._hook_failed()

    def _end_endless(self, starting: _Call, now: int, work: int) -> None:
        """A call with no input view is done once the backward of a module outside it begins."""
        first, last = starting.first, starting.last
        phase = starting.row[PHASE]
        for call in self._endless:
            if not (call.first < first <= call.last or first < call.first <= last or call.row[PHASE] != phase):
                break
        else:
            return  # every one is inside or around the starting call: nothing closes (no list built)
        keep = []
        for call in self._endless:
            inside = call.first < first <= call.last
            around = first < call.first <= last
            if inside or around or call.row[PHASE] != starting.row[PHASE]:  # a recompute's rows are apart
                keep.append(call)
            elif not call.row[B_END]:
                self._close_backward(call.row, now, work)
        self._endless = keep

    def _backward_end(self, call: _Call, now: int, work: int, task: int) -> None:
        try:
            row = call.row
            if row[B_END]:
                return  # a second backward through the same graph
            if not row[B_START]:
                if call.nodes[OUT] is None:
                    return  # no output needs a gradient: no backward (its input's node ran for another reason)
                self._backward_start(call, now, work, task)  # the output was the input (an identity module)
            self._close_backward(row, now, work)
            parent = row[PARENT]  # position: back in the caller's backward, if it is open
            caller = self._log.rows[parent] if 0 <= parent < len(self._log.rows) else None
            self.position.module = (
                caller[MID] if caller is not None and caller[B_START] and not caller[B_END] else at.NO_MODULE
            )
        except Exception:
            self._hook_failed()

    def _close_backward(self, row: list, now: int, work: int) -> None:
        row[B_END] = now
        row[B_WORK_END] = work
        if self._pass is not None:
            self._pass[2] = now

    def _drop_nodes(self) -> None:
        self._viewed_from.clear()
        for call in self._multi:
            call.nodes = [n if n is None or type(n) is int else len(n) if type(n) is list else 1 for n in call.nodes]
        self._multi = []

    def _backward_called(self) -> bool:
        """The training thread calls torch.autograd.backward, outside any backward: the pass starts here if a
        module's backward follows (see agent/backward_call.py). True: tell me when the call returns."""
        try:
            if self._closed or _graph_task_id() != -1 or threading.get_ident() != self.position.thread_id:
                return False
            if self._end_pending:
                self._end_step(self._end_pending)
            if self._optimizer_start:
                self._pause_optimizer()  # loss.backward() inside optimizer.step(closure)
            self.outside.end(OUT_PASS)
            self._backward_called_at = self._stamp()
            return True
        except Exception:
            self._hook_failed()
            return False

    def _backward_returned(self) -> None:
        self._backward_called_at = 0

    def _begin_pass(self, now: int) -> None:
        """The pass begins when the training loop called backward, or else with its first call's backward, at
        that call's stamp (a later stamp would leave the call's first microseconds outside the pass: its self
        time could exceed the pass it is in)."""
        log = self._log
        start = self._backward_called_at or now
        self._backward_called_at = 0
        if self._optimizer_start:
            self._pause_optimizer()  # loss.backward() inside optimizer.step(closure)
        self.outside.end(OUT_PASS)  # (a backward not called by the loop: its first module's)
        # A backward whose first module hook fired in a nested graph task (reentrant checkpoint)
        # shows up as two pieces with no forward in between: they are one pass.
        if log.passes and not any(r[PHASE] == FORWARD for r in log.rows[log.rows_at_pass_end :]):
            self._pass = log.passes[-1]
        else:
            self._pass = [start, 0, 0]
            log.passes.append(self._pass)
        self.position.passes = len(log.passes)  # position: a backward pass began

    def _graph_task_done(self, task: int) -> None:
        """Engine callback: the graph task ran all its nodes. Close the calls that got no end."""
        try:
            work = self._work()
            now = self._stamp()
            for call in self._open_backward.pop(task, ()):
                if not call.row[B_END]:
                    if call.nodes[OWN] is not None:
                        self.counters["backward_ends_at_pass_end"] += 1
                    self._close_backward(call.row, now, work)
            self._endless = [c for c in self._endless if not c.row[B_END]]
            if not self._open_backward:
                self.position.module = at.NO_MODULE  # position: every module's backward is done
                _queue_callback(self._backward_pass_done)  # runs after DDP's all-reduce wait
        except Exception:
            self._hook_failed()

    def _backward_pass_done(self) -> None:
        try:
            if self._pass is not None:
                self._pass[1] = self._stamp()
                self._log.rows_at_pass_end = len(self._log.rows)
            self._pass = None
            self._endless = []
            self._recent_nodes.clear()
            self._drop_nodes()
            self.exit_drain.note_pass()  # this pass's gloo works hold its Context (agent/teardown.py)
            self.position.module = at.NO_MODULE  # position: between backward and the optimizer
            self.position.phase = at.OUTSIDE
            self.outside.begin(OUT_PASS)
            if self._in_optimizer and not self._optimizer_start:
                self.outside.cancel()
                self._optimizer_start = self._stamp()  # back in optimizer.step() after its closure
                self.position.phase = at.OPTIMIZER
            if self._step_due:
                self._step_due = False
                self._end_step()
        except Exception:
            self._hook_failed()

    def _optimizer_pre(self, optimizer, args, kwargs) -> None:
        try:
            if self._in_optimizer and self._optimizer_start and id(optimizer) != self._outer_optimizer:
                return  # stepped inside another's step (ZeroRedundancyOptimizer's local optimizer): part of it
            self._outer_optimizer = id(optimizer)
            start = 0
            if self._end_pending:
                if id(optimizer) in self._stepped or not self._log.optimizer:
                    self._end_step(self._end_pending)  # the same optimizer again: a new step (Lightning, LBFGS)
                else:  # another optimizer right after the last one: the same step, whose optimizer phase goes on
                    self._end_pending = 0
                    self.position.step, self.position.step_start_ns = self._step_no, self._log.start_host_ns
                    start = self._log.optimizer[-1][1]  # the code between the two steps is optimizer time too
            if start:
                self.outside.cancel()
            else:
                self.outside.end(OUT_OPTIMIZER)
            self._stepped.append(id(optimizer))
            self._in_optimizer = True
            self._optimizer_start = start or self._stamp()
            self.position.phase = at.OPTIMIZER  # position
        except Exception:
            self._hook_failed()

    def _pause_optimizer(self) -> None:
        """optimizer.step(closure) runs a forward and backward: that time is not the optimizer's."""
        self._log.optimizer.append((self._optimizer_start, self._stamp()))
        self._optimizer_start = 0

    def _optimizer_post(self, optimizer, args, kwargs) -> None:
        try:
            if id(optimizer) != self._outer_optimizer:
                return  # the inner step of a nested pair: the outer one's goes on
            self.optimizer_steps += 1
            if self._optimizer_start:
                self._log.optimizer.append((self._optimizer_start, self._stamp()))
            self._optimizer_start = 0
            self._in_optimizer = False
            if _graph_task_id() != -1:
                self._step_due = True  # optimizer fused into backward: the step ends with the pass
                self.position.phase = at.BACKWARD  # position
            else:
                # The step ends here, but is closed when the loop next does anything but step another optimizer
                # (the next forward, backward, step(), close(), a read of last_step()): until then it is the
                # next step's data loading, as far as anyone watching the rank can tell.
                self._end_pending = time.perf_counter_ns()
                self.outside.begin(OUT_OPTIMIZER)
                if self._next_trace is None:  # what a step's end decides is decided at its first optimizer's end
                    self._next_trace = (self._take_trace(),)
                    self._sample_step(self._step_no + 1)
                self.position.new_step(self._step_no + 1, self._end_pending)  # position: the next step's data
        except Exception:
            self._hook_failed()

    def _optimizer_skipped(self, optimizer) -> None:
        """A GradScaler skipped optimizer.step() (inf or NaN gradients): the step ends as if it had stepped."""
        if not self._closed and threading.get_ident() == self.position.thread_id and not self._in_optimizer:
            self._optimizer_pre(optimizer, (), {})
            self._optimizer_post(optimizer, (), {})

    def _end_step(self, end_ns: int = 0) -> None:
        """end_ns: when the step ended (perf_counter_ns), if not now."""
        try:
            self._end_pending = 0
            self._stepped = []
            decided, self._next_trace = self._next_trace, None
            log = self._log
            if log.is_empty():
                return
            log.end_host_ns = end_ns or time.perf_counter_ns()
            log.call_windows = self.call_windows
            log.gc = self.gc_pauses.take(log.end_host_ns)
            log.fetches = self.fetches.take(log.end_host_ns)
            log.outside = self.outside.take(log.end_host_ns)
            self._log = StepLog(log.end_host_ns)
            self._stack.clear()
            self._open_backward.clear()
            self._endless = []
            self._recent_nodes.clear()
            self._drop_nodes()
            self._hook_carrier._backward_hooks = None  # the last node hook's calls live only as long as the graph
            self._pass = None
            self.parents = {"Global"}
            # aggregated later, off the training thread (by the sender, or by whoever reads it first); a CUDA
            # step's events travel with it and are resolved there too
            trace = self._take_trace() if decided is None else decided[0]
            record = DeferredStepRecord(log, self._step_no, self._clock.close_step(), trace, self.counters)
            self._step_no += 1
            if decided is None:
                self._sample_step(self._step_no)
            self._log.detail = self._detail
            self.position.new_step(self._step_no, log.end_host_ns)  # position: the next step's data
            self._emit(record)
        except Exception:
            self._hook_failed()

    def _take_trace(self) -> str | None:
        with self._trace_lock:
            if self._trace_request is None:
                return None
            capture_id, steps = self._trace_request
            self._trace_request = (capture_id, steps - 1) if steps > 1 else None
            return capture_id

    def _emit(self, record: StepRecord) -> None:
        names = self._names.names
        record.first_new_module_id = self._names_sent
        record.new_module_names = names[self._names_sent :]
        self._names_sent += len(record.new_module_names)
        self._last = record
        self.counters["steps"] += 1
        if self._on_step is not None:
            try:
                self._on_step(record)
            except Exception:
                self.counters["on_step_errors"] += 1
                logger.debug("modtrack: on_step failed", exc_info=True)

    def _hook_failed(self) -> None:
        self.counters["hook_errors"] += 1
        logger.debug("modtrack: hook error (ignored)", exc_info=True)
