"""The largest value each GpuHealth figure can take on the wire, shared by both sides: the agent leaves out a
reading above it (a driver's "unknown" sentinel), the collector refuses a report that carries one."""

from __future__ import annotations

MAX_COUNT = 1 << 53  # counters stay exact in float64

GPU_FIGURE_MAX = {
    "sm_clock_mhz": 100_000,
    "max_sm_clock_mhz": 100_000,
    "memory_clock_mhz": 100_000,
    "temperature_c": 1_000,
    "power_mw": 100_000_000,
    "power_limit_mw": 100_000_000,
    "utilization_pct": 100,
    "ecc_uncorrected": MAX_COUNT,
    "xid_events": MAX_COUNT,
    "last_xid": (1 << 32) - 1,
    "errors": MAX_COUNT,
}
