"""GPU health per rank: the latest sample of every rank, and what it says about a straggler.

Ingest writes each rank's newest GpuHealth sample into a per-job table (one row per rank, numpy), on
the event loop; the evaluation thread reads a copy when an episode changes and asks `explanation()`
whether the culprit's GPU explains its slowness: its SM (or memory) clock clearly below its peers'
median, with the throttle reasons NVML gives for it (thermal, power cap, hardware slowdown, ...), or
Xid / uncorrected ECC errors its peers do not have. All of it vectorised over the job's ranks.

Samples are kept in memory only (one per rank, about once a second: writing them to SQLite would cost
a write per rank per second); the explanation is stored with its episode.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from modtrack.collector.records import GPU_FIGURES, Episode, GpuSample
from modtrack.protos import modtrack_pb2 as pb

# GpuClockReason bit -> short name, from the proto (the agent names them from the same table).
REASON_NAMES: dict[int, str] = {
    bit: name.removeprefix("GPU_CLOCK_REASON_").lower() for name, bit in pb.GpuClockReason.items() if bit
}
_BIT = {name: bit for bit, name in REASON_NAMES.items()}
# What a person reads for a reason that holds the clock down; gpu_idle and display clocks are no slowdown.
REASON_TEXT = {
    "sw_thermal": "thermal throttling",
    "hw_thermal": "thermal throttling",
    "sw_power_cap": "power cap",
    "hw_slowdown": "hardware slowdown",
    "hw_power_brake": "power brake",
    "sync_boost": "sync boost (held to a slower GPU's clock)",
    "applications_clocks": "application clocks set below the maximum",
}
SLOWDOWN_BITS = sum(_BIT[name] for name in REASON_TEXT)
CLOCK_GAP = 0.10  # the culprit's clock at least this far below its peers' median explains slowness
OWN_MAX_GAP = 0.20  # with no peer sampled: this far below its own maximum, with a throttle reason
STALE_S = 60.0  # a sample older than this says nothing about now

_F = {name: i for i, name in enumerate(GPU_FIGURES)}


@dataclass
class GpuTable:
    """A copy of one job's latest samples, one row per rank that sent one."""

    ranks: np.ndarray  # (R,) int64
    figures: np.ndarray  # (R, len(GPU_FIGURES)) float64, NaN where not given
    reasons: np.ndarray  # (R,) int64 GpuClockReason bits
    received_s: np.ndarray  # (R,) time.monotonic() when the sample came in
    hosts: list[str]
    names: list[str]  # GPU model per rank
    nvml_index: np.ndarray  # (R,) int64
    unavailable: list[str]


class _JobGpus:
    """One job's table, grown by doubling; a rank keeps its row."""

    def __init__(self) -> None:
        self.row: dict[int, int] = {}
        self.ranks = np.zeros(0, np.int64)
        self.figures = np.zeros((0, len(GPU_FIGURES)))
        self.reasons = np.zeros(0, np.int64)
        self.received_s = np.zeros(0)
        self.nvml_index = np.zeros(0, np.int64)
        self.hosts: list[str] = []
        self.names: list[str] = []
        self.unavailable: list[str] = []

    def put(self, rank: int, host: str, sample: GpuSample, now: float) -> None:
        i = self.row.get(rank)
        if i is None:
            i = self.row[rank] = len(self.row)
            if i >= len(self.ranks):
                self._grow(max(8, 2 * len(self.ranks)))
            self.hosts.append(host)
            self.names.append("")
            self.unavailable.append("")
        self.ranks[i] = rank
        self.figures[i] = sample.figures
        self.reasons[i] = sample.clock_event_reasons
        self.received_s[i] = now
        self.nvml_index[i] = sample.nvml_index
        self.hosts[i], self.names[i], self.unavailable[i] = host, sample.name, sample.unavailable

    def _grow(self, size: int) -> None:
        n = len(self.ranks)
        self.ranks = np.concatenate([self.ranks, np.zeros(size - n, np.int64)])
        self.figures = np.concatenate([self.figures, np.full((size - n, len(GPU_FIGURES)), np.nan)])
        self.reasons = np.concatenate([self.reasons, np.zeros(size - n, np.int64)])
        self.received_s = np.concatenate([self.received_s, np.zeros(size - n)])
        self.nvml_index = np.concatenate([self.nvml_index, np.zeros(size - n, np.int64)])

    def copy(self) -> GpuTable:
        n = len(self.row)
        return GpuTable(
            self.ranks[:n].copy(),
            self.figures[:n].copy(),
            self.reasons[:n].copy(),
            self.received_s[:n].copy(),
            list(self.hosts),
            list(self.names),
            self.nvml_index[:n].copy(),
            list(self.unavailable),
        )


class GpuBoard:
    """Every job's latest GPU sample per rank. observe() on the event loop; table(), explain() and
    scrapes from any thread (one lock, held for a copy)."""

    def __init__(self, clock=time.monotonic) -> None:
        self._jobs: dict[str, _JobGpus] = {}
        self._lock = threading.Lock()
        self._clock = clock

    def observe(self, job: str, rank: int, host: str, sample: GpuSample) -> None:
        with self._lock:
            state = self._jobs.get(job)
            if state is None:
                state = self._jobs[job] = _JobGpus()
            state.put(rank, host, sample, self._clock())

    def forget(self, job: str) -> None:
        with self._lock:
            self._jobs.pop(job, None)

    def jobs(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def table(self, job: str) -> GpuTable | None:
        with self._lock:
            state = self._jobs.get(job)
            return None if state is None else state.copy()

    def explain(self, episode: Episode) -> str:
        """The episode's explanation from its culprit's GPU (a host episode: all its ranks), or ""."""
        table = self.table(episode.job)
        if table is None:
            return ""
        culprits = episode.ranks if episode.rank < 0 else [episode.rank]
        return explanation(np.asarray(culprits, np.int64), table, self._clock())

    def ranks(self, job: str) -> list[dict] | None:
        """The API's per-rank view (GET /api/v1/jobs/{job}/gpu), ranks ascending; None: no sample yet."""
        table = self.table(job)
        if table is None:
            return None
        now = self._clock()
        out = []
        for i in np.argsort(table.ranks, kind="stable").tolist():
            row = table.figures[i]
            entry: dict = {
                "rank": int(table.ranks[i]),
                "host": table.hosts[i],
                "age_s": round(float(now - table.received_s[i]), 3),
                "gpu": table.names[i],
                "nvml_index": int(table.nvml_index[i]),
            }
            if table.unavailable[i]:
                entry["unavailable"] = table.unavailable[i]
            for name, value in zip(GPU_FIGURES, row.tolist()):
                entry[name] = None if value != value else int(value)  # NaN: not given
            entry["clock_reasons"] = [n for bit, n in REASON_NAMES.items() if int(table.reasons[i]) & bit]
            out.append(entry)
        return out


def _ghz(mhz: float) -> str:
    return f"{mhz / 1000:.3g} GHz"


def _median(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(np.median(values)) if values.size else float("nan")


def explanation(culprits: np.ndarray, table: GpuTable, now: float) -> str:
    """What the culprits' GPUs say about their slowness next to their peers' (every other rank with a
    fresh sample), as one line; "" when nothing there explains it.

    "SM clock 1.1 GHz vs peers' 1.98 GHz: thermal throttling (91 °C vs peers' 60 °C)"; a memory clock
    gap the same way; "2 Xid errors (last Xid 79)" and "3 uncorrected ECC errors" when the culprit has
    them and its peers do not. A GPU that NVML calls idle (and nothing else) is clocked down because it
    waits: its clocks explain nothing."""
    fresh = now - table.received_s <= STALE_S
    mine = np.isin(table.ranks, culprits) & fresh
    if not mine.any():
        return ""
    peers = ~np.isin(table.ranks, culprits) & fresh
    f, p = table.figures[mine], table.figures[peers]

    def col(rows: np.ndarray, name: str) -> np.ndarray:
        return rows[:, _F[name]]

    held = int(np.bitwise_or.reduce(table.reasons[mine]))
    reasons = held & SLOWDOWN_BITS
    # An idle GPU clocks down by itself: a low clock then says the rank waits elsewhere, not that the GPU is slow.
    idle = bool(held & _BIT["gpu_idle"]) and not reasons
    if peers.any():  # a reason every peer has too explains no gap between them
        reasons &= ~int(np.bitwise_and.reduce(table.reasons[peers]))
    parts = []
    sm, sm_peers = _median(col(f, "sm_clock_mhz")), _median(col(p, "sm_clock_mhz"))
    if not idle and sm_peers == sm_peers and sm <= (1 - CLOCK_GAP) * sm_peers:
        parts.append(f"SM clock {_ghz(sm)} vs peers' {_ghz(sm_peers)}" + _why(reasons, f, p))
    elif sm_peers != sm_peers and reasons:  # no peer sampled: its own maximum is the yardstick
        top = _median(col(f, "max_sm_clock_mhz"))
        if top == top and sm <= (1 - OWN_MAX_GAP) * top:
            parts.append(f"SM clock {_ghz(sm)} of its maximum {_ghz(top)}" + _why(reasons, f, p))
    mem, mem_peers = _median(col(f, "memory_clock_mhz")), _median(col(p, "memory_clock_mhz"))
    if not idle and mem_peers == mem_peers and mem <= (1 - CLOCK_GAP) * mem_peers:
        parts.append(f"memory clock {_ghz(mem)} vs peers' {_ghz(mem_peers)}")
    parts += _errors(f, p)
    return "; ".join(parts)


def _why(reasons: int, mine: np.ndarray, peers: np.ndarray) -> str:
    if not reasons:
        return " (no throttle reason reported)"
    texts: list[str] = []
    for bit, name in REASON_NAMES.items():
        text = REASON_TEXT.get(name)
        if reasons & bit and text is not None and text not in texts:
            texts.append(text)
    out = []
    for text in texts:
        if text == "thermal throttling":
            t, t_peers = _median(mine[:, _F["temperature_c"]]), _median(peers[:, _F["temperature_c"]])
            if t == t:
                text += f" ({t:.0f} °C" + (f" vs peers' {t_peers:.0f} °C)" if t_peers == t_peers else ")")
        elif text == "power cap":
            w, limit = _median(mine[:, _F["power_mw"]]), _median(mine[:, _F["power_limit_mw"]])
            if w == w and limit == limit:
                text += f" ({w / 1000:.0f} W of a {limit / 1000:.0f} W limit)"
        out.append(text)
    return ": " + ", ".join(out)


def _errors(mine: np.ndarray, peers: np.ndarray) -> list[str]:
    """Xid and uncorrected ECC errors the culprits have and their peers do not."""
    out = []
    xids = np.nansum(mine[:, _F["xid_events"]])
    if xids > 0 and not np.nansum(peers[:, _F["xid_events"]]):
        last = mine[:, _F["last_xid"]]
        last = last[~np.isnan(last)]
        text = f"{xids:.0f} Xid error{'s' if xids != 1 else ''}"
        out.append(text + (f" (last Xid {last[-1]:.0f})" if last.size else ""))
    ecc = np.nansum(mine[:, _F["ecc_uncorrected"]])
    if ecc > 0 and not np.nansum(peers[:, _F["ecc_uncorrected"]]):
        out.append(f"{ecc:.0f} uncorrected ECC error{'s' if ecc != 1 else ''}")
    return out
