"""On a real GPU with real NVML: the sampler finds the rank's own GPU and reads what torch's own NVML readers
read (an independent path: torch maps its device to NVML by CUDA_VISIBLE_DEVICES, the sampler by UUID).

Run: `python -m pytest -q -s -m cuda tests/test_gpu_health_cuda.py` (prints each figure and the cost of a sample).
"""

from __future__ import annotations

import time

import pytest
import torch

from modtrack.agent.gpu_health import GpuHealthSampler, cuda_device, reason_names
from modtrack.protos import modtrack_pb2 as pb

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
pynvml = pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed (pip install 'modtrack[gpu]')")


def one_sample(s: GpuHealthSampler) -> pb.GpuHealth:
    s.tick()
    report = pb.StepReport(step=0)
    s.attach(report, time.perf_counter_ns())
    assert report.HasField("gpu"), "no sample"
    return report.gpu


def test_the_sample_is_the_gpu_torch_uses():
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    index, uuid = cuda_device(0) or (None, None)
    assert index == 0 and uuid.startswith(("GPU-", "MIG-"))
    s = GpuHealthSampler(0)
    try:
        g = one_sample(s)
        started = time.perf_counter()
        for _ in range(20):
            s.tick()
        per_sample_us = (time.perf_counter() - started) / 20 * 1e6
    finally:
        s.close()
        s._shutdown()
    print(
        f"\nGPU health on {g.name} (NVML index {g.nvml_index}): SM {g.sm_clock_mhz}/{g.max_sm_clock_mhz} MHz, "
        f"memory {g.memory_clock_mhz} MHz, {g.temperature_c} C, "
        f"{g.power_mw / 1000:.0f}/{g.power_limit_mw / 1000:.0f} W, "
        f"utilisation {g.utilization_pct} %, reasons {reason_names(g.clock_event_reasons)}, "
        f"ECC {g.ecc_uncorrected if g.HasField('ecc_uncorrected') else 'n/a'}, "
        f"Xid {g.xid_events if g.HasField('xid_events') else 'n/a'}, errors {g.errors}; "
        f"{per_sample_us:.0f} us per sample"
    )
    assert not g.unavailable and g.errors == 0
    assert torch.cuda.get_device_name(0) in g.name or g.name in torch.cuda.get_device_name(0)
    assert 0 < g.sm_clock_mhz <= g.max_sm_clock_mhz
    assert abs(g.sm_clock_mhz - torch.cuda.clock_rate(0)) <= 0.3 * g.max_sm_clock_mhz  # sampled at other instants
    assert abs(g.temperature_c - torch.cuda.temperature(0)) <= 5
    assert 0 < g.power_mw <= 1.2 * g.power_limit_mw
    assert per_sample_us < 20_000  # well under the 1 s period


def test_a_busy_gpu_reads_busy():
    x = torch.randn(8192, 8192, device="cuda")
    s = GpuHealthSampler(0)
    try:
        s.tick()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            for _ in range(20):
                x = (x @ x).tanh_()
            torch.cuda.synchronize()
        g = one_sample(s)
    finally:
        s.close()
        s._shutdown()
    print(f"\nbusy: utilisation {g.utilization_pct} %, SM {g.sm_clock_mhz} MHz, {g.power_mw / 1000:.0f} W")
    assert g.utilization_pct >= 50
