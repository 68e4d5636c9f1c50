"""The agent's GPU health sampler against a fake pynvml (no GPU here): what it reads, names and counts,
that it runs only on its own thread, stays bounded, and starts nothing on a job without CUDA; and the
launcher's default path to a real collector."""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import tracemalloc

import pynvml

from harness import torchrun as launch
from harness.fake_nvml import FakeGpu, FakeNvml
from harness.http import get
from harness.waiting import wait_for
from modtrack.agent import gpu_health
from modtrack.agent.gpu_health import INSTALL_HINT, GpuHealthSampler, reason_names
from modtrack.protos import modtrack_pb2 as pb

THERMAL = pynvml.nvmlClocksEventReasonSwThermalSlowdown | pynvml.nvmlClocksEventReasonHwThermalSlowdown
UUID = FakeGpu().uuid


def sampler(nvml: FakeNvml, device=(0, UUID), **kw) -> GpuHealthSampler:
    kw.setdefault("clock", iter(range(1_000, 10**12, 1_000)).__next__)
    return GpuHealthSampler(nvml=lambda: nvml, device=lambda local_rank: device, **kw)


def taken(s: GpuHealthSampler, end_ns: int = 10**15) -> pb.GpuHealth | None:
    report = pb.StepReport(step=1)
    s.attach(report, end_ns)
    return report.gpu if report.HasField("gpu") else None


def test_a_sample_carries_what_nvml_said_and_names_the_throttle_reasons():
    gpu = FakeGpu(sm_mhz=1100, mem_mhz=2619, temperature_c=91, power_mw=650_000, reasons=THERMAL, xids=[79])
    gpu.ecc_uncorrected = 2
    s = sampler(FakeNvml([FakeGpu(uuid="GPU-other"), gpu]), device=(1, gpu.uuid))
    s.tick()
    g = taken(s)
    assert g is not None and not g.unavailable
    assert (g.nvml_index, g.name) == (1, "NVIDIA H200")
    assert (g.sm_clock_mhz, g.max_sm_clock_mhz, g.memory_clock_mhz) == (1100, 1980, 2619)
    assert (g.temperature_c, g.power_mw, g.power_limit_mw, g.utilization_pct) == (91, 650_000, 700_000, 97)
    assert reason_names(g.clock_event_reasons) == ["sw_thermal", "hw_thermal"]
    assert (g.ecc_uncorrected, g.xid_events, g.last_xid, g.errors) == (2, 1, 79, 0)
    s.tick()  # the Xid was read once: the count stays, no new one
    assert (taken(s).xid_events, s.errors) == (1, 0)


def test_reason_names_cover_every_nvml_bit():
    bits = {
        pynvml.nvmlClocksEventReasonGpuIdle: "gpu_idle",
        pynvml.nvmlClocksEventReasonApplicationsClocksSetting: "applications_clocks",
        pynvml.nvmlClocksEventReasonSwPowerCap: "sw_power_cap",
        pynvml.nvmlClocksEventReasonHwSlowdown: "hw_slowdown",
        pynvml.nvmlClocksEventReasonSyncBoost: "sync_boost",
        pynvml.nvmlClocksEventReasonSwThermalSlowdown: "sw_thermal",
        pynvml.nvmlClocksEventReasonHwThermalSlowdown: "hw_thermal",
        pynvml.nvmlClocksEventReasonHwPowerBrakeSlowdown: "hw_power_brake",
        pynvml.nvmlClocksEventReasonDisplayClockSetting: "display_clocks",
    }
    for bit, name in bits.items():
        assert reason_names(bit) == [name]
    assert sum(bits) == pynvml.nvmlClocksEventReasonAll
    assert reason_names(pynvml.nvmlClocksThrottleReasonBoardLimit) == ["bit_9"]  # newer bits are not lost
    assert reason_names(0) == []


def test_unsupported_figures_are_asked_once_and_failures_are_counted():
    nvml = FakeNvml()
    nvml.fail["nvmlDeviceGetTotalEccErrors"] = pynvml.NVML_ERROR_NOT_SUPPORTED  # a consumer GPU
    nvml.fail["nvmlDeviceRegisterEvents"] = pynvml.NVML_ERROR_NOT_SUPPORTED  # no Xid events here
    nvml.fail["nvmlDeviceGetPowerUsage"] = pynvml.NVML_ERROR_UNKNOWN
    s = sampler(nvml)
    for _ in range(3):
        s.tick()
    g = taken(s)
    assert not g.HasField("ecc_uncorrected") and not g.HasField("xid_events") and not g.HasField("power_mw")
    assert g.HasField("sm_clock_mhz") and g.temperature_c == 55
    assert nvml.count("nvmlDeviceGetTotalEccErrors") == 1 and nvml.count("nvmlEventSetWait_v2") == 0
    assert nvml.count("nvmlDeviceGetPowerUsage") == 3  # a failure is tried again next time...
    assert g.errors == s.errors == 3  # ...and counted each time; not-supported is no error
    nvml.fail.clear()
    s.tick()
    assert taken(s).power_mw == 450_000


def test_a_reading_out_of_range_is_left_out_and_counted():
    s = sampler(FakeNvml([FakeGpu(temperature_c=0xFFFFFFFF)]))
    s.tick()
    g = taken(s)
    assert not g.HasField("temperature_c") and g.errors == 1 and g.sm_clock_mhz == 1980


def test_without_nvidia_ml_py_a_sample_says_why_once_a_minute():
    def missing():
        raise ImportError("No module named 'pynvml'")

    s = GpuHealthSampler(nvml=missing, device=lambda local_rank: (0, UUID), retry_s=60)
    s.tick()
    s.tick()  # not retried before retry_s
    g = taken(s)
    assert (g.unavailable, g.errors, s.samples) == (INSTALL_HINT, 1, 1)
    assert not g.HasField("sm_clock_mhz")


def test_nvml_that_cannot_start_or_find_the_gpu_says_so():
    nvml = FakeNvml()
    nvml.fail["nvmlInit"] = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    s = sampler(nvml, retry_s=0)
    s.tick()
    assert taken(s).unavailable.startswith("nvmlInit failed: Driver Not Loaded")
    nvml.fail.clear()
    lost = sampler(FakeNvml(), device=(3, "GPU-gone"), retry_s=0)
    lost.tick()
    assert "GPU-gone" in taken(lost).unavailable
    s.tick()  # retried: NVML is up now
    assert taken(s).sm_clock_mhz == 1980


def test_no_cuda_no_nvml():
    """A CPU job: the sampler only looks whether torch initialised CUDA; NVML is never loaded."""
    loads = []
    s = GpuHealthSampler(nvml=lambda: loads.append(1), retry_s=0)  # the real CUDA seam: torch on CPU
    for _ in range(3):
        s.tick()
    assert gpu_health.cuda_device(0) is None
    assert (loads, s.samples, taken(s)) == ([], 0, None)


def test_a_report_carries_the_newest_sample_of_its_step_and_no_report_twice():
    clock = iter([100, 200, 300]).__next__
    s = sampler(FakeNvml(), clock=clock)
    for _ in range(3):
        s.tick()
    assert taken(s, end_ns=250).sampled_ns == 200  # 100 is older: dropped, the collector keeps the latest
    assert taken(s, end_ns=260) is None  # nothing new since
    assert taken(s, end_ns=400).sampled_ns == 300
    assert s.attached == 2


def test_sampled_on_its_own_thread_never_the_training_thread():
    nvml = FakeNvml()
    s = sampler(nvml, interval_s=0.01).start()
    try:
        wait_for(lambda: s.samples >= 5, 10, "five samples")
    finally:
        s.close()
    assert not s._thread.is_alive()
    assert nvml.threads() == {"modtrack-gpu-health"}
    assert threading.current_thread().name not in nvml.threads()
    assert nvml.initialised == 0  # nvmlShutdown at close


def test_no_memory_growth_over_many_samples():
    nvml = FakeNvml([FakeGpu(xids=[])])
    nvml.calls = _Forgetful()  # the fake's own call log would grow; the sampler must not
    s = sampler(nvml)
    for _ in range(200):
        s.tick()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(2_000):
        s.tick()
    grown = sum(d.size_diff for d in tracemalloc.take_snapshot().compare_to(before, "filename"))
    tracemalloc.stop()
    assert len(s._samples) <= 4 and s.samples == 2_200
    assert grown < 64 * 1024, f"{grown} bytes more after 2,000 samples"


class _Forgetful(list):
    def append(self, item) -> None:
        pass


LAUNCHED = textwrap.dedent("""
    import os, sys, time, types
    import torch
    sys.path.insert(0, os.environ["TESTS"])
    from harness.fake_nvml import FakeGpu, FakeNvml
    nvml = sys.modules["pynvml"] = FakeNvml([FakeGpu(uuid="GPU-1234", sm_mhz=1234)])  # NVML faked at its seam
    if "--fake-cuda" in sys.argv:  # and CUDA: torch.cuda's three calls
        torch.cuda.is_initialized = lambda: True
        torch.cuda.device_count = lambda: 1
        torch.cuda.get_device_properties = lambda index: types.SimpleNamespace(uuid="1234")
    torch.set_num_threads(1)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(25):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.1)
    threads = sorted(t.name for t in __import__("threading").enumerate())
    os.write(1, f"nvml calls {len(nvml.calls)} threads {threads}\\n".encode())
""")


def test_the_launcher_samples_the_gpu_of_a_cuda_job_and_never_calls_nvml_on_a_cpu_job(collector, tmp_path):
    """A job with CUDA faked and one on the CPU, side by side (neither is timed)."""
    script = tmp_path / "train.py"
    script.write_text(LAUNCHED)
    agent = [sys.executable, "-m", "modtrack.agent", "--collector", collector.grpc_target]
    cpu, cuda = launch.run_all(
        [[*agent, "--job", "cpu", str(script)], [*agent, "--job", "cuda", str(script), "--fake-cuda"]],
        120,
        cwd=tmp_path,
        extra_env={"TESTS": os.path.dirname(os.path.abspath(__file__))},
    )
    for out in (cpu, cuda):
        assert out.returncode == 0, out.stderr
        assert "'modtrack-gpu-health'" in out.stdout  # the sampler runs in both...
    status, body = get(collector.url, "/api/v1/jobs/cuda/gpu")
    assert status == 200
    assert [(r["rank"], r["sm_clock_mhz"], r["gpu"]) for r in body["ranks"]] == [(0, 1234, "NVIDIA H200")]
    status, body = get(collector.url, "/api/v1/jobs/cpu/gpu")
    assert status == 200
    assert "nvml calls 0 " in cpu.stdout and body["ranks"] == []  # ...but on a CPU job it never calls NVML
