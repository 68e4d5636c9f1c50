"""The rules of Chrome trace / Perfetto JSON that its importer relies on, as one check."""

from __future__ import annotations

import json


def assert_valid_chrome_trace(doc: dict) -> None:
    """Raise if `doc` breaks the rules the JSON importer relies on."""
    json.dumps(doc, allow_nan=False)  # plain JSON, no NaN/Infinity
    assert doc["displayTimeUnit"] == "ms"
    assert isinstance(doc["traceEvents"], list)
    named_procs, named_tracks, tracks = set(), set(), {}
    for ev in doc["traceEvents"]:
        assert isinstance(ev["name"], str) and ev["name"]
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int)
        if ev["ph"] == "M":
            assert ev["name"] in {"process_name", "thread_name", "process_sort_index", "thread_sort_index"}
            assert "args" in ev
            if ev["name"] == "process_name":
                named_procs.add(ev["pid"])
            if ev["name"] == "thread_name":
                named_tracks.add((ev["pid"], ev["tid"]))
            continue
        assert ev["ph"] == "X", ev
        assert isinstance(ev["ts"], (int, float)) and isinstance(ev["dur"], (int, float))
        assert ev["dur"] >= 0
        tracks.setdefault((ev["pid"], ev["tid"]), []).append(
            (round(ev["ts"] * 1000), round((ev["ts"] + ev["dur"]) * 1000), ev["name"])
        )
    for key, spans in tracks.items():
        assert key in named_tracks, f"track {key} has no thread_name"
        assert key[0] in named_procs, f"process {key[0]} has no process_name"
        spans.sort(key=lambda s: (s[0], -(s[1] - s[0])))
        stack: list[tuple] = []
        for s, e, name in spans:
            while stack and stack[-1][1] <= s:
                stack.pop()
            assert not stack or e <= stack[-1][1], f"{name} {s}..{e} straddles {stack[-1]} on {key}"
            stack.append((s, e, name))
