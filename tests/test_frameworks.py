"""Step phases under real training loops: forward and backward run inside `optimizer.step(closure)`
(LBFGS, PyTorch Lightning) are forward and backward, not optimizer time, and data time is still
measured; Lightning and the HF Trainer give the same per-module breakdown as a plain loop."""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
from torch import nn

from harness import torchrun
from harness.collector_process import CollectorProcess
from harness.evaluated import wait_evaluated
from harness.http import get_json
from harness.tiny_models import tiny_llama as build_tiny_llama
from modtrack.agent import ModuleTracker, position

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

DATA_WAIT = 0.030  # each batch takes this long to load
STEPS = 3


def tiny_llama():
    torch.manual_seed(0)
    return build_tiny_llama(positions=32)


class SlowData(torch.utils.data.Dataset):
    """Token sequences; every item waits DATA_WAIT / batch size (a slow loader), in wall time."""

    def __init__(self, batch: int = 4, items: int = 64):
        self.batch = batch
        self.items = torch.randint(0, 256, (items, 32), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        time.sleep(DATA_WAIT / self.batch)
        return {"input_ids": self.items[i], "labels": self.items[i]}


def records_of(run) -> tuple[list, ModuleTracker]:
    records = []
    with ModuleTracker(on_step=records.append, clock="cpu") as t:
        run()
    return records, t


def breakdown(tracker: ModuleTracker, record) -> dict:
    """{(module, phase): calls} of one step, names without the root's class."""
    names = tracker.module_names
    out = {}
    for phase, cols in record.phases.items():
        for mid, calls in zip(cols.module_id.tolist(), cols.calls.tolist()):
            out[(names[mid].split(".", 1)[-1], phase)] = calls
    return out


def check_phases(record, data_wait: float, step_call_ms: float | None = None) -> None:
    """step_call_ms: optimizer.step()'s wall time measured around the call (closure included)."""
    ms = {k: getattr(record, f"{k}_ns") / 1e6 for k in ("forward", "backward", "optimizer", "data")}
    assert ms["forward"] > 0 and ms["backward"] > 0, ms
    if step_call_ms is None:
        assert ms["optimizer"] < ms["forward"] + ms["backward"], ms  # the closure's work is not the optimizer's
    else:  # the closure's forward and backward are inside the call, and not the optimizer's
        assert ms["optimizer"] <= step_call_ms - ms["forward"] - ms["backward"] + 0.2, (ms, step_call_ms)
    assert ms["data"] >= data_wait * 1e3 * 0.9, ms
    total = sum(ms.values())
    assert total == pytest.approx(record.wall_ns / 1e6, rel=0.02), (ms, record.wall_ns / 1e6)


def plain_loop() -> tuple[list, ModuleTracker]:
    model = tiny_llama()
    loader = torch.utils.data.DataLoader(SlowData(), batch_size=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def run():
        for step, batch in enumerate(loader):
            if step == STEPS:
                break
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()

    return records_of(run)


def test_lbfgs_closure_is_forward_and_backward_and_data_time_is_measured():
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.LBFGS(model.parameters(), max_iter=4)
    x, y = torch.randn(64, 16), torch.randn(64, 1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    step_call_ms = []

    def run():
        for _ in range(STEPS):
            time.sleep(DATA_WAIT)
            start = time.perf_counter()
            opt.step(closure)
            step_call_ms.append((time.perf_counter() - start) * 1e3)

    records, _ = records_of(run)
    assert len(records) == STEPS
    for r, call_ms in zip(records[1:], step_call_ms[1:]):
        check_phases(r, DATA_WAIT, call_ms)
        assert r.phases["forward"].calls.max() == 4  # four closure calls: four forwards in one step


BETWEEN = 0.020  # the loop's own code between two optimizers' steps (a scheduler, logging): this long


def two_optimizers(model: nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """SGD with momentum for the 2-D weights, AdamW for the rest (as Muon and AdamW split a model)."""
    matrices = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return torch.optim.SGD(matrices, lr=1e-2, momentum=0.9), torch.optim.AdamW(rest, lr=1e-3)


def test_two_optimizers_stepped_one_after_the_other_end_one_step():
    """Each iteration is one step, not one per optimizer: its optimizer phase runs from the first optimizer's step
    to the last one's end (the loop's code between them too), and the next batch's loading is the next step's."""
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opts = two_optimizers(model)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    records: list = []
    stepped_ms, positions = [], []
    with ModuleTracker(on_step=records.append, clock="cpu") as t:
        for _ in range(STEPS + 1):
            time.sleep(DATA_WAIT)
            nn.functional.mse_loss(model(x), y).backward()
            start = time.perf_counter()
            opts[0].step()
            time.sleep(BETWEEN)
            opts[1].step()
            stepped_ms.append((time.perf_counter() - start) * 1e3)
            positions.append((t.position.step, t.position.phase))
            for opt in opts:
                opt.zero_grad()
    assert len(records) == STEPS + 1, [r.step for r in records]
    assert positions == [(i + 1, position.DATA) for i in range(STEPS + 1)]  # after both: the next step's loading
    for r, ms in zip(records[1:], stepped_ms[1:]):
        phase_ms = {k: getattr(r, f"{k}_ns") / 1e6 for k in ("forward", "backward", "optimizer", "data")}
        assert phase_ms["forward"] > 0 and phase_ms["backward"] > 0, phase_ms
        # the test's own clock around both steps holds the optimizer phase, and little else
        assert ms * 0.95 - 0.3 <= phase_ms["optimizer"] <= ms, (phase_ms, ms)
        assert DATA_WAIT * 1e3 * 0.9 <= phase_ms["data"] < (DATA_WAIT + BETWEEN / 2) * 1e3, phase_ms
        assert sum(phase_ms.values()) == pytest.approx(r.wall_ns / 1e6, rel=0.02), (phase_ms, r.wall_ns / 1e6)


def test_under_gradient_accumulation_the_loops_own_code_is_host_time_in_every_micro_batch():
    """Four micro-batches a step: each one's loading is data time; the loop's code between each forward and its
    backward, and after the last backward, is host time (StepReport.host_ns). The truth: the test's own clock
    around each wait it makes."""
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    x, y = torch.randn(64, 16), torch.randn(64, 1)

    def timed_sleep(seconds: float) -> float:
        start = time.perf_counter()
        time.sleep(seconds)
        return (time.perf_counter() - start) * 1e3

    records: list = []
    host_ms, loading_ms = [], []
    with ModuleTracker(on_step=records.append, clock="cpu"):
        for _ in range(STEPS + 2):
            host = loading = 0.0
            for _ in range(4):
                loading += timed_sleep(0.004)
                loss = nn.functional.mse_loss(model(x), y) / 4
                host += timed_sleep(0.006)  # a user's metrics: between the forward and its backward
                loss.backward()
            host += timed_sleep(0.005)  # gradient clipping, logging: after the last backward
            opt.step()
            opt.zero_grad()
            host_ms.append(host)
            loading_ms.append(loading)
    assert len(records) == STEPS + 2
    errors = [r.host_ns / 1e6 - truth for r, truth in zip(records[1:], host_ms[1:])]
    # beyond the waits: the loss, the loop's own lines, backward's call and return, in 5 gaps (~0.2 ms each here);
    # a micro-batch missed would read 6 ms short, the loading counted in 16 ms long
    assert 0 <= statistics.median(errors) < 2.5, errors
    for r, host, loading in zip(records[1:], host_ms[1:], loading_ms[1:]):
        assert r.data_ns / 1e6 >= host + loading, (r.data_ns / 1e6, host, loading)  # host time is part of data_ns


def test_a_step_whose_optimizer_step_a_grad_scaler_skipped_still_ends():
    """float16 mixed precision: GradScaler.step() skips optimizer.step() when the gradients hold an inf (2 of 6
    steps here). Each iteration is still one step, the skipped ones with no optimizer time; before, a skipped
    step ran on into the next iteration (one step of three forwards)."""
    model = nn.Linear(8, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.register_step_pre_hook(lambda *_: time.sleep(0.005))  # an optimizer step takes 5 ms here
    scaler = torch.amp.GradScaler("cpu")
    original_step = torch.amp.GradScaler.step
    records: list = []
    with ModuleTracker(on_step=records.append, clock="cpu"):
        for i in range(6):
            x = torch.randn(4, 8)
            if i in (1, 2):
                x[0, 0] = float("inf")  # its gradient overflows: the scaler skips this step
            scaler.scale(model(x).sum()).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    assert [r.phases["forward"].calls.tolist() for r in records] == [[1]] * 6
    assert all(r.backward_ns > 0 for r in records)
    stepped = [r.optimizer_ns >= 5_000_000 for r in records]
    assert stepped == [True, False, False, True, True, True], [r.optimizer_ns for r in records]
    assert all(r.optimizer_ns < 1_000_000 for r, s in zip(records, stepped) if not s)  # skipped: no optimizer time
    assert torch.amp.GradScaler.step is original_step  # put back at close


class Wrapping(torch.optim.Optimizer):
    """An optimizer that steps another inside its own step, with work before and after it (as
    ZeroRedundancyOptimizer steps its local optimizer and then broadcasts the parameters it updated)."""

    def __init__(self, inner: torch.optim.Optimizer, before_s: float, after_s: float, seen: list):
        super().__init__(inner.param_groups, {})
        self.inner, self.before_s, self.after_s, self.seen = inner, before_s, after_s, seen

    def step(self, closure=None):
        time.sleep(self.before_s)
        self.inner.step()
        self.seen.append(self.tracker.position.phase)  # where a hang in the broadcast would be told
        time.sleep(self.after_s)


def test_an_optimizer_stepped_inside_another_is_the_outer_ones_step():
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 1))
    phases: list = []
    opt = Wrapping(torch.optim.SGD(model.parameters(), lr=1e-2), 0.005, BETWEEN, phases)
    x, y = torch.randn(64, 16), torch.randn(64, 1)
    records: list = []
    stepped_ms = []
    with ModuleTracker(on_step=records.append, clock="cpu") as t:
        opt.tracker = t
        for _ in range(STEPS + 1):
            time.sleep(DATA_WAIT)
            nn.functional.mse_loss(model(x), y).backward()
            start = time.perf_counter()
            opt.step()
            stepped_ms.append((time.perf_counter() - start) * 1e3)
            opt.zero_grad()
    assert len(records) == STEPS + 1
    assert phases == [position.OPTIMIZER] * (STEPS + 1)
    for r, ms in zip(records[1:], stepped_ms[1:]):
        assert ms * 0.95 - 0.3 <= r.optimizer_ns / 1e6 <= ms, (r.optimizer_ns / 1e6, ms)
        assert r.data_ns / 1e6 < (DATA_WAIT + BETWEEN / 2) * 1e3, r.data_ns / 1e6


def test_each_optimizer_after_its_own_forward_and_backward_ends_a_step():
    """A GAN's discriminator and generator updates (a forward and a backward before each optimizer's step) are two
    steps per iteration, each with its own phases; so is one optimizer stepped twice in a row."""
    disc, gen = nn.Linear(8, 1), nn.Linear(4, 8)
    opt_d, opt_g = torch.optim.SGD(disc.parameters(), lr=1e-2), torch.optim.SGD(gen.parameters(), lr=1e-2)
    z = torch.randn(32, 4)
    records: list = []
    with ModuleTracker(on_step=records.append, clock="cpu"):
        for _ in range(STEPS):
            disc(gen(z).detach()).mean().backward()
            opt_d.step()
            (-disc(gen(z)).mean()).backward()
            opt_g.step()
            opt_d.zero_grad()
            opt_g.zero_grad()
        opt_g.step()
        opt_g.step()
    assert len(records) == 2 * STEPS + 2
    for r in records[: 2 * STEPS]:
        assert r.forward_ns > 0 and r.backward_ns > 0 and r.optimizer_ns > 0, r.step
    assert [r.forward_ns for r in records[-2:]] == [0, 0] and all(r.optimizer_ns > 0 for r in records[-2:])


def test_lightning_steps_have_the_plain_loops_breakdown():
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_llama()

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def run():
        trainer = pl.Trainer(
            max_steps=STEPS,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(Module(), torch.utils.data.DataLoader(SlowData(), batch_size=4))

    records, t = records_of(run)
    plain, plain_t = plain_loop()
    assert len(records) >= STEPS
    for r in records[1:STEPS]:
        check_phases(r, DATA_WAIT)
    assert breakdown(t, records[1]) == breakdown(plain_t, plain[1])


def test_hf_trainer_steps_have_the_plain_loops_breakdown(tmp_path):
    pytest.importorskip("accelerate")

    def run():
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=STEPS,
            per_device_train_batch_size=4,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            optim="adamw_torch",
        )
        transformers.Trainer(model=tiny_llama(), args=args, train_dataset=SlowData()).train()

    records, t = records_of(run)
    plain, plain_t = plain_loop()
    assert len(records) >= STEPS
    for r in records[1:STEPS]:
        check_phases(r, DATA_WAIT)
    assert breakdown(t, records[1]) == breakdown(plain_t, plain[1])


# ---- under torchrun, with the agent and a real collector -----------------------------------------
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "framework_train.py")


@pytest.fixture
def collector_process(tmp_path):
    """A collector subprocess on free loopback ports, ended by the test."""
    with CollectorProcess(tmp_path / "data") as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["lightning", "hf"])
def test_a_user_hook_that_slows_one_rank_is_named_at_its_module(collector_process, framework, tmp_path):
    grpc_addr, api = collector_process.grpc_target, collector_process.url
    steps, onset = 30, 6
    cmd = torchrun.torchrun_cmd(
        2,
        "-m",
        "modtrack.agent",
        "--collector",
        grpc_addr,
        "--job",
        framework,
        SCRIPT,
        "--framework",
        framework,
        "--steps",
        str(steps),
        "--slow-rank",
        "1",
        "--slow-ms",
        "40",
        "--slow-from-step",
        str(onset),
    )
    done = torchrun.run(cmd, timeout=240, extra_env={"TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("done rank") == 2, done.stdout
    wait_evaluated(api, steps - 1, job=framework, timeout=30)
    stragglers = get_json(f"{api}/api/v1/jobs/{framework}/stragglers")["stragglers"]
    culprit = [
        s
        for s in stragglers
        if s["rank"] == 1 and s["module"].endswith("model.layers.1.mlp") and s["phase"] == "forward"
    ]
    assert culprit, json.dumps(stragglers, indent=1)
    assert [s for s in stragglers if s["rank"] != 1] == [], json.dumps(stragglers, indent=1)
    # the module's time, not its caller's: the hook's 40 ms are in layers.1.mlp's forward
    step = get_json(f"{api}/api/v1/jobs/{framework}/modules?step={steps - 2}")["modules"]
    mlp = [m for m in step if m["module"].endswith("model.layers.1.mlp") and m["phase"] == "forward"]
    assert mlp and mlp[0]["ms_by_rank"]["1"] > 35 > mlp[0]["ms_by_rank"]["0"], mlp
