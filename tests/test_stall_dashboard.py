"""The dashboard's hung-job banner in a real headless Chromium, fed by heartbeats over real gRPC."""

from __future__ import annotations

import pytest

from harness.browser import console_errors
from harness.browser import wait_js as wait_in_page
from harness.collector_thread import CollectorThread
from harness.evaluated import wait_stall_with_every_beat
from harness.fake_rank import FakeRank
from modtrack.protos import modtrack_pb2 as pb

DDP_WAIT = "/site-packages/torch/autograd/graph.py:829 in _engine_run_backward: return Variable._execution_engine"
HANG = "/job/train.py:40 in next_batch: time.sleep(3600)"


@pytest.mark.slow
def test_banner_names_the_stuck_rank_shows_its_stack_and_goes_when_it_moves(tmp_path, browser):
    c = CollectorThread(tmp_path / "data")
    ranks = [FakeRank(c.grpc_target, "hung", r, 2) for r in range(2)]
    try:
        base = dict(step=7, step_ns=12 * 10**9, position_ns=11 * 10**9, repeat_ms=1000)
        ranks[0].send(
            pb.AgentMessage(heartbeat=pb.Heartbeat(phase="backward", stack=[DDP_WAIT], backward_passes=1, **base))
        )
        ranks[1].send(
            pb.AgentMessage(heartbeat=pb.Heartbeat(phase="data", stack=["/job/train.py:99 in main", HANG], **base))
        )
        wait_stall_with_every_beat(c.url, "hung")
        browser.get(c.url + "/")
        title = wait_in_page(
            browser,
            "!document.getElementById('stall').hidden && document.getElementById('stall-title').textContent",
            30,
            "the stall banner",
        )
        assert "Job stalled: rank 1 on host1 has not moved for" in title and "data, outside every module" in title
        assert "step 7" in title
        assert (
            browser.execute_script("return document.getElementById('stall-detail').textContent")
            == "rank 0 waits for it"
        )
        assert HANG in browser.execute_script("return document.getElementById('stall-stack').textContent")
        ranks[1].send(pb.AgentMessage(heartbeat=pb.Heartbeat(step=8, running=True)))  # it moves again
        wait_in_page(browser, "document.getElementById('stall').hidden", 30, "the banner to go")
        assert console_errors(browser) == []
    finally:
        for r in ranks:
            r.kill()
        c.stop()
