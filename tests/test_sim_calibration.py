"""The simulator's noise, calibrated from real jobs: measured on real steps with no straggler, drawn back size by
size, it comes out as it was measured (so the detection benchmark can run on the noise of real jobs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness import replay
from modtrack.collector.sim.calibration import measure_noise
from modtrack.collector.sim.cluster_model import ClusterModel

DATA = Path(__file__).parent / "data"
ONSET = 15  # the kept jobs' stragglers start here (tests/bench/scenarios.py)


def real_clean_steps():
    """The steps before the onset of three real 3-rank torchrun jobs (DDP, FSDP1, FSDP2) kept as fixtures."""
    steps = []
    for name in ("ddp_every3_last.npz", "fsdp1_optimizer_last.npz", "fsdp2_optimizer_last.npz"):
        steps += [m for m in replay.load(str(DATA / name)) if 5 <= m.step < ONSET]
    return steps


def test_noise_drawn_from_real_steps_comes_back_as_measured():
    clean = real_clean_steps()
    real = measure_noise(clean)
    assert real.steps >= 25 and len(real.cell) > 2000
    # A simulated 3-rank job whose modules have the real columns' sizes, drawing from the real noise.
    sizes = np.nanmedian(np.asarray(clean[0].self_ms, dtype=np.float64), axis=0)
    sizes = sizes[sizes >= 0.05]
    model = ClusterModel(ranks=3, ranks_per_host=3, modules=len(sizes) // 2, seed=3, measured=real)
    model.base = sizes[: 2 * model.modules]
    sim = measure_noise([model.step(s) for s in range(150)])
    again, want = sim.summary(), real.summary()
    for figure in ("cell_robust_sigma", "cells_over_1.2x", "cells_over_1.5x"):
        assert abs(again[figure] - want[figure]) <= 0.35 * want[figure], (figure, again[figure], want[figure])

    # Size by size: small modules spike more often than large ones, in the real job and in its simulation.
    def spikes(noise, lo_ms, hi_ms):
        cells = noise.cell[(noise.cell_ms >= lo_ms) & (noise.cell_ms < hi_ms)]
        return float(np.mean(cells > np.log(1.5)))

    assert spikes(real, 0.05, 0.15) > 3 * spikes(real, 0.5, 1e9)
    assert spikes(sim, 0.05, 0.15) > 1.4 * spikes(sim, 0.5, 1e9)


def test_real_cpu_noise_is_far_wider_than_the_simulators_own():
    """Why the calibration matters: the simulator's own noise (2-5 % jitter) is narrower than 3 CPU ranks sharing
    2 cores by several times, and has far fewer spikes."""
    real = measure_noise(real_clean_steps()).summary()
    own = measure_noise([ClusterModel(ranks=3, ranks_per_host=3, seed=3, sigma=0.05).step(s) for s in range(100)])
    assert real["cell_robust_sigma"] > 2 * own.summary()["cell_robust_sigma"]
    assert real["cells_over_1.5x"] > 5 * own.summary()["cells_over_1.5x"]
