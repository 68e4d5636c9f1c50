"""What `pip install modtrack` puts on a machine: every package under its modtrack.* name, the dashboard and
the .proto beside the code, and the two commands answering --help."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from harness.collector_process import REPO, env

ROOT = Path(REPO)
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
FOLDERS = {"agent": "modtrack.agent", "collector": "modtrack.collector", "protos": "modtrack.protos"}


def source_files(folder: str) -> list[Path]:
    """Files git would ship from a top-level folder: no caches."""
    return [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def packages_on_disk() -> set[str]:
    """Every folder Python could import from: with an __init__.py, or with files of its own (the dashboard's)."""
    found = set()
    for folder, package in FOLDERS.items():
        for path in [ROOT / folder, *(ROOT / folder).rglob("*")]:
            if not path.is_dir() or "__pycache__" in path.parts:
                continue
            if (path / "__init__.py").exists() or any(p.is_file() for p in path.iterdir()):
                found.add(".".join([package, *path.relative_to(ROOT / folder).parts]))
    return found


def test_every_package_is_listed_under_its_modtrack_name():
    assert {folder: package for package, folder in SETUPTOOLS["package-dir"].items()} == FOLDERS
    assert set(SETUPTOOLS["packages"]) == packages_on_disk()


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    """A wheel built by setuptools from a copy of the sources (the checkout stays clean), and what the build
    wrote to stderr."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    out = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return zipfile.ZipFile(src / "dist" / out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.fixture(scope="module")
def wheel(build) -> zipfile.ZipFile:
    return build[0]


def test_the_license_is_an_spdx_expression_shipped_with_its_text_and_no_build_warning(build):
    """PEP 639: `License-Expression` and the LICENSE file in the wheel; the table form setuptools deprecates
    would warn on every install."""
    wheel, stderr = build
    metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert {"License-Expression: Apache-2.0", "License-File: LICENSE"} <= set(metadata.splitlines()), metadata[:800]
    license_text = next(n for n in wheel.namelist() if n.endswith(".dist-info/licenses/LICENSE"))
    assert wheel.read(license_text) == (ROOT / "LICENSE").read_bytes()
    assert "deprecat" not in stderr.lower(), stderr[-3000:]
    assert "absent from the `packages` configuration" not in stderr, stderr[-3000:]  # a folder left out


def test_the_wheel_holds_every_file_of_every_package(wheel):
    """Code, the dashboard's files, the .proto and its stubs: all of it, under modtrack/."""
    names = set(wheel.namelist())
    expected = {
        f"{FOLDERS[folder].replace('.', '/')}/{p.relative_to(ROOT / folder).as_posix()}"
        for folder in FOLDERS
        for p in source_files(folder)
    }
    assert {"modtrack/collector/api/dashboard/index.html", "modtrack/protos/modtrack.proto"} <= expected
    missing = sorted(expected - names)
    assert not missing, f"not in the wheel: {missing}"
    assert not [n for n in names if n.split("/")[0] in FOLDERS], "a top-level agent, collector or protos"


@pytest.mark.parametrize("module, words", [("modtrack.agent", "--collector"), ("modtrack.collector", "serve")])
def test_help_of_both_commands(module, words):
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env(),
                         cwd=ROOT, timeout=60)  # fmt: skip
    assert out.returncode == 0 and "usage:" in out.stdout and words in out.stdout, out
