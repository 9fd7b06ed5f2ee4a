"""`avprobe report`: redraw the HTML claim report from a finished run, without re-running it.

    avprobe report                                     # reports/claims.json -> reports/claims.html
    avprobe report --from reports/release.json --out /tmp/release.html
    avprobe report --store /data/avprobe-store         # the results moved

Reads the verdicts from the run's claims.json (written beside every report by the claims
suite: `pytest claims/ ... --report reports/claims.html`) and the figures' data from the
result store, read-only: nothing is computed and no claim is re-tested. A model whose results
are missing is named with the `avprobe collect` command that computes them, and the report is
still written with its verdicts. Exit code 0 when the report was written, 2 when it could not be.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_CLAIMS = Path("reports/claims.json")


def register(subparsers) -> None:
    """Add the `report` subcommand."""
    p = subparsers.add_parser("report", help="redraw the HTML claim report from a run's claims.json (offline)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--from", dest="claims_json", type=Path, default=DEFAULT_CLAIMS,
                   help=f"the run's claims.json, written beside its report (default: {DEFAULT_CLAIMS})")
    p.add_argument("--out", type=Path, default=None,
                   help="the HTML report to write (default: the report named in claims.json, beside it)")
    p.add_argument("--store", type=Path, default=None,
                   help="result store to read the figures' data from (default: the run's, as claims.json says)")
    p.add_argument("--model", action="append", default=None,
                   help="draw only this model's figures (repeatable; default: every model of the run)")
    p.set_defaults(func=_report)


def _say(console: Any, text: str, style: str = "red") -> None:
    console.print(f"[{style}]avprobe report:[/] {text}", highlight=False, soft_wrap=True)


def _report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from avprobe.report.export import read_claims
    from avprobe.report.html import write_report

    err = Console(stderr=True)
    src = args.claims_json
    if not src.is_file():
        _say(err, f"no claims file at {src}: run the claims first, e.g. `make claims` or "
                  "`pytest claims/ --model organism --report reports/claims.html` (it writes claims.json beside "
                  "the report), or pass --from FILE")
        return 2
    try:
        outcomes, doc = read_claims(src)
    except (ValueError, KeyError, TypeError) as exc:
        _say(err, f"{src} cannot be read: {exc}")
        return 2
    run = dict(doc.get("run") or {})
    if args.store is not None:
        run["store"] = str(args.store)
    models = args.model or run.get("models") or sorted({o.model for o in outcomes if " vs " not in o.model})
    evidences: dict[str, Any] = {}
    for m in models:
        ev = _evidence(m, run, err)
        if ev is not None:
            evidences[m] = ev
    out = args.out or src.with_name(doc.get("report") or src.with_suffix(".html").name)
    try:
        path = write_report(out, outcomes, evidences, run=run)
    except OSError as exc:
        _say(err, f"cannot write {out}: {exc}")
        return 2
    Console().print(f"avprobe report: {len(outcomes)} verdicts of {len(models)} model(s) from {src}; "
                    f"report written to {path}", highlight=False, soft_wrap=True)
    return 0


def _evidence(model: str, run: dict[str, Any], err: Any) -> Any:
    """One model's stored results, read-only; None (said once, no traceback) when they cannot be read."""
    from avprobe.pipeline.gather import GatherError, gather_evidence
    from avprobe.store import StoreError

    store = run.get("store") or "fixtures"
    try:
        return gather_evidence(model, store_root=store, samples=run.get("samples"), limit=run.get("limit"),
                               judge=run.get("judge"), judge_url=run.get("judge_url"),
                               base_model=run.get("base_model"), offline=True)
    except (FileNotFoundError, ValueError, GatherError, StoreError, RuntimeError, OSError) as exc:
        _say(err, f"{model}: no figures ({exc})", style="yellow")
        return None
