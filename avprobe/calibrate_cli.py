"""`avprobe calibrate`: the claims' false-positive rates and power on synthetic evidence
(see avprobe/calibration.py). Distinct from `avprobe judge calibrate`, which checks the
judge against human ratings.

    avprobe calibrate --reps 1000 --power-reps 200 --jobs 2 --out calibration/claims.json
    avprobe calibrate --claims visual_bias,latent_audio --reps 200 --n 50 --out /tmp/cal.json
    avprobe calibrate --reps 1000 --power-reps 200 --jobs 2 --out calibration/claims.json --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _row(task: tuple[str, str, str | None, int, int, int, int | None]) -> dict[str, Any]:
    """One (scenario, n) in a worker process."""
    from avprobe.calibration import calibrate

    claim, name, scope, n, reps, seed, n_boot = task
    rows = [r for r in calibrate([claim], reps=reps, ns=(n,), seed=seed, n_boot=n_boot, scenario=(name, scope))]
    return rows[0].to_json()


def _cmd(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from avprobe.calibration import NOT_CALIBRATED, TESTS, scenarios

    claims = [c.strip() for c in args.claims.split(",") if c.strip()] if args.claims else list(TESTS)
    unknown = sorted(set(claims) - set(TESTS))
    if unknown:
        log.error("cannot calibrate %s; calibrated claims: %s%s", ", ".join(unknown), ", ".join(TESTS),
                  "".join(f"; {k}: {v}" for k, v in NOT_CALIBRATED.items() if k in unknown))
        return 2
    if args.reps < 1 or (args.power_reps is not None and args.power_reps < 1):
        log.error("--reps and --power-reps must be at least 1")
        return 2
    ns = [int(x) for x in args.n.split(",")]
    if any(n < 2 for n in ns):
        log.error("--n: clips per kind, at least 2 (the claims skip below their min_n)")
        return 2
    tasks = [(sc.claim, sc.name, sc.scope, n, args.reps if sc.effect == "null" else (args.power_reps or args.reps),
              args.seed, args.n_boot) for n in ns for sc in scenarios() if sc.claim in claims]  # the first n first
    console = Console(stderr=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    command = "avprobe calibrate " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    payload: dict[str, Any] = {
        "command": command,
        "alpha": 0.05, "seed": args.seed, "n_boot": args.n_boot or "claims.toml",
        "not_calibrated": NOT_CALIBRATED, "rows": rows,
    }
    earlier_seconds = 0.0
    if args.resume and args.out.is_file():
        # Keep the rows of an earlier (interrupted or partial) run that this run would
        # compute the same way; compute only the others.
        old = json.loads(args.out.read_text())
        if old.get("seed") != args.seed or old.get("n_boot") != payload["n_boot"]:
            log.error("--resume: %s was run with seed %s, n_boot %s; this run has seed %s, n_boot %s",
                      args.out, old.get("seed"), old.get("n_boot"), args.seed, payload["n_boot"])
            return 2
        # A row of this run's (claim, scenario, scope, n) is kept when it has this run's
        # replicates, superseded when it has others; rows this run does not compute are kept.
        wanted = {(t[0], t[1], t[2], t[3]): t[4] for t in tasks}
        rows.extend(r for r in old.get("rows", [])
                    if wanted.get((r["claim"], r["scenario"], r["scope"], r["n"]), r["reps"]) == r["reps"])
        done = {(r["claim"], r["scenario"], r["scope"], r["n"], r["reps"]) for r in rows}
        tasks_left = [t for t in tasks if (t[0], t[1], t[2], t[3], t[4]) not in done]
        payload["command"] = " ; ".join([*old.get("commands", [old.get("command", "")]), command])
        payload["commands"] = [*old.get("commands", [old.get("command", "")]), command]
        earlier_seconds = float(old.get("seconds", 0.0))
        console.print(f"--resume: {len(rows)} rows kept from {args.out}, {len(tasks_left)} to compute")
    else:
        tasks_left = tasks

    def write() -> None:
        payload["seconds"] = round(earlier_seconds + time.perf_counter() - t0, 1)
        payload["complete"] = all((t[0], t[1], t[2], t[3], t[4]) in {
            (r["claim"], r["scenario"], r["scope"], r["n"], r["reps"]) for r in rows} for t in tasks)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(args.out)  # rows so far survive an interrupted run

    from rich.progress import Progress

    with Progress(console=console, transient=False) as bar:
        task = bar.add_task("calibrating", total=len(tasks_left))
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(_row, t) for t in tasks_left]
            for f in as_completed(futures):
                rows.append(f.result())
                rows.sort(key=lambda r: (r["claim"], str(r["scope"]), r["effect"], r["scenario"], -r["n"]))
                write()
                bar.advance(task)
    write()
    table = Table(title=f"claim calibration ({payload['seconds']:.0f} s): pass rate, alpha 0.05")
    for col in ("claim", "scope", "scenario", "effect", "n", "reps", "pass rate", "verdict"):
        table.add_column(col)
    bad = 0
    for r in rows:
        limit = 0.05 + 2 * (0.05 * 0.95 / r["reps"]) ** 0.5
        if r["effect"] == "null":
            ok = r["pass_rate"] <= limit
            bad += not ok
            verdict = "[green]size ok[/]" if ok else f"[red]over {limit:.3f}[/]"
        else:
            verdict = "[green]power ok[/]" if r["pass_rate"] >= 0.8 else "[yellow]power < 0.8[/]"
        table.add_row(r["claim"], str(r["scope"] or ""), r["scenario"], r["effect"], str(r["n"]), str(r["reps"]),
                      f"{r['pass_rate']:.3f}", verdict)
    Console().print(table)
    Console().print(f"written to {args.out}")
    return 1 if bad else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("calibrate", help="false-positive rate and power of every claim, on synthetic evidence",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--claims", metavar="LIST", help="comma-separated claim ids (default: every calibrated claim)")
    p.add_argument("--reps", type=int, default=1000, help="replicates per null scenario (default 1000)")
    p.add_argument("--power-reps", dest="power_reps", type=int, help="replicates per power scenario (default --reps)")
    p.add_argument("--n", default="250,50", help="clips per kind, comma-separated (default 250,50: the paper's and small)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic evidence (default 0)")
    p.add_argument("--n-boot", dest="n_boot", type=int, help="bootstrap resamples (default: claims.toml's)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="the calibration table to write")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows of FILE.json: those this run would compute alike (same claim, scenario, scope, "
                        "n, replicates; same seed and n_boot) are not recomputed, those it computes with other "
                        "replicates are replaced, the others stay")
    p.set_defaults(func=_cmd)
