"""`collector serve`'s settings: one ServeConfig holds every default, and the command line is built from it.

Each field's metadata carries its flag's help text (fields without help have no flag: tests and
embedders set them). The defaults are typed once, here; `--help` shows them, and the stages'
own defaults (the merge's watermark, ingest's Hello timeout, the query CLI's URL) refer here. `validate()` is
where settings that cannot work together are refused, whether they came from flags or code.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from modtrack.collector.pipeline.detector import CPU_CLOCK_FLOOR, CPU_CLOCK_WARMUP, DetectorParams


def _flag(default, help: str, **argparse_kw) -> Any:
    """A field that is also a `serve` flag (--name-with-dashes)."""
    if isinstance(default, list):
        return field(default_factory=list, metadata={"help": help, **argparse_kw})
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class ServeConfig:
    grpc_addr: str = _flag("127.0.0.1:50051", "HOST:PORT for agents (port 0: any)")
    http_addr: str = _flag("127.0.0.1:8080", "HOST:PORT for the API (port 0: any)")
    data_dir: str = _flag("./modtrack-data", "where the SQLite file lives")
    token_file: str | None = _flag(
        None,
        "require 'authorization: Bearer <token>': the file holds one token, or lines 'JOB TOKEN' "
        "(per-job tokens; JOB '*' is the admin token)",
    )
    tls_cert: str | None = _flag(None, "PEM certificate for gRPC and HTTP (with --tls-key)")
    tls_key: str | None = _flag(None, "PEM private key")
    watermark_s: float = _flag(2.0, "evaluate a step this long after its first report even if ranks are late")
    missing_after_s: float = _flag(30.0, "a rank silent this long is marked missing and no longer waited for")
    retain_steps: int = _flag(5000, "per-module figures are kept for this many newest evaluated steps per job")
    job_retention_s: float = _flag(
        3600.0,
        "a job with no connected rank for this long leaves the collector's memory "
        "(its history stays in SQLite and is served from there)",
    )
    alert_webhooks: list[str] = _flag(
        [], "POST straggler alerts here (repeatable)", flag="--alert-webhook", action="append", metavar="URL"
    )
    dashboard_url: str | None = _flag(None, "link put in alerts (default: none)")
    max_streams: int = _flag(16384, "concurrent agent streams; more are refused with RESOURCE_EXHAUSTED")
    hello_timeout_s: float = _flag(10.0, "a stream that sends no Hello this long after opening is closed")
    max_message_bytes: int = 16 * 1024 * 1024  # one report of ~500k module entries; bigger is refused
    tick_s: float = 0.05  # how often the merge looks for due steps
    retention_every_s: float = 10.0  # how often old module figures are trimmed and finished jobs forgotten
    token: Any = None  # the loaded tokens (auth.as_tokens takes a str, a Tokens or None); from token_file
    detector: DetectorParams = field(default_factory=DetectorParams)  # for every job; flags --detect-*

    def validate(self) -> ServeConfig:
        """Raise ValueError, naming the flag, for settings that cannot work; return self."""
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        d = self.detector
        if not (1 <= d.k <= d.n <= 255):
            raise ValueError("--detect-k and --detect-n need 1 <= k <= n <= 255")
        for name in ("watermark_s", "missing_after_s", "hello_timeout_s", "tick_s", "retention_every_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")
        if self.job_retention_s < 0:
            raise ValueError("--job-retention-s must be >= 0")
        if self.retain_steps < 1 or self.max_streams < 1:
            raise ValueError("--retain-steps and --max-streams must be >= 1")
        return self


# --detect-* flags: the DetectorParams knobs a user may tune, with their help; defaults from DetectorParams.
DETECTOR_FLAGS = {
    "ratio": "flag a module time above this x the peers' median",
    "z": "... and above this robust z-score",
    "k": "open an episode once k of the last n steps are flagged",
    "n": "... and close it after n clean steps",
    "min_excess_ms": "never flag an excess over the median below this many ms "
    f"(default: 0, {CPU_CLOCK_FLOOR['min_excess_ms']} for ranks on the CPU clock)",
    "min_excess_frac": "... nor below this fraction of the median step wall time "
    f"(default: 0, {CPU_CLOCK_FLOOR['min_excess_frac']} for ranks on the CPU clock)",
    "warmup_steps": "a job's first steps judge nothing (lazy init, first-call hooks) "
    f"(default: 0, {CPU_CLOCK_WARMUP} for ranks on the CPU clock)",
}
_FLOAT_OR_NONE = {"min_excess_ms", "min_excess_frac"}
_INT_OR_NONE = {"warmup_steps"}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ServeConfig field with help text as a flag, then the --detect-* group."""
    defaults = ServeConfig()
    for f in dataclasses.fields(ServeConfig):
        if "help" not in f.metadata:
            continue
        kw = dict(f.metadata)
        flag = kw.pop("flag", "--" + f.name.replace("_", "-"))
        default = getattr(defaults, f.name)
        if kw.get("action") != "append" and default is not None:
            kw["type"] = type(default)
            kw["help"] += " (default: %(default)s)"
        parser.add_argument(flag, dest=f.name, default=default, **kw)
    group = parser.add_argument_group("straggler detection")
    params = DetectorParams()
    for name, help_text in DETECTOR_FLAGS.items():
        default = getattr(params, name)
        kind = float if name in _FLOAT_OR_NONE else int if name in _INT_OR_NONE else type(default)
        if default is not None:
            help_text += " (default: %(default)s)"
        group.add_argument(
            f"--detect-{name.replace('_', '-')}", dest=f"detect_{name}", type=kind, default=default, help=help_text
        )


def from_args(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig a parsed `serve` command line asks for (tokens not loaded yet), validated."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig) if "help" in f.metadata}
    tuned = {name: getattr(args, f"detect_{name}") for name in DETECTOR_FLAGS}
    detector = dataclasses.replace(DetectorParams(), **tuned)
    return ServeConfig(**values, detector=detector).validate()
