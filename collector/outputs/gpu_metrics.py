"""GPU health on /metrics: a few gauges per rank from each rank's latest sample, built at scrape time.

The bound is per rank and fixed, as for the other per-rank series (collector/outputs/metrics.py): at most
len(FIGURES) + 1 series, plus one `modtrack_gpu_clock_throttled` series for each throttle reason active
now, out of the closed set of gpu_health.REASON_TEXT (7): never a label from free text. A rank whose
latest sample is older than gpu_health.STALE_S, and a forgotten job, have no series.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modtrack.collector.pipeline.gpu_health import REASON_NAMES, REASON_TEXT, STALE_S, GpuBoard
from modtrack.collector.records import GPU_FIGURES

_LABELS = ["job", "rank", "host"]
# figure -> (family, metric name, scale to base units, help)
FIGURES = {
    "sm_clock_mhz": (GaugeMetricFamily, "modtrack_gpu_sm_clock_hertz", 1e6, "The rank's GPU SM clock."),
    "max_sm_clock_mhz": (GaugeMetricFamily, "modtrack_gpu_max_sm_clock_hertz", 1e6, "The GPU's maximum SM clock."),
    "memory_clock_mhz": (GaugeMetricFamily, "modtrack_gpu_memory_clock_hertz", 1e6, "The GPU's memory clock."),
    "temperature_c": (GaugeMetricFamily, "modtrack_gpu_temperature_celsius", 1.0, "The GPU's temperature."),
    "power_mw": (GaugeMetricFamily, "modtrack_gpu_power_watts", 1e-3, "The GPU's power draw."),
    "power_limit_mw": (GaugeMetricFamily, "modtrack_gpu_power_limit_watts", 1e-3, "The GPU's enforced power limit."),
    "utilization_pct": (
        GaugeMetricFamily,
        "modtrack_gpu_utilization_ratio",
        1e-2,
        "Share of NVML's last sample period in which a kernel ran on the GPU.",
    ),
    "ecc_uncorrected": (
        GaugeMetricFamily,
        "modtrack_gpu_ecc_uncorrected_errors",
        1.0,
        "Uncorrected ECC errors of the GPU since its driver loaded (volatile).",
    ),
    "xid_events": (
        CounterMetricFamily,
        "modtrack_gpu_xid_events",
        1.0,
        "Critical Xid events of the GPU seen since the rank's agent started.",
    ),
    "errors": (
        CounterMetricFamily,
        "modtrack_gpu_nvml_errors",
        1.0,
        "NVML calls of the rank's GPU health sampler that failed.",
    ),
}
_THROTTLE_BITS = [(bit, name) for bit, name in REASON_NAMES.items() if name in REASON_TEXT]


class GpuMetrics(Collector):
    """Registered on the collector's registry; reads the GpuBoard when Prometheus scrapes."""

    def __init__(self, board: GpuBoard, clock=time.monotonic):
        self.board = board
        self._clock = clock

    def describe(self) -> list[Metric]:
        return []  # built at scrape time only

    def collect(self) -> Iterator[Metric]:
        families = {name: kind(metric, text, labels=_LABELS) for name, (kind, metric, _, text) in FIGURES.items()}
        available = GaugeMetricFamily(
            "modtrack_gpu_health_available",
            "1 while the rank's agent reads its GPU through NVML, 0 when it cannot (the API says why).",
            labels=_LABELS,
        )
        throttled = GaugeMetricFamily(
            "modtrack_gpu_clock_throttled",
            "1 for each reason NVML gives now for holding the GPU's clocks down.",
            labels=[*_LABELS, "reason"],
        )
        now = self._clock()
        for job in self.board.jobs():
            table = self.board.table(job)
            if table is None:
                continue
            for i in np.flatnonzero(now - table.received_s <= STALE_S).tolist():
                labels = [job, str(int(table.ranks[i])), table.hosts[i]]
                available.add_metric(labels, 0 if table.unavailable[i] else 1)
                row = table.figures[i].tolist()
                for name, (_, _, scale, _) in FIGURES.items():
                    value = row[GPU_FIGURES.index(name)]
                    if value == value:  # NaN: not given
                        families[name].add_metric(labels, value * scale)
                reasons = int(table.reasons[i])
                for bit, reason in _THROTTLE_BITS:
                    if reasons & bit:
                        throttled.add_metric([*labels, reason], 1)
        yield available
        yield from families.values()
        yield throttled
