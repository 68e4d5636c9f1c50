"""The committed wire code must match protos/modtrack.proto."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
GENERATED = ("modtrack_pb2.py", "modtrack_pb2.pyi", "modtrack_pb2_grpc.py")


def test_generated_code_is_fresh(tmp_path):
    (tmp_path / "protos").mkdir()
    (tmp_path / "protos" / "modtrack.proto").write_bytes((ROOT / "protos" / "modtrack.proto").read_bytes())
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", "protos/modtrack.proto"],
        cwd=tmp_path, check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "protos" / name).read_text()
        committed = (ROOT / "protos" / name).read_text()
        assert fresh == committed, f"protos/{name} is stale: run `make protos`"


def test_importable_as_protos_package():
    from protos import modtrack_pb2, modtrack_pb2_grpc

    report = modtrack_pb2.StepReport(step=3)
    report.phases.add(phase=modtrack_pb2.PHASE_BACKWARD, module_id=[0, 1], self_ns=[5, 6])
    assert modtrack_pb2.StepReport.FromString(report.SerializeToString()) == report
    assert hasattr(modtrack_pb2_grpc, "CollectorStub")
