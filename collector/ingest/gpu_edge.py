"""GPU health at the edge: a StepReport's GpuHealth checked and turned into a GpuSample.

The bounds are far above any GPU (a 100 GHz clock, 1,000 °C, 100 kW) and only refuse what no NVML
reading can be: a bad sample refuses its report like any other bad field (edge_limits.Refused with the
field's name), so nothing half-checked reaches /metrics or a verdict.
"""

from __future__ import annotations

import numpy as np

from modtrack.collector.ingest.edge_limits import MAX_ABS_TIME_NS, MAX_LABEL_CHARS, invalid
from modtrack.collector.records import GPU_FIGURES, GpuSample
from modtrack.protos.gpu_limits import GPU_FIGURE_MAX

MAX_NVML_INDEX = 1 << 16


def parse_gpu(report, where: str) -> GpuSample | None:
    """The report's GPU sample, checked; None when it carries none. Raises Refused naming the field."""
    if not report.HasField("gpu"):
        return None
    g = report.gpu
    where = f"{where} gpu"
    figures = np.full(len(GPU_FIGURES), np.nan)
    for i, name in enumerate(GPU_FIGURES):
        if name == "errors" or g.HasField(name):
            value = getattr(g, name)
            if value > GPU_FIGURE_MAX[name]:
                raise invalid(f"{where}: {name} {value} is over the limit of {GPU_FIGURE_MAX[name]}")
            figures[i] = value
    if abs(g.sampled_ns) > MAX_ABS_TIME_NS:
        raise invalid(f"{where}: sampled_ns is out of range")
    if g.nvml_index > MAX_NVML_INDEX:
        raise invalid(f"{where}: nvml_index {g.nvml_index} is over the limit of {MAX_NVML_INDEX}")
    for name in ("name", "unavailable"):
        text = getattr(g, name)
        if len(text) > MAX_LABEL_CHARS or not text.isprintable():
            raise invalid(f"{where}: {name} must be at most {MAX_LABEL_CHARS} printable characters")
    if g.unavailable and not np.isnan(figures[: GPU_FIGURES.index("errors")]).all():
        raise invalid(f"{where}: a sample marked unavailable ({g.unavailable!r}) carries figures")
    return GpuSample(figures, int(g.clock_event_reasons), int(g.nvml_index), g.name, g.unavailable)
