"""The detection-quality benchmark's quick mode, with the targets of the scale issue asserted."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "bench"))

import detector_quality


def test_detection_quality_targets_on_a_fixed_seed():
    results = detector_quality.evaluate(runs=40, steps=400, seed=1)
    ours, base = results["modtrack"], results["baseline"]
    assert ours["stragglers_ge_1.3x"] >= 50  # enough cases for the rates to mean something
    assert ours["precision"] >= 0.99
    assert ours["recall_ge_1.3x"] >= 0.95
    assert ours["latency_p50"] <= 5
    assert ours["victims_blamed"] == 0
    assert ours["false_alarms_per_1000_clean"] == 0
    assert ours["module_phase_right"] >= 0.95
    # The rank-level baseline, same runs: it misses what hides in one module.
    assert base["recall_ge_1.3x"] < ours["recall_ge_1.3x"]
