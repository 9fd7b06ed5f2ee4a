"""`avprobe report`: regenerate the HTML claim report from cached results only.

    avprobe report                                           # claims/ on the organism -> reports/claims.html
    avprobe report --model organism --model organism-control --verdicts claims/verdicts
    avprobe report --model qwen2.5-omni-3b --store /data/avprobe-store --out reports/omni3b.html

Runs the claims suite offline (`pytest CLAIMS --offline --report OUT ...`): nothing is
computed, and a result missing from the store is an error naming it (`avprobe collect`
computes it). Returns pytest's exit code (1: a claim failed or a result is missing).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the `report` subcommand."""
    p = subparsers.add_parser("report", help="regenerate the HTML claim report from cached results (offline)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--claims", type=Path, default=None,
                   help="the claims suite directory (default: claims/ under the current directory)")
    p.add_argument("--model", action="append", default=None,
                   help="model alias, HF id or local path (repeatable; default: the plugin's, organism)")
    p.add_argument("--store", type=Path, default=None, help="result store directory (default: the plugin's, fixtures/)")
    p.add_argument("--out", type=Path, default=Path("reports/claims.html"), help="the HTML report to write")
    p.add_argument("--verdicts", type=Path, default=None, help="directory of expected verdicts (<model>.json)")
    p.set_defaults(func=_report)


def pytest_args(args: argparse.Namespace, claims_dir: Path) -> list[str]:
    """The pytest command line that `avprobe report` runs."""
    argv = [str(claims_dir), "-p", "no:cacheprovider", "--offline", "--report", str(args.out)]
    for m in args.model or ():
        argv += ["--model", m]
    if args.store is not None:
        argv += ["--store", str(args.store)]
    if args.verdicts is not None:
        argv += ["--verdicts", str(args.verdicts)]
    return argv


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    claims_dir = args.claims if args.claims is not None else Path.cwd() / "claims"
    if not claims_dir.is_dir():
        Console(stderr=True).print(
            f"[red]avprobe report: no claims suite at {claims_dir}[/]: run it from the avprobe checkout "
            "(the directory holding claims/) or pass --claims DIR",
            highlight=False, soft_wrap=True,
        )
        return 2
    import pytest

    return int(pytest.main(pytest_args(args, claims_dir)))
