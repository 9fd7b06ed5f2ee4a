"""`avprobe judge score | calibrate`: judge one caption, or measure a judge against people.

`add_judge_arguments` and `judge_from_args` are shared with other commands that judge.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

from avprobe.judge import make_judge
from avprobe.judge.base import Judge

log = logging.getLogger(__name__)

# Which CLI options each backend takes (others would be a TypeError in make_judge).
_BACKEND_OPTIONS = {
    "concept": (),
    "openai": ("base_url", "max_workers", "timeout", "max_retries"),
    "transformers": ("batch_size", "allow_download"),
    "embedding": (),
}


def add_judge_arguments(parser: argparse.ArgumentParser, default: str | None = "concept") -> None:
    """--judge SPEC and the options of the backends."""
    g = parser.add_argument_group("judge")
    g.add_argument(
        "--judge",
        default=default,
        required=default is None,
        metavar="SPEC",
        help="concept | openai[:MODEL] | transformers:MODEL_OR_PATH | embedding"
        + (f" (default {default})" if default else ""),
    )
    g.add_argument("--judge-url", dest="judge_url", metavar="URL", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (else $AVPROBE_JUDGE_URL, $OPENAI_BASE_URL)")
    g.add_argument("--judge-concurrency", dest="judge_concurrency", type=int, metavar="N", help="parallel requests to the judge endpoint (default 8)")
    g.add_argument("--judge-timeout", dest="judge_timeout", type=float, metavar="S", help="seconds one attempt of a judge request may take in all, from connecting to the last byte of the reply (DNS lookup aside; default 120)")
    g.add_argument("--judge-retries", dest="judge_retries", type=int, metavar="N", help="retries on 429, 5xx and timeouts (default 4)")
    g.add_argument("--judge-batch-size", dest="judge_batch_size", type=int, metavar="N", help="batch size of the transformers judge (default 8)")
    g.add_argument("--judge-allow-download", dest="judge_allow_download", action="store_true", help="let the transformers judge download its weights (default: local files only)")
    g.add_argument("--store", type=Path, metavar="DIR", help="result store to cache judgments in (default: no cache)")


def judge_from_args(args: argparse.Namespace, cache: Any = None) -> Judge:
    """Build the judge the parsed arguments ask for (cache: a Store, or --store's)."""
    if cache is None and getattr(args, "store", None) is not None:
        from avprobe.store import Store

        cache = Store(args.store)
    backend = args.judge.partition(":")[0]
    given = {
        "base_url": args.judge_url,
        "max_workers": args.judge_concurrency,
        "timeout": args.judge_timeout,
        "max_retries": args.judge_retries,
        "batch_size": args.judge_batch_size,
        # None when unset, so it is neither passed nor warned about; other commands that judge
        # may not define the flag.
        "allow_download": True if getattr(args, "judge_allow_download", False) else None,
    }
    allowed = _BACKEND_OPTIONS.get(backend, ())
    for name, value in given.items():
        if value is not None and name not in allowed:
            log.warning("option for %s ignored by the %s judge", name, backend)
    options = {k: v for k, v in given.items() if k in allowed}
    return make_judge(args.judge, cache=cache, **options)


def _usage_errors(fn):
    """Report configuration mistakes (bad spec, no URL, bad ratings file) as one line, exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (ValueError, FileNotFoundError) as exc:
            log.error("%s", exc)
            return 2

    return run


@_usage_errors
def _cmd_score(args: argparse.Namespace) -> int:
    judge = judge_from_args(args)
    score = judge.score(args.candidate, args.reference, args.modality)
    print(json.dumps({"label": judge.label, "proxy": judge.proxy, **score.to_dict()}, indent=2))
    if not score.scored:
        log.error("unscored: %s", score.reason)
        return 1
    return 0


def _fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


@_usage_errors
def _cmd_calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from avprobe.judge.calibrate import calibrate, read_ratings

    rows = read_ratings(args.ratings)
    judge = judge_from_args(args)
    results = calibrate(rows, judge, n_boot=args.n_boot, seed=args.seed, confidence=args.confidence)
    table = Table(title=f"Judge vs human ratings ({args.ratings.name}); judge {judge.label}")
    for col in ("modality", "Spearman rho", f"{args.confidence:.0%} CI", "p", "n", "unscored", "paper"):
        table.add_column(col)
    paper = {"audio": "0.816", "video": "0.732"}
    for m, r in results.items():
        table.add_row(m, _fmt(r.rho), f"[{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]", f"{r.p_value:.2g}", str(r.n), str(r.n_unscored), paper[m])
    console = Console()
    console.print(table)
    if judge.proxy:
        console.print("[yellow]note: this judge is a weaker proxy, not the paper's LLM judge[/yellow]")
    if args.json is not None:
        payload = {m: r.__dict__ for m, r in results.items()}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        console.print(f"wrote {args.json}")
    return 0 if all(r.n >= 3 for r in results.values()) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `judge score` and `judge calibrate`."""
    p = subparsers.add_parser("judge", help="fidelity judges: score a caption, calibrate against human ratings")
    sub = p.add_subparsers(dest="judge_command", metavar="SUBCOMMAND")

    s = sub.add_parser("score", help="judge one candidate caption against a reference")
    s.add_argument("--candidate", required=True, help="caption to judge")
    s.add_argument("--reference", required=True, help="reference caption for the modality")
    s.add_argument("--modality", required=True, choices=("audio", "video"), help="which fidelity to judge")
    add_judge_arguments(s)
    s.set_defaults(func=_cmd_score)

    c = sub.add_parser("calibrate", help="Spearman rho of a judge against human ratings, per modality")
    c.add_argument("ratings", type=Path, metavar="RATINGS.csv", help="columns: id, modality, candidate, reference, human_score")
    c.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples (default 2000)")
    c.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    c.add_argument("--confidence", type=float, default=0.95, help="CI level (default 0.95)")
    c.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON")
    add_judge_arguments(c, default=None)
    c.set_defaults(func=_cmd_calibrate)

    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])
