"""`python -m modtrack.collector serve|query` (also the `modtrack-collector` console script)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from modtrack.collector.api import query_cli


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the collector: gRPC ingest, HTTP API, SQLite store")
    p.add_argument("--grpc-addr", default="127.0.0.1:50051", help="HOST:PORT for agents (port 0: any)")
    p.add_argument("--http-addr", default="127.0.0.1:8080", help="HOST:PORT for the API (port 0: any)")
    p.add_argument("--data-dir", default="./modtrack-data", help="where the SQLite file lives")
    p.add_argument("--token-file", help="require 'authorization: Bearer <token>': the file holds one "
                   "token, or lines 'JOB TOKEN' (per-job tokens; JOB '*' is the admin token)")
    p.add_argument("--tls-cert", help="PEM certificate for gRPC and HTTP (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--watermark-s", type=float, default=2.0,
                   help="evaluate a step this long after its first report even if ranks are late")
    p.add_argument("--missing-after-s", type=float, default=30.0,
                   help="a rank silent this long is marked missing and no longer waited for")
    p.add_argument("--retain-steps", type=int, default=5000,
                   help="per-module figures are kept for this many newest steps per job")
    p.add_argument("--alert-webhook", action="append", default=[], metavar="URL",
                   help="POST straggler alerts here (repeatable)")
    p.add_argument("--dashboard-url", help="link put in alerts (default: none)")
    p.add_argument("--max-streams", type=int, default=16384,
                   help="concurrent agent streams; more are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--hello-timeout-s", type=float, default=10.0,
                   help="a stream that sends no Hello this long after opening is closed")
    p.add_argument("--log-level", default="INFO")
    _detector_flags(p)


def _detector_flags(p) -> None:
    """--detect-* for every DetectorParams knob a user may tune; defaults from DetectorParams."""
    from modtrack.collector.pipeline.detector import CPU_CLOCK_FLOOR, DetectorParams

    d = DetectorParams()
    g = p.add_argument_group("straggler detection")
    g.add_argument("--detect-ratio", type=float, default=d.ratio,
                   help="flag a module time above this x the peers' median (default %(default)s)")
    g.add_argument("--detect-z", type=float, default=d.z,
                   help="... and above this robust z-score (default %(default)s)")
    g.add_argument("--detect-k", type=int, default=d.k,
                   help="open an episode once k of the last n steps are flagged (default %(default)s)")
    g.add_argument("--detect-n", type=int, default=d.n,
                   help="... and close it after n clean steps (default %(default)s)")
    g.add_argument("--detect-min-excess-ms", type=float, default=None,
                   help="never flag an excess over the median below this many ms (default: 0, "
                   f"{CPU_CLOCK_FLOOR['min_excess_ms']} for ranks on the CPU clock)")
    g.add_argument("--detect-min-excess-frac", type=float, default=None,
                   help="... nor below this fraction of the median step wall time (default: 0, "
                   f"{CPU_CLOCK_FLOOR['min_excess_frac']} for ranks on the CPU clock)")


def _detector_params(args):
    from modtrack.collector.pipeline.detector import DetectorParams

    if not (1 <= args.detect_k <= args.detect_n <= 255):
        raise ValueError("--detect-k and --detect-n need 1 <= k <= n <= 255")
    return DetectorParams(ratio=args.detect_ratio, z=args.detect_z, k=args.detect_k, n=args.detect_n,
                          min_excess_ms=args.detect_min_excess_ms,
                          min_excess_frac=args.detect_min_excess_frac)


def _serve(args) -> int:
    from modtrack.collector import auth
    from modtrack.collector.serve import ServeConfig, serve

    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    try:
        detector = _detector_params(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        token = auth.load_tokens(args.token_file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = ServeConfig(
        grpc_addr=args.grpc_addr, http_addr=args.http_addr, data_dir=args.data_dir, token=token,
        tls_cert=args.tls_cert, tls_key=args.tls_key, watermark_s=args.watermark_s,
        missing_after_s=args.missing_after_s, retain_steps=args.retain_steps,
        alert_webhooks=args.alert_webhook, dashboard_url=args.dashboard_url,
        max_streams=args.max_streams, hello_timeout_s=args.hello_timeout_s, detector=detector)
    try:
        asyncio.run(serve(config, on_ready=lambda line: print(line, flush=True)))
    except OSError as exc:  # port in use, unwritable data dir
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="modtrack-collector", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    query_cli.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return query_cli.run(args)


if __name__ == "__main__":
    sys.exit(main())
