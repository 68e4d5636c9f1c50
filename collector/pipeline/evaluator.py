"""The merge tick and the evaluation of due steps: merge -> detect -> episodes -> store, metrics, alerts.

The tick runs on the event loop: it asks the merge for due steps (each carries a snapshot of its
job), marks silent ranks missing, trims old module figures, and forgets jobs that finished more
than `job_retention_s` ago (their history stays in SQLite and comes back if a rank says Hello
again). Due steps are evaluated on one evaluation thread, which reads only the snapshots and its
own detectors, so a large job's detection never stalls ingest and a Hello never races it. A step
whose evaluation fails is counted and logged with its job and step, never dropped in silence.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np

from modtrack.collector.config import ServeConfig
from modtrack.collector.outputs.alerting import AlertDispatcher
from modtrack.collector.outputs.metrics import CollectorMetrics
from modtrack.collector.pipeline.collectives import take_out_waits
from modtrack.collector.pipeline.detector import Detector, params_for_clock
from modtrack.collector.pipeline.merge import JobSnapshot, JobState, Merger, RankState, ReadyStep, build_matrix
from modtrack.collector.records import Episode
from modtrack.collector.store.sqlite import Store
from modtrack.collector.store.writer import StoreWriter

log = logging.getLogger("modtrack.collector")

# A due step of a job that sends collective stats waits at most this long for them (agent/collectives.py:
# Flight Recorder dumps come every second, or less often where a dump is dear)
COLLECTIVE_HOLD_S = 15.0


@dataclasses.dataclass
class StoredJob:
    """What a restart (or a returning job) reads back from SQLite to carry on."""

    state: JobState
    episodes: list[Episode]  # every episode of the job, for their ids
    active: list[Episode]


def read_job(store: Store, row: dict) -> StoredJob:
    """Read thread: a job's module table, ranks (missing until they report) and episodes."""
    job = row["job"]
    last = row["last_evaluated_step"]
    state = JobState(
        job, row["world_size"], store.module_names(job), -1 if last is None else last, row.get("attempt") or 0
    )
    for r in store.ranks(job):
        state.sessions[r["rank"]] = (r.get("attempt") or 0, r.get("session") or "")
        state.add_rank(
            r["rank"],
            RankState(
                host=r["host"] or "",
                last_seen=0.0,
                state="missing",
                clock_offset_ns=r["clock_offset_ns"] or 0,
                clock_kind=r["clock_kind"] or 0,
            ),
        )
    episodes = store.episodes(job)
    return StoredJob(state, episodes, [e for e in episodes if e.state == "active"])


def read_one_job(store: Store, job: str) -> StoredJob | None:
    row = store.job(job)
    return None if row is None else read_job(store, row)


def episode_key(ep: Episode) -> tuple:
    """One verdict per culprit: its module may change as the verdict grows, its identity does not."""
    return (ep.job, ep.attempt, ep.rank, ep.first_step)


class Evaluator:
    def __init__(
        self,
        config: ServeConfig,
        merger: Merger,
        store: Store,
        writer: StoreWriter,
        metrics: CollectorMetrics,
        alerting: AlertDispatcher,
        read: Callable,
    ):
        self.config = config
        self.merger = merger
        self.store = store
        self.writer = writer
        self.metrics = metrics
        self.alerting = alerting
        self.read = read  # async read(fn, *args): runs fn on the read pool
        self.detectors: dict[str, Detector] = {}  # touched only on the evaluation thread
        self.episode_ids: dict[tuple, int] = {}
        self.next_episode_id = 1
        self.eval_errors = 0  # steps (or ticks) whose evaluation raised
        self.jobs_forgotten = 0
        self.connected: Callable[[str], bool] = lambda job: False  # set by the collector
        self.on_forget: list[Callable[[str], None]] = []
        self.explain: Callable[[Episode], str] = lambda ep: ""  # GPU health: what the culprit's GPU says
        # collective timing: (ranks, ms per step) each rank waited in collectives lately
        self.collective_waits: Callable[[str], tuple[np.ndarray, np.ndarray]] = lambda job: (np.zeros(0), np.zeros(0))
        # ... and (ranks, module x phase column keys, ms) of a step's waits inside module windows; a step is held
        # (at most collective_hold_s) until collectives_in(job, step): its stats arrive after the step itself
        self.collective_module_waits: Callable[[str, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = (
            lambda job, step: (np.zeros(0), np.zeros(0), np.zeros(0))
        )
        self.collectives_in: Callable[[str, int], bool] = lambda job, step: True
        self.collective_hold_s = COLLECTIVE_HOLD_S
        self._held: list[tuple[ReadyStep, float]] = []  # (step, since): in order per job
        self.pool = concurrent.futures.ThreadPoolExecutor(1, "modtrack-eval")
        self._restoring: dict[str, asyncio.Future] = {}

    # --- restart and returning jobs ------------------------------------------------------------
    def restore_all(self) -> None:
        """Read thread, before serving: every stored job as it was."""
        for row in self.store.jobs():
            self._install(read_job(self.store, row))
        self.next_episode_id = self.store.max_episode_id() + 1

    async def restore_job(self, job: str) -> None:
        """Event loop, on the Hello of a job not in memory (forgotten after it finished): read it
        back from SQLite so module ids, steps and episodes carry on. Concurrent Hellos wait for
        the same read."""
        if job in self.merger.jobs:
            return
        pending = self._restoring.get(job)
        if pending is None:
            pending = self._restoring[job] = asyncio.ensure_future(self.read(read_one_job, self.store, job))
        try:
            stored = await asyncio.shield(pending)
        finally:
            self._restoring.pop(job, None)
        if stored is not None and job not in self.merger.jobs:
            await asyncio.get_running_loop().run_in_executor(self.pool, self._install_episodes, stored)
            self.merger.jobs.setdefault(job, stored.state)  # on the loop, where merge state lives

    def _install(self, stored: StoredJob) -> None:
        """Read thread at start, before anything else runs."""
        self._install_episodes(stored)
        self.merger.jobs[stored.state.job] = stored.state

    def _install_episodes(self, stored: StoredJob) -> None:
        """Episode ids and the active episodes' detector state (the evaluation thread's own)."""
        for ep in stored.episodes:
            if ep.id is not None:
                self.episode_ids[episode_key(ep)] = ep.id
        if stored.active:
            self._detector(stored.state.snapshot()).restore(stored.active)

    # --- the tick ------------------------------------------------------------------------------
    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_retention = time.monotonic() + self.config.retention_every_s
        while True:
            await asyncio.sleep(self.config.tick_s)
            try:
                ready, missing = self.merger.due(time.monotonic())
                ready = self._release(ready, time.monotonic())
                for job, rank in missing:
                    log.warning(
                        "rank %d of job %r is missing (no report for %.0f s)", rank, job, self.config.missing_after_s
                    )
                    self.writer.call(self.store.upsert_rank, job, rank, {"state": "missing"})
                    self.metrics.mark_rank_missing(job, rank, self.merger.jobs[job].ranks[rank].host)
                if ready:
                    await loop.run_in_executor(self.pool, self.evaluate, ready)
                for job, n in list(self.store.duplicates.items()):
                    if job in self.merger.jobs:  # a forgotten job's series stay gone
                        self.metrics.set_duplicates(job, "conflict", n)
                if time.monotonic() >= next_retention:
                    next_retention = time.monotonic() + self.config.retention_every_s
                    for job in list(self.merger.jobs):
                        self.writer.call(self.store.drop_old_module_blobs, job, self.config.retain_steps)
                    await self.forget_finished(time.monotonic())
            except asyncio.CancelledError:
                raise
            except Exception:
                self.eval_errors += 1
                log.exception("merge tick failed")

    def _release(self, ready: list[ReadyStep], now: float) -> list[ReadyStep]:
        """The due steps whose collective stats are in, or that waited collective_hold_s for them, in order per
        job; the others are held. Collective stats ride a later report (a Flight Recorder dump comes every second
        or more), and a step's waits inside module windows are taken out of that very step's module compute."""
        out, held, blocked = [], [], set()
        for item, since in self._held + [(item, now) for item in ready]:
            job = item.job.job
            if job not in blocked and (now - since >= self.collective_hold_s or self.collectives_in(job, item.step)):
                out.append(item)
            else:
                blocked.add(job)  # its later steps wait behind it
                held.append((item, since))
        self._held = held
        return out

    async def forget_finished(self, now: float) -> list[str]:
        """Jobs with no connected rank, nothing pending and no activity for job_retention_s leave
        memory: merge state, detector, episode ids, metrics series. SQLite keeps their history."""
        held = {item.job.job for item, _ in self._held}  # steps waiting for their collective stats
        gone = [
            job
            for job, state in self.merger.jobs.items()
            if not state.pending
            and job not in held
            and not self.connected(job)
            and now - state.last_activity > self.config.job_retention_s
        ]
        if not gone:
            return gone
        for job in gone:
            del self.merger.jobs[job]
        await asyncio.get_running_loop().run_in_executor(self.pool, self._forget, gone)
        for job in gone:
            for forget in self.on_forget:
                forget(job)
            log.info(
                "job %r finished %.0f s ago: forgotten in memory, kept in SQLite", job, self.config.job_retention_s
            )
        self.jobs_forgotten += len(gone)
        return gone

    def _forget(self, jobs: list[str]) -> None:
        """Evaluation thread: the detectors and episode ids are its own."""
        gone = set(jobs)
        for job in jobs:
            self.detectors.pop(job, None)
        for key in [k for k in self.episode_ids if k[0] in gone]:
            del self.episode_ids[key]

    # --- evaluation (the evaluation thread) --------------------------------------------------------
    def _detector(self, job: JobSnapshot) -> Detector:
        """The job's detector; a new attempt (torchelastic restart) starts a fresh one, and the old
        attempt's episodes end."""
        detector = self.detectors.get(job.job)
        if detector is not None and getattr(detector, "attempt", 0) != job.attempt:
            for ep in detector.active():
                ep.state = "resolved"
                self._persist_episode(ep)
            self.metrics.set_episodes(job.job, [])
            detector = None
        if detector is None:
            params = params_for_clock(self.config.detector, job.cpu_clock)
            detector = self.detectors[job.job] = Detector(job.job, params)
            detector.attempt = job.attempt
        return detector

    def evaluate(self, ready: list[ReadyStep]) -> None:
        """Matrix, detector, episodes to the store, metrics, alerts; reads only the snapshots."""
        evaluated: dict[tuple[str, int], int] = {}  # (job, attempt) -> its last step evaluated here
        for item in ready:
            job = item.job.job
            try:
                matrix = build_matrix(item.job, item.step, item.rows)
                # waits inside module windows out of module compute, before ranks are compared
                take_out_waits(matrix, self.collective_module_waits(job, item.step), self.collective_waits(job))
                detector = self._detector(item.job)
                changed = detector.observe(matrix)
                for ep in changed:
                    self._persist_episode(ep)
                self.metrics.observe_step(matrix, item.lag_s)
                if changed:
                    self.metrics.set_episodes(job, detector.active())
            except Exception:
                self.eval_errors += 1
                log.exception("evaluating step %d of job %r failed; the step has no verdict", item.step, job)
            # Evaluated, with or without a verdict: the step is done and is not merged again.
            evaluated[(job, item.job.attempt)] = max(item.step, evaluated.get((job, item.job.attempt), item.step))
        for (job, attempt), step in evaluated.items():  # one write per job, after its episodes (store: the max)
            self.writer.call_threadsafe(self.store.set_evaluated, job, step, attempt)

    def _persist_episode(self, ep: Episode) -> None:
        key = episode_key(ep)
        if ep.id is None:
            ep.id = self.episode_ids.get(key)
        if ep.id is None:
            ep.id = self.next_episode_id
            self.next_episode_id += 1
        self.episode_ids[key] = ep.id
        if ep.state == "active":  # GPU health, collectives; a resolved episode keeps the last explanation it had
            ep.explanation = self.explain(ep)
        snapshot = dataclasses.replace(ep, ranks=list(ep.ranks))
        self.writer.call_threadsafe(self.store.upsert_episode, snapshot)
        log.info(
            "straggler episode %s: job %r attempt %d rank %d host %s: %s, %s/%s %.2fx, %.1f ms/step lost, steps %d-%d",
            ep.state,
            ep.job,
            ep.attempt,
            ep.rank,
            ep.host,
            ep.cause,
            ep.module,
            ep.phase,
            ep.slowdown,
            ep.cost_ms_per_step,
            ep.first_step,
            ep.last_step,
        )
        self.alerting.episode_changed(snapshot)  # thread-safe, never blocks

    def close(self) -> None:
        self.pool.shutdown(wait=True)
