"""`avprobe release-check`: a new model release against the one it replaces, as CI runs it.

    avprobe release-check --new my-org/Omni-3B-v2 --previous qwen2.5-omni-3b --out reports/release \\
        -- --samples paper500.jsonl --judge openai:Qwen/Qwen3-32B --judge-url $JUDGE_URL --device cuda

One run of the claims suite on both models (the previous release's results come from the
store; only the new one's are computed), then a statistical comparison of their claims.json
outcomes, claim by claim and scope by scope. A claim regresses when

- its verdict moved (passed, failed or skipped: any change), or
- an estimate of the new release (the headline or any part) lies outside the previous
  release's confidence interval of the same part;

never by a fixed tolerance. The previous release's committed expected verdicts (if any)
are given to both models (`--verdicts`), so the HTML report shows the new release's moved
verdicts as the terminal does. Writes into --out: release.html, release.json (every claim),
release.samples.jsonl, junit.xml, and release-check.json / release-check.md (the
comparison). Exit code: 0 no regression, 1 regressions (listed), 2 the run itself failed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from avprobe.claim import ClaimOutcome
from avprobe.records import verdict_file


@dataclass(frozen=True)
class Finding:
    """One way the new release differs from the previous one."""

    claim_id: str
    scope: str
    what: str  # "verdict moved" | "outside previous CI" | "missing"
    part: str
    previous: str
    new: str


def register(subparsers) -> None:
    p = subparsers.add_parser("release-check", help="a new release against the previous one: verdicts and CIs",
                              description=__doc__.splitlines()[0])
    p.add_argument("--new", required=True, help="the new release: model alias, HF id or local path")
    p.add_argument("--previous", required=True, help="the release it replaces (its results are read from the store)")
    p.add_argument("--out", type=Path, default=Path("reports/release"),
                   help="directory for the report, claims.json, junit.xml and the comparison (default: reports/release)")
    p.add_argument("--verdicts", type=Path, default=Path("claims/verdicts"),
                   help="committed expected verdicts; the previous release's file is given to both models "
                        "(default: claims/verdicts)")
    p.add_argument("--claims", type=Path, default=Path("claims"),
                   help="the claims suite directory (default: claims/ of the checkout)")
    p.add_argument("--store", type=Path, default=None, help="result store (default: the plugin's, fixtures/)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER,
                   help="after --: more options for the claims run (--samples, --judge, --judge-url, --device, "
                        "--dtype, --offline, ...)")
    p.set_defaults(func=_main)


def compare(previous: list[ClaimOutcome], new: list[ClaimOutcome]) -> list[Finding]:
    """The statistical comparison: moved verdicts and estimates outside the previous CI."""
    prev = {(o.claim_id, o.scope): o for o in previous}
    out: list[Finding] = []
    for o in new:
        p = prev.pop((o.claim_id, o.scope), None)
        if p is None:
            out.append(Finding(o.claim_id, o.scope, "missing", "", "not run", o.status))
            continue
        if p.status != o.status:
            out.append(Finding(o.claim_id, o.scope, "verdict moved", "", p.status, o.status))
            continue
        for name, (pe, lo, hi), (ne, _, _) in _paired_parts(p, o):
            if not all(math.isfinite(x) for x in (lo, hi, ne)):
                continue
            if ne < lo or ne > hi:
                out.append(Finding(o.claim_id, o.scope, "outside previous CI", name,
                                   f"{pe:.4g} [{lo:.4g}, {hi:.4g}]", f"{ne:.4g}"))
    for (cid, scope), p in prev.items():
        out.append(Finding(cid, scope, "missing", "", p.status, "not run"))
    return out


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _paired_parts(p: ClaimOutcome, o: ClaimOutcome):
    """(name, previous (estimate, lo, hi), new (estimate, lo, hi)) for each part both have;
    the headline when neither has parts."""
    if p.parts and o.parts:
        mine = {q["name"]: q for q in o.parts}
        for q in p.parts:
            n = mine.get(q["name"])
            if n is None:
                continue
            ci_p, ci_n = q.get("ci") or [None, None], n.get("ci") or [None, None]
            yield (q["name"], (_num(q.get("estimate")), _num(ci_p[0]), _num(ci_p[1])),
                   (_num(n.get("estimate")), _num(ci_n[0]), _num(ci_n[1])))
    elif p.ci is not None:
        yield "", (_num(p.estimate), _num(p.ci[0]), _num(p.ci[1])), (_num(o.estimate), math.nan, math.nan)


def pytest_command(args: argparse.Namespace, verdicts: Path, report: Path, junit: Path) -> list[str]:
    extra = list(args.pytest_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    cmd = [sys.executable, "-m", "pytest", str(args.claims), "-p", "no:cacheprovider", "-q",
           "--model", args.new, "--model", args.previous, "--verdicts", str(verdicts), "--report", str(report),
           f"--junitxml={junit}"]
    if args.store is not None:
        cmd += ["--store", str(args.store)]
    return cmd + extra


def _main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from avprobe.report.export import read_claims

    con = Console()
    if args.new == args.previous:
        con.print("[red]release-check:[/] --new and --previous name the same model", highlight=False)
        return 2
    if not args.claims.is_dir():
        con.print(f"[red]release-check:[/] no claims suite at {args.claims}: run from the avprobe checkout or pass "
                  "--claims DIR", highlight=False)
        return 2
    out = args.out
    verdicts = out / "verdicts"
    if verdicts.exists():
        shutil.rmtree(verdicts)
    verdicts.mkdir(parents=True)
    # The new release's expected verdicts are the previous one's (same naming rule as the plugin).
    committed = verdict_file(args.verdicts, args.previous)
    if committed.is_file():
        for m in (args.previous, args.new):
            shutil.copyfile(committed, verdict_file(verdicts, m))
    report, junit = out / "release.html", out / "junit.xml"
    cmd = pytest_command(args, verdicts, report, junit)
    con.print("release-check: " + " ".join(cmd[1:]), highlight=False, soft_wrap=True)
    rc = subprocess.run(cmd, check=False).returncode
    claims_json = report.with_suffix(".json")
    # pytest: 0 all passed, 1 some claim failed (a verdict, not an error); anything else is the run failing
    errors = _junit_errors(junit)
    if rc not in (0, 1) or errors or not claims_json.is_file():
        con.print(f"[red]release-check:[/] the claims run failed (pytest exit {rc}, {errors} errors); "
                  f"see the output above", highlight=False)
        return 2
    outcomes, _ = read_claims(claims_json)
    prev = [o for o in outcomes if o.model == args.previous]
    new = [o for o in outcomes if o.model == args.new]
    if not prev or not new:
        con.print(f"[red]release-check:[/] no verdicts for {args.previous if not prev else args.new}", highlight=False)
        return 2
    findings = compare(prev, new)
    doc = {"new": args.new, "previous": args.previous, "claims": len(new), "regressions": [asdict(f) for f in findings],
           "rule": "verdict moved, or a new estimate outside the previous release's CI of the same part",
           "report": report.name, "claims_json": claims_json.name}
    (out / "release-check.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "release-check.md").write_text(_markdown(args, findings, len(new)))
    t = Table(title=f"{args.new} vs {args.previous}: {len(findings)} regressions over {len(new)} claims")
    for col in ("claim", "scope", "what", "part", "previous", "new"):
        t.add_column(col, overflow="fold")
    for f in findings:
        t.add_row(f.claim_id, f.scope, f.what, f.part, f.previous, f.new)
    con.print(t)
    con.print(f"release-check: report {report}; comparison {out / 'release-check.md'}", highlight=False)
    return 1 if findings else 0


def _junit_errors(path: Path) -> int:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return 1
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return sum(int(s.get("errors", 0)) for s in suites)


def _markdown(args: argparse.Namespace, findings: list[Finding], n: int) -> str:
    lines = [f"# {args.new} vs {args.previous}", "",
             f"{len(findings)} regressions over {n} claims (rule: verdict moved, or a new estimate outside the "
             "previous release's CI of the same part).", ""]
    if findings:
        lines += ["| claim | scope | what | part | previous | new |", "|---|---|---|---|---|---|"]
        lines += [f"| {f.claim_id} | {f.scope} | {f.what} | {f.part} | {f.previous} | {f.new} |" for f in findings]
    return "\n".join(lines) + "\n"
