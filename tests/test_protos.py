"""The committed wire code must match protos/modtrack.proto."""

import pathlib

from modtrack.protos.generate import GENERATED, generate

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh(tmp_path):
    generate(tmp_path)
    for name in GENERATED:
        fresh = (tmp_path / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make protos`"


def test_importable_as_protos_package():
    from modtrack.protos import modtrack_pb2, modtrack_pb2_grpc

    report = modtrack_pb2.StepReport(step=3)
    report.phases.add(phase=modtrack_pb2.PHASE_BACKWARD, module_id=[0, 1], self_ns=[5, 6])
    assert modtrack_pb2.StepReport.FromString(report.SerializeToString()) == report
    assert hasattr(modtrack_pb2_grpc, "CollectorStub")
