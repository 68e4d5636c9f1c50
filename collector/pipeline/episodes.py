"""Straggler episodes from per-step flags: one verdict per culprit, hysteresis, host roll-up, cost.

The flag history is a ring of the last `long_n` steps' (ranks x columns) flag matrices with two
running counts (the last n steps, the last long_n), so k-of-n and the rate rule for intermittent
stragglers are one vectorized add and subtract per step. Only ranks that reach a count (few) and
the active episodes (few) are visited in Python, each with numpy over its columns.

An episode is a rank (or a host): it lists every column (module x phase, data loading, optimizer)
where the rank carries significant excess over its peers' median, and what the job loses per step,
which is the culprit's excess bounded by what its peers really waited, in any phase.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from modtrack.collector.records import N_PHASES, PHASE_NAMES, Episode, StepMatrix, column_key
from modtrack.collector.small_arrays import excess_sums, median, nan_column_medians, nan_median, nan_to, row_percentiles

if TYPE_CHECKING:
    from modtrack.collector.pipeline.detector import StepFlags

STEP_COLUMN_NAMES = {
    -1: ("(data loading)", "data"),
    -2: ("(optimizer)", "optimizer"),
    -3: ("(host between modules)", "host"),
    -4: ("(garbage collection)", "gc"),
}
GC_COLUMN = -4  # the key of garbage collection's column (above)
STEP_CAUSES = {
    "data": "data loading",
    "optimizer": "optimizer",
    "host": "host time between modules",
    "gc": "garbage collection",
}
MAX_LISTED = 32  # entries of an episode's `modules` (a whole-rank verdict would list every module)
# The job's step time before an episode: the mean of this many quiet steps, as many as the cost's mean has (cost_steps'
# default), so that the loss per step is a difference of two means of equal length and noise.
BASELINE_STEPS = 30
LOCAL_BASELINE_STEPS = 4  # ... between an intermittent episode's slow steps: of the last this many
MIN_BASELINE = 5
# A step this many times the job's pace (the median of its last PACE_STEPS steps; with episodes open, at most the
# baseline's), beyond what the culprits explain,
# is the whole job busy with something else at once: an evaluation, a checkpoint save. It neither sets the pace of
# the baseline nor scales a cost (what a culprit's peers waited for it in that step still counts).
PAUSE_FACTOR = 3.0
PACE_STEPS = 9
# The wall a culprit costs, per ms of its excess compute, at most: 3 ranks on 2 shared cores under FSDP2 lost 101 ms
# per step to a rank 40 ms slow in every module (its busy cores slow its peers' compute too).
MAX_WALL_SCALE = 3.0
WHOLE_RANK_FRAC = 0.1  # a rank slower in most modules by this fraction of the step in all is slow as a whole
MAX_GAP = 20  # steps between an intermittent straggler's slow steps that still keep it one episode


class _quiet(np.errstate):
    """numpy and warnings quiet for the all-NaN slices of absent columns."""

    def __init__(self):
        super().__init__(all="ignore")

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._w.__exit__(*exc)


@dataclass
class _Step:
    """One step's inputs to the book, computed once."""

    m: StepMatrix
    x: np.ndarray  # (R, K) judged columns
    flags: StepFlags
    rank_wide: np.ndarray  # (R,) bool
    wall: np.ndarray
    wait: np.ndarray
    idle: np.ndarray  # what each rank waited, in any phase (falls back to the backward tail)
    floor: float  # the least excess a listed entry carries
    wall_med: float
    idle_order: np.ndarray  # ranks' rows by idle time, least first


@dataclass
class _Track:
    """An active episode and the rings behind its verdict: the culprit's figures in its slow steps."""

    episode: Episode
    ranks: list[int]
    keys: np.ndarray  # (K,) column keys the rings below are indexed by
    excess: np.ndarray  # (S, K) ms over the peers' median, in the last S slow steps (NaN: not yet)
    ratio: np.ndarray  # (S, K) over the peers' median
    held: np.ndarray  # (S, K) bool: above the hold bars
    wide: np.ndarray  # (S,) bool: slow across most columns
    pos: int = 0
    slow_steps: int = 0  # since the episode opened
    steps: int = 0  # since the episode opened
    clean: int = 0  # consecutive steps without a flag
    last_slow: int = 0
    max_gap: int = 1  # longest run between two slow steps: an intermittent straggler's period
    losses: deque = field(default_factory=deque)  # the job's loss in each of the last cost_steps steps
    walls: deque = field(default_factory=deque)
    between: deque = field(default_factory=deque)  # its excess in the listed columns in recent steps not slow
    held_back: deque = field(default_factory=deque)  # what its peers waited for it (see _losses) in its last steps
    sig: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # significant columns
    med_excess: np.ndarray = field(default_factory=lambda: np.zeros(0))
    med_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pending: Any = None  # this step's (what-if loss, own excess, walls), before the wall scale
    judged: Any = None  # this step's (significant columns, whole rank), for the verdict once its loss is known
    # Reported: once it lists a significant entry (a module, a step-level cause) or the whole rank. A track
    # that never does (a waiting rank's spikes, none over the bars in half its slow steps) ends unseen.
    published: bool = False


def _key(rank: int, host: str) -> tuple:
    return (rank, host if rank == -1 else "")


def _empty_rings(s: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.full((s, k), np.nan), np.full((s, k), np.nan), np.zeros((s, k), bool)


def _column_name(key: int, names: Sequence[str]) -> tuple[str, str]:
    if key < 0:
        return STEP_COLUMN_NAMES.get(key, (f"step#{key}", "step"))
    mid, ph = divmod(key, N_PHASES)
    return (names[mid] if 0 <= mid < len(names) else f"module#{mid}", PHASE_NAMES.get(ph, str(ph)))


class EpisodeBook:
    def __init__(self, job: str, params):
        self.job = job
        self.p = params  # k and n as the job's size asks (see _align)
        self.base_p = params
        self.span = max(params.long_n, params.n + 2)  # ring length (n grows by one on a large job)
        self.hist: Any = (
            None  # np.ndarray once the first step is seen  # (span, R, K) bool cell flags of the last span steps
        )
        self.counts: Any = None  # np.ndarray once the first step is seen  # (R, K) flagged steps among the last n
        # The rate rule counts only flags the rank's peers paid for (they waited for it): its own ring.
        self.long_hist: Any = None  # np.ndarray once the first step is seen  # (span, R, K) bool
        self.long_counts: Any = None  # np.ndarray once the first step is seen  # (R, K) ... among the last long_n
        # A step in which most of a rank's columns are flagged is one piece of evidence that the
        # rank is slow, not evidence that each of its cells is: it is counted here, not in counts.
        self.rank_hist: Any = None  # np.ndarray once the first step is seen  # (span, R) bool rank-wide steps
        self.rank_counts: Any = None  # np.ndarray once the first step is seen  # (R,)
        self.rank_long_hist: Any = None  # np.ndarray once the first step is seen  # (span, R) ... paid for
        self.rank_long_counts: Any = None  # np.ndarray once the first step is seen  # (R,)
        self.pos = 0
        self.rank_ids = np.empty(0, np.int64)
        self.col_keys = np.empty(0, np.int64)
        self.rank_index: dict[int, int] = {}
        self.col_index: dict[tuple[str, str], int] = {}
        self.col_names: list[tuple[str, str]] = []
        self.tracks: dict[tuple, _Track] = {}
        self.baseline: deque = deque()  # (step, the job's step time: median rank wall) of recent quiet steps
        # (growth of the job's step time over the baseline, the compute the culprits explain) in recent slow steps
        self.growth: deque = deque(maxlen=params.cost_steps)
        self.pace: deque = deque(maxlen=PACE_STEPS)  # the job's step time (median rank wall) in its last steps
        self.scale = 1.0  # wall the job loses per ms of culprit compute (their ratio of sums)
        self._floor_ms = 0.0
        self._cpu_clock = False  # the job's ranks time modules in CPU time: their waits are known in every phase

    # ---- bookkeeping of ranks and columns that come and go -------------------------------

    def _align(self, m: StepMatrix, step_keys: np.ndarray) -> None:
        """Keep the flag history indexed like this matrix (ranks leave, modules appear)."""
        ranks = np.asarray(m.ranks, np.int64)
        keys = np.concatenate(
            [column_key(np.asarray(m.column_module, np.int64), np.asarray(m.column_phase, np.int64)), step_keys]
        )
        if self.hist is not None and np.array_equal(ranks, self.rank_ids) and np.array_equal(keys, self.col_keys):
            return
        new = np.zeros((self.span, len(ranks), len(keys)), bool)
        new_long = np.zeros_like(new)
        new_rank = np.zeros((self.span, len(ranks)), bool)
        new_rank_long = np.zeros_like(new_rank)
        if self.hist is not None:
            _, nr, orr = np.intersect1d(ranks, self.rank_ids, assume_unique=True, return_indices=True)
            _, nc, oc = np.intersect1d(keys, self.col_keys, assume_unique=True, return_indices=True)
            new[:, nr[:, None], nc] = self.hist[:, orr[:, None], oc]
            new_long[:, nr[:, None], nc] = self.long_hist[:, orr[:, None], oc]
            new_rank[:, nr] = self.rank_hist[:, orr]
            new_rank_long[:, nr] = self.rank_long_hist[:, orr]
        self.hist, self.long_hist, self.rank_hist, self.rank_long_hist = new, new_long, new_rank, new_rank_long
        # Among many cells some cell is flagged in k of n steps by chance alone (DetectorParams.many_cells)
        base = self.base_p
        many = len(ranks) * len(keys) > base.many_cells
        self.p = replace(base, k=base.k + 1, n=base.n + 1) if many else base
        self.counts, self.rank_counts = self._window(new, self.p.n), self._window(new_rank, self.p.n)
        self.long_counts = self._window(new_long, self.p.long_n)
        self.rank_long_counts = self._window(new_rank_long, self.p.long_n)
        self.rank_ids, self.col_keys = ranks, keys
        self.rank_index = {int(r): i for i, r in enumerate(ranks)}
        names = m.module_names
        self.col_names = [_column_name(k, names) for k in keys.tolist()]
        self.col_index = {name: j for j, name in enumerate(self.col_names)}
        for track in self.tracks.values():
            self._realign_track(track, keys)

    def _window(self, hist: np.ndarray, n: int) -> np.ndarray:
        """Counts over the last n written slots of a ring whose next slot is self.pos."""
        idx = [(self.pos - 1 - i) % self.span for i in range(n)]
        return hist[idx].sum(axis=0, dtype=np.int16)

    @staticmethod
    def _realign_track(track: _Track, keys: np.ndarray) -> None:
        excess, ratio, held = _empty_rings(track.excess.shape[0], len(keys))
        _, nc, oc = np.intersect1d(keys, track.keys, assume_unique=True, return_indices=True)
        excess[:, nc], ratio[:, nc], held[:, nc] = track.excess[:, oc], track.ratio[:, oc], track.held[:, oc]
        track.keys, track.excess, track.ratio, track.held = keys, excess, ratio, held
        if len(track.sig):
            sig, med_e, med_r = np.zeros(len(keys), bool), np.full(len(keys), np.nan), np.full(len(keys), np.nan)
            sig[nc], med_e[nc], med_r[nc] = track.sig[oc], track.med_excess[oc], track.med_ratio[oc]
            track.sig, track.med_excess, track.med_ratio = sig, med_e, med_r

    def _push(self, cell_flags: np.ndarray, paid_for: np.ndarray, rank_wide: np.ndarray, rank_paid: np.ndarray) -> None:
        """Write this step's flags over the oldest slot; the counts drop the slots leaving their windows."""
        out_long = (self.pos - min(self.p.long_n, self.span)) % self.span
        out_short = (self.pos - self.p.n) % self.span
        self.long_counts -= self.long_hist[out_long]
        self.counts -= self.hist[out_short]
        self.rank_long_counts -= self.rank_long_hist[out_long]
        self.rank_counts -= self.rank_hist[out_short]
        self.hist[self.pos] = cell_flags
        self.long_hist[self.pos] = paid_for
        self.rank_hist[self.pos] = rank_wide
        self.rank_long_hist[self.pos] = rank_paid
        self.counts += cell_flags
        self.long_counts += paid_for
        self.rank_counts += rank_wide
        self.rank_long_counts += rank_paid
        self.pos = (self.pos + 1) % self.span

    # ---- per step -------------------------------------------------------------------------

    def update(self, m: StepMatrix, x: np.ndarray, step_keys: np.ndarray, flags) -> list[Episode]:
        self._align(m, step_keys)
        self._module_names = m.module_names
        self._cpu_clock = bool(m.cpu_clock)
        flagged = flags.flagged
        runs = np.count_nonzero(~np.isnan(x), axis=1)
        rank_wide = (runs >= 4) & (2 * flagged.sum(axis=1) > runs)
        rank_wide |= self._slow_everywhere(m, x, flags)
        cell_flags = flagged & ~rank_wide[:, None]
        with np.errstate(all="ignore"):  # NaN arithmetic only: no warning to catch
            k = np.asarray(m.self_ms).shape[1]
            total_excess = excess_sums(x[:, :k], flags.median[:k])
        # ... and a rank slow everywhere now and then must lose the job what a step-level cause must: on shared
        # cores a rank's modules all run a few % longer in CPU time for a step or two (4-5 ms in a 35 ms step).
        wall_med = nan_median(m.wall_ms) if len(m.wall_ms) else 0.0
        bar = self.p.step_bar(wall_med)
        rank_paid = rank_wide & (flags.paid_ms >= 0.5 * total_excess) & (total_excess > bar)
        self._push(cell_flags, cell_flags & flags.waited, rank_wide, rank_paid)

        wall = np.asarray(m.wall_ms, dtype=np.float64)
        wait = nan_to(m.sync_wait_ms)
        idle = m.idle_or_tail_ms
        wall = nan_to(wall)
        floor = self._floor(wall)
        self._floor_ms = max(floor, 0.05)
        step = _Step(
            m,
            x,
            flags,
            rank_wide,
            wall,
            wait,
            idle,
            floor,
            median(wall) if len(wall) else 0.0,
            np.argsort(idle, kind="stable"),
        )

        stepped: list[_Track] = []
        for key, track in list(self.tracks.items()):
            self._advance(track, step)
            stepped.append(track)
            if track.episode.state == "resolved":
                del self.tracks[key]
                self._forget(track.ranks)
        opened = self._open(step)
        new = {id(ep) for ep in opened}  # by identity: comparing Episode dataclasses field by field is slow
        # a track an opening replaced (it listed nothing) is gone: no loss, no verdict
        live = {id(t) for t in self.tracks.values()}
        stepped = [t for t in stepped if t.episode.state == "resolved" or id(t) in live]
        stepped += [t for t in self.tracks.values() if id(t.episode) in new]
        # A step for the baseline: nothing flagged, and no episode but intermittent ones not slow now. Between an
        # intermittent straggler's slow steps the job runs at its own pace, which drifts on a shared host.
        # A step-level flag within twice its bar (5-10 % of the step) is the bar's own margin over a shared host's
        # spikes, not a slow step: the baseline keeps it (the mean of the quiet steps is the job's pace).
        with np.errstate(invalid="ignore"):
            loud_steps = flagged[:, k:] & ((x[:, k:] - flags.median[k:]) > 2 * bar)
        quiet = not flagged[:, :k].any() and not loud_steps.any()
        quiet = quiet and all(self._intermittent(t) and t.last_slow != m.step for t in self.tracks.values())
        self._losses(stepped, step, quiet)
        for t in stepped:
            if t.judged is not None:
                self._verdict(t, *t.judged)
                t.judged = None
        # A track popped by a host's roll-up was stepped first: its resolved episode is told once, like any other.
        return [t.episode for t in stepped if t.published]

    def _losses(self, tracks: list[_Track], s: _Step, quiet: bool) -> None:
        """Each track's loss this step: its what-if (excess bounded by its peers' wait), scaled so that
        what all culprits together explain is what the job's step time really grew by over the steps before.

        Module compute is CPU time on the CPU clock; what the job loses is wall time, which on a host
        whose cores are shared runs longer than the compute behind it (by 0-30 % on 2 cores, measured
        under DDP, FSDP2, FSDP1). The job's step time against its median before any episode measures
        that; with no baseline (yet) the what-if stands."""
        job_wall = s.wall_med
        pace = median(list(self.pace)) if len(self.pace) >= 3 else 0.0
        self.pace.append(job_wall)
        if quiet and job_wall > 0 and not self._job_paused(job_wall, pace, 0.0):
            self.baseline.append((s.m.step, job_wall, s.m.ranks, s.idle))
            while len(self.baseline) > BASELINE_STEPS:
                self.baseline.popleft()
        pending = [t for t in tracks if t.pending is not None]
        if not pending:
            return
        # With every culprit at its peers' pace the step would end at the first non-culprit's finish:
        # the most any culprit's excess would give back, bounded by what the non-culprits waited.
        culprits = sorted({r for t in pending for r in t.pending[3]})
        others = np.delete(np.arange(len(s.idle)), culprits)

        def gives_back(t: _Track) -> float:
            if not len(others):
                return t.pending[0]
            rows = t.pending[3]
            idle_gap = float(s.idle[others].min()) - float(s.idle[rows].min())
            tail_gap = float(s.wait[others].min()) - float(s.wait[rows].min())
            return min(t.pending[1], max(idle_gap, tail_gap))

        given = [gives_back(t) for t in pending]
        for t, g in zip(pending, given):
            t.held_back.append(g)
            if len(t.held_back) > self.p.cost_steps:
                t.held_back.popleft()
        explained = max(given)
        counted = len(self.baseline) >= MIN_BASELINE and explained > self._floor_ms
        # The pace without the culprits, for the pause: the recent pace already holds what they cost, and with it
        # 3x an evaluation step (a kept DDP job: 194-214 ms against a pace of 54, of which 29 were the culprit's)
        # read as growth and scaled a 27 ms loss to 38.6.
        base = self._baseline_now() if counted else 0.0
        if counted and not self._job_paused(job_wall, min(pace, base), explained):
            self.growth.append((job_wall - base, explained))
        # One scale from the sums over recent slow steps, not a ratio per step: a step's growth moves by tens
        # of ms on a loaded host, and each ratio clipped to [0, 2] would pull every cost towards the compute.
        grew, explained_sum = (sum(col) for col in zip(*self.growth)) if self.growth else (0.0, 0.0)
        self.scale = min(max(grew / explained_sum, 0.0), MAX_WALL_SCALE) if explained_sum > 0 else 1.0
        for t in pending:
            self._record_loss(t, t.pending[0], t.pending[2])
            t.pending = None

    @staticmethod
    def _job_paused(job_wall: float, pace: float, explained: float) -> bool:
        """The job's step took far longer than its pace and than its culprits can explain (see PAUSE_FACTOR)."""
        return pace > 0 and job_wall > PAUSE_FACTOR * pace + MAX_WALL_SCALE * explained

    def _unquiet(self, ranks) -> None:
        """A new episode's onset leaves the baseline: the last quiet steps in which its peers already waited for its
        ranks (a whole rank slow a little in each module, which no cell's flag says until k of n steps)."""
        while self.baseline:
            step, wall, ids, idle = self.baseline[-1]
            mine = np.isin(ids, ranks)
            if mine.all() or not mine.any():
                return
            bar = self.p.step_bar(wall)
            if float(idle[~mine].min()) - float(idle[mine].min()) <= bar:
                return
            self.baseline.pop()

    def _baseline_now(self) -> float:
        """The job's step time without the stragglers: the mean of the quiet steps before the episodes (a loss per step
        is a difference of means: on a shared host the step time is skewed or bimodal, 90 and 150 ms, and a median of
        few steps lands on one mode, then a faster spell after the onset reads as negative growth and the scale as 0),
        or, while only intermittent ones are open, the median of the last few between their slow steps (the job's
        pace right before the slow step: on a shared host it drifts by more over a run than a 1-in-3 straggler costs).
        """
        if self.tracks and all(self._intermittent(t) for t in self.tracks.values()):
            return median([b[1] for b in list(self.baseline)[-LOCAL_BASELINE_STEPS:]])
        return sum(b[1] for b in self.baseline) / len(self.baseline)

    def _slow_everywhere(self, m: StepMatrix, x: np.ndarray, flags) -> np.ndarray:
        """Ranks slower than the median in most of their modules, by a total that matters: a whole
        rank slowed a little in each module (a slower core, a throttled clock), where no one cell
        clears the floors. Victims (waiting more than the median rank) are not. Of two ranks, slower than the
        other: their median is the mean of both, halfway to the culprit (2-rank jobs with a rank 40 ms slow in
        every module, 1.25 ms in each, got no verdict under DDP, FSDP2 or FSDP1)."""
        if len(x) < 2:
            return np.zeros(len(x), dtype=bool)
        k = np.asarray(m.self_ms).shape[1]
        with np.errstate(all="ignore"):  # NaN arithmetic only: no warning to catch
            peers = x[::-1, :k] if len(x) == 2 else flags.median[:k]
            diff = x[:, :k] - peers
            runs = np.count_nonzero(~np.isnan(diff), axis=1)
            # three in five of its modules above the hold ratio: slow everywhere, not in a few. (Not three in four:
            # under FSDP2 the containers' self time is the wrapper's own work, 1-2 ms of it, which a rank slow in
            # every leaf does not stretch: 23 of 82 columns.)
            spread = row_percentiles(x[:, :k] / peers, 40) > self.p.hold_ratio
            total = np.nansum(diff, axis=1)
            wall_med = nan_median(m.wall_ms) if len(m.wall_ms) else 0.0
            wait = nan_to(m.sync_wait_ms)
        floor = max(3 * (self.p.min_excess_ms or 0.0), WHOLE_RANK_FRAC * (wall_med if np.isfinite(wall_med) else 0.0))
        not_victim = wait <= (median(wait) if len(wait) else 0.0) + max(self.p.sync_tol_ms, 0.02 * wall_med)
        # ... but the rank every other waited for longer, in any phase, is none, whatever its tail (as in the
        # detector's flags): under FSDP2 a rank 40 ms slow in every module waited 7-23 ms in its backward tail
        # against its peers' 4-10 while they waited 76-98 ms in all against its 43-62 (a kept job: found 7 steps late)
        idle = m.idle_or_tail_ms
        if len(idle):
            not_victim |= idle <= idle.min()
        return (runs >= 8) & spread & (total > floor) & not_victim

    def _floor(self, wall: np.ndarray) -> float:
        """The least excess a listed entry must carry (the opening floors)."""
        return self.p.excess_floor(nan_median(wall) if len(wall) else 0.0)

    def _figures(self, track: _Track, s: _Step):
        """This step's figures for a track: (rows, its excess and ratio per column, the cap on the
        job's loss), or None when the rank (or every peer) is gone."""
        rows = [self.rank_index[r] for r in track.ranks if r in self.rank_index]
        if not rows or len(rows) == len(s.x):
            return None
        with _quiet():
            # Among many ranks the culprit barely moves the median: the step's column medians
            # serve every track; a few ranks need the median of the others.
            many = len(s.x) - len(rows) >= 8
            peer_med = s.flags.median if many else nan_column_medians(np.delete(s.x, rows, axis=0))
            if len(rows) == 1:  # a rank: its own row (nanmax/nanmedian of one row is the row, at 10x the cost)
                excess = s.x[rows[0]] - peer_med
                ratio = s.x[rows[0]] / peer_med
            else:
                excess = np.nanmax(s.x[rows], axis=0) - peer_med  # the job waits for the slowest member
                ratio = nan_column_medians(s.x[rows]) / peer_med  # a host's typical member
        # Synchronous training: the step would shorten by the culprit's excess, but only down to
        # the next slowest rank's finish: the least any peer waited (in any phase), minus what the
        # culprit itself waited. Unsynchronised steps: the wall gap. The job cannot lose more.
        members = set(rows)
        peer_idle = float(s.idle[next(i for i in s.idle_order.tolist() if i not in members)])
        peer_wall = s.wall_med if many else median(np.delete(s.wall, rows))
        wall_cap = float(s.wall[rows].max()) - peer_wall
        # The backward tail alone, too: on a loaded host a culprit preempted in its slow module shows that wall
        # as idle (wall minus its compute), which cuts the idle gap; its peers' wait in the tail it does not cut.
        peer_wait = float(np.delete(s.wait, rows).min())
        tail_cap = peer_wait - float(s.wait[rows].min())
        cap = max(peer_idle - float(s.idle[rows].min()), tail_cap, wall_cap, 0.0)
        return rows, excess, ratio, cap

    def _summarise(self, track: _Track, floor: float) -> None:
        """Medians over the recorded slow steps, and the significant columns: held in at least half
        of them, with a median excess above the floor."""
        recorded = min(track.slow_steps, track.excess.shape[0])
        with _quiet():  # a column absent in a recorded step has no median: it drops out
            track.med_excess = np.median(track.excess[:recorded], axis=0)
            track.med_ratio = np.median(track.ratio[:recorded], axis=0)
        often = 2 * track.held[:recorded].sum(axis=0) >= recorded
        whole = self._wide_share(track) >= 0.5  # slow everywhere: a little in each module counts
        track.sig = often & (nan_to(track.med_excess, -1.0) > (0.0 if whole else floor))

    def _advance(self, track: _Track, s: _Step, opening: bool = False) -> None:
        ep = track.episode
        track.steps += 1
        fig = self._figures(track, s)
        now = False
        if fig is not None:
            rows, excess, ratio, cap = fig
            sig = track.sig if len(track.sig) == len(track.keys) else np.zeros(len(track.keys), bool)
            if not track.slow_steps:  # restored after a collector restart: its module until it has figures
                c = self.col_index.get((ep.module, ep.phase))
                if c is not None and c < len(sig):
                    sig = sig.copy()
                    sig[c] = True
            wide = bool(s.rank_wide[rows].any())
            # Slow now: across the rank, or in a listed column (lower bars, and half the floor: a 0.1 ms
            # module 2x its median is no slow step). A spike elsewhere keeps no episode open; a module that
            # joins a slow rank is recorded with its slow steps.
            held_now = s.flags.held[rows].any(axis=0) & (nan_to(excess) > 0.5 * s.floor)
            now = opening or wide or bool(held_now[sig].any())
            if now:
                slot = track.pos % track.excess.shape[0]
                track.excess[slot], track.ratio[slot] = excess, ratio
                track.held[slot] = s.flags.held[rows].any(axis=0) | s.flags.flagged[rows].any(axis=0)
                track.wide[slot] = wide
                track.pos += 1
                track.slow_steps += 1
                self._summarise(track, s.floor)
                sig = track.sig
            whole = self._wide_share(track) >= 0.5
            step_excess = float(np.nansum(excess)) if whole else float(np.nansum(excess[sig]))
            step_excess = max(step_excess, 0.0)
            track.pending = (min(step_excess, cap), step_excess, s.wall, rows)  # the loss is set in _losses
            if not now:
                track.between.append(step_excess)
                if len(track.between) > self.p.cost_steps:
                    track.between.popleft()
            track.judged = (sig, whole)
        if now:
            if not opening:
                track.max_gap = max(track.max_gap, min(s.m.step - track.last_slow, MAX_GAP))
            track.clean = 0
            track.last_slow = ep.last_step = s.m.step
        else:  # a rank gone, or its module gone, no longer slows the job either
            track.clean += 1
            if track.clean >= max(self.p.n, 2 * track.max_gap):
                ep.state = "resolved"

    @staticmethod
    def _intermittent(track: _Track) -> bool:
        """Slow in a minority of its steps (1 in 2 at most), once it has run long enough to tell, and at its peers'
        pace in the others. A rank slow in every step whose excess only clears the bars in some (its peers' own
        times swing by as much on a shared host) is persistent: between its slow steps it still carries half of
        what it carries in them."""
        if track.steps < 6 or 1.5 * track.slow_steps >= track.steps:
            return False
        between = sorted(track.between)
        return len(between) < 4 or between[len(between) // 2] < 0.5 * track.episode.excess_ms

    def _wide_share(self, track: _Track) -> float:
        recorded = min(track.slow_steps, len(track.wide))
        return float(track.wide[:recorded].mean()) if recorded else 0.0

    def _record_loss(self, track: _Track, loss: float, wall: np.ndarray) -> None:
        track.losses.append(loss)
        track.walls.append(median(wall) if len(wall) else 0.0)
        while len(track.losses) > self.p.cost_steps:
            track.losses.popleft()
            track.walls.popleft()
        ep = track.episode
        ep.cost_ms_per_step = float(np.mean(track.losses)) * self.scale
        wall_med = median(track.walls)
        ep.cost_pct = 100.0 * ep.cost_ms_per_step / wall_med if wall_med > 0 else 0.0

    def _verdict(self, track: _Track, sig: np.ndarray, whole: bool) -> None:
        """The episode's listed entries, excess, slowdown and cause from its slow steps."""
        ep = track.episode
        med_excess, med_ratio = track.med_excess, track.med_ratio
        if len(med_excess) != len(sig):
            return
        cols = np.flatnonzero(sig)
        if not len(cols) and not whole:
            return  # nothing over the bars (now): an unreported track stays so, a reported one keeps its listing
        if not track.published and not self._holds_back(track, whole):
            return
        track.published = True
        cols = cols[np.argsort(-med_excess[cols], kind="stable")]
        names = [_column_name(int(track.keys[c]), self._module_names) for c in cols.tolist()]
        ep.modules = [
            {
                "module": name,
                "phase": phase,
                "excess_ms": round(float(med_excess[c]), 3),
                "slowdown": round(float(med_ratio[c]), 3) if np.isfinite(med_ratio[c]) else None,
            }
            for (name, phase), c in zip(names, cols.tolist())
        ][:MAX_LISTED]
        recorded = min(track.slow_steps, track.excess.shape[0])
        rings = track.excess[:recorded] if whole else track.excess[:recorded, sig]
        ep.excess_ms = float(np.median(np.nansum(rings, axis=1))) if recorded else 0.0
        c = self.col_index.get((ep.module, ep.phase))
        if c is not None and c < len(med_ratio) and np.isfinite(med_ratio[c]):
            ep.slowdown = float(med_ratio[c])
        ep.cause = self._cause(track, names, whole)

    def _holds_back(self, track: _Track, whole: bool) -> bool:
        """Whether an unreported track is reported now: a whole rank once it stays slow (k slow steps, the opening
        one included), and on the CPU clock, where the peers' waits are known in every phase, any track once it
        has cost the job more than the excess floor, this step included: what the ranks no episode holds waited
        for it, on average over its steps (other culprits slow in the same steps do not hide it), times the wall
        the job really lost per ms of such waits (the scale). On shared cores a rank's loop code spikes 8x in 3
        steps of 5, or its every module runs long in CPU time for 2-3 steps, when a busy neighbour shares its core:
        that cost the job a few ms once, or nothing, and is over before a user could look (clean DDP jobs: 5.3 ms
        of host time over in one step, 0.0 per step; a whole rank 1.3-2.3x for 3 steps, 0.44 ms, then 0.0)."""
        if whole and track.slow_steps < self.p.k:
            return False
        if not self._cpu_clock:
            return True
        return bool(track.held_back) and float(np.mean(track.held_back)) * self.scale > self._floor_ms

    def _cause(self, track: _Track, names: list[tuple[str, str]], whole: bool) -> str:
        ep = track.episode
        if ep.rank == -1:
            text = f"whole host {ep.host}"
        elif whole:
            text = "whole rank"
        else:
            parts = []
            modules = len({name for name, phase in names if phase in ("forward", "backward", "recompute")})
            for _name, phase in names:
                step_cause = STEP_CAUSES.get(phase)
                if step_cause is not None and step_cause not in parts:
                    parts.append(step_cause)
                elif step_cause is None and not any(p.startswith("compute") for p in parts):
                    parts.append(f"compute in {modules} module" + ("s" if modules > 1 else ""))
            text = " + ".join(parts) or "compute"
        if self._intermittent(track):
            text += f", intermittent (1 step in {max(2, round(track.steps / track.slow_steps))})"
        return text

    # ---- opening ------------------------------------------------------------------------------

    def _track(self, ep: Episode, ranks, last_slow: int) -> _Track:
        """A track for an episode, its rings empty, indexed by the book's columns now."""
        excess, ratio, held = _empty_rings(self.p.smooth_steps, len(self.col_keys))
        wide = np.zeros(self.p.smooth_steps, bool)
        return _Track(ep, sorted(ranks), self.col_keys, excess, ratio, held, wide, last_slow=last_slow)

    def _busy_ranks(self) -> set[int]:
        """Ranks in a reported episode, or in one that lists entries and waits only for its cost to clear the floor
        (see _holds_back): a new episode in its place would leave it open and unseen, to be told later beside the
        new one. One with nothing over the bars in its slow steps (noise before an onset, say) does not hold its
        rank: new evidence opens a new episode in its place."""
        return {r for t in self.tracks.values() if t.published or self._listing(t) for r in t.ranks}

    def _listing(self, track: _Track) -> bool:
        return bool(track.sig.any()) or (track.slow_steps > 0 and self._wide_share(track) >= 0.5)

    def _new_track(self, s: _Step, rank: int, host: str, c: int, ranks) -> Episode:
        module, phase = self.col_names[c]
        ep = Episode(
            job=self.job,
            rank=rank,
            host=host,
            module=module,
            phase=phase,
            slowdown=1.0,
            first_step=s.m.step,
            last_step=s.m.step,
            state="active",
            cost_ms_per_step=0.0,
            ranks=sorted(ranks),
            attempt=getattr(s.m, "attempt", 0) or 0,
        )
        track = self._track(ep, ranks, s.m.step)
        track.max_gap = self._period(ranks, c)
        self._advance(track, s, opening=True)
        self.tracks[_key(rank, host)] = track
        self._unquiet(track.ranks)
        self._forget(track.ranks)
        return ep

    def _period(self, ranks, c: int) -> int:
        """The longest gap between the flagged steps (the cell's, or the rank's as a whole) that opened an
        episode, over the rate rule's window: an intermittent straggler's period from its first evidence, so
        that it is not resolved between its first slow steps (one spell without a flag is no stop)."""
        rows = [self.rank_index[r] for r in ranks if r in self.rank_index]
        if not rows:
            return 1
        order = [(self.pos - self.p.long_n + i) % self.span for i in range(min(self.p.long_n, self.span))]
        seen = self.long_hist[:, rows, c][order].any(axis=1) | self.rank_long_hist[:, rows][order].any(axis=1)
        steps = np.flatnonzero(seen)
        # at most the period long_k flags in long_n steps can have: an old stray flag sets no long period
        most = self.p.long_n // self.p.long_k + 1
        return int(min(np.diff(steps).max(), most)) if len(steps) >= 2 else 1

    def _forget(self, ranks) -> None:
        """An opened episode consumes its ranks' flag history: once it closes, a new one needs new evidence."""
        rows = [self.rank_index[r] for r in ranks if r in self.rank_index]
        self.hist[:, rows] = False
        self.long_hist[:, rows] = False
        self.rank_hist[:, rows] = False
        self.rank_long_hist[:, rows] = False
        for counts in (self.counts, self.long_counts, self.rank_counts, self.rank_long_counts):
            counts[rows] = 0

    def _open(self, s: _Step) -> list[Episode]:
        """Open an episode for each rank flagged now whose cell (or whole rank) was flagged in k of
        the last n steps, or in long_k of the last long_n, and that is not reported yet.

        The steps counted are either a cell's own (its rank otherwise normal) or the rank's, slow
        across most of its columns; spikes of one kind do not add to the other's.
        """
        p = self.p
        # The rate rule is for modules: wall-time step columns (data, optimizer) see preemption
        # spikes now and then on shared cores, and open only on k of the last n steps. Garbage collection is
        # timed only while a collection runs (0 otherwise), so it has no such spikes: a rank whose full
        # collections come every few steps is an intermittent straggler like a module's.
        long = self.long_counts >= p.long_k
        long[:, (self.col_keys < 0) & (self.col_keys != GC_COLUMN)] = False
        enough = (self.counts >= p.k) | long
        rank_enough = (self.rank_counts >= p.k) | (self.rank_long_counts >= p.long_k)
        rows, cols = np.nonzero((enough | rank_enough[:, None]) & s.flags.flagged)
        # A whole rank slow a little everywhere may have no flagged cell: its costliest column.
        busy_now = self._busy_ranks()
        bare = [
            r
            for r in np.flatnonzero(rank_enough & s.rank_wide).tolist()
            if r not in set(rows.tolist()) and int(self.rank_ids[r]) not in busy_now
        ]
        if bare:
            k = np.asarray(s.m.self_ms).shape[1]
            with _quiet():
                best = np.nanargmax(nan_to(s.x[bare, :k] - s.flags.median[:k], -np.inf), axis=1)
            rows, cols = np.concatenate([rows, bare]).astype(np.int64), np.concatenate([cols, best]).astype(np.int64)
        if not len(rows):
            return []
        busy = np.isin(self.rank_ids[rows], list(self._busy_ranks()))
        rows, cols = rows[~busy], cols[~busy]  # ranks already reported stay in their episode
        opened: list[Episode] = []
        excess = s.x[rows, cols] - s.flags.median[cols]
        cells: dict[int, list[tuple[float, int]]] = {}  # rank -> its (excess, column) now
        for r, c, e in zip(rows.tolist(), cols.tolist(), excess.tolist()):
            cells.setdefault(int(self.rank_ids[r]), []).append((e, c))
        if p.host_rollup and cells:
            opened += self._roll_up_hosts(s, cells)
        for rank, flagged_cells in cells.items():
            _, c = max(flagged_cells)  # the column that carries the most excess
            opened.append(self._new_track(s, rank, s.m.hosts[self.rank_index[rank]], c, [rank]))
        return opened

    def _roll_up_hosts(self, s: _Step, cells) -> list[Episode]:
        """> half of a host's ranks (at least 2) slow in one column: one host episode replaces theirs.

        Only a host with peers elsewhere can be slower than its peers: on a one-host job every
        rank shares the host, and ranks slow in unrelated columns are noise, not a node problem.
        """
        m = s.m
        host_size: dict[str, int] = {}
        for h in m.hosts:
            host_size[h] = host_size.get(h, 0) + 1
        if len(host_size) < 2:
            return []
        alone = {t.episode.rank: t for t in self.tracks.values() if t.episode.rank != -1}
        voters: dict[tuple[str, int], set[int]] = {}  # (host, column) -> ranks slow there
        for rank, flagged in cells.items():
            host = m.hosts[self.rank_index[rank]]
            for _, c in flagged:
                voters.setdefault((host, c), set()).add(rank)
        for rank, t in alone.items():
            c = self.col_index.get((t.episode.module, t.episode.phase))
            if c is not None:
                voters.setdefault((t.episode.host, c), set()).add(rank)
        opened = []
        done: set[str] = set()
        for (host, c), members in sorted(voters.items(), key=lambda kv: -len(kv[1])):
            if host in done or len(members) < 2 or 2 * len(members) <= host_size[host]:
                continue
            done.add(host)
            for rank in members & set(alone):
                t = self.tracks.pop(_key(rank, ""))
                t.episode.state = "resolved"
                if t.published:
                    opened.append(t.episode)
            for rank in members:
                cells.pop(rank, None)
            opened.append(self._new_track(s, -1, host, c, members))
        return opened

    # ---- queries and restart --------------------------------------------------------------

    def active(self) -> list[Episode]:
        return [t.episode for t in self.tracks.values() if t.published]

    def restore(self, episodes: list[Episode]) -> None:
        for ep in episodes:
            if ep.state != "active":
                continue
            ranks = list(ep.ranks) if ep.rank == -1 else [ep.rank]
            track = self._track(ep, ranks, ep.last_step)
            track.published = True
            track.losses.append(ep.cost_ms_per_step)  # as it was scaled: the scale starts at 1 again
            track.walls.append(100.0 * ep.cost_ms_per_step / ep.cost_pct if ep.cost_pct else 0.0)
            self.tracks[_key(ep.rank, ep.host)] = track
