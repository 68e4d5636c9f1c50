"""Per-step straggler flags, vectorized over ranks x (module, phase) columns.

For every column, among the ranks that ran it, the detector takes the median and the MAD,
and flags a rank whose self time is both `ratio` times the median and a robust outlier
(modified z = 0.6745 (x - median) / MAD above `z`). One sort per matrix gives the medians of
all columns at once; no Python loop runs per rank or per column. Step-level figures outside
modules (data loading, optimizer, host time, garbage collection) are judged as more columns. The flags then feed the
episode book (collector/pipeline/episodes.py): one verdict per culprit, hysteresis, host roll-up, cost.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from modtrack.collector.pipeline.episodes import EpisodeBook
from modtrack.collector.pipeline.sampled_steps import HeldDetail
from modtrack.collector.records import Episode, StepMatrix
from modtrack.collector.small_arrays import column_medians, excess_sums, median, nan_median, nan_to, pair_medians

Z_SCALE = 0.6745  # makes the MAD of a normal sample comparable to its standard deviation


@dataclass
class DetectorParams:
    """What makes a rank x column a straggler. Defaults suit GPU compute jitter of a few %."""

    ratio: float = 1.2  # flag only when self time > ratio x the column's median
    z: float = 3.5  # ... and its modified z-score is above this
    k: int = 3  # an episode opens once k of the last n steps are flagged
    n: int = 5  # ... and closes after n consecutive clean steps
    # ... k + 1 of n + 1 on a job judging more cells (ranks x columns) than this: among many cells, noise flags
    # one in 3 of 5 steps somewhere by chance (multiple comparisons). Simulated jobs on the noise of real CPU ranks
    # sharing cores (tests/bench/detector_quality.py --noise-from, 40 runs): false alarms per 1,000 clean steps on
    # 32 and 64 ranks 6.8 and 14.4 with 3 of 5 everywhere, 0 and 0 with this; latency p50 2 -> 3 steps there, recall
    # the same. A real 3-rank job of 80 columns (246 cells) keeps 3 of 5.
    many_cells: int = 512
    # Hysteresis in size as well as time: an open episode's step is clean only when the cell is
    # below these lower bars, so a culprit hovering at the opening bar does not flap.
    hold_ratio: float = 1.1
    hold_z: float = 2.0
    # The MAD is floored so that equal ranks give z = 0 and sub-jitter noise never flags:
    mad_floor_frac: float = 0.01  # ... at this fraction of the median
    mad_floor_ms: float = 0.01  # ... and at this many ms (z > 3.5 then needs > ~0.05 ms excess)
    # An excess too small to matter never opens an episode: self time over the column's median
    # must exceed both floors. None: 0 (a 1.3x slowdown of a 0.3 ms GPU kernel is a real, if
    # cheap, straggler), except on jobs whose ranks time on the CPU clock (CPU_CLOCK_FLOOR).
    min_excess_ms: float | None = None
    min_excess_frac: float | None = None  # ... x the median step wall time
    # Two ranks have no meaningful MAD: the slower is flagged on the ratio alone, with a
    # higher bar, and only if it does not wait more than the other (a victim waits).
    two_rank_ratio: float = 1.25
    # Culprit, not victim: a rank waiting in the gradient all-reduce more than the median
    # rank (by more than this tolerance) is waiting for someone else, and is never flagged.
    sync_tol_ms: float = 1.0
    sync_tol_frac: float = 0.02  # of the median step wall time, whichever is larger
    smooth_steps: int = 10  # slowdown and excess: medians over its last this-many slow steps
    # Intermittent stragglers (1 slow step in 3, or in 5) never reach k of n: a cell (or a rank)
    # flagged in long_k of the last long_n steps opens an episode too.
    long_k: int = 4
    long_n: int = 20
    cost_steps: int = 30  # the cost is the mean loss over this many steps (slow or not)
    # Step-level columns (data loading, optimizer) are wall time: they open nothing below this excess.
    step_floor_ms: float = 5.0
    step_floor_frac: float = 0.05  # ... x the median step wall time
    host_rollup: bool = True  # > half of a host's ranks (at least 2) slow together: one host episode
    # A job's first steps judge nothing: lazy initialisation, the tracker's first-call hook installs and
    # allocator growth make them unlike the rest. None: CPU_CLOCK_WARMUP steps on CPU-clocked jobs, else 0.
    warmup_steps: int | None = None

    def excess_floor(self, wall_ms: float) -> float:
        """The least excess over its column's median a module cell needs in a step of this wall time (0: none)."""
        frac = (self.min_excess_frac or 0.0) * (wall_ms if np.isfinite(wall_ms) else 0.0)
        return max(self.min_excess_ms or 0.0, frac)

    def step_bar(self, wall_ms: float) -> float:
        """The excess a step-level column (data loading, optimizer, host time, GC) needs in a step of this wall time."""
        return max(self.step_floor_ms, self.step_floor_frac * (wall_ms if np.isfinite(wall_ms) else 0.0))


# Host CPU time is a coarser instrument than GPU events: on a clean job, processes differ by a few
# hundred µs of CPU time in small modules, for steps on end (page faults, caches, allocator, cores
# shared with other ranks). Measured: 4 CPU ranks on 2 shared cores, 80 clean steps: 2-4 episodes
# of 1.3-2.6x costing 0.1-1.3 ms (<= 0.6 % of a ~240 ms step) without a floor; with a floor of
# 0.5 ms / 0.5 % one clean 3-rank run still opened a 0.69 ms (0.52 %) episode, so the floor sits
# at 1 ms and 1 % of the step: a CPU straggler costing less is not worth an alert.
CPU_CLOCK_FLOOR = {"min_excess_ms": 1.0, "min_excess_frac": 0.01}
# Measured: a clean 3-rank CPU job under full load opened a 5 ms episode in its head's forward from
# flags in steps 0-4 (cost 0.9 ms per step, resolved at once); nothing after its first steps.
CPU_CLOCK_WARMUP = 5


def params_for_clock(params: DetectorParams, cpu_clock: bool) -> DetectorParams:
    """A job's params: floors left unset (None) get the CPU floor on a CPU-clocked job, else 0."""
    floors: dict[str, Any] = {
        name: (CPU_CLOCK_FLOOR[name] if cpu_clock else 0.0) for name in CPU_CLOCK_FLOOR if getattr(params, name) is None
    }
    if params.warmup_steps is None:
        floors["warmup_steps"] = CPU_CLOCK_WARMUP if cpu_clock else 0
    return replace(params, **floors)


@dataclass
class StepFlags:
    """One step's verdict per cell, and the column figures the episode book needs."""

    flagged: np.ndarray  # (R, K) bool: above the opening bars
    held: np.ndarray  # (R, K) bool: above the lower bars that keep an open episode open
    # (R, K) bool: the rank's peers waited for it at least half the cell's excess (a victim's noise: they did not)
    waited: np.ndarray
    paid_ms: np.ndarray  # (R,) the rank's module excess ahead of every other rank's (what the step waits for)
    median: np.ndarray  # (K,) median self time among the ranks that ran the column
    count: np.ndarray  # (K,) how many ranks ran the column


def column_stats(self_ms: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column: count of ranks that ran it, median and MAD of their self times (NaN-aware)."""
    count = np.count_nonzero(~np.isnan(self_ms), axis=0)
    if len(self_ms) == 2:  # two ranks: a column's median is the mean of its numbers, without sorting
        median = pair_medians(self_ms)
        return count, median, pair_medians(np.abs(self_ms - median))
    median = column_medians(np.sort(self_ms, axis=0), count)  # sort puts NaN last
    mad = column_medians(np.sort(np.abs(self_ms - median), axis=0), count)
    return count, median, mad


def _peer_wait_median(wait: np.ndarray, x: np.ndarray, count: np.ndarray) -> np.ndarray | float:
    """Median sync wait among the ranks that ran each column (pipeline stages wait differently)."""
    if not len(wait):
        return 0.0
    if (count == len(wait)).all():  # every rank ran every column: one median for all
        return median(wait)
    waits = np.where(np.isnan(x), np.nan, wait[:, None])
    return column_medians(np.sort(waits, axis=0), count)


def _peer_idle(idle: np.ndarray) -> np.ndarray:
    """Per rank, what the median of the other ranks waited (in any phase: StepMatrix.idle_or_tail_ms)."""
    if len(idle) < 2:
        return idle.copy()
    if len(idle) == 2:  # the other rank's (the general case's 0.5 * (v + v), exactly)
        return idle[::-1].copy()
    order = np.argsort(idle, kind="stable")
    ordered, place = idle[order], np.empty(len(idle), np.int64)
    place[order] = np.arange(len(idle))
    others = len(idle) - 1  # the median of the others: the sorted waits with the rank's own left out

    def other(j: int) -> np.ndarray:
        return np.where(j < place, ordered[j], ordered[min(j + 1, len(idle) - 1)])

    return 0.5 * (other((others - 1) // 2) + other(others // 2))


def _compute_lead(x: np.ndarray, median: np.ndarray) -> np.ndarray:
    """Per rank, its module excess over the columns' medians, less the largest of any other rank: how far
    its compute is ahead of the next slowest rank's, which a synchronous step waits for. < 0 but for one."""
    total = excess_sums(x, median)
    if len(total) < 2:
        return np.zeros(len(total))
    if len(total) == 2:  # the other rank is the largest of any other
        return total - total[::-1]
    order = np.argsort(-total, kind="stable")
    first, second = total[order[0]], total[order[1]]
    return total - np.where(np.arange(len(total)) == order[0], second, first)


def _waited_for(idle: np.ndarray, x: np.ndarray, median: np.ndarray, steps: int) -> np.ndarray:
    """Per rank, how long its peers waited for it beyond what its slower modules explain: what the
    median peer waited (in any phase) minus what the rank itself waited and its module excess.

    A rank slow in data loading or in the optimizer keeps every peer waiting in the next
    collective (the gradient all-reduce of the step, or of the next one, the slowdown going on);
    a rank preempted while its peers were held up too cost nobody anything, and is no straggler."""
    if len(idle) < 2:
        return np.zeros(len(idle))
    peer = _peer_idle(idle)
    module_excess = excess_sums(x[:, :-steps], median[:-steps]) if steps else 0.0
    return peer - idle - module_excess


# Step-level figures judged like module columns: (StepMatrix field, name, phase).
STEP_COLUMNS = (
    ("data_ms", "(data loading)", "data"),
    ("optimizer_ms", "(optimizer)", "optimizer"),
    ("host_ms", "(host between modules)", "host"),
    ("gc_ms", "(garbage collection)", "gc"),  # appended: each column's key is -1 - its index here
)


def _step_figure(m: StepMatrix, field: str):
    """A step-level column: data loading is what is left of the step outside modules, less the host's time; the
    host's time is its code's, less what it waited there (gradient clipping's all-reduce under FSDP: every rank is
    there as long as the last one, and only the thread's CPU time tells the one that ran its code)."""
    value = getattr(m, field, None)
    if field == "data_ms" and value is not None and m.host_ms is not None:
        return np.asarray(value, dtype=np.float64) - np.asarray(m.host_ms, dtype=np.float64)
    if field == "host_ms" and value is not None and m.host_wait_ms is not None:
        return np.asarray(value, dtype=np.float64) - np.asarray(m.host_wait_ms, dtype=np.float64)
    return value


def judged_columns(m: StepMatrix) -> tuple[np.ndarray, np.ndarray]:
    """The (R, K') matrix the detector judges: module self times, then the step-level columns the
    matrix carries. Returns it and the step columns' keys (negative: they are no module)."""
    x = np.asarray(m.self_ms, dtype=np.float64)
    extra = [
        (-1 - i, _step_figure(m, field))
        for i, (field, _, _) in enumerate(STEP_COLUMNS)
        if getattr(m, field, None) is not None
    ]
    if not extra:
        return x, np.empty(0, np.int64)
    out = np.empty((x.shape[0], x.shape[1] + len(extra)))  # one block: column_stack and hstack copied twice
    out[:, : x.shape[1]] = x
    for i, (_, v) in enumerate(extra):
        out[:, x.shape[1] + i] = v
    return out, np.array([k for k, _ in extra], np.int64)


def flag_step(m: StepMatrix, p: DetectorParams, x: np.ndarray | None = None) -> StepFlags:
    """Flag every rank x column whose compute is in excess, victims excluded."""
    x = judged_columns(m)[0] if x is None else x
    wait = nan_to(m.sync_wait_ms)
    count, median, mad = column_stats(x)
    wall_median = nan_median(m.wall_ms) if len(m.wall_ms) else 0.0
    tol = max(p.sync_tol_ms, p.sync_tol_frac * (wall_median if np.isfinite(wall_median) else 0.0))

    with np.errstate(invalid="ignore"):
        mad_f = np.maximum(np.maximum(mad, p.mad_floor_frac * median), p.mad_floor_ms)
        z_excess = (x - median) * Z_SCALE
        # A victim waits for someone: in the gradient all-reduce (the backward tail) more than the median rank. But
        # the rank every other waited for longer, in any phase, is no victim, whatever its tail: under FSDP2 on shared
        # cores a rank slow in one module's forward waited longest in the tail in 1 of its slow steps in 4 (a kept
        # 1-in-5 job: each such step delayed its verdict by 20 steps).
        idle = m.idle_or_tail_ms
        least_idle = idle <= idle.min() if len(idle) else np.zeros(0, bool)
        not_victim = (wait[:, None] <= _peer_wait_median(wait, x, count) + tol) | least_idle[:, None]
        many = (count >= 3) & not_victim
        # Columns two ranks ran: the other rank's time and wait, once for both bars below (on a 2-rank job, all)
        two = count == 2
        every_two = two.size > 0 and bool(two.all())
        if two.any():
            sub = x if every_two else x[:, two]
            ran = ~np.isnan(sub)
            peer = np.where(ran, sub, 0.0).sum(axis=0) - sub  # the other rank's time (np.nansum's sum)
            peer_wait_ok = (wait[:, None] <= ((wait[:, None] * ran).sum(axis=0) - wait[:, None]) + tol) | least_idle[
                :, None
            ]
            sub_excess = sub - peer

        def above(ratio: float, z: float, two_ratio: float) -> np.ndarray:
            if every_two:  # no column has 3 ranks: the two-rank bars are all
                return (sub > two_ratio * peer) & (sub_excess > z / Z_SCALE * p.mad_floor_ms) & peer_wait_ok
            out = (x > ratio * median) & (z_excess > z * mad_f) & many
            if two.any():
                out[:, two] = (sub > two_ratio * peer) & (sub_excess > z / Z_SCALE * p.mad_floor_ms) & peer_wait_ok
            return out

        flagged = above(p.ratio, p.z, p.two_rank_ratio)
        if p.min_excess_ms or p.min_excess_frac:
            flagged &= (x - median) > p.excess_floor(wall_median)
        steps = x.shape[1] - np.asarray(m.self_ms).shape[1]  # the step-level columns, last
        if steps and np.isfinite(wall_median):
            # Data loading and optimizer are wall time, which a rank preempted on shared cores
            # stretches by a few ms now and then (measured: 1-16 ms, 1.6-10x, on 3 ranks / 2 cores).
            # The bar is 5 % of the step: under FSDP on a loaded host a step took 150-220 ms and a 30 ms
            # optimizer straggler (31-42 ms of excess) cleared 20 % in 1 step in 4 (found 26 steps late, its cost
            # lost); with a wider model (steps of 350 ms under FSDP2) a 30 ms optimizer and a 40 ms data loading
            # straggler never cleared 10 %. Spikes its peers waited for reach 10-60 % of a step, but in no 3 of 5
            # steps of 133 real jobs (their clean steps and those before each onset) at 5 %.
            bar = p.step_bar(wall_median)
            # ... and a rank is slow there only if its peers waited for it (most of its excess). These bars
            # stand in for the MAD's: among 3 ranks one peer's noise is the MAD, and under FSDP2 on a loaded host
            # (steps of 150-250 ms) peers' optimizer steps ran 5-22 ms long now and then, which hid a 30 ms
            # optimizer straggler for 11 steps, and broke its episode in two (the hold's MAD, below).
            sx, smed = x[:, -steps:], median[-steps:]
            step_excess = sx - smed
            peers_waited = _waited_for(idle, x, median, steps)[:, None]
            waited = peers_waited >= 0.5 * step_excess
            # Culprit or victim is what these waits in any phase say, not the backward tail's alone: under FSDP2 a
            # slow loader's peers wait in the next forward's all-gathers while its own tail wait can be the step's
            # longest on shared cores (a kept job: 9-19 ms against 4-9; its verdict came 7 steps late).
            ranks_ok = count[-steps:] >= 2
            flagged[:, -steps:] = (sx > p.ratio * smed) & (step_excess > bar) & waited & ranks_ok
        held = above(p.hold_ratio, p.hold_z, p.hold_ratio)
        if steps and np.isfinite(wall_median):
            # An open episode holds on lower bars, and while its peers still wait for it by any amount: what they
            # wait is noisy too (+-50 ms there, in the next forward's all-gathers), and a victim's cell does not
            # stay above its peers' for steps on end.
            held[:, -steps:] = (sx > p.hold_ratio * smed) & (step_excess > 0.5 * bar) & (peers_waited >= 0) & ranks_ok
        # What the rate rule (intermittent stragglers) counts: a flag the step waited for, the rank's compute
        # ahead of every other rank's by half the cell's excess. On shared cores a waiting rank's cell spikes
        # now and then, in a step that waited for the culprit's far larger excess: no evidence against it.
        # (Measured waits are no judge of that on a loaded host: a culprit preempted in its slow module shows
        # as much "idle" as the peers that wait for it, in half its slow steps of a 1-in-3 job.)
        paid = _compute_lead(x[:, : x.shape[1] - steps], median[: x.shape[1] - steps])
        corroborated = paid[:, None] >= 0.5 * (x - median)
        if steps and np.isfinite(wall_median):
            corroborated[:, -steps:] = waited
    return StepFlags(flagged=flagged, held=held, median=median, count=count, waited=corroborated, paid_ms=paid)


class Detector:
    """Turns a job's merged steps into straggler episodes; one instance per job.

    Steps must come in increasing order; a step not after the last one seen is ignored
    (a replayed or late step changes nothing).
    """

    def __init__(self, job: str, params: DetectorParams | None = None):
        self.job = job
        self.attempt = 0  # the attempt it judges: the evaluator starts a fresh detector for each
        self.params = params or DetectorParams()
        self.book = EpisodeBook(job, self.params)
        self.held = HeldDetail()  # sampled mode: module columns between steps with detail
        self.last_step: int | None = None

    def observe(self, matrix: StepMatrix) -> list[Episode]:
        """Evaluate one step; return the episodes it opened, updated or closed."""
        if self.last_step is not None and matrix.step <= self.last_step:
            return []
        self.last_step = matrix.step
        if matrix.step < (self.params.warmup_steps or 0):  # by step number: a restarted collector judges on
            return []
        matrix = self.held.fill(matrix)
        x, step_keys = judged_columns(matrix)
        flags = flag_step(matrix, self.params, x)
        self.held.judged(matrix, flags)  # sampled mode: held cells count only where both samples agreed
        return self.book.update(matrix, x, step_keys, flags)

    def active(self) -> list[Episode]:
        return self.book.active()

    def restore(self, episodes: list[Episode]) -> None:
        """Continue the active episodes of a previous collector run (same objects, same ids)."""
        self.book.restore(episodes)
