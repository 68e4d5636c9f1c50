"""`python -m modtrack.collector serve|query` (also the `modtrack-collector` console script)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from modtrack.collector import config
from modtrack.collector.api import query_cli


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the collector: gRPC ingest, HTTP API, SQLite store")
    config.add_serve_arguments(p)
    p.add_argument("--log-level", default="INFO")


def _serve(args) -> int:
    from modtrack.collector import auth
    from modtrack.collector.serve import serve
    from modtrack.collector.store.schema import SchemaError

    try:
        settings = config.from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings.token = auth.load_tokens(settings.token_file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings, on_ready=lambda line: print(line, flush=True)))
    except (OSError, SchemaError) as exc:  # port in use, unwritable or newer data dir
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
