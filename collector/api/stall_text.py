"""`collector query stall` as text: the verdict in one line, every rank's place, the stuck rank's stack."""

from __future__ import annotations

from modtrack.collector.api.query_cli import table


def render_stall(data: dict) -> str:
    if data["stalled"]:
        head = f"job {data['job']}: STALLED for {data['since_s']:.0f} s at step {data['step']}: {data['summary']}"
    elif data.get("paused"):
        head = f"job {data['job']}: paused for {data['since_s']:.0f} s: {data['summary']}"
    else:
        head = f"job {data['job']}: not stalled ({data.get('summary') or 'running'})"
    rows = [
        [r["rank"], r["host"], r["state"], r.get("step"), r["phase"], r["module"], r["seconds"]] for r in data["ranks"]
    ]
    lines = [head, table(["RANK", "HOST", "STATE", "STEP", "PHASE", "MODULE", "SECONDS"], rows)]
    for r in data["ranks"]:
        if r["state"] == "stuck" and r["stack"]:
            lines.append(f"stack of rank {r['rank']} (stuck), innermost last:")
            lines += [f"  {frame}" for frame in r["stack"]]
    paused = data.get("paused")
    if not data["stalled"] and paused and paused.get("stack"):  # every rank is in the same place: one stack
        lines.append("stack where the job is paused, innermost last:")
        lines += [f"  {frame}" for frame in paused["stack"]]
    return "\n".join(lines)
