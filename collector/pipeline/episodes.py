"""Straggler episodes from per-step flags: hysteresis, one episode per culprit, host roll-up, cost.

The flag history is a ring of the last n steps' (ranks x columns) flag matrices with a running
count, so k-of-n is one vectorized add and subtract per step. Only cells that reach k (few) and
the active episodes (few) are visited in Python.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from modtrack.collector.records import PHASE_NAMES, Episode, StepMatrix, column_key


@dataclass
class _Track:
    """An active episode and the running figures behind its smoothed slowdown and cost."""

    episode: Episode
    ranks: list[int]
    clean: int = 0  # consecutive steps without a flag
    slowdowns: deque = field(default_factory=deque)
    costs: deque = field(default_factory=deque)
    pcts: deque = field(default_factory=deque)


def _key(rank: int, host: str, module: str, phase: str) -> tuple:
    return (rank, host if rank == -1 else "", module, phase)


class EpisodeBook:
    def __init__(self, job: str, params):
        self.job = job
        self.p = params
        self.hist: np.ndarray | None = None  # (n, R, K) bool flags of the last n steps
        self.counts: np.ndarray | None = None  # (R, K) uint8 flagged steps among the last n
        # A step in which most of a rank's columns are flagged is one piece of evidence that the
        # rank is slow, not evidence that each of its cells is: it is counted here, not in counts.
        self.rank_hist: np.ndarray | None = None  # (n, R) bool rank-wide steps of the last n
        self.rank_counts: np.ndarray | None = None  # (R,) uint8
        self.pos = 0
        self.rank_ids = np.empty(0, np.int64)
        self.col_keys = np.empty(0, np.int64)
        self.rank_index: dict[int, int] = {}
        self.col_index: dict[tuple[str, str], int] = {}
        self.col_names: list[tuple[str, str]] = []
        self.tracks: dict[tuple, _Track] = {}

    # ---- bookkeeping of ranks and columns that come and go -------------------------------

    def _align(self, m: StepMatrix) -> None:
        """Keep the flag history indexed like this matrix (ranks leave, modules appear)."""
        ranks = np.asarray(m.ranks, np.int64)
        keys = column_key(np.asarray(m.column_module, np.int64), np.asarray(m.column_phase, np.int64))
        if (
            self.hist is not None
            and np.array_equal(ranks, self.rank_ids)
            and np.array_equal(keys, self.col_keys)
        ):
            return
        new = np.zeros((self.p.n, len(ranks), len(keys)), bool)
        new_rank = np.zeros((self.p.n, len(ranks)), bool)
        if self.hist is not None:
            _, nr, orr = np.intersect1d(ranks, self.rank_ids, assume_unique=True, return_indices=True)
            _, nc, oc = np.intersect1d(keys, self.col_keys, assume_unique=True, return_indices=True)
            new[:, nr[:, None], nc] = self.hist[:, orr[:, None], oc]
            new_rank[:, nr] = self.rank_hist[:, orr]
        self.hist, self.rank_hist = new, new_rank
        self.counts = new.sum(axis=0, dtype=np.uint8)
        self.rank_counts = new_rank.sum(axis=0, dtype=np.uint8)
        self.rank_ids, self.col_keys = ranks, keys
        self.rank_index = {int(r): i for i, r in enumerate(ranks)}
        names = m.module_names
        self.col_names = [
            (names[mid] if 0 <= mid < len(names) else f"module#{mid}", PHASE_NAMES.get(ph, str(ph)))
            for mid, ph in zip(np.asarray(m.column_module).tolist(), np.asarray(m.column_phase).tolist())
        ]
        self.col_index = {name: j for j, name in enumerate(self.col_names)}

    # ---- per step -------------------------------------------------------------------------

    def update(self, m: StepMatrix, flags) -> list[Episode]:
        self._align(m)
        flagged = flags.flagged
        x = np.asarray(m.self_ms, dtype=np.float64)
        runs = np.count_nonzero(~np.isnan(x), axis=1)
        rank_wide = (runs >= 4) & (2 * flagged.sum(axis=1) > runs)
        cell_flags = flagged & ~rank_wide[:, None]
        self.counts -= self.hist[self.pos]
        self.hist[self.pos] = cell_flags
        self.counts += cell_flags
        self.rank_counts -= self.rank_hist[self.pos]
        self.rank_hist[self.pos] = rank_wide
        self.rank_counts += rank_wide
        self.pos = (self.pos + 1) % self.p.n

        wall = np.asarray(m.wall_ms, dtype=np.float64)
        wait = np.nan_to_num(np.asarray(m.sync_wait_ms, dtype=np.float64))
        wall_med = float(np.nanmedian(wall)) if len(wall) else 0.0
        wall_cap = float(np.nanmax(wall)) - wall_med if len(wall) else 0.0

        changed: list[Episode] = []
        for key, track in list(self.tracks.items()):
            self._advance(track, m, x, flags.held, wait, wall_med, wall_cap)
            changed.append(track.episode)
            if track.episode.state == "resolved":
                del self.tracks[key]
        changed += self._open(m, x, flags, wait, wall_med, wall_cap)
        return changed

    def _figures(self, track, x, c, wait, wall_med, wall_cap):
        """This step's slowdown (vs. peers' median), cost in ms and % for a track's column."""
        rows = [self.rank_index[r] for r in track.ranks if r in self.rank_index]
        col = x[:, c]
        mine = col[rows]
        mine = mine[~np.isnan(mine)]
        if not len(mine):
            return None
        others = np.delete(col, rows)
        others = others[~np.isnan(others)]
        if not len(others):
            return None
        peer_med = float(np.median(others))
        excess = float(mine.max()) - peer_med
        # Synchronous training: the step would shorten by the excess, but only down to the
        # next slowest rank's finish (the least any peer waited, minus what the culprit waited).
        # Unsynchronised steps: the wall gap. The job cannot lose more than that.
        peer_wait = float(np.delete(wait, rows).min()) if len(wait) > len(rows) else 0.0
        cap = max(wall_cap, peer_wait - float(wait[rows].min()), 0.0)
        cost = min(max(excess, 0.0), cap)
        slowdown = float(np.median(mine)) / peer_med if peer_med > 0 else float("inf")
        pct = 100.0 * cost / wall_med if wall_med > 0 else 0.0
        return slowdown, cost, pct

    def _record(self, track, figures) -> None:
        if figures is None:
            return
        ep = track.episode
        for buf, value in zip((track.slowdowns, track.costs, track.pcts), figures):
            buf.append(value)
            while len(buf) > self.p.smooth_steps:
                buf.popleft()
        ep.slowdown = float(np.median(track.slowdowns))
        ep.cost_ms_per_step = float(np.median(track.costs))
        ep.cost_pct = float(np.median(track.pcts))

    def _advance(self, track, m, x, held, wait, wall_med, wall_cap) -> None:
        ep = track.episode
        c = self.col_index.get((ep.module, ep.phase))
        now = False
        if c is not None:
            rows = [self.rank_index[r] for r in track.ranks if r in self.rank_index]
            now = bool(held[rows, c].any()) if rows else False
            if now:  # figures of the steps it is slow in: the smoothed slowdown does not fade
                self._record(track, self._figures(track, x, c, wait, wall_med, wall_cap))
        if now:
            track.clean = 0
            ep.last_step = m.step
        else:  # a rank gone, or its module gone, no longer slows the job either
            track.clean += 1
            if track.clean >= self.p.n:
                ep.state = "resolved"

    def _busy_ranks(self) -> set[int]:
        return {r for t in self.tracks.values() for r in t.ranks}

    def _new_track(self, m, rank, host, c, ranks, x, wait, wall_med, wall_cap) -> Episode:
        module, phase = self.col_names[c]
        ep = Episode(
            job=self.job, rank=rank, host=host, module=module, phase=phase, slowdown=1.0,
            first_step=m.step, last_step=m.step, state="active", cost_ms_per_step=0.0,
            ranks=sorted(ranks),
        )
        track = _Track(ep, sorted(ranks))
        self._record(track, self._figures(track, x, c, wait, wall_med, wall_cap))
        self.tracks[_key(rank, host, module, phase)] = track
        return ep

    def _open(self, m, x, flags, wait, wall_med, wall_cap) -> list[Episode]:
        """Open episodes for cells flagged now and in k of the last n steps, not yet reported.

        The k steps are either the cell's own (its rank otherwise normal) or the rank's, slow
        across most of its columns; spikes of one kind do not add to the other's.
        """
        enough = (self.counts >= self.p.k) | (self.rank_counts >= self.p.k)[:, None]
        rows, cols = np.nonzero(enough & flags.flagged)
        if not len(rows):
            return []
        busy = np.isin(self.rank_ids[rows], list(self._busy_ranks()))
        rows, cols = rows[~busy], cols[~busy]  # ranks already reported stay in their episode
        opened: list[Episode] = []
        hosts = m.hosts
        excess = x[rows, cols] - flags.median[cols]
        cells: dict[int, list[tuple[float, int]]] = {}  # rank -> its (excess, column) now
        for r, c, e in zip(rows.tolist(), cols.tolist(), excess.tolist()):
            cells.setdefault(int(self.rank_ids[r]), []).append((e, c))
        if self.p.host_rollup and cells:
            opened += self._roll_up_hosts(m, cells, x, wait, wall_med, wall_cap)

        for rank, flagged_cells in cells.items():
            _, c = max(flagged_cells)  # the column that carries the most excess
            r = self.rank_index[rank]
            opened.append(self._new_track(m, rank, hosts[r], c, [rank], x, wait, wall_med, wall_cap))
        return opened

    def _roll_up_hosts(self, m, cells, x, wait, wall_med, wall_cap) -> list[Episode]:
        """> half of a host's ranks (at least 2) slow in one column: one host episode replaces theirs.

        Only a host with peers elsewhere can be slower than its peers: on a one-host job every
        rank shares the host, and ranks slow in unrelated columns are noise, not a node problem.
        """
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
                t = self.tracks.pop(_key(rank, "", alone[rank].episode.module, alone[rank].episode.phase))
                t.episode.state = "resolved"
                opened.append(t.episode)
            for rank in members:
                cells.pop(rank, None)
            opened.append(self._new_track(m, -1, host, c, members, x, wait, wall_med, wall_cap))
        return opened

    # ---- queries and restart --------------------------------------------------------------

    def active(self) -> list[Episode]:
        return [t.episode for t in self.tracks.values()]

    def restore(self, episodes: list[Episode]) -> None:
        for ep in episodes:
            if ep.state != "active":
                continue
            ranks = list(ep.ranks) if ep.rank == -1 else [ep.rank]
            track = _Track(ep, sorted(ranks))
            track.slowdowns.append(ep.slowdown)
            track.costs.append(ep.cost_ms_per_step)
            track.pcts.append(ep.cost_pct)
            self.tracks[_key(ep.rank, ep.host, ep.module, ep.phase)] = track
