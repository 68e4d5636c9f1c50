"""`collector query {jobs,stragglers,steps,modules,stall,gpu}`: the HTTP API as tables, or its JSON.
`collector query sampling --job J --every N` switches a running job's sampled mode (a POST).

Exit 0 on success; 1 with a one-line reason when the API answers an error (unknown job, bad
query, wrong token); 2 when the collector cannot be reached.
"""

from __future__ import annotations

import json
import statistics
import sys
import urllib.error
import urllib.parse
import urllib.request

from modtrack.collector.config import ServeConfig
from modtrack.collector.records import entry_without_ratio

PER_RANK_COLUMNS = 8  # modules table: one column per rank up to this many ranks


def add_parser(sub) -> None:
    p = sub.add_parser("query", help="ask a running collector (readable table or --json)")
    p.add_argument("what", choices=("jobs", "stragglers", "steps", "modules", "stall", "gpu", "sampling"))
    p.add_argument("--url", default=f"http://{ServeConfig.http_addr}", help="the collector's HTTP address")
    p.add_argument("--job", help="job name (all but `jobs`; default: the only job, if one)")
    p.add_argument("--last", type=int, default=10, help="steps: how many recent steps")
    p.add_argument("--step", type=int, help="modules: which step (default: last evaluated)")
    p.add_argument("--attempt", type=int, help="which attempt of a restarted job (default: the latest)")
    p.add_argument("--every", type=int, help="sampling: module detail every N steps (1: every step)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.add_argument("--token-file", help="send 'Authorization: Bearer <token in this file>'")
    p.add_argument("--timeout", type=float, default=10.0)


class QueryError(Exception):
    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def fetch(url: str, path: str, token: str | None, timeout: float, params: dict | None = None, body=None):
    """GET (or, with a JSON `body`, POST) one API path."""
    query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v is not None})
    full = url.rstrip("/") + path + (f"?{query}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(full, data=data, headers={"Accept": "application/json"})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            reason = json.load(exc).get("error", exc.reason)
        except (ValueError, AttributeError):
            reason = exc.reason
        raise QueryError(f"{exc.code} from {full}: {reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise QueryError(f"cannot reach the collector at {url}: {reason}", code=2) from None
    except ValueError:
        raise QueryError(f"{full} did not answer JSON; is it a modtrack collector?") from None


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def render(what: str, data: dict) -> str:
    if what == "jobs":
        return (
            table(
                ["JOB", "WORLD", "REPORTING", "LAST_STEP", "ATTEMPT", "STATE", "DETAIL"],
                [
                    [
                        j["job"],
                        j["world_size"],
                        j["ranks_reporting"],
                        j["last_step"],
                        j.get("attempt", 0),
                        j["state"],
                        _detail(j.get("sample_every")),
                    ]
                    for j in data["jobs"]
                ],
            )
            if data["jobs"]
            else "no jobs yet"
        )
    if what == "stragglers":
        if not data["stragglers"]:
            return f"job {data['job']}: no stragglers"
        return _render_stragglers(data["stragglers"])
    if what == "steps":
        return (
            table(
                ["STEP", "RANK", "HOST", "WALL_MS", "FORWARD_MS", "BACKWARD_MS", "SYNC_WAIT_MS"],
                [
                    [
                        s["step"],
                        r["rank"],
                        r["host"],
                        r["wall_ms"],
                        r["forward_ms"],
                        r["backward_ms"],
                        r["sync_wait_ms"],
                    ]
                    for s in data["steps"]
                    for r in s["ranks"]
                ],
            )
            if data["steps"]
            else "no steps yet"
        )
    if what == "sampling":
        return f"job {data['job']}: module detail {_detail(data['sample_every'])} ({data['ranks']} ranks told)"
    if what == "stall":  # hung jobs (issue 14)
        from modtrack.collector.api.stall_text import render_stall

        return render_stall(data)
    if what == "gpu":  # GPU health
        return _render_gpu(data)
    return _render_modules(data)


def _detail(every) -> str:
    """Sampled mode as the jobs table shows it."""
    if every is None:
        return "-"
    return "every step" if every == 1 else f"every {every} steps"


def _render_gpu(data: dict) -> str:
    """One row per rank: its GPU's latest NVML sample (clocks in GHz, power in W)."""
    if not data["ranks"]:
        return f"job {data['job']}: no GPU sample (no rank uses CUDA, or none reads NVML)"

    def scaled(value, by: float):
        return None if value is None else value / by

    rows = [
        [
            r["rank"],
            r["host"],
            r.get("unavailable") or r["gpu"],
            scaled(r["sm_clock_mhz"], 1000),
            scaled(r["max_sm_clock_mhz"], 1000),
            scaled(r["memory_clock_mhz"], 1000),
            r["temperature_c"],
            scaled(r["power_mw"], 1000),
            scaled(r["power_limit_mw"], 1000),
            r["utilization_pct"],
            ",".join(r["clock_reasons"]) or "-",
            r["xid_events"],
            r["ecc_uncorrected"],
        ]
        for r in data["ranks"]
    ]
    headers = ["RANK", "HOST", "GPU", "SM_GHZ", "MAX_GHZ", "MEM_GHZ", "TEMP_C", "POWER_W", "LIMIT_W", "UTIL_%"]
    return table([*headers, "CLOCK_REASONS", "XID", "ECC_UNCORR"], rows)


def _render_stragglers(stragglers: list[dict]) -> str:
    """One row per verdict, then its listed modules (every place the rank is slow) indented below it."""
    rows = []
    for s in stragglers:
        entries = s.get("modules") or []
        no_ratio = entry_without_ratio(s["module"], s["phase"], entries) is not None  # its peers spend nothing there
        rows.append(
            [
                "host" if s["rank"] < 0 else s["rank"],
                s["host"],
                s["module"],
                s["phase"],
                "-" if no_ratio else f"{s['slowdown']:.2f}x",
                s.get("excess_ms"),
                f"{s['first_step']}-{s['last_step']}",
                s["state"],
                s["cost_ms_per_step"],
                s.get("cause") or "-",
            ]
        )
        if s.get("explanation"):  # GPU health: what the culprit's GPU says
            rows.append(["", "", "  GPU: " + s["explanation"], "", "", "", "", "", "", ""])
        if len(entries) > 1 or entries and (entries[0]["module"], entries[0]["phase"]) != (s["module"], s["phase"]):
            for e in entries:
                slowdown = f"{e['slowdown']:.2f}x" if e.get("slowdown") is not None else "-"
                rows.append(["", "", "  " + e["module"], e["phase"], slowdown, e["excess_ms"], "", "", "", ""])
    return table(
        ["RANK", "HOST", "MODULE", "PHASE", "SLOWDOWN", "EXCESS_MS", "STEPS", "STATE", "COST_MS/STEP", "CAUSE"], rows
    )


def _render_modules(data: dict) -> str:
    ranks = sorted({int(r) for m in data["modules"] for r in m["ms_by_rank"]})
    per_rank = len(ranks) <= PER_RANK_COLUMNS
    headers = ["MODULE", "PHASE", "MEDIAN_MS", "MAX_MS", "SLOWEST_RANK"]
    if per_rank:
        headers += [f"R{r}" for r in ranks]
    rows = []
    for m in data["modules"]:
        by_rank = {int(r): ms for r, ms in m["ms_by_rank"].items()}
        slowest = max(by_rank, key=lambda r: by_rank[r])
        row = [m["module"], m["phase"], statistics.median(by_rank.values()), by_rank[slowest], slowest]
        if per_rank:
            row += [by_rank.get(r) for r in ranks]
        rows.append(row)
    title = f"job {data['job']} step {data['step']} (self time, ms)"
    return title + "\n" + table(headers, rows) if rows else title + ": no module figures kept"


def run(args) -> int:
    try:
        token = None
        if args.token_file:
            with open(args.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        data = _query(args, token)
    except QueryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2) if args.json else render(args.what, data))
    return 0


def _query(args, token: str | None) -> dict:
    get = lambda path, params=None: fetch(args.url, path, token, args.timeout, params)  # noqa: E731
    if args.what == "jobs":
        return get("/api/v1/jobs")
    job = args.job
    if job is None:
        jobs = [j["job"] for j in get("/api/v1/jobs")["jobs"]]
        if len(jobs) != 1:
            raise QueryError(
                f"--job is needed: the collector has {len(jobs)} jobs" + (f" ({', '.join(jobs[:10])})" if jobs else "")
            )
        job = jobs[0]
    path = f"/api/v1/jobs/{urllib.parse.quote(job, safe='')}/{args.what}"
    if args.what == "sampling":
        if args.every is None or args.every < 1:
            raise QueryError("sampling needs --every N (N >= 1)")
        return fetch(args.url, path, token, args.timeout, body={"every": args.every})
    params = {"last": args.last} if args.what == "steps" else {}
    if args.what == "modules":
        params = {"step": args.step}
    params["attempt"] = getattr(args, "attempt", None)
    return get(path, params)
