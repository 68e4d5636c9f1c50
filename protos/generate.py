"""Regenerate the wire code from modtrack.proto (`make protos`; the staleness test calls it too).

protoc writes imports after the proto's path, so the proto is compiled from a scratch tree where it
sits at modtrack/protos/: the generated modules then import each other as `modtrack.protos.…`.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
GENERATED = ("modtrack_pb2.py", "modtrack_pb2.pyi", "modtrack_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> None:
    """Write the generated modules into out_dir."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = pathlib.Path(scratch)
        (tree / "modtrack" / "protos").mkdir(parents=True)
        shutil.copy(HERE / "modtrack.proto", tree / "modtrack" / "protos" / "modtrack.proto")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                "-I.",
                "--python_out=.",
                "--pyi_out=.",
                "--grpc_python_out=.",
                "modtrack/protos/modtrack.proto",
            ],
            cwd=tree,
            check=True,
        )
        for name in GENERATED:
            shutil.copy(tree / "modtrack" / "protos" / name, out_dir / name)


if __name__ == "__main__":
    generate(HERE)
