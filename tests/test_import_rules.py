"""The two import rules of the layout: the agent never imports the collector, and the collector never imports
torch (nor the agent, which does): agent and collector meet only in protos/. Checked twice: an AST scan of every
module's imports (lazy ones inside functions too), and the real thing in subprocesses where the forbidden
imports cannot succeed, the collector serving and answering requests."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.collector_process import REPO, CollectorProcess, env
from harness.fake_rank import FakeRank, stream_steps
from harness.http import get

PACKAGES = {"agent": "modtrack.agent", "collector": "modtrack.collector", "protos": "modtrack.protos"}
FORBIDDEN = {  # package -> the modules it may not import, with what it would break
    "modtrack.agent": {"modtrack.collector": "the agent runs in training processes; the collector is a service"},
    "modtrack.collector": {"torch": "the collector installs and runs with no torch",
                           "modtrack.agent": "the agent imports torch"},
    "modtrack.protos": {"torch": "the wire is shared by both sides", "modtrack.agent": "the wire is shared",
                        "modtrack.collector": "the wire is shared"},
}  # fmt: skip


def module_name(root: Path, path: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports_of(path: Path, name: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file: top level, in functions, relative ones
    resolved, and importlib.import_module / __import__ calls with a constant name."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def violations(root: Path, packages: dict[str, str] = PACKAGES) -> list[str]:
    """Every import that breaks FORBIDDEN, as 'file:line: module imports forbidden (why)'."""
    out = []
    for folder, package in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            name = module_name(root / folder, path, package)
            for line, imported in imports_of(path, name):
                for forbidden, why in FORBIDDEN[package].items():
                    if imported == forbidden or imported.startswith(forbidden + "."):
                        out.append(f"{path.relative_to(root)}:{line}: {name} imports {imported} ({why})")
    return sorted(set(out))


def test_no_module_breaks_the_import_rules():
    assert violations(Path(REPO)) == []


def test_no_test_module_imports_another():
    """What tests share lives in tests/harness/ (or tests/conftest.py): a test module is never imported."""
    tests = Path(REPO) / "tests"
    test_modules = {p.stem for p in tests.glob("test_*.py")}
    found = [
        f"{path.relative_to(tests)}:{line}: imports {imported}"
        for path in sorted(tests.rglob("*.py"))
        for line, imported in imports_of(path, path.stem)
        if imported.split(".")[0] in test_modules or imported.startswith("tests.")
    ]
    assert found == []


def test_the_scan_finds_each_kind_of_violation(tmp_path):
    files = {
        "collector/__init__.py": "",
        "collector/fine.py": "import numpy\nfrom modtrack.protos import modtrack_pb2\nimport torchvision_like\n",
        "collector/direct.py": "import torch.nn\n",
        "collector/lazy.py": "def f():\n    from torch import nn\n",
        "collector/by_name.py": "import importlib\nimportlib.import_module('torch')\n",
        "collector/sub/__init__.py": "from ... import agent\n",  # modtrack.agent, relative from a package
        "agent/__init__.py": "",
        "agent/relative.py": "from ..collector import serve\n",
        "agent/absolute.py": "import modtrack.collector.serve as s\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = violations(tmp_path, {"agent": "modtrack.agent", "collector": "modtrack.collector"})
    where = sorted({v.split(":")[0] for v in found})
    assert where == ["agent/absolute.py", "agent/relative.py", "collector/by_name.py", "collector/direct.py",
                     "collector/lazy.py", "collector/sub/__init__.py"], found  # fmt: skip
    assert any("modtrack.collector.sub imports modtrack.agent" in v for v in found), found


# A guard put in front of the real program: the forbidden top-level names cannot be imported, and every
# attempt is written to stderr (so one hidden in a try/except ImportError is seen too).
GUARD = textwrap.dedent("""
    import sys
    class Guard:
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
                print(f"FORBIDDEN IMPORT {{name}}", file=sys.stderr, flush=True)
                raise ImportError(f"{{name}} may not be imported here")
    sys.meta_path.insert(0, Guard())
""")


def guarded(blocked: list[str], then: str) -> list[str]:
    return [sys.executable, "-c", GUARD.format(blocked=tuple(blocked)) + textwrap.dedent(then)]


IMPORT_ALL = """
    import importlib, pkgutil
    package = importlib.import_module({package!r})
    names = [m.name for m in pkgutil.walk_packages(package.__path__, {package!r} + ".")]
    for name in names:
        importlib.import_module(name)
    print(len(names), "modules")
"""


@pytest.mark.parametrize("package, blocked", [
    ("modtrack.collector", ["torch", "modtrack.agent"]),
    ("modtrack.agent", ["modtrack.collector"]),
    ("modtrack.protos", ["torch", "modtrack.agent", "modtrack.collector"]),
])  # fmt: skip
def test_every_module_imports_with_the_forbidden_ones_impossible(package, blocked):
    out = subprocess.run(guarded(blocked, IMPORT_ALL.format(package=package)), capture_output=True, text=True,
                         env=env(), cwd=REPO, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "FORBIDDEN" not in out.stderr, out.stderr[-3000:]
    assert int(out.stdout.split()[0]) >= 1


def test_the_guard_stops_a_forbidden_import():
    out = subprocess.run(guarded(["torch"], "import torch\n"), capture_output=True, text=True, env=env(), timeout=60)
    assert out.returncode == 1 and "FORBIDDEN IMPORT torch" in out.stderr, out


RUN_COLLECTOR = """
    import runpy
    runpy.run_module("modtrack.collector", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_the_collector_serves_with_torch_impossible_to_import(tmp_path):
    """Start, ingest a job, detect, store, answer every kind of request, stop: torch never asked for."""
    command = guarded(["torch", "modtrack.agent"], RUN_COLLECTOR)
    with CollectorProcess(tmp_path / "data", "--watermark-s", "0.2", command=command) as server:
        assert get(server.url, "/healthz")[0] == 200
        ranks = [FakeRank(server.grpc_target, "no-torch", r, 2) for r in range(2)]
        try:
            stream_steps(ranks, range(5))
        finally:
            for r in ranks:
                r.close()
        for path in (
            "/api/v1/jobs",
            "/api/v1/jobs/no-torch/steps?last=5",
            "/api/v1/jobs/no-torch/stragglers",
            "/api/v1/jobs/no-torch/modules?step=0",
            "/api/v1/alerts",
            "/metrics",
            "/",
        ):
            assert get(server.url, path)[0] == 200, path
        assert server.terminate() == 0
    assert "FORBIDDEN" not in server.log(), server.log()[-3000:]
