"""The timeline export: a Chrome trace / Perfetto JSON document that the importer accepts.

The checks follow the format's rules that Perfetto's JSON importer enforces: complete ("X")
events with `ts`/`dur` in microseconds, events on one track perfectly nested, metadata ("M")
events naming every process and track.
"""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.chrome_trace import assert_valid_chrome_trace
from modtrack.collector.api.trace_export import RankTimeline, build_trace

MODULES = ["GPT", "GPT.blocks.0", "GPT.blocks.0.attn", "GPT.blocks.0.mlp", "GPT.head"]


def _captured_rank(rank: int, host: str, clock_shift_ns: int, base_ns: int, slow: float = 1.0):
    """Two steps of a small nested model, as a rank whose clock reads true time + shift."""
    rows = []  # (step, module, phase, start, end, depth) in true ns from base
    t = 0
    steps = []
    for step in (10, 11):
        step_start = t
        # forward: GPT > blocks.0 > (attn, mlp), then head
        rows.append((step, 0, 1, t, t + 1000_000, 0))
        rows.append((step, 1, 1, t + 10_000, t + 700_000, 1))
        rows.append((step, 2, 1, t + 20_000, t + int(20_000 + 300_000 * slow), 2))
        rows.append((step, 3, 1, t + 400_000, t + 650_000, 2))
        rows.append((step, 4, 1, t + 750_000, t + 950_000, 1))
        t += 1000_000
        # backward: reverse order, nested the same way
        rows.append((step, 0, 2, t, t + 2000_000, 0))
        rows.append((step, 4, 2, t + 10_000, t + 400_000, 1))
        rows.append((step, 1, 2, t + 500_000, t + 1900_000, 1))
        rows.append((step, 3, 2, t + 510_000, t + 1000_000, 2))
        rows.append((step, 2, 2, t + 1100_000, t + 1800_000, 2))
        t += 2500_000
        steps.append((step, step_start, t))
    a = np.array(rows, dtype=np.int64)
    agent = base_ns + clock_shift_ns
    return RankTimeline(
        rank=rank,
        host=host,
        offset_ns=-clock_shift_ns,
        module_names=MODULES,
        step=a[:, 0],
        module_id=a[:, 1],
        phase=a[:, 2],
        start_ns=a[:, 3] + agent,
        end_ns=a[:, 4] + agent,
        depth=a[:, 5],
        step_number=np.array([s for s, _, _ in steps]),
        step_start_ns=np.array([b for _, b, _ in steps]) + agent,
        step_end_ns=np.array([e for _, _, e in steps]) + agent,
    )


def _x_events(doc, pid, cat=None):
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] == pid and (cat is None or e["cat"] == cat)]


def test_captured_trace_is_valid_and_names_every_rank():
    base = 1_795_000_000_000_000_000  # a wall-clock-sized collector time
    ranks = [_captured_rank(r, f"node{r // 2}", 0, base) for r in range(4)]
    doc = build_trace("job1", ranks, "capture", 10, 11)
    assert_valid_chrome_trace(doc)
    names = {e["pid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "rank 0 @ node0", 1: "rank 1 @ node0", 2: "rank 2 @ node1", 3: "rank 3 @ node1"}
    tracks = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name" and e["pid"] == 0}
    assert tracks == {"steps", "forward", "backward"}
    # forward and backward on their own tracks
    fwd_tids = {e["tid"] for e in _x_events(doc, 0, "forward")}
    bwd_tids = {e["tid"] for e in _x_events(doc, 0, "backward")}
    assert len(fwd_tids) == 1 and len(bwd_tids) == 1 and fwd_tids != bwd_tids
    assert doc["otherData"]["source"] == "capture"
    assert doc["otherData"]["ranks"] == [0, 1, 2, 3]


def test_timestamps_are_microseconds_on_the_collector_clock():
    base = 1_795_000_000_000_000_000
    doc = build_trace("j", [_captured_rank(0, "h", 0, base)], "capture", 10, 11)
    origin = doc["otherData"]["ts_origin_ns"]
    attn = [e for e in _x_events(doc, 0, "forward") if e["name"] == "GPT.blocks.0.attn"][0]
    assert attn["dur"] == 300.0  # 300 000 ns
    assert origin + round(attn["ts"] * 1000) == base + 20_000
    assert origin <= base and base - origin < 1_000_000


def test_a_rank_with_its_clock_five_seconds_ahead_lines_up_after_correction():
    base = 50_000_000_000
    ranks = [
        _captured_rank(0, "a", 0, base),
        _captured_rank(1, "b", 5_000_000_000, base),
        _captured_rank(2, "c", -3_000_000, base),
    ]
    doc = build_trace("j", ranks, "capture", 10, 11)
    assert_valid_chrome_trace(doc)
    first = {pid: min(e["ts"] for e in _x_events(doc, pid, "forward")) for pid in (0, 1, 2)}
    assert abs(first[1] - first[0]) < 1.0 and abs(first[2] - first[0]) < 1.0
    # the correction is what lines them up: without the offset, rank 1 sits 5 s later
    ranks[1].offset_ns = 0
    raw = build_trace("j", ranks, "capture", 10, 11)
    raw_first = {pid: min(e["ts"] for e in _x_events(raw, pid, "forward")) for pid in (0, 1)}
    assert abs(raw_first[1] - raw_first[0] - 5_000_000) < 1.0


def test_summary_spans_that_straddle_go_to_an_overflow_track():
    # A module called twice (0..1 ms and 4..5 ms) around a sibling (2..7 ms): as first-start..last-end
    # spans they straddle, which one track cannot show.
    tl = RankTimeline(
        rank=0,
        host="h",
        offset_ns=0,
        module_names=["M", "M.a", "M.b"],
        step=np.array([5, 5, 5]),
        module_id=np.array([0, 1, 2]),
        phase=np.array([1, 1, 1]),
        start_ns=np.array([0, 0, 2_000_000]) + 10**9,
        end_ns=np.array([8_000_000, 5_000_000, 7_000_000]) + 10**9,
    )
    doc = build_trace("j", [tl], "step_summary", 5, 5)
    assert_valid_chrome_trace(doc)
    assert doc["otherData"]["source"] == "step_summary"
    tracks = {e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
    assert tracks == {"forward", "forward #2"}
    assert len(_x_events(doc, 0)) == 3  # nothing measured was dropped


def test_no_ranks_gives_an_empty_but_valid_document():
    doc = build_trace("j", [], "step_summary", 1, 2)
    assert_valid_chrome_trace(doc)
    assert doc["traceEvents"] == []


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.integers(0, 3_000), st.sampled_from([1, 2, 3])), min_size=1, max_size=60
    )
)
def test_any_set_of_spans_exports_as_perfectly_nested_tracks(spans):
    a = np.array(spans, dtype=np.int64)
    tl = RankTimeline(
        rank=3,
        host="h",
        offset_ns=123_456_789,
        module_names=[f"m{i}" for i in range(60)],
        step=np.zeros(len(a), np.int64),
        module_id=np.arange(len(a)),
        phase=a[:, 2],
        start_ns=a[:, 0] * 997,
        end_ns=(a[:, 0] + a[:, 1]) * 997,
    )
    doc = build_trace("j", [tl], "step_summary", 0, 0)
    assert_valid_chrome_trace(doc)
    assert len(_x_events(doc, 3)) == len(a)


def test_the_checker_rejects_straddling_events():
    bad = {
        "displayTimeUnit": "ms",
        "traceEvents": [
            {"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "rank 0 @ h"}},
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": 2, "args": {"name": "forward"}},
            {"name": "a", "ph": "X", "pid": 0, "tid": 2, "ts": 0.0, "dur": 5.0},
            {"name": "b", "ph": "X", "pid": 0, "tid": 2, "ts": 2.0, "dur": 5.0},
        ],
    }
    try:
        assert_valid_chrome_trace(bad)
    except AssertionError:
        return
    raise AssertionError("straddling events passed the check")
