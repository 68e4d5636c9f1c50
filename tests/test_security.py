"""Authentication (one shared token or per-job tokens), TLS with the real agent, safe defaults,
and no secret in any log."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import ssl
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from harness.collector_process import REPO, CollectorProcess, env
from harness.collector_thread import CollectorThread
from harness.fake_rank import FakeRank, stream_steps
from harness.http import get
from harness.waiting import wait_for
from modtrack.collector import auth
from modtrack.collector.serve import ServeConfig

TOKENS = "# per-job tokens\njob-a tok-a\nteam-b-* tok-b\n* tok-admin\n"

TRAIN = textwrap.dedent("""
    import torch
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(6):
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    print("trained")
""")


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 and localhost, made here; returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_token_file_formats(tmp_path):
    single = auth.Tokens.parse("  s3cret \n")
    assert single.access("Bearer s3cret").admin and single.access("Bearer s3cre") is None
    tokens = auth.Tokens.parse(TOKENS)
    assert tokens.access("Bearer tok-a").allows("job-a")
    assert not tokens.access("Bearer tok-a").allows("job-ab")
    assert tokens.access("Bearer tok-b").allows("team-b-7")
    assert not tokens.access("Bearer tok-b").allows("job-a")
    assert tokens.access("Bearer tok-admin").admin
    assert tokens.access("tok-a") is None and tokens.access(None) is None
    with pytest.raises(ValueError, match="JOB TOKEN"):
        auth.Tokens.parse("job-a tok-a\njob-b tok b\n")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        auth.load_tokens(str(tmp_path / "empty"))


def test_per_job_tokens_on_grpc_and_http(tmp_path):
    c = CollectorThread(tmp_path / "data", token=auth.Tokens.parse(TOKENS))
    ranks = []
    try:
        a = FakeRank(c.grpc_target, "job-a", 0, 1, token="tok-a")
        b = FakeRank(c.grpc_target, "team-b-1", 0, 1, token="tok-b")
        ranks += [a, b]
        stream_steps([a], [0, 1])
        stream_steps([b], [0])
        refused = {
            grpc.StatusCode.PERMISSION_DENIED: [
                FakeRank(c.grpc_target, "team-b-1", 1, 2, token="tok-a"),
                FakeRank(c.grpc_target, "job-c", 0, 1, token="tok-b"),
            ],
            grpc.StatusCode.UNAUTHENTICATED: [
                FakeRank(c.grpc_target, "job-a", 0, 1),
                FakeRank(c.grpc_target, "job-a", 0, 1, token="tok-a "),
            ],
        }
        for code, streams in refused.items():
            ranks += streams
            for s in streams:
                s.wait_done()
                assert s.error is not None and s.error.code() == code, s.error
        store = c.collector.store
        assert [j["job"] for j in store.jobs()] == ["job-a", "team-b-1"]  # nothing of the refused
        assert [r["rank"] for r in store.ranks("team-b-1")] == [0]

        assert get(c.url, "/api/v1/jobs/job-a/steps", "tok-a")[0] == 200
        assert get(c.url, "/api/v1/jobs/team-b-1/steps", "tok-a")[0] == 403
        assert get(c.url, "/api/v1/jobs/team-b-1/steps", "tok-admin")[0] == 200
        assert get(c.url, "/api/v1/jobs/job-a/steps")[0] == 401
        assert get(c.url, "/api/v1/jobs/job-a/steps", "tok-x")[0] == 401
        assert [j["job"] for j in get(c.url, "/api/v1/jobs", "tok-b")[1]["jobs"]] == ["team-b-1"]
        assert len(get(c.url, "/api/v1/jobs", "tok-admin")[1]["jobs"]) == 2
        assert get(c.url, "/metrics", "tok-a")[0] == 403  # all jobs' series: admin only
        assert get(c.url, "/metrics", "tok-admin")[0] == 200
        assert get(c.url, "/healthz")[0] == 200
    finally:
        for r in ranks:
            r.kill()
        c.stop()


def test_defaults_bind_loopback_only():
    assert ServeConfig().http_addr.startswith("127.0.0.1:")
    assert ServeConfig().grpc_addr.startswith("127.0.0.1:")
    from modtrack.collector.__main__ import _serve_parser

    parser = argparse.ArgumentParser()
    _serve_parser(parser.add_subparsers())
    args = parser.parse_args(["serve"])
    assert args.http_addr.startswith("127.0.0.1:") and args.grpc_addr.startswith("127.0.0.1:")
    assert args.token_file is None and args.tls_cert is None  # documented: set both to expose


def start_agent(tmp_path, target, job, extra_env=None, *args) -> subprocess.Popen:
    script = tmp_path / "train_small.py"
    script.write_text(TRAIN)
    return subprocess.Popen(
        [sys.executable, "-m", "modtrack.agent", "--collector", target, "--job", job, *args, str(script)],
        cwd=REPO,
        env=env(**(extra_env or {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, out, err


@pytest.mark.slow
def test_real_agent_over_tls_with_tokens_and_no_secret_in_logs(tmp_path):
    cert, key = self_signed(tmp_path)
    (tmp_path / "tokens").write_text(TOKENS)
    (tmp_path / "agent-token").write_text("tok-a\n")
    server = CollectorProcess(
        tmp_path / "data",
        "--token-file",
        str(tmp_path / "tokens"),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--watermark-s",
        "0.2",
        log_path=tmp_path / "collector.log",
    )
    try:
        target = server.grpc_target
        tls = {"MODTRACK_TLS_CA": str(cert)}
        agents = [  # all at once: the machine is small, the test should not be slow
            start_agent(tmp_path, target, "job-a", {"MODTRACK_TOKEN": "tok-a", **tls}),
            start_agent(
                tmp_path, target, "job-a", None, "--token-file", str(tmp_path / "agent-token"), "--tls-ca", str(cert)
            ),
            start_agent(tmp_path, target, "team-b-1", {"MODTRACK_TOKEN": "tok-a", **tls}),
            start_agent(tmp_path, target, "job-a", {"MODTRACK_TOKEN": "tok-a"}),  # no CA: no TLS
        ]
        results = [finish(a) for a in agents]
        for code, out, err in results:  # refused or not, training is unharmed
            assert code == 0 and out == "trained\n", err
        wrong_job_err = results[2][2]

        ctx = ssl.create_default_context(cafile=str(cert))
        url = f"https://{server.http_addr}"

        def query(path, token="tok-admin"):
            req = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
                return json.load(resp)

        wait_for(
            lambda: len(query("/api/v1/jobs/job-a/steps?last=100")["steps"]) == 6,
            20,
            lambda: f"job-a's 6 steps: {query('/api/v1/jobs/job-a/steps')} {results[0][2]}",
        )
        assert [j["job"] for j in query("/api/v1/jobs")["jobs"]] == ["job-a"]
        with pytest.raises(OSError):  # plain HTTP to the HTTPS port
            urllib.request.urlopen(f"http://{server.http_addr}/api/v1/jobs", timeout=10)
        with pytest.raises(urllib.error.HTTPError, match="403"):
            query("/api/v1/jobs/team-b-1/steps", "tok-a")
    finally:
        server.terminate()
    log = server.log()
    assert "may not write job 'team-b-1'" in log
    assert log.count("refused 127.0.0.1: this token may not write") == 1
    everything = log + "".join(server.lines) + "".join(out + err for _, out, err in results)
    for secret in ("tok-a", "tok-b", "tok-admin"):
        assert secret not in everything
    assert "PERMISSION_DENIED" in wrong_job_err, wrong_job_err
