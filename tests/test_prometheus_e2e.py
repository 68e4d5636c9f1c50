"""End to end: fake ranks with a straggler -> collector -> real Prometheus (our rules) -> real
Alertmanager -> a webhook receiver, next to the collector's own built-in webhook.

The test's copies of the configs use 1 s intervals and a 2 s `for`, so the whole story (firing,
then resolved once the straggler recovers) takes seconds.
"""

import json
import pathlib
import shutil
import subprocess
import threading
import urllib.parse
import urllib.request

import pytest
import yaml

from harness.collector_thread import CollectorThread
from harness.fake_rank import FakeRank, report
from harness.ports import free_port
from harness.waiting import wait_for
from harness.webhook_receiver import WebhookReceiver
from modtrack.collector.outputs.alert_payload import fingerprint

DEPLOY = pathlib.Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
JOB = "e2e-train"
CULPRIT, MODULE = 2, "Net.blocks.1"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (PROMETHEUS and ALERTMANAGER), reason="prometheus / alertmanager not installed"),
]


def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_ready(url: str, proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    def ready() -> bool:
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        with urllib.request.urlopen(url, timeout=1):
            return True

    wait_for(ready, timeout_s, f"{url} to answer", interval=0.2, retry_on=(OSError,))


class Process:
    """A subprocess that is always ended: terminate, then kill."""

    def __init__(self, args, log_path: pathlib.Path):
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.log.close()


class Feeder:
    """Four ranks on two hosts, ten steps a second; rank 2 slow in Net.blocks.1 while `straggle`."""

    def __init__(self, target: str):
        self.ranks = [FakeRank(target, JOB, r, 4, host=f"node{r // 2}") for r in range(4)]
        self.straggle = True
        self.step = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for r, rank in enumerate(self.ranks):
                slow = self.straggle and r == CULPRIT
                fwd = [1.0, 2.0, 3.0, 12.0 if slow else 4.0, 5.0]
                # the culprit computes longer; its peers wait for it in the all-reduce
                sync_ms = 1.0 if slow or not self.straggle else 9.0
                rank.report(report(self.step, fwd, bwd_ms=[1.0, 2.0, 3.0, 4.0, 5.0], sync_ms=sync_ms))
            self.step += 1

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)
        for rank in self.ranks:
            rank.close()


def test_culprit_fires_through_prometheus_and_alertmanager_then_resolves(tmp_path):
    stack = []
    try:
        am_receiver = WebhookReceiver().__enter__()
        stack.append(lambda: am_receiver.__exit__(None, None, None))
        builtin_receiver = WebhookReceiver().__enter__()
        stack.append(lambda: builtin_receiver.__exit__(None, None, None))
        collector = CollectorThread(
            tmp_path / "data", alert_webhooks=[builtin_receiver.url], dashboard_url="http://dash.example"
        )
        stack.append(collector.stop)

        am_port, prom_port = free_port(), free_port()
        (tmp_path / "alertmanager.yml").write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "test",
                        "group_by": ["alertname", "job", "rank", "module"],
                        "group_wait": "1s",
                        "group_interval": "1s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [
                        {"name": "test", "webhook_configs": [{"url": am_receiver.url, "send_resolved": True}]}
                    ],
                }
            )
        )
        am = Process(
            [
                ALERTMANAGER,
                f"--config.file={tmp_path / 'alertmanager.yml'}",
                f"--storage.path={tmp_path / 'am-data'}",
                f"--web.listen-address=127.0.0.1:{am_port}",
                "--cluster.listen-address=",
            ],
            tmp_path / "alertmanager.log",
        )
        stack.append(am.stop)

        rules = yaml.safe_load((DEPLOY / "prometheus" / "modtrack-rules.yml").read_text())
        for rule in rules["groups"][0]["rules"]:
            rule["for"] = "2s"
        (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
        scrape = yaml.safe_load((DEPLOY / "prometheus" / "scrape-config.yml").read_text())["scrape_configs"][0]
        del scrape["authorization"]  # this collector runs without a token
        scrape.update(
            scrape_interval="1s", static_configs=[{"targets": [f"127.0.0.1:{collector.collector.http_port}"]}]
        )
        (tmp_path / "prometheus.yml").write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(tmp_path / "rules.yml")],
                    "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                    "scrape_configs": [scrape],
                }
            )
        )
        prom = Process(
            [
                PROMETHEUS,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--rules.alert.resend-delay=1s",
            ],
            tmp_path / "prometheus.log",
        )
        stack.append(prom.stop)
        wait_ready(f"http://127.0.0.1:{am_port}/-/ready", am.proc)
        wait_ready(f"http://127.0.0.1:{prom_port}/-/ready", prom.proc)

        feeder = Feeder(collector.grpc_target)
        stack.append(feeder.stop)

        def alerts_with(status):
            return lambda bodies: any(
                a["status"] == status and a["labels"].get("alertname") == "ModtrackStraggler"
                for b in bodies
                for a in b["alerts"]
            )

        bodies = am_receiver.wait_for(alerts_with("firing"), 40)
        firing = [a for b in bodies for a in b["alerts"] if a["status"] == "firing"]
        assert firing, f"no firing alert from Alertmanager; got {bodies}"
        labels = firing[0]["labels"]
        assert (
            labels["alertname"],
            labels["job"],
            labels["rank"],
            labels["host"],
            labels["module"],
            labels["phase"],
            labels["severity"],
        ) == ("ModtrackStraggler", JOB, str(CULPRIT), "node1", MODULE, "forward", "warning")
        assert f"Rank {CULPRIT} on host node1" in firing[0]["annotations"]["summary"]
        assert MODULE in firing[0]["annotations"]["summary"]
        assert "per step" in firing[0]["annotations"]["summary"]
        # Our fingerprint is Alertmanager's own for the same labels.
        assert firing[0]["fingerprint"] == fingerprint(labels)
        # Only the culprit: no alert names another rank.
        assert {a["labels"].get("rank") for b in bodies for a in b["alerts"]} <= {str(CULPRIT)}

        # The dashboard's queries are valid PromQL on this Prometheus and the rules loaded healthy.
        dashboard = json.loads((DEPLOY / "grafana" / "modtrack-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                query = urllib.parse.quote(target["expr"].replace("$job", JOB))
                answer = http_json(f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}")
                assert answer["status"] == "success", target["expr"]
        groups = http_json(f"http://127.0.0.1:{prom_port}/api/v1/rules")["data"]["groups"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"])
        query = urllib.parse.quote(f'modtrack_step_seconds{{job="{JOB}"}}')
        series = http_json(f"http://127.0.0.1:{prom_port}/api/v1/query?query={query}")["data"]["result"]
        assert sorted(s["metric"]["rank"] for s in series) == ["0", "1", "2", "3"]

        feeder.straggle = False
        bodies = am_receiver.wait_for(alerts_with("resolved"), 40)
        resolved = [a for b in bodies for a in b["alerts"] if a["status"] == "resolved"]
        assert resolved, "no resolved alert from Alertmanager"
        assert resolved[0]["labels"]["rank"] == str(CULPRIT) and resolved[0]["labels"]["module"] == MODULE

        # The collector's own webhook told the same story, without Prometheus.
        builtin = builtin_receiver.wait_for(alerts_with("resolved"), 10)
        statuses = [
            (b["status"], b["alerts"][0]["labels"]["rank"], b["alerts"][0]["labels"]["module"])
            for b in builtin
            if b["alerts"][0]["labels"]["phase"] == "forward"
        ]
        assert statuses[0] == ("firing", str(CULPRIT), MODULE) and statuses[-1] == ("resolved", str(CULPRIT), MODULE)
        assert builtin[0]["alerts"][0]["generatorURL"].startswith("http://dash.example/")
    finally:
        for stop in reversed(stack):
            stop()
