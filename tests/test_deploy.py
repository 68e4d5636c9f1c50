"""deploy/: the rules pass promtool, manifests validate, the dashboard asks for metrics that exist."""

import json
import pathlib
import re
import shutil
import subprocess
import sys

import kubernetes_validate
import pytest
import tomllib
import yaml

from harness.metrics_samples import episode, matrix
from modtrack.collector.ingest.gpu_edge import parse_gpu
from modtrack.collector.outputs.gpu_metrics import GpuMetrics
from modtrack.collector.outputs.metrics import CollectorMetrics
from modtrack.collector.pipeline.gpu_health import GpuBoard
from modtrack.collector.pipeline.merge import Merger
from modtrack.collector.pipeline.stall_watch import StallWatch
from modtrack.protos import modtrack_pb2 as pb

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
ROOT = DEPLOY.parent
K8S_VERSION = "1.30.0"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool not installed (make system-deps)"
)


GPU_SAMPLE = pb.GpuHealth(
    sampled_ns=1, sm_clock_mhz=1100, max_sm_clock_mhz=1980, memory_clock_mhz=2619, temperature_c=91, power_mw=1,
    power_limit_mw=2, utilization_pct=90, clock_event_reasons=64, ecc_uncorrected=0, xid_events=1, last_xid=79,
)  # fmt: skip


def exposed_metric_names() -> set[str]:
    """Every sample name the collector exposes once it has seen a job with a straggler."""
    m = CollectorMetrics()
    for rank in range(4):
        m.observe_rank("train", rank, "node0", 1.0, {"reports_dropped": 1})
    m.observe_step(matrix(), lag_s=0.1)
    m.set_episodes("train", [episode(), episode(rank=-1, host="node1", ranks=[2, 3])])
    m.mark_rank_missing("train", 5, "node2")
    m.count_rejected("bad_token")
    m.count_alert_delivery("sent")
    watch, merger = StallWatch(), Merger()  # hung jobs: rank 1 stuck while rank 0 waits in a collective
    m.registry.register(watch)
    for rank, stack in ((0, "/torch/distributed/distributed_c10d.py:1 in barrier"), (1, "train.py:9 in load")):
        merger.hello("stuck", rank, 2, "node0")
        watch.heartbeat(
            "stuck", rank, pb.Heartbeat(step=3, phase="data", step_ns=9, position_ns=9, stack=[stack]), None
        )
    watch.evaluate(merger.jobs, None)
    board = GpuBoard()  # GPU health: a throttled GPU with an Xid
    board.observe("train", 0, "node0", parse_gpu(pb.StepReport(gpu=GPU_SAMPLE), "step 0"))
    m.registry.register(GpuMetrics(board))
    text = m.exposition()[0].decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bmodtrack_[a-z_]+", expr))


@needs_promtool
def test_rules_pass_promtool_check_and_their_unit_tests():
    check = subprocess.run(
        ["promtool", "check", "rules", "modtrack-rules.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", "modtrack-rules.test.yml"],
        cwd=DEPLOY / "prometheus",
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_every_rule_has_a_unit_test_severity_for_and_annotations():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "modtrack-rules.yml").read_text())["groups"][0]["rules"]
    tests = yaml.safe_load((DEPLOY / "prometheus" / "modtrack-rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert {r["alert"] for r in rules} == tested
    for rule in rules:
        assert rule["for"] and rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"] and "Runbook" in rule["annotations"]["description"]


def test_rules_name_only_metrics_the_collector_exposes():
    exposed = exposed_metric_names()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "modtrack-rules.yml").read_text())["groups"][0]["rules"]
    for rule in rules:
        text = rule["expr"] + json.dumps(rule["annotations"])
        assert metric_names_in(text) <= exposed, rule["alert"]


@needs_promtool
def test_scrape_config_example_is_a_valid_prometheus_config(tmp_path):
    config = yaml.safe_load((DEPLOY / "prometheus" / "scrape-config.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["job_name"] == "modtrack-collector" and job["honor_labels"] is True
    (tmp_path / "token").write_text("secret\n")
    job["authorization"]["credentials_file"] = str(tmp_path / "token")
    config["rule_files"] = [str(DEPLOY / "prometheus" / "modtrack-rules.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def kubernetes_documents():
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def pod_templates(doc) -> list[dict]:
    """The pod templates of a Kubeflow PyTorchJob, which the Kubernetes schemas do not know."""
    return [spec["template"] for spec in doc["spec"]["pytorchReplicaSpecs"].values()]


def test_every_kubernetes_manifest_validates_against_the_schemas():
    kinds = set()
    for _name, doc in kubernetes_documents():
        kinds.add(doc["kind"])
        if doc["kind"] == "PyTorchJob":
            for template in pod_templates(doc):
                pod = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": template}
                kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert kinds == {"Deployment", "Service", "PersistentVolumeClaim", "PyTorchJob"}


def test_the_validation_catches_a_broken_manifest():
    docs = dict(kubernetes_documents())
    broken = json.loads(json.dumps(docs["collector-deployment.yaml"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_collector_and_agents_meet_in_kubernetes():
    docs = dict(kubernetes_documents())
    deployment = docs["collector-deployment.yaml"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--grpc-addr=0.0.0.0:50051" in args and "--http-addr=0.0.0.0:8080" in args
    assert any(a.startswith("--token-file=") for a in args)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["collector-pvc.yaml"]["metadata"]["name"]
    service = docs["collector-service.yaml"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    grpc_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
    for template in pod_templates(docs["pytorchjob-example.yaml"]):
        command = template["spec"]["containers"][0]["command"]
        assert command[:3] == ["torchrun", "-m", "modtrack.agent"]
        assert f"--collector={service['metadata']['name']}:{grpc_port}" in command


def test_grafana_dashboard_queries_name_metrics_that_exist():
    dashboard = json.loads((DEPLOY / "grafana" / "modtrack-dashboard.json").read_text())
    exposed = exposed_metric_names()
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) >= 10
    for expr in exprs:
        names = metric_names_in(expr)
        assert names, f"no modtrack metric in {expr!r}"
        assert names <= exposed, f"{expr!r} names {names - exposed}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path):
    unit = (DEPLOY / "systemd" / "modtrack-collector.service").read_text()
    # the console script is not installed at that path here: point at one that exists
    (tmp_path / "modtrack-collector.service").write_text(
        unit.replace("/usr/local/bin/modtrack-collector", sys.executable)
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "modtrack-collector.service")], capture_output=True, text=True
    )
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr


def test_dockerfile_copies_what_exists_and_installs_no_torch():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    collector_install = project["dependencies"] + project["optional-dependencies"]["collector"]
    assert not [d for d in collector_install if d.startswith("torch")]
    assert "pip install --no-cache-dir '.[collector]'" in dockerfile
    assert '"--grpc-addr=0.0.0.0:50051", "--http-addr=0.0.0.0:8080"' in dockerfile


def test_deploy_files_use_flags_the_collector_knows():
    help_text = subprocess.run(
        [sys.executable, "-m", "modtrack.collector", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = dict(kubernetes_documents())
    used = [
        a.split("=")[0]
        for a in docs["collector-deployment.yaml"]["spec"]["template"]["spec"]["containers"][0]["args"][1:]
    ]
    used += re.findall(
        r"(--[a-z-]+)",
        (DEPLOY / "systemd" / "modtrack-collector.service").read_text().split("ExecStart=")[1].split("\n\n")[0],
    )
    used += re.findall(r'"(--[a-z-]+)=', (DEPLOY / "Dockerfile").read_text())
    assert {"--grpc-addr", "--http-addr", "--data-dir", "--token-file"} <= set(used)
    for flag in used:
        assert flag in help_text, flag
