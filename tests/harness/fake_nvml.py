"""A fake pynvml at the narrowest seam: only the functions agent/gpu_health.py calls, answering from a FakeGpu.

Constants and error classes are the real module's (nvidia-ml-py, a dev dependency), so a sampler that
passes against this calls NVML the way NVML wants: a wrong constant or an unhandled NVMLError subclass
would show here too. Every call is recorded with the name of the thread that made it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pynvml


@dataclass(eq=False)  # a handle: compared by identity, as NVML's are
class FakeGpu:
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    name: str = "NVIDIA H200"
    sm_mhz: int = 1980
    max_sm_mhz: int = 1980
    mem_mhz: int = 3201
    temperature_c: int = 55
    power_mw: int = 450_000
    power_limit_mw: int = 700_000
    utilization_pct: int = 97
    reasons: int = 0  # clocks event reason bits
    ecc_uncorrected: int = 0
    xids: list[int] = field(default_factory=list)  # Xid codes waiting to be read from the event set


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _EventData:
    eventType: int
    eventData: int


class FakeNvml:
    """Stands for the `pynvml` module. `fail[name] = NVML error code` makes that function raise it."""

    NVMLError = pynvml.NVMLError

    def __init__(self, gpus: list[FakeGpu] | None = None):
        for name in dir(pynvml):  # the real constants
            if name.startswith(("NVML_", "nvmlClocksEventReason", "nvmlClocksThrottleReason", "nvmlEventType")):
                setattr(self, name, getattr(pynvml, name))
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.fail: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []  # (function, thread name)
        self._lock = threading.Lock()
        self.initialised = 0

    def _enter(self, function: str) -> None:
        with self._lock:
            self.calls.append((function, threading.current_thread().name))
        code = self.fail.get(function)
        if code is not None:
            raise pynvml.NVMLError(code)

    def count(self, function: str) -> int:
        return sum(1 for f, _ in self.calls if f == function)

    def threads(self) -> set[str]:
        return {t for _, t in self.calls}

    # ---- the functions the sampler calls ----------------------------------------------------
    def nvmlInit(self):
        self._enter("nvmlInit")
        self.initialised += 1

    def nvmlShutdown(self):
        self._enter("nvmlShutdown")
        self.initialised -= 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self._enter("nvmlDeviceGetHandleByUUID")
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                return gpu
        raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetHandleByIndex(self, index):
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return self.gpus[index]

    def nvmlDeviceGetIndex(self, gpu):
        self._enter("nvmlDeviceGetIndex")
        return self.gpus.index(gpu)

    def nvmlDeviceGetName(self, gpu):
        self._enter("nvmlDeviceGetName")
        return gpu.name

    def nvmlDeviceGetClockInfo(self, gpu, kind):
        self._enter("nvmlDeviceGetClockInfo")
        return {pynvml.NVML_CLOCK_SM: gpu.sm_mhz, pynvml.NVML_CLOCK_MEM: gpu.mem_mhz}[kind]

    def nvmlDeviceGetMaxClockInfo(self, gpu, kind):
        self._enter("nvmlDeviceGetMaxClockInfo")
        assert kind == pynvml.NVML_CLOCK_SM
        return gpu.max_sm_mhz

    def nvmlDeviceGetTemperature(self, gpu, sensor):
        self._enter("nvmlDeviceGetTemperature")
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, gpu):
        self._enter("nvmlDeviceGetPowerUsage")
        return gpu.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, gpu):
        self._enter("nvmlDeviceGetEnforcedPowerLimit")
        return gpu.power_limit_mw

    def nvmlDeviceGetUtilizationRates(self, gpu):
        self._enter("nvmlDeviceGetUtilizationRates")
        return _Utilization(gpu.utilization_pct, 40)

    def nvmlDeviceGetCurrentClocksEventReasons(self, gpu):
        self._enter("nvmlDeviceGetCurrentClocksEventReasons")
        return gpu.reasons

    def nvmlDeviceGetTotalEccErrors(self, gpu, error_type, counter_type):
        self._enter("nvmlDeviceGetTotalEccErrors")
        assert (error_type, counter_type) == (pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC)
        return gpu.ecc_uncorrected

    def nvmlEventSetCreate(self):
        self._enter("nvmlEventSetCreate")
        return []  # the event set: the devices registered in it

    def nvmlDeviceRegisterEvents(self, gpu, types, event_set):
        self._enter("nvmlDeviceRegisterEvents")
        assert types & pynvml.nvmlEventTypeXidCriticalError
        event_set.append(gpu)

    def nvmlEventSetWait_v2(self, event_set, timeout_ms):
        self._enter("nvmlEventSetWait_v2")
        assert timeout_ms == 0, "the sampler must never wait for an event"
        for gpu in event_set:
            if gpu.xids:
                return _EventData(pynvml.nvmlEventTypeXidCriticalError, gpu.xids.pop(0))
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlEventSetFree(self, event_set):
        self._enter("nvmlEventSetFree")
