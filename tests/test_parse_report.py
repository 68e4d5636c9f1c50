"""parse_report in-process: the one-block fast check accepts exactly what the phase-by-phase
check accepts, refuses with the same message, and keeps every column entry in order."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modtrack.collector.ingest import edge_limits
from modtrack.collector.ingest.parse import RankStream, _explain_phases, parse_report
from modtrack.collector.records import STEP_FIGURES
from modtrack.protos import modtrack_pb2 as pb

TABLE = 6
DAY, ABS = edge_limits.MAX_DURATION_NS, edge_limits.MAX_ABS_TIME_NS
# Values at and beyond every bound; a report gets clean values and at most a few bad ones,
# so a check that let one kind of bad value through would be seen.
GOOD = {
    "module_id": st.integers(0, TABLE - 1),
    "calls": st.integers(0, 2**32 - 1),
    "inclusive_ns": st.sampled_from([0, 1, 5_000, DAY]),
    "self_ns": st.sampled_from([0, DAY]),
    "first_start_ns": st.sampled_from([0, 10**12, ABS, -ABS]),
    "last_end_ns": st.sampled_from([-ABS, 0, ABS]),
}
BAD = {
    "module_id": [TABLE, 2**32 - 1],
    "inclusive_ns": [-1, DAY + 1, -(2**63)],
    "self_ns": [-1, DAY + 1, 2**63 - 1],
    "first_start_ns": [ABS + 1, -ABS - 1],
    "last_end_ns": [ABS + 1, -(2**63)],
}


def stream() -> RankStream:
    # Job-wide ids differ from local ones, so a missed remap shows.
    remap = np.arange(TABLE, dtype=np.int64)[::-1] + 100
    return RankStream("j", 0, [f"m{i}" for i in range(TABLE)], remap, None)


@st.composite
def phases(draw):
    out = []
    for phase in draw(st.lists(st.sampled_from([1, 2, 3]), max_size=3)):
        n = draw(st.integers(0, 4))
        out.append(
            {"phase": phase, **{name: draw(st.lists(values, min_size=n, max_size=n)) for name, values in GOOD.items()}}
        )
    for _ in range(draw(st.integers(0, 2)) if out else 0):
        ph = out[draw(st.integers(0, len(out) - 1))]
        kind = draw(st.sampled_from(["value", "value", "value", "phase", "short"]))
        if kind == "phase":
            ph["phase"] = draw(st.sampled_from([0, 4, 7]))
        elif kind == "short":
            ph[draw(st.sampled_from(list(GOOD)))] = []
        else:
            name = draw(st.sampled_from(list(BAD)))
            if ph[name]:
                ph[name][draw(st.integers(0, len(ph[name]) - 1))] = draw(st.sampled_from(BAD[name]))
    return out


def message(phase_list) -> pb.StepReport:
    r = pb.StepReport(step=3, start_ns=0, end_ns=10)
    for ph in phase_list:
        r.phases.add(**ph)
    return r


def refusal(fn) -> str | None:
    try:
        fn()
    except edge_limits.Refused as exc:
        return str(exc)
    return None


@settings(max_examples=400, deadline=None, database=None)
@given(phases())
def test_fast_check_agrees_with_phase_by_phase(phase_list):
    report = message(phase_list)
    s = stream()
    where = "job 'j' rank 0 step 3"
    try:
        expected = refusal(lambda: _explain_phases(report, s, where))
    except AssertionError:  # its way of saying the report is clean
        expected = None
    assert refusal(lambda: parse_report(report, s, None)) == expected


def test_clean_report_keeps_every_entry_in_order():
    phase_list = [
        {
            "phase": 2,
            "module_id": [3, 0],
            "calls": [1, 2],
            "inclusive_ns": [30, 10],
            "self_ns": [20, 5],
            "first_start_ns": [-4, 7],
            "last_end_ns": [26, 17],
        },
        {
            "phase": 1,
            "module_id": [],
            "calls": [],
            "inclusive_ns": [],
            "self_ns": [],
            "first_start_ns": [],
            "last_end_ns": [],
        },
        {
            "phase": 3,
            "module_id": [5],
            "calls": [4],
            "inclusive_ns": [DAY],
            "self_ns": [0],
            "first_start_ns": [ABS],
            "last_end_ns": [-ABS],
        },
    ]
    row = parse_report(message(phase_list), stream(), None)
    m = row.modules
    assert m["phase"].tolist() == [2, 2, 3]
    assert m["module"].tolist() == [102, 105, 100]  # remapped: local 3, 0, 5
    assert m["calls"].tolist() == [1, 2, 4]
    assert m["inclusive"].tolist() == [30, 10, DAY]
    assert m["self"].tolist() == [20, 5, 0]
    assert m["first_start"].tolist() == [-4, 7, ABS]
    assert m["last_end"].tolist() == [26, 17, -ABS]
    after = 4 + len(STEP_FIGURES)  # after the key and the figures
    assert [len(v) for v in row.sql_row()[after : after + 7]] == [3, 12, 12, 24, 24, 24, 24]


def test_the_loops_own_code_is_carried_and_never_more_than_the_time_outside_the_phases():
    r = message([])
    r.data_ns, r.host_ns = 8, 6
    assert parse_report(r, stream(), None).figures["host_ns"] == 6
    r.host_ns = 9
    assert "host_ns 9 is longer than data_ns 8" in refusal(lambda: parse_report(r, stream(), None))


def test_a_steps_gc_pauses_are_carried():
    r = message([])
    r.gc_ns, r.gc_collections = 7, 2
    row = parse_report(r, stream(), None)
    assert (row.figures["gc_ns"], row.figures["gc_collections"]) == (7, 2)


@pytest.mark.parametrize(
    "gc_ns, message_part",
    [
        (-1, "negative duration gc_ns=-1"),
        (11, "gc_ns 11 is longer than the step itself (10 ns from start_ns to end_ns)"),
    ],
)
def test_gc_pauses_outside_the_step_are_refused(gc_ns, message_part):
    r = message([])  # a step of 10 ns
    r.gc_ns = gc_ns
    assert message_part in refusal(lambda: parse_report(r, stream(), None))


def test_report_with_no_phases_is_empty_not_refused():
    row = parse_report(message([]), stream(), None)
    assert all(len(v) == 0 for v in row.modules.values())


@pytest.mark.parametrize(
    "bad, message_part",
    [
        ({"inclusive_ns": [-1]}, "phase forward: negative duration -1"),
        ({"self_ns": [DAY + 1]}, "phase forward: a duration of 86400000000001 ns is more than a day"),
        ({"last_end_ns": [ABS + 1]}, "phase forward: a clock stamp is out of range"),
        ({"module_id": [TABLE]}, f"module id {TABLE} is outside the rank's table of {TABLE} names"),
    ],
)
def test_refusal_names_the_phase_and_the_problem(bad, message_part):
    ph = {
        "phase": 1,
        "module_id": [0],
        "calls": [1],
        "inclusive_ns": [1],
        "self_ns": [1],
        "first_start_ns": [0],
        "last_end_ns": [1],
        **bad,
    }
    assert message_part in refusal(lambda: parse_report(message([ph]), stream(), None))


def windowed_message(backward, recompute) -> pb.StepReport:
    """Backward's second entry (called 3 times) and recompute's only one (twice) carry call windows; forward's
    module called twice carries none."""
    phase_list = [
        {"phase": 2, "module_id": [3, 0], "calls": [1, 3], "inclusive_ns": [5, 6], "self_ns": [5, 6]},
        {"phase": 1, "module_id": [1], "calls": [2], "inclusive_ns": [1], "self_ns": [1]},
        {"phase": 3, "module_id": [5], "calls": [2], "inclusive_ns": [2], "self_ns": [2]},
    ]
    for ph in phase_list:
        ph["first_start_ns"], ph["last_end_ns"] = [0] * len(ph["module_id"]), [9] * len(ph["module_id"])
    for ph, (start, end) in ((phase_list[0], backward), (phase_list[2], recompute)):
        ph["call_start_ns"], ph["call_end_ns"] = start, end
    return message(phase_list)


def test_call_windows_belong_to_the_entries_called_several_times_in_order():
    row = parse_report(windowed_message(([0, 3, 6], [2, 5, 9]), ([1, 4], [3, 8])), stream(), None)
    m = row.modules
    assert m["call_owner"].tolist() == [1, 1, 1, 3, 3]  # entries: backward 3, 0; forward 1; recompute 5
    assert m["call_start"].tolist() == [0, 3, 6, 1, 4] and m["call_end"].tolist() == [2, 5, 9, 3, 8]
    assert "call_owner" not in parse_report(windowed_message(([], []), ([], [])), stream(), None).modules


@pytest.mark.parametrize(
    "backward, message_part",
    [
        (([0, 3], [2, 5]), "phase backward: call_start_ns and call_end_ns must have one entry per call"),
        (([0, 3, 6], [2, 5]), "have 3 and 2"),
        (([0, 3, 6], [2, 5, 4]), "phase backward call windows: negative duration -2"),
        (([0, 3, -ABS - 1], [2, 5, 9]), "phase backward call windows: a clock stamp is out of range"),
    ],
)
def test_call_windows_that_do_not_fit_the_calls_are_refused(backward, message_part):
    assert message_part in refusal(lambda: parse_report(windowed_message(backward, ([1, 4], [3, 8])), stream(), None))
