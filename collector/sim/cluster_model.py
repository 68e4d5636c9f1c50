"""A synthetic synchronous training job: per-step rank x (module, phase) times, no torch.

Used by the simulator (collector/sim/simulate.py), the detection-quality benchmark and the
detector tests. Each module has a base forward and backward time; every rank's time is that
times log-normal jitter, with rare large spikes (a page fault, a noisy neighbour) on single
cells and whole ranks. DDP-style synchronisation: every rank's step ends when the slowest
rank's compute does, and the difference shows up as that rank's sync wait. With pipeline
stages, each module runs only on the ranks of its stage (NaN elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modtrack.collector.records import StepMatrix
from modtrack.collector.sim.calibration import MeasuredNoise


@dataclass
class Straggler:
    """Ranks slowed by `slowdown` in one module and phase for steps onset <= s < end."""

    ranks: list[int]
    module: int  # -1: every module (a slow GPU, thermal throttling)
    phase: int  # 1 forward, 2 backward (ignored when module is -1)
    slowdown: float
    onset: int
    end: int
    host: str | None = None  # set when the whole host is slow


@dataclass
class ClusterModel:
    ranks: int = 8
    ranks_per_host: int = 8
    modules: int = 20
    stages: int = 1  # pipeline stages; modules and ranks split evenly between them
    sigma: float = 0.03  # log-normal jitter of each cell
    spike_p: float = 0.001  # chance a cell spikes in a step
    rank_spike_p: float = 0.001  # chance a whole rank spikes (every cell) in a step
    spike_max: float = 3.0  # spikes multiply a cell by U(1.5, spike_max)
    other_ms: float = 5.0  # per-step time outside modules (data, optimizer)
    seed: int = 0
    noise_pool: int = 0  # > 0: draw this many noise matrices once and reuse them (big jobs)
    stragglers: list[Straggler] = field(default_factory=list)
    measured: MeasuredNoise | None = None  # set: noise drawn from a real job's (sigma and spikes unused)

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed)
        base = self.rng.lognormal(mean=0.0, sigma=1.0, size=self.modules)  # ~0.2 .. 5 ms
        self.base = np.concatenate([base, 2.0 * base])  # backward about twice the forward
        self.column_module = np.concatenate([np.arange(self.modules)] * 2).astype(np.int64)
        self.column_phase = np.repeat([1, 2], self.modules).astype(np.int64)
        self.hosts = [f"node{r // self.ranks_per_host}" for r in range(self.ranks)]
        self.module_names = [f"Net.layers.{m}" for m in range(self.modules)]
        stage_of_module = np.arange(self.modules) * self.stages // self.modules
        stage_of_rank = np.arange(self.ranks) * self.stages // self.ranks
        runs = stage_of_rank[:, None] == np.concatenate([stage_of_module] * 2)[None, :]
        self.mask = np.where(runs, 1.0, np.nan)  # (R, K): NaN where the rank does not run it

    def host_ranks(self, host: str) -> list[int]:
        return [r for r, h in enumerate(self.hosts) if h == host]

    def column(self, module: int, phase: int) -> int:
        return (phase - 1) * self.modules + module

    def _noise(self) -> np.ndarray:
        """Multiplicative noise of one step: log-normal body, rare spikes of cells and ranks; or a real job's."""
        rng, R, K = self.rng, self.ranks, len(self.base)
        if self.measured is not None and len(self.measured.cell) and len(self.measured.rank):
            return self.measured.draw(rng, self.base, R)
        x = rng.lognormal(0.0, self.sigma, size=(R, K))
        spikes = rng.random((R, K)) < self.spike_p
        x[spikes] *= rng.uniform(1.5, self.spike_max, size=int(spikes.sum()))
        hit = rng.random(R) < self.rank_spike_p
        x[hit] *= rng.uniform(1.5, self.spike_max, size=(int(hit.sum()), 1))
        return x

    def step(self, step: int, present: np.ndarray | None = None) -> StepMatrix:
        """The merged figures of one step; `present` picks the ranks that reported it."""
        R = self.ranks
        rng = self.rng
        if self.noise_pool:
            if not hasattr(self, "pool"):
                self.pool = [self._noise() for _ in range(self.noise_pool)]
            # Shuffled ranks, so a spike drawn once does not come back on the same rank.
            x = self.base[None, :] * self.pool[int(rng.integers(self.noise_pool))][rng.permutation(R)]
        else:
            x = self.base[None, :] * self._noise()
        for s in self.stragglers:
            if s.onset <= step < s.end:
                cols = slice(None) if s.module < 0 else self.column(s.module, s.phase)
                x[s.ranks, cols] *= s.slowdown
        x *= self.mask
        compute = np.nansum(x, axis=1) + self.other_ms * rng.lognormal(0.0, self.sigma, size=R)
        finish = compute.max()
        wait = finish - compute
        wall = np.full(R, finish + 0.2)
        fw = np.nansum(x[:, : self.modules], axis=1)
        bw = np.nansum(x[:, self.modules :], axis=1) + wait
        rows = np.arange(R) if present is None else np.asarray(present)
        return StepMatrix(
            job="sim",
            step=step,
            ranks=rows.astype(np.int64),
            hosts=[self.hosts[r] for r in rows],
            column_module=self.column_module,
            column_phase=self.column_phase,
            self_ms=x[rows],
            wall_ms=wall[rows],
            sync_wait_ms=wait[rows],
            forward_ms=fw[rows],
            backward_ms=bw[rows],
            module_names=self.module_names,
        )
