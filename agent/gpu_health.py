"""The health of the rank's own GPU through NVML: clocks, temperature, power, throttle reasons, ECC, Xid.

A straggling rank is often a GPU that runs slower than its twins (hot, power capped, held back by a
hardware slowdown): its clocks say so. A thread of its own samples NVML about once a second, never
the training thread and not the sender either, because an NVML call on a GPU in trouble can hang for
seconds and neither training nor heartbeats may wait for that. The sender attaches the newest sample
taken before a step ended to that step's report (attach()); samples wait in a deque of a few, so
nothing grows when the sender is slow.

Nothing happens on a job that does not use CUDA: until torch has initialised CUDA in this process the
thread only looks (`torch.cuda.is_initialized()`, which starts nothing) and never calls NVML.
`nvidia-ml-py` (module `pynvml`) is an optional dependency (`pip install 'modtrack[gpu]'`); without it,
or with NVML failing to start, a sample saying why (`unavailable`) goes out once a minute. Every NVML
call that fails is counted (`errors` in each sample); a figure NVML does not support on this GPU is
asked once and then left out. Nothing here raises into the training job.
"""

from __future__ import annotations

import collections
import importlib
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType

from modtrack.protos import modtrack_pb2 as pb
from modtrack.protos.gpu_limits import GPU_FIGURE_MAX

# GpuClockReason bit -> short name ("sw_thermal", "hw_slowdown", ...): the proto's table.
REASON_NAMES: dict[int, str] = {
    bit: name.removeprefix("GPU_CLOCK_REASON_").lower() for name, bit in pb.GpuClockReason.items() if bit
}
INSTALL_HINT = "nvidia-ml-py is not installed (pip install 'modtrack[gpu]')"
MAX_XID_EVENTS_PER_SAMPLE = 16  # drained per sample: a storm of Xids cannot keep the thread busy


def reason_names(mask: int) -> list[str]:
    """The names of the GpuClockReason bits set in `mask`, lowest bit first; unknown bits as "bit_N"."""
    names = [name for bit, name in REASON_NAMES.items() if mask & bit]
    unknown = mask & ~sum(REASON_NAMES)
    return names + [f"bit_{i}" for i in range(64) if unknown >> i & 1]


def cuda_device(local_rank: int) -> tuple[int, str] | None:
    """(torch device index, NVML UUID) of this rank's GPU once torch has initialised CUDA, else None.

    Runs on the sampler thread, where torch.cuda.current_device() is that thread's device, not the
    training thread's: the rank's device is taken as LOCAL_RANK's (torchrun's one GPU per local rank),
    or device 0 when fewer devices are visible (one GPU per process through CUDA_VISIBLE_DEVICES)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return None
    count = torch.cuda.device_count()
    index = local_rank if 0 <= local_rank < count else 0
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return index, uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def load_nvml() -> ModuleType:
    return importlib.import_module("pynvml")


class GpuHealthSampler:
    """start() the thread, attach() from the sender, close() at exit. `nvml` and `device` are the seams
    tests replace (a fake pynvml, a fake CUDA device)."""

    def __init__(
        self,
        local_rank: int = 0,
        *,
        interval_s: float = 1.0,
        retry_s: float = 60.0,
        nvml: Callable[[], ModuleType] = load_nvml,
        device: Callable[[int], tuple[int, str] | None] = cuda_device,
        clock: Callable[[], int] = time.perf_counter_ns,
        keep: int = 4,
    ):
        self.local_rank = local_rank
        self.interval_s = interval_s
        self.retry_s = retry_s
        self._load = nvml
        self._device = device
        self._clock = clock
        self._samples: collections.deque[pb.GpuHealth] = collections.deque(maxlen=keep)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="modtrack-gpu-health", daemon=True)
        # sampler thread only
        self._nvml: ModuleType | None = None
        self._handle = None
        self._index = 0
        self._name = ""
        self._max_sm_mhz: int | None = None
        self._unsupported: set[str] = set()
        self._events = None  # NVML event set for Xid events, None when NVML cannot give them here
        self._xid_events = 0
        self._last_xid: int | None = None
        self._next_try = 0.0
        self.errors = 0  # NVML calls that failed (and figures out of range)
        self.samples = 0  # samples taken, status samples included
        self.attached = 0  # samples put on a report (sender thread)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> GpuHealthSampler:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 0.5) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # ---- sender thread -----------------------------------------------------------------------
    def attach(self, report: pb.StepReport, end_ns: int) -> None:
        """Put on `report` the newest sample taken before its step ended (end_ns, agent clock) that no
        report carried yet; older unsent ones are dropped: the collector keeps only the latest."""
        try:
            latest = None
            samples = self._samples
            while samples and samples[0].sampled_ns <= end_ns:
                latest = samples.popleft()
            if latest is not None:
                report.gpu.CopyFrom(latest)
                self.attached += 1
        except Exception:
            self.errors += 1

    # ---- sampler thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:
                self.errors += 1
        self._shutdown()

    def tick(self) -> None:
        """One look: open NVML once CUDA is in use, then one sample (the thread calls this every interval_s)."""
        if self._handle is None and not self._open():
            return
        self._keep(self._sample())

    def _keep(self, sample: pb.GpuHealth) -> None:
        self.samples += 1
        self._samples.append(sample)

    def _open(self) -> bool:
        """True once NVML and the device's handle are there. Before CUDA is in use: False, nothing else.
        A failure is retried every retry_s, and sends a sample that says why."""
        now = time.monotonic()
        if now < self._next_try:
            return False
        device = self._device(self.local_rank)
        if device is None:
            return False
        self._next_try = now + self.retry_s
        index, uuid = device
        try:
            nvml = self._load()
        except Exception:
            self.errors += 1
            self._keep(self._status(INSTALL_HINT))
            return False
        try:
            nvml.nvmlInit()
        except Exception as e:
            self.errors += 1
            self._keep(self._status(f"nvmlInit failed: {e}"))
            return False
        self._nvml = nvml
        handle = self._call("handle", nvml.nvmlDeviceGetHandleByUUID, uuid)
        if handle is None:
            handle = self._call("handle", nvml.nvmlDeviceGetHandleByIndex, index)
        if handle is None:
            self._keep(self._status(f"NVML does not know the GPU {uuid} (CUDA device {index})"))
            return False
        self._handle = handle
        self._index = self._call("index", nvml.nvmlDeviceGetIndex, handle) or 0
        name = self._call("name", nvml.nvmlDeviceGetName, handle) or ""
        self._name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name))[:256]
        self._max_sm_mhz = self._plausible("max_sm_clock_mhz", self._call("max_sm_clock_mhz", self._max_clock, handle))
        self._events = self._xid_event_set()
        return True

    def _status(self, why: str) -> pb.GpuHealth:
        return pb.GpuHealth(sampled_ns=self._clock(), unavailable=why[:256], errors=self.errors)

    def _call(self, field: str, fn, *args):
        """fn(*args), or None when it failed (counted) or is not supported here (asked once)."""
        if field in self._unsupported:
            return None
        try:
            return fn(*args)
        except Exception as e:
            self._failed(field, e)
            return None

    def _failed(self, field: str, error: Exception) -> None:
        """Not supported on this GPU: never asked again. Anything else: counted."""
        nvml = self._nvml
        if nvml is not None and getattr(error, "value", None) == getattr(nvml, "NVML_ERROR_NOT_SUPPORTED", object()):
            self._unsupported.add(field)
        else:
            self.errors += 1

    def _plausible(self, field: str, value):
        if value is None:
            return None
        if not 0 <= value <= GPU_FIGURE_MAX.get(field, 1 << 63):
            self.errors += 1
            return None
        return int(value)

    def _max_clock(self, handle) -> int:
        nvml = self._nvml
        assert nvml is not None
        return nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM)

    def _reasons(self, handle) -> int:
        nvml = self._nvml
        assert nvml is not None
        read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)  # the newer name
        if read is None:
            read = nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return read(handle)

    def _readers(self) -> dict[str, Callable]:
        nvml = self._nvml
        assert nvml is not None
        return {
            "sm_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
            "memory_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
            "temperature_c": lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
            "power_mw": nvml.nvmlDeviceGetPowerUsage,
            "power_limit_mw": nvml.nvmlDeviceGetEnforcedPowerLimit,
            "utilization_pct": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
            "clock_event_reasons": self._reasons,
            "ecc_uncorrected": lambda h: nvml.nvmlDeviceGetTotalEccErrors(
                h, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC
            ),
        }

    def _sample(self) -> pb.GpuHealth:
        handle = self._handle
        sample = pb.GpuHealth(sampled_ns=self._clock(), nvml_index=self._index, name=self._name)
        if self._max_sm_mhz is not None:
            sample.max_sm_clock_mhz = self._max_sm_mhz
        for field, read in self._readers().items():
            value = self._plausible(field, self._call(field, read, handle))
            if value is not None:
                setattr(sample, field, value)
        if self._events is not None:
            self._drain_xids()
            sample.xid_events = self._xid_events
            if self._last_xid is not None:
                sample.last_xid = self._last_xid
        sample.errors = self.errors
        return sample

    def _xid_event_set(self):
        """An NVML event set listening for critical Xid events of the device, or None where NVML cannot
        (some drivers, containers without the permission, MIG): then the samples carry no Xid figures."""
        nvml = self._nvml
        assert nvml is not None
        events = self._call("xid", nvml.nvmlEventSetCreate)
        if events is None:
            return None
        try:
            nvml.nvmlDeviceRegisterEvents(self._handle, nvml.nvmlEventTypeXidCriticalError, events)
        except Exception as e:
            self._failed("xid", e)
            self._call("xid_free", nvml.nvmlEventSetFree, events)
            return None
        return events

    def _drain_xids(self) -> None:
        """The Xid events since the last sample, without waiting (timeout 0)."""
        nvml = self._nvml
        assert nvml is not None
        for _ in range(MAX_XID_EVENTS_PER_SAMPLE):
            try:
                data = nvml.nvmlEventSetWait_v2(self._events, 0)
            except Exception as e:
                if getattr(e, "value", None) != nvml.NVML_ERROR_TIMEOUT:  # timeout: no event waiting
                    self.errors += 1
                return
            if data.eventType & nvml.nvmlEventTypeXidCriticalError:
                self._xid_events += 1
                self._last_xid = int(data.eventData)

    def _shutdown(self) -> None:
        nvml = self._nvml
        if nvml is None:
            return
        try:
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
            nvml.nvmlShutdown()
        except Exception:
            pass
