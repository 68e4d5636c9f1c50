"""The HTTP JSON API (CONTRACT.md), /metrics, /healthz and the dashboard page, on aiohttp.

Every SQLite read runs in the read thread pool, never on the event loop that also serves
gRPC ingest. All times in milliseconds; errors are JSON {"error": ...} with 400/401/404.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from aiohttp import web

from modtrack.collector import auth
from modtrack.collector.records import PHASE_NAMES, STEP_FIGURES, Episode, column_key
from modtrack.collector.store.sqlite import Store

DASHBOARD = pathlib.Path(__file__).resolve().parent / "dashboard" / "index.html"
OPEN_PATHS = {"/healthz", "/"}  # probes and the static page carry no data
JOB_FILTERED_PATHS = {"/api/v1/jobs", "/api/v1/alerts"}  # a per-job token sees its jobs only
ACCESS = web.RequestKey("access", auth.Access)
MAX_LAST = 10_000


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def int_param(request: web.Request, name: str, default: int | None, lo: int = 0, hi: int | None = None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ApiError(400, f"{name} must be {bounds}")
    return value


class Controls(Protocol):
    """Messages to a job's connected ranks (the ingest servicer); KeyError: no rank connected."""

    def request_capture(self, job: str, steps: int) -> tuple[str, int]: ...

    def set_sampling(self, job: str, every: int) -> int: ...

    def sampling(self, job: str) -> int | None: ...

    def pause(self, job: str) -> int: ...

    def resume(self, job: str) -> int: ...


@dataclass
class ApiDeps:
    """Everything the routes use, typed: the store (read on the read pool), what lives only in
    memory (connected ranks, firing alerts, metrics), and the controls."""

    store: Store
    read: Callable[..., Awaitable[Any]]  # read(fn, *args): fn on the read pool
    tokens: auth.Tokens | None
    ranks_reporting: Callable[[str], int | None]  # a job's live ranks; None when it is not in memory
    controls: Controls
    alerts: Callable[[list[Episode]], list[dict]]  # active episodes -> alerts, as they fire
    exposition: Callable[[], tuple[bytes, str]]  # /metrics body and content type
    store_errors: Callable[[], int]  # failed store commits so far
    stall: Callable[[str], dict] | None = None  # hung jobs: a job's stall verdict (GET /api/v1/jobs/{job}/stall)
    collectives: Callable[[str, int], dict] | None = None  # (job, last): collective timing per group (issue 15)
    gpu: Callable[[str], list[dict] | None] | None = None  # GPU health: a job's latest GPU sample per rank


def make_app(deps: ApiDeps) -> web.Application:
    """The aiohttp application serving CONTRACT.md's routes from `deps`."""
    store, read = deps.store, deps.read

    refusals = auth.RefusalLog()

    @web.middleware
    async def token_and_errors(request, handler):
        static = request.path.startswith("/dashboard/")
        if request.path not in OPEN_PATHS and not static:
            access = auth.access(request.headers.get("Authorization"), deps.tokens)
            if access is None:
                refusals.refused(request.remote, "missing or wrong bearer token (HTTP)")
                return error(401, "missing or wrong bearer token")
            request[ACCESS] = access
            job = request.match_info.get("job")
            # A per-job token opens its jobs' pages and filtered lists, not /metrics.
            if not access.admin and (
                job is None and request.path not in JOB_FILTERED_PATHS or job is not None and not access.allows(job)
            ):
                return error(403, "this token does not open this resource")
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, str(exc))
        except web.HTTPException as exc:  # unknown path, wrong method: JSON like the rest
            if exc.status < 400:
                raise
            return error(exc.status, exc.reason)

    async def known_job(request) -> str:
        job = request.match_info["job"]
        if deps.ranks_reporting(job) is None and not await read(store.job_exists, job):
            raise ApiError(404, f"unknown job {job!r}")
        return job

    async def jobs(request):
        rows = await read(store.jobs)
        out = []
        for row in filter(lambda r: _allowed(request, r["job"]), rows):
            reporting = deps.ranks_reporting(row["job"]) or 0
            out.append(
                {
                    "job": row["job"],
                    "world_size": row["world_size"],
                    "ranks_reporting": reporting,
                    "last_step": row["last_step"],
                    "last_evaluated_step": row["last_evaluated_step"],
                    "attempt": row["attempt"],
                    "state": "running" if reporting else "stopped",
                    "sample_every": deps.controls.sampling(row["job"]),  # sampled mode; None: never set here
                }
            )
        return web.json_response({"jobs": out})

    async def stragglers(request):
        job = await known_job(request)
        state = request.query.get("state")
        if state not in (None, "active", "resolved"):
            return error(400, "state must be active or resolved")
        attempt = int_param(request, "attempt", None)
        episodes = await read(store.episodes, job, state, attempt)
        return web.json_response(
            {
                "job": job,
                "attempt": await _attempt(job, attempt),
                "stragglers": [
                    {
                        "rank": e.rank,
                        "host": e.host,
                        "module": e.module,
                        "phase": e.phase,
                        "slowdown": round(e.slowdown, 4),
                        "first_step": e.first_step,
                        "last_step": e.last_step,
                        "state": e.state,
                        "cost_ms_per_step": round(e.cost_ms_per_step, 4),
                        "cost_pct": round(e.cost_pct, 3),
                        "cause": e.cause,
                        "excess_ms": round(e.excess_ms, 4),
                        "modules": e.modules,
                        "attempt": e.attempt,
                        "ranks": e.ranks,
                        "id": e.id,
                        "explanation": e.explanation,  # GPU health: "" when the GPU explains nothing
                    }
                    for e in episodes
                ],
            }
        )

    async def _attempt(job: str, attempt: int | None) -> int:
        """The attempt a query is about: the one asked for, else the job's latest."""
        return attempt if attempt is not None else await read(store.latest_attempt, job)

    async def steps(request):
        job = await known_job(request)
        last = int_param(request, "last", 100, 1, MAX_LAST)
        attempt = await _attempt(job, int_param(request, "attempt", None))
        rows = await read(store.last_steps, job, last, attempt)
        hosts = await _hosts(job)
        by_step: dict[int, list] = {}
        for step, rank, *figures in rows:
            f = dict(zip(STEP_FIGURES, figures))
            by_step.setdefault(step, []).append(
                {
                    "rank": rank,
                    "host": hosts.get(rank, ""),
                    "wall_ms": (f["end_ns"] - f["start_ns"]) / 1e6,
                    "forward_ms": f["forward_ns"] / 1e6,
                    "backward_ms": f["backward_ns"] / 1e6,
                    "sync_wait_ms": f["backward_tail_ns"] / 1e6,
                    "optimizer_ms": f["optimizer_ns"] / 1e6,
                    "data_ms": f["data_ns"] / 1e6,
                    "recompute_ms": f["recompute_ns"] / 1e6,
                    "gc_ms": f["gc_ns"] / 1e6,  # full GC pauses (out of the module and data times)
                    "gc_collections": f["gc_collections"],
                    "host_ms": f["host_ns"] / 1e6,  # the loop's own code between the phases (part of data_ms)
                    "host_wait_ms": f["host_wait_ns"] / 1e6,  # the part of host_ms the rank was blocked
                }
            )
        return web.json_response(
            {"job": job, "attempt": attempt, "steps": [{"step": s, "ranks": ranks} for s, ranks in by_step.items()]}
        )

    async def _hosts(job: str) -> dict[int, str]:
        ranks = await read(store.ranks, job)
        return {r["rank"]: r["host"] for r in ranks}

    async def modules(request):
        job = await known_job(request)
        step = int_param(request, "step", None)
        asked = int_param(request, "attempt", None)
        attempt = await _attempt(job, asked)
        if step is None:
            step = (
                await read(store.last_evaluated_step, job)
                if asked is None
                else await read(store.last_stored_step, job, attempt)
            )
            if step is None:
                return error(404, f"job {job!r} has no evaluated step yet")
        per_rank = await read(store.step_modules, job, step, attempt)
        if not per_rank:
            return error(404, f"job {job!r} has no step {step}")
        names = await read(store.module_names, job)
        return web.json_response(
            {"job": job, "attempt": attempt, "step": step, "modules": module_table(per_rank, names)}
        )

    async def capture(request):
        job = await known_job(request)
        count = int_param(request, "steps", 1, 1, 1000)
        assert count is not None  # it has a default
        try:
            capture_id, asked = deps.controls.request_capture(job, count)
        except KeyError:
            return error(409, f"no rank of job {job!r} is connected")
        return web.json_response({"job": job, "capture_id": capture_id, "steps": count, "ranks": asked})

    async def sampling(request):
        """Sampled mode: {"every": N} (JSON body, or ?every=N): module detail every Nth step, 1: every step."""
        job = await known_job(request)
        every = int_param(request, "every", None, 1, 1_000_000)
        if every is None:
            try:
                body = await request.json() if request.can_read_body else {}
            except ValueError:
                raise ApiError(400, 'the body must be JSON: {"every": N}') from None
            value = body.get("every") if isinstance(body, dict) else None
            if type(value) is not int or not 1 <= value <= 1_000_000:
                raise ApiError(400, "'every' must be a whole number from 1 to 1000000")
            every = value
        try:
            asked = deps.controls.set_sampling(job, every)
        except KeyError:
            return error(409, f"no rank of job {job!r} is connected")
        return web.json_response({"job": job, "sample_every": every, "ranks": asked})

    def control(action: str):
        async def handle(request):
            job = await known_job(request)
            try:
                asked = getattr(deps.controls, action)(job)
            except KeyError:
                return error(409, f"no rank of job {job!r} is connected")
            return web.json_response({"job": job, "action": action, "ranks": asked})

        return handle

    async def alerts(request):
        episodes = await read(store.episodes, None, "active")
        episodes = [e for e in episodes if _allowed(request, e.job)]
        alerts = [a for a in deps.alerts(episodes) if _allowed(request, a["labels"]["job"])]
        return web.json_response({"alerts": alerts})

    async def stall(request):  # hung jobs (issue 14): collector/pipeline/stall.py says who holds the job
        job = await known_job(request)
        if deps.stall is None:
            return error(404, "this collector has no stall verdicts")
        return web.json_response(deps.stall(job))

    async def collectives(request):  # collector/pipeline/collectives.py: who arrives last, slow links
        job = await known_job(request)
        last = int_param(request, "last", 20, lo=1, hi=1000)
        if deps.collectives is None:
            return error(404, "this collector has no collective timing")
        return web.json_response(deps.collectives(job, last or 20))

    async def gpu(request):  # GPU health: each rank's latest NVML sample (collector/pipeline/gpu_health.py)
        job = await known_job(request)
        ranks = deps.gpu(job) if deps.gpu is not None else None
        return web.json_response({"job": job, "ranks": ranks or []})

    async def metrics(request):
        body, content_type = await read(deps.exposition)  # off the loop: a scrape of 4096 ranks takes a while
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def healthz(request):
        return web.json_response({"status": "ok", "store_errors": deps.store_errors(), "time_ms": time.time_ns() / 1e6})

    async def index(request):
        if DASHBOARD.exists():
            return web.FileResponse(DASHBOARD)
        return web.Response(text="modtrack collector: the dashboard is not installed; see /api/v1/jobs\n")

    app = web.Application(middlewares=[token_and_errors])
    app.router.add_get("/api/v1/jobs", jobs)
    app.router.add_get("/api/v1/jobs/{job}/stragglers", stragglers)
    app.router.add_get("/api/v1/jobs/{job}/steps", steps)
    app.router.add_get("/api/v1/jobs/{job}/modules", modules)
    app.router.add_get("/api/v1/jobs/{job}/stall", stall)  # hung jobs
    app.router.add_get("/api/v1/jobs/{job}/collectives", collectives)
    app.router.add_get("/api/v1/jobs/{job}/gpu", gpu)  # GPU health
    app.router.add_post("/api/v1/jobs/{job}/capture", capture)
    app.router.add_post("/api/v1/jobs/{job}/sampling", sampling)
    app.router.add_post("/api/v1/jobs/{job}/pause", control("pause"))
    app.router.add_post("/api/v1/jobs/{job}/resume", control("resume"))
    app.router.add_get("/api/v1/alerts", alerts)
    try:  # the timeline export, once present
        from modtrack.collector.api.trace_export import make_trace_handler
    except ImportError:
        pass
    else:
        app.router.add_get("/api/v1/jobs/{job}/trace", make_trace_handler(store, read))
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", index)
    if DASHBOARD.parent.is_dir():
        app.router.add_static("/dashboard/", DASHBOARD.parent)  # the page's script and style
    return app


def _allowed(request: web.Request, job: str) -> bool:
    access = request.get(ACCESS)
    return access is None or access.allows(job)


def module_table(per_rank: dict[int, dict], names: list[str]) -> list[dict]:
    """[{"module", "phase", "ms_by_rank", "inclusive_ms_by_rank", "calls_by_rank"}] for one
    step; ms is self time (compute exclusive of children), the figure the detector compares."""
    ranks = sorted(per_rank)
    cols = [per_rank[r] for r in ranks]
    lengths = [len(c["module"]) for c in cols]
    if not sum(lengths):
        return []
    rank_of = np.repeat(np.array(ranks, dtype=np.int64), lengths)
    module = np.concatenate([c["module"] for c in cols]).astype(np.int64)
    phase = np.concatenate([c["phase"] for c in cols]).astype(np.int64)
    self_ms = np.concatenate([c["self"] for c in cols]) / 1e6
    incl_ms = np.concatenate([c["inclusive"] for c in cols]) / 1e6
    calls = np.concatenate([c["calls"] for c in cols]).astype(np.int64)
    order = np.lexsort((rank_of, phase, module))
    keys = column_key(module, phase)[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    bounds = np.r_[starts, len(keys)]
    rank_s = rank_of[order].astype(str).tolist()
    self_l, incl_l, calls_l = (self_ms[order].tolist(), incl_ms[order].tolist(), calls[order].tolist())
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        mid, pid = int(module[order[a]]), int(phase[order[a]])
        out.append(
            {
                "module": names[mid] if mid < len(names) else f"#{mid}",
                "phase": PHASE_NAMES.get(pid, str(pid)),
                "ms_by_rank": dict(zip(rank_s[a:b], self_l[a:b])),
                "inclusive_ms_by_rank": dict(zip(rank_s[a:b], incl_l[a:b])),
                "calls_by_rank": dict(zip(rank_s[a:b], calls_l[a:b])),
            }
        )
    return out
