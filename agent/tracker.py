"""ModuleTracker: the seed's `torch.utils.module_tracker.ModuleTracker`, plus timing per module call.

Where the hooks go, and why they are cheap:
- forward: global module forward pre/post hooks (the post hook with always_call, so an exception in
  a forward still closes its call).
- backward start: a pre-hook on the autograd node that made the module's output (fires when the
  first gradient reaches the module). Backward end: a pre-hook on the node that made each input
  (fires once the module has produced the input's gradient). These hooks live on the graph's own
  nodes and die with the graph: no handle is kept, so memory stays flat step after step. The seed
  uses a multi-grad hook on every call's inputs and outputs, which costs ~10x more.
- the autograd engine's final callback closes calls whose inputs need no gradient (the first
  layer) and marks the end of the backward pass; a second callback, queued from the first, runs
  after DDP's own (which waits for the gradient all-reduce): the gap is the backward tail.
- steps end at a global optimizer step post hook, or `step()`.

What a time means (agent/clocks.py): on CPU a call's inclusive and self time are the calling
thread's CPU time (clock="cpu", the default there), so a rank preempted by other processes or
blocked in a collective does not look slow; timestamps (timelines, step, backward pass and tail,
optimizer, data) stay wall time. clock="wall" makes durations wall time too; on CUDA, events.

Every hook is fail-open: any exception is swallowed and counted in counters["hook_errors"].
"""
from __future__ import annotations

import logging
import threading
import time
from functools import partial

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._pytree import tree_flatten

from modtrack.agent.clocks import make_clock
from modtrack.agent.module_names import ModuleNames
from modtrack.agent import position as at  # where the rank is (issue 14: hung jobs)
from modtrack.agent.step_accumulator import (B_END, B_START, B_WORK_END, B_WORK_START, F_END, F_START, F_WORK_END,
                                    F_WORK_START, FORWARD, MID, PENDING, PHASE, RECOMPUTE, StepLog,
                                    build_step_record, step_summary)
from modtrack.agent.step_accumulator import PARENT  # position
from modtrack.agent.step_record import StepRecord

logger = logging.getLogger(__name__)

_graph_task_id = torch._C._current_graph_task_id
_queue_callback = torch.autograd.Variable._execution_engine.queue_callback
_is_compiling = torch.compiler.is_compiling
_Tensor = torch.Tensor

# CUDA steps whose events the GPU has not passed yet wait here; past this many, the oldest is dropped.
MAX_PENDING_STEPS = 8
# A loop that never ends a step (inference: no optimizer, no step()) must not grow memory
# forever: past this many calls, the next return to the top level ends a step by itself.
MAX_CALLS_PER_STEP = 100_000
# Autograd nodes remembered (alive) to share one hook between the modules that meet there.
RECENT_NODES = 64


def _grad_nodes(values) -> list:
    """Distinct autograd nodes that produced the tensors in `values` (a tensor, or any nesting)."""
    if isinstance(values, _Tensor):
        node = values.grad_fn
        return [node] if node is not None else []
    if type(values) is tuple and len(values) == 1 and isinstance(values[0], _Tensor):
        node = values[0].grad_fn
        return [node] if node is not None else []
    values = tree_flatten(values)[0]
    nodes = []
    for v in values:
        if isinstance(v, _Tensor):
            node = v.grad_fn
            if node is not None and node not in nodes:
                nodes.append(node)
    return nodes


class ModuleTracker:
    """Tracks which modules run (`parents`, `is_bw`, as the seed does) and times every call.

    on_step(record) is called on the training thread once per finished step, with an
    `agent.step_record.StepRecord`. clock: "cpu" (durations in thread CPU time), "wall" (CPU,
    durations in wall time: for ranks with several intra-op threads), "cuda" or "auto" (cuda when
    available, else cpu).
    """

    def __init__(self, on_step=None, clock: str = "auto") -> None:
        self.parents: set[str] = {"Global"}
        self.counters = {"hook_errors": 0, "steps": 0, "on_step_errors": 0, "steps_dropped": 0,
                         "implicit_steps": 0}
        self._on_step = on_step
        self._clock = make_clock(clock)
        self.clock_kind: str = self._clock.kind
        self._stamp = self._clock.stamp
        self._work = self._clock.work_stamp
        self._names = ModuleNames()
        self._names_sent = 0
        self._log = StepLog(time.perf_counter_ns())
        self.position = at.Position(self._log.start_host_ns)  # where the rank is (issue 14: hung jobs)
        self._stack: list[tuple] = []  # open forward calls: (row, input grad nodes)
        self._open_backward: dict[int, list] = {}  # graph task id -> rows whose backward started there
        self._pass: list | None = None  # the backward pass running now, an entry of log.passes
        self._step_due = False  # an optimizer stepped inside backward: end the step when it ends
        self._optimizer_start = 0
        self._recent_nodes: dict = {}  # autograd node -> the actions its one pre-hook runs
        self._pending: list[tuple] = []  # finished steps waiting for their clock (CUDA)
        self._step_no = 0
        self._last: StepRecord | None = None
        self._trace_lock = threading.Lock()
        self._trace_request: tuple[str, int] | None = None
        self._handles: list = []
        self._closed = False

    # ---- the seed's surface -------------------------------------------------------------------
    @property
    def is_bw(self) -> bool:
        """True while a backward pass runs (as the seed: any autograd graph task on this thread)."""
        return _graph_task_id() != -1

    def __enter__(self):
        if not self._handles and not self._closed:
            self._log = StepLog(time.perf_counter_ns())
            self.position.new_step(self._step_no, self._log.start_host_ns)  # position: the thread that trains
            self.position.thread_id = threading.get_ident()
            self._handles = [
                register_module_forward_pre_hook(self._forward_pre),
                register_module_forward_hook(self._forward_post, always_call=True),
                register_optimizer_step_pre_hook(self._optimizer_pre),
                register_optimizer_step_post_hook(self._optimizer_post),
            ]
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
        self._end_step()

    def last_step(self) -> dict:
        """{(module_name, phase): {"calls", "inclusive_ms", "self_ms"}} of the last finished step."""
        return {} if self._last is None else step_summary(self._last, self.module_names)

    def last_record(self) -> StepRecord | None:
        return self._last

    def request_trace(self, capture_id: str, steps: int) -> None:
        """Thread-safe: the next `steps` StepRecords carry every call's start and end."""
        with self._trace_lock:
            self._trace_request = (capture_id, int(steps)) if steps > 0 else None

    def close(self) -> None:
        """Remove every hook, finish the step in progress, resolve what the GPU still owes."""
        if self._closed:
            return
        self._closed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        try:
            self._end_step()
            for _, _, batch, _ in self._pending:
                batch.wait()  # CUDA only (CPU steps never wait here); once, at exit: never in a hook
            self._flush()
        except Exception:
            self.counters["hook_errors"] += 1
            logger.debug("modtrack: error while closing", exc_info=True)

    # ---- forward ------------------------------------------------------------------------------
    def _forward_pre(self, mod, args) -> None:
        if _is_compiling():
            return
        try:
            mid = self._names.module_id(mod)
            if mid < 0:
                return
            name = self._names.names[mid]
            parents = self.parents
            recursive = name in parents
            if recursive:
                logger.info("The module hierarchy tracking seems to be broken as this Module was already "
                            "entered. %s during forward", name)
            parents.add(name)
            if len(args) == 1 and isinstance(args[0], _Tensor):  # the common case, without a call
                node = args[0].grad_fn
                input_nodes = None if node is None else (node,)
            else:
                input_nodes = _grad_nodes(args) if args else None
            stack = self._stack
            rows = self._log.rows
            # the layout of agent.step_accumulator.new_row, inlined: this runs for every call
            row = [mid, RECOMPUTE if _graph_task_id() != -1 else FORWARD, 0, 0,
                   stack[-1][0] if stack else -1, len(stack), int(recursive), 0, 0, 0, 0, 0, 0, 0]
            stack.append((len(rows), row, input_nodes, mod, name))
            rows.append(row)
            position = self.position  # position: this call is the innermost open module
            position.module = mid
            position.phase = row[PHASE]
            row[F_START] = self._stamp()
            row[F_WORK_START] = self._work()
        except Exception:
            self._hook_failed()

    def _forward_post(self, mod, args, output) -> None:
        if _is_compiling():
            return
        try:
            work = self._work()
            now = self._stamp()
            stack = self._stack
            if stack and stack[-1][3] is mod:
                frame = stack.pop()
            else:
                frame = self._find_frame(mod)
                if frame is None:
                    return  # a wrapper (not timed), or a call that started before a step ended
            _, row, input_nodes, _, name = frame
            row[F_END] = now
            row[F_WORK_END] = work
            position = self.position  # position: back in the caller, or outside every module
            if stack:
                caller = stack[-1][1]
                position.module = caller[MID]
                position.phase = caller[PHASE]
            else:
                position.module = at.NO_MODULE
                position.phase = at.BACKWARD if row[PHASE] == RECOMPUTE else at.OUTSIDE
            if name in self.parents:
                self.parents.remove(name)
            else:
                logger.info("The Module hierarchy tracking is confused as we're exiting a Module that was "
                            "never entered. %s during forward", name)
            if output is not None:
                self._hook_backward(row, output, input_nodes)
            if not stack and len(self._log.rows) >= MAX_CALLS_PER_STEP and self._pass is None:
                self.counters["implicit_steps"] += 1
                self._end_step()
        except Exception:
            self._hook_failed()

    def _find_frame(self, mod):
        """Hooks out of step (a step ended inside a forward): find mod's frame, drop those above it."""
        stack = self._stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][3] is mod:
                frame = stack[i]
                del stack[i:]
                return frame
        return None

    def _hook_backward(self, row: list, output, input_nodes) -> None:
        """Pre-hooks on the output's nodes (backward starts) and the inputs' nodes (it ends)."""
        out_nodes = _grad_nodes(output)
        if not out_nodes:
            return  # no_grad, eval, or an output that needs no gradient: forward only
        for node in out_nodes:
            self._on_node(node, (True, row))
        if input_nodes:
            if len(input_nodes) > 1:
                row[PENDING] = len(input_nodes)
            for node in input_nodes:
                self._on_node(node, (False, row))

    def _on_node(self, node, action: tuple) -> None:
        """One Python pre-hook per node: a module's output node is usually the next module's input
        node, so recent nodes are remembered and their hook gets one more action instead."""
        actions = self._recent_nodes.get(node)
        if actions is None:
            if len(self._recent_nodes) >= RECENT_NODES:
                self._recent_nodes.clear()  # bounded: only adjacent calls share nodes anyway
            actions = self._recent_nodes[node] = [action]
            node.register_prehook(partial(self._node_fired, actions))
        else:
            actions.append(action)

    def _node_fired(self, actions: list, grad_outputs) -> None:
        try:
            for is_start, row in actions:
                if is_start:
                    self._backward_start(row)
                else:
                    self._backward_end(row)
        except Exception:
            self._hook_failed()

    # ---- backward -----------------------------------------------------------------------------
    def _backward_start(self, row: list) -> None:
        if row[B_START] or row[B_END]:
            return  # another output of the same call, or a second backward through the graph
        try:
            task = _graph_task_id()
            open_rows = self._open_backward.get(task)
            if open_rows is None:
                open_rows = self._open_backward[task] = []
                _queue_callback(partial(self._graph_task_done, task))
                if self._pass is None:
                    self._begin_pass()
            open_rows.append(row)
            self.parents.add(self._names.names[row[MID]])
            position = self.position  # position: in this module's backward
            position.module = row[MID]
            position.phase = at.BACKWARD
            row[B_START] = self._stamp()
            row[B_WORK_START] = self._work()
        except Exception:
            self._hook_failed()

    def _backward_end(self, row: list) -> None:
        if row[PENDING] > 1:
            row[PENDING] -= 1  # wait for the gradients of all inputs
            return
        try:
            work = self._work()
            now = self._stamp()
            if not row[B_START] or row[B_END]:
                return
            row[B_END] = now
            row[B_WORK_END] = work
            if self._pass is not None:
                self._pass[2] = now
            self.parents.discard(self._names.names[row[MID]])
            parent = row[PARENT]  # position: back in the caller's backward, if it is open
            caller = self._log.rows[parent] if 0 <= parent < len(self._log.rows) else None
            self.position.module = caller[MID] if caller is not None and caller[B_START] and not caller[B_END] \
                else at.NO_MODULE
        except Exception:
            self._hook_failed()

    def _begin_pass(self) -> None:
        log = self._log
        # A backward whose first module hook fired in a nested graph task (reentrant checkpoint)
        # shows up as two pieces with no forward in between: they are one pass.
        if log.passes and not any(r[PHASE] == FORWARD for r in log.rows[log.rows_at_pass_end:]):
            self._pass = log.passes[-1]
        else:
            self._pass = [self._stamp(), 0, 0]
            log.passes.append(self._pass)
        self.position.passes = len(log.passes)  # position: a backward pass began

    def _graph_task_done(self, task: int) -> None:
        """Engine callback: the graph task ran all its nodes. Close the calls that got no end."""
        try:
            work = self._work()
            now = self._stamp()
            for row in self._open_backward.pop(task, ()):
                if not row[B_END]:
                    row[B_END] = now
                    row[B_WORK_END] = work
                    if self._pass is not None:
                        self._pass[2] = now
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
            self._recent_nodes.clear()
            self.parents = {"Global"}
            self.position.module = at.NO_MODULE  # position: between backward and the optimizer
            self.position.phase = at.OUTSIDE
            if self._step_due:
                self._step_due = False
                self._end_step()
        except Exception:
            self._hook_failed()

    # ---- optimizer and steps ------------------------------------------------------------------
    def _optimizer_pre(self, optimizer, args, kwargs) -> None:
        try:
            self._optimizer_start = self._stamp()
            self.position.phase = at.OPTIMIZER  # position
        except Exception:
            self._hook_failed()

    def _optimizer_post(self, optimizer, args, kwargs) -> None:
        try:
            self._log.optimizer.append((self._optimizer_start, self._stamp()))
            if _graph_task_id() != -1:
                self._step_due = True  # optimizer fused into backward: the step ends with the pass
                self.position.phase = at.BACKWARD  # position
            else:
                self._end_step()
        except Exception:
            self._hook_failed()

    def _end_step(self) -> None:
        try:
            log = self._log
            if log.is_empty():
                return
            log.end_host_ns = time.perf_counter_ns()
            self._log = StepLog(log.end_host_ns)
            self._stack.clear()
            self._open_backward.clear()
            self._recent_nodes.clear()
            self._pass = None
            self.parents = {"Global"}
            self._pending.append((self._step_no, log, self._clock.close_step(), self._take_trace()))
            self._step_no += 1
            self.position.new_step(self._step_no, log.end_host_ns)  # position: the next step's data
            self._flush()
        except Exception:
            self._hook_failed()

    def _take_trace(self) -> str | None:
        with self._trace_lock:
            if self._trace_request is None:
                return None
            capture_id, steps = self._trace_request
            self._trace_request = (capture_id, steps - 1) if steps > 1 else None
            return capture_id

    def _flush(self) -> None:
        """Build and hand over every finished step whose stamps can be resolved now, in order."""
        pending = self._pending
        while pending:
            step_no, log, batch, trace_id = pending[0]
            table = None
            if batch is not None:
                table = batch.resolve()
                if table is None:
                    if len(pending) <= MAX_PENDING_STEPS:
                        return
                    batch.release()
                    pending.pop(0)
                    self.counters["steps_dropped"] += 1
                    continue
            pending.pop(0)
            self._emit(build_step_record(log, step_no, table, trace_id))

    def _emit(self, record: StepRecord) -> None:
        names = self._names.names
        record.first_new_module_id = self._names_sent
        record.new_module_names = names[self._names_sent:]
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
