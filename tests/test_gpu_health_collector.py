"""GPU health on the collector: samples over real gRPC (a real agent sender with a fake pynvml, and fake
ranks), refused when malformed, served per rank by the API and /metrics (bounded), and the straggler's
verdict explained by its GPU, in the API, the CLI and the alert."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.browser import wait_js
from harness.fake_nvml import FakeGpu, FakeNvml
from harness.fake_rank import FakeRank, report
from harness.http import get
from harness.slow_job import slow_rank_ms, sync_of
from harness.waiting import wait_for
from modtrack.agent.gpu_health import GpuHealthSampler
from modtrack.agent.identity import Identity
from modtrack.agent.step_record import PhaseColumns, StepRecord
from modtrack.agent.transport import Transport
from modtrack.collector.api.query_cli import render
from modtrack.collector.outputs.gpu_metrics import GpuMetrics
from modtrack.collector.pipeline.gpu_health import REASON_TEXT, GpuBoard, explanation
from modtrack.collector.records import GPU_FIGURES, GpuSample
from modtrack.protos import modtrack_pb2 as pb

GPU_IDLE, SW_THERMAL, HW_THERMAL, POWER_CAP, SYNC_BOOST = 1, 32, 64, 4, 16  # GpuClockReason bits (NVML's)


def gpu_msg(sm=1980, temp=60, reasons=0, **fields) -> pb.GpuHealth:
    base = dict(
        sampled_ns=1,
        name="NVIDIA H200",
        sm_clock_mhz=sm,
        max_sm_clock_mhz=1980,
        memory_clock_mhz=3201,
        temperature_c=temp,
        power_mw=500_000,
        power_limit_mw=700_000,
        utilization_pct=98,
        clock_event_reasons=reasons,
        ecc_uncorrected=0,
        xid_events=0,
    )
    base.update(fields)
    return pb.GpuHealth(**base)


def sample(**kw) -> GpuSample:
    g = gpu_msg(**kw)
    figures = np.array([getattr(g, f) if f == "errors" or g.HasField(f) else np.nan for f in GPU_FIGURES], float)
    return GpuSample(figures, g.clock_event_reasons, 0, g.name, g.unavailable)


def board_of(samples: dict[int, GpuSample]) -> GpuBoard:
    board = GpuBoard()
    for rank, s in samples.items():
        board.observe("train", rank, f"host{rank}", s)
    return board


def explain(culprits, samples, now=None) -> str:
    board = board_of(samples)
    table = board.table("train")
    assert table is not None
    return explanation(np.asarray(culprits), table, time.monotonic() if now is None else now)


# ---- the explanation, from samples whose truth is known -------------------------------------
def test_a_throttled_gpu_explains_its_rank():
    samples = {r: sample() for r in range(4)}
    samples[2] = sample(sm=1100, temp=91, reasons=SW_THERMAL | HW_THERMAL)
    assert explain([2], samples) == "SM clock 1.1 GHz vs peers' 1.98 GHz: thermal throttling (91 °C vs peers' 60 °C)"


def test_a_power_capped_gpu_and_its_errors():
    samples = {r: sample() for r in range(3)}
    samples[0] = sample(sm=1500, power_mw=700_000, reasons=POWER_CAP, xid_events=2, last_xid=79, ecc_uncorrected=3)
    assert explain([0], samples) == (
        "SM clock 1.5 GHz vs peers' 1.98 GHz: power cap (700 W of a 700 W limit); "
        "2 Xid errors (last Xid 79); 3 uncorrected ECC errors"
    )


def test_nothing_to_say_when_the_gpu_runs_like_its_peers():
    samples = {r: sample(sm=1950 + r * 10) for r in range(4)}
    assert explain([1], samples) == ""
    samples[1] = sample(sm=1900, reasons=SW_THERMAL)  # a reason, but no clock gap: not the cause
    assert explain([1], samples) == ""


def test_a_reason_every_peer_shares_explains_no_gap_and_a_gap_without_reason_is_said():
    samples = {r: sample(reasons=SYNC_BOOST) for r in range(3)}
    samples[1] = sample(sm=1200, reasons=SYNC_BOOST)
    assert explain([1], samples) == "SM clock 1.2 GHz vs peers' 1.98 GHz (no throttle reason reported)"


def test_an_idle_gpu_clocked_down_explains_nothing_but_its_errors_do():
    samples = {r: sample() for r in range(3)}
    samples[1] = sample(sm=600, memory_clock_mhz=810, reasons=GPU_IDLE)  # waiting for its data loader
    assert explain([1], samples) == ""
    samples[1] = sample(sm=600, reasons=GPU_IDLE, xid_events=1, last_xid=48)
    assert explain([1], samples) == "1 Xid error (last Xid 48)"


def test_with_no_peer_sampled_the_gpu_is_held_to_its_own_maximum():
    assert explain([0], {0: sample(sm=1100, reasons=HW_THERMAL)}) == (
        "SM clock 1.1 GHz of its maximum 1.98 GHz: thermal throttling (60 °C)"
    )
    assert explain([0], {0: sample(sm=1100)}) == ""  # no reason: an idle GPU clocks down too


def test_a_host_episode_compares_its_ranks_with_the_rest_and_stale_samples_say_nothing():
    samples = {r: sample() for r in range(4)}
    samples[2] = samples[3] = sample(sm=990, reasons=HW_THERMAL)
    assert explain([2, 3], samples).startswith("SM clock 0.99 GHz vs peers' 1.98 GHz: thermal")
    assert explain([2, 3], samples, now=time.monotonic() + 3600) == ""


# ---- over the wire -----------------------------------------------------------------------------
def test_the_agent_sender_carries_its_gpu_samples_to_the_api(collector):
    """A real Transport with the real sampler reading a fake pynvml: what NVML said is what the API serves."""
    gpu = FakeGpu(sm_mhz=1100, temperature_c=91, reasons=SW_THERMAL, xids=[79])
    nvml = FakeNvml([gpu])
    sampler = GpuHealthSampler(0, interval_s=0.02, nvml=lambda: nvml, device=lambda local_rank: (0, gpu.uuid))
    identity = Identity(job="agentjob", rank=0, local_rank=0, world_size=1, group_rank=0, host="h0", pid=1)
    transport = Transport(collector.grpc_target, identity, flush_interval_s=0.02)
    transport.gpu_health = sampler
    sampler.start()
    transport.start()
    try:
        wait_for(lambda: sampler.samples >= 1, 10, "a GPU sample")
        ids = np.arange(1, dtype=np.uint32)
        ns = np.full(1, 1000, np.int64)
        for step in range(3):
            now = time.perf_counter_ns()
            cols = PhaseColumns(ids, np.ones(1, np.uint32), ns, ns, ns, ns)
            names = ["Net"] if step == 0 else []
            transport.submit(
                StepRecord(step, now - 1000, now, new_module_names=names, phases={"forward": cols, "backward": cols})
            )
            time.sleep(0.05)
        body = wait_for(
            lambda: (b := get(collector.url, "/api/v1/jobs/agentjob/gpu")[1])["ranks"] and b, 10, "rank 0's GPU"
        )
    finally:
        transport.close()
        sampler.close()
    (rank,) = body["ranks"]
    assert (rank["rank"], rank["host"], rank["gpu"]) == (0, "h0", "NVIDIA H200")
    assert (rank["sm_clock_mhz"], rank["max_sm_clock_mhz"], rank["temperature_c"]) == (1100, 1980, 91)
    assert (rank["clock_reasons"], rank["xid_events"], rank["last_xid"]) == (["sw_thermal"], 1, 79)
    assert rank["errors"] == 0 and rank["age_s"] < 10 and "unavailable" not in rank
    assert sampler.attached >= 1 and "modtrack-gpu-health" in nvml.threads() and len(nvml.threads()) == 1


@pytest.mark.parametrize(
    "bad, says",
    [
        (gpu_msg(temperature_c=5000), "temperature_c 5000 is over the limit of 1000"),
        (gpu_msg(utilization_pct=101), "utilization_pct 101 is over the limit of 100"),
        (gpu_msg(name="H200\n"), "name must be at most 256 printable characters"),
        (gpu_msg(unavailable="no NVML"), "a sample marked unavailable ('no NVML') carries figures"),
    ],
)
def test_a_bad_gpu_sample_refuses_its_report_with_the_field_and_the_collector_keeps_what_it_had(collector, bad, says):
    rank = FakeRank(collector.grpc_target, "train", 0, 1)
    rank.report(report(0, [1.0] * 5, gpu=gpu_msg(sm=1800)))
    rank.wait_ack(0)
    rank.report(report(1, [1.0] * 5, gpu=bad))
    rank.wait_done()
    assert rank.error is not None and rank.error.code().name == "INVALID_ARGUMENT"
    assert "job 'train' rank 0 step 1 gpu: " + says in rank.error.details()
    status, body = get(collector.url, "/api/v1/jobs/train/gpu")
    assert status == 200 and [r["sm_clock_mhz"] for r in body["ranks"]] == [1800]  # the good one stays
    again = FakeRank(collector.grpc_target, "train", 0, 1, session="s2")
    again.report(report(1, [1.0] * 5))
    again.wait_ack(1)  # the collector serves on
    again.close()


def test_an_agent_that_cannot_read_nvml_says_why_in_the_api_and_metrics(collector):
    rank = FakeRank(collector.grpc_target, "train", 0, 1)
    rank.report(
        report(0, [1.0] * 5, gpu=pb.GpuHealth(sampled_ns=1, unavailable="nvidia-ml-py is not installed", errors=1))
    )
    rank.wait_ack(0)
    rank.close()
    (entry,) = get(collector.url, "/api/v1/jobs/train/gpu")[1]["ranks"]
    assert entry["unavailable"] == "nvidia-ml-py is not installed" and entry["sm_clock_mhz"] is None
    text = get(collector.url, "/metrics")[1]
    assert 'modtrack_gpu_health_available{host="host0",job="train",rank="0"} 0.0' in text
    assert "modtrack_gpu_sm_clock_hertz{" not in text


def test_metrics_per_rank_are_bounded_and_in_base_units():
    board = GpuBoard()
    every_reason = sum(bit for bit in pb.GpuClockReason.values())
    for rank in range(64):
        board.observe("train", rank, f"host{rank // 8}", sample(sm=1100, reasons=every_reason, xid_events=1))
    board.observe("old", 0, "h", sample())
    families = {f.name: f for f in text_string_to_metric_families(_exposition(GpuMetrics(board)))}
    per_rank = [s for f in families.values() for s in f.samples if s.labels.get("job") == "train"]
    assert len(per_rank) <= 64 * (11 + 7)  # the figures, availability, and the 7 throttle reasons at most
    reasons = {s.labels["reason"] for s in families["modtrack_gpu_clock_throttled"].samples}
    assert reasons == set(REASON_TEXT)
    sm = {
        s.labels["rank"]: s.value for s in families["modtrack_gpu_sm_clock_hertz"].samples if s.labels["job"] == "train"
    }
    assert len(sm) == 64 and set(sm.values()) == {1.1e9}
    power = families["modtrack_gpu_power_watts"].samples[0].value
    assert power == 500.0
    board.forget("train")
    later = GpuMetrics(board, clock=lambda: time.monotonic() + 3600)  # "old" is stale by then
    assert "job=" not in _exposition(later).replace("# ", "")


def _exposition(collector) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


# ---- the verdict -------------------------------------------------------------------------------
TRUTH = "SM clock 1.1 GHz vs peers' 1.98 GHz: thermal throttling (91 °C vs peers' 60 °C)"


def stream_throttled_job(collector) -> dict:
    """Four fake ranks, rank 2 slow in Net.blocks.1 and its GPU at 1.1 GHz, thermal; the others at 1.98 GHz.
    A sample rides on a few reports only, as the agent sends them. Returns the explained straggler."""
    ranks = [FakeRank(collector.grpc_target, "train", i, 4) for i in range(4)]
    try:
        for step in range(10):
            for i, r in enumerate(ranks):
                fields = {}
                if step in (0, 6):
                    throttled = i == 2
                    fields["gpu"] = gpu_msg(
                        sm=1100 if throttled else 1980, temp=91 if throttled else 60, reasons=SW_THERMAL * throttled
                    )
                r.report(report(step, slow_rank_ms(i, step), sync_ms=sync_of(i), **fields))
        for r in ranks:
            r.wait_ack(9)
    finally:
        for r in ranks:
            r.close()

    def straggler():
        found = get(collector.url, "/api/v1/jobs/train/stragglers")[1]["stragglers"]
        return [s for s in found if s["state"] == "active" and s["explanation"]]

    (s,) = wait_for(straggler, 15, "an explained straggler")
    return s


def test_the_slow_rank_whose_gpu_throttles_is_explained_in_api_cli_and_alert(collector):
    s = stream_throttled_job(collector)
    assert (s["rank"], s["explanation"]) == (2, TRUTH)
    table = render("stragglers", get(collector.url, "/api/v1/jobs/train/stragglers")[1])
    assert f"GPU: {TRUTH}" in table
    alerts = get(collector.url, "/api/v1/alerts")[1]["alerts"]
    (alert,) = [a for a in alerts if a["labels"].get("rank") == "2"]
    assert alert["annotations"]["explanation"] == TRUTH and TRUTH in alert["annotations"]["summary"]
    gpu = render("gpu", get(collector.url, "/api/v1/jobs/train/gpu")[1]).splitlines()
    assert gpu[0].split()[:4] == ["RANK", "HOST", "GPU", "SM_GHZ"]
    assert [line.split()[4] for line in gpu[1:]] == ["1.980", "1.980", "1.100", "1.980"]


def test_the_dashboard_banner_says_what_the_gpu_explains(collector, browser):
    stream_throttled_job(collector)
    browser.get(collector.url + "/?job=train")
    detail = wait_js(browser, "document.getElementById('verdict-detail').textContent.includes('GPU:') && "
                     "document.getElementById('verdict-detail').textContent", 30, "the GPU in the banner")  # fmt: skip
    assert f"GPU: {TRUTH}" in detail
    assert "rank 2 @ host2" in browser.execute_script("return document.getElementById('verdict-title').textContent")
