"""agent.track() / agent.step() in a custom loop, streaming to a real gRPC server on loopback."""

from __future__ import annotations

import torch

from harness.fake_collector import FakeCollector
from harness.waiting import wait_for
from modtrack.agent import api


def test_track_streams_every_step_of_a_loop_without_optimizer(serve, monkeypatch):
    monkeypatch.delenv("MODTRACK_COLLECTOR", raising=False)
    fake = FakeCollector()
    _, port = serve(fake)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with api.track(f"127.0.0.1:{port}", job="custom-loop") as tracking:
        assert tracking.transport is not None
        for _ in range(4):
            model(torch.randn(4, 8)).sum().backward()
            api.step()  # no optimizer: the loop marks its steps itself
        wait_for(lambda: len(fake.received) == 4)
    assert api._active is None
    ((_, hello),) = fake.hellos
    assert hello.job == "custom-loop" and hello.world_size == 1
    names = list(hello.module_names) or list(fake.reports[0].new_module_names)
    assert names[:2] == ["Sequential", "Sequential.0"]
    phases = {p.phase for p in fake.reports[3].phases}
    assert phases >= {1, 2}  # forward and backward figures
    assert len(fake.offsets) >= 1  # the clock offset went out too


def test_track_without_collector_does_nothing(monkeypatch):
    monkeypatch.delenv("MODTRACK_COLLECTOR", raising=False)
    tracking = api.track()
    assert tracking.tracker is None and tracking.transport is None
    api.step()  # harmless
    tracking.close()
