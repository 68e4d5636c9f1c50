"""`python -m modtrack.agent [--collector HOST:PORT] SCRIPT [ARGS...]` (also `modtrack-agent`).

Runs SCRIPT as __main__ in this very process, the way `python -m cProfile` does, with
tracking switched on first: the user's code needs no change, and its argv, sys.path,
output, exceptions and exit code are what they would be under plain `python SCRIPT`.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from modtrack.agent import config

USAGE = (
    "python -m modtrack.agent [--collector HOST:PORT] [--job NAME] [--token-file F] [--tls-ca F] "
    "[--clock auto|cpu|wall|cuda] SCRIPT [ARGS...]"
)


def _parser() -> argparse.ArgumentParser:
    env = config.from_env()
    p = argparse.ArgumentParser(prog="modtrack-agent", usage=USAGE, description=__doc__.split("\n\n")[1])
    p.add_argument(
        "--collector",
        default=env.collector,
        help="collector gRPC address (env MODTRACK_COLLECTOR); without one the script runs untracked",
    )
    p.add_argument("--job", default=None, help="job id (env MODTRACK_JOB; default: torchrun's run id)")
    p.add_argument(
        "--token-file", default=None, help="file holding the collector's bearer token (or env MODTRACK_TOKEN)"
    )
    p.add_argument(
        "--tls-ca", default=None, help="CA certificate (PEM) to reach a collector serving TLS (or env MODTRACK_TLS_CA)"
    )
    p.add_argument(
        "--clock",
        default=env.clock,
        choices=config.CLOCKS,
        help="how module time is measured (env MODTRACK_CLOCK): auto = cuda events when CUDA is "
        "available, else cpu (thread CPU time); wall for ranks with several intra-op threads",
    )
    p.add_argument("script", help="the training script, run as __main__")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return p


def _run_as_main(path: str) -> None:
    """runpy.run_path as __main__; an uncaught exception is reported as plain python would."""
    try:
        runpy.run_path(path, run_name="__main__")
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as e:
        tb = e.__traceback__
        script = os.path.abspath(path)
        while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
            tb = tb.tb_next  # drop this launcher's and runpy's frames
        tb = tb or e.__traceback__
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    opts = _parser().parse_args(argv)
    script = opts.script
    if not os.path.isfile(script):
        print(f"{sys.executable}: can't open file {script!r}: [Errno 2] No such file or directory", file=sys.stderr)
        sys.exit(2)
    tracking = None
    if opts.collector:  # set up before sys.path changes: the agent imports from where it was found
        from modtrack.agent.api import track

        fallback = f"{os.path.splitext(os.path.basename(script))[0]}-{os.getpid()}"
        tracking = track(
            opts.collector,
            opts.job,
            token_file=opts.token_file,
            tls_ca=opts.tls_ca,
            clock=opts.clock,
            fallback_job=fallback,
        )
    sys.argv[:] = [script, *opts.args]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        _run_as_main(script)
    finally:
        if tracking is not None:
            tracking.close()


if __name__ == "__main__":
    main()
