"""`avprobe dataset`: validate | audiocaps | counterfactual | paper-split."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from avprobe.media.counterfactual import DEFAULT_THRESHOLD, BuildReport

DATASET_HELP = "manifests: validate, import AudioCaps, build counterfactuals and the paper's split"


def register(subparsers) -> None:
    """Add the `dataset` command and its subcommands."""
    p = subparsers.add_parser("dataset", help=DATASET_HELP, description=DATASET_HELP)
    sub = p.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    v = sub.add_parser("validate", help="check every row of a manifest (and optionally decode every clip)")
    v.add_argument("manifest", type=Path, help="manifest to check (.jsonl or .csv)")
    v.add_argument("--decode", action="store_true", help="also decode every clip (slow on big sets)")
    v.add_argument("--fps", type=float, default=2.0, help="frame rate to sample when decoding (default 2.0)")
    v.add_argument("--max-frames", type=int, default=768, help="most frames decoded per clip (default 768)")
    v.add_argument("--errors-out", type=Path, help="write the error records here as JSONL")
    v.set_defaults(func=cmd_validate)

    a = sub.add_parser("audiocaps", help="AudioCaps CSV + folder of downloaded clips -> manifest")
    a.add_argument("csv", type=Path, help="AudioCaps CSV (audiocap_id, youtube_id, start_time, caption)")
    a.add_argument("clips", type=Path, help="folder holding the downloaded clips (searched recursively)")
    a.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
    a.add_argument("--video-captions", type=Path, help="CSV with id (or youtube_id) and caption columns")
    a.add_argument("--clip-seconds", type=float, default=10.0, help="clip length from start_time, seconds (default 10)")
    a.set_defaults(func=cmd_audiocaps)

    for name, helptext, n_default in (
        ("counterfactual", "give clips the audio of semantically unrelated clips", 250),
        ("paper-split", "the paper's shape: n samples, half factual, half counterfactual", 500),
    ):
        c = sub.add_parser(name, help=helptext, description=helptext)
        c.add_argument("manifest", type=Path, help="input manifest (.jsonl or .csv)")
        c.add_argument("--out", type=Path, required=True, help="manifest to write (.jsonl)")
        c.add_argument("--n", type=int, default=n_default, help=f"samples to build (default {n_default})")
        c.add_argument("--seed", type=int, default=0, help="seed of the pairing (default 0)")
        c.add_argument(
            "--threshold",
            type=float,
            default=DEFAULT_THRESHOLD,
            help=f"max cosine similarity of the audio captions (default {DEFAULT_THRESHOLD})",
        )
        c.add_argument("--mux", type=Path, metavar="DIR", help="also write mp4s with the swapped audio into DIR")
        c.add_argument("--allow-bad-rows", action="store_true", help="build from the valid rows of a manifest with bad ones")
        c.set_defaults(func=cmd_counterfactual if name == "counterfactual" else cmd_paper_split)


def _console():
    from rich.console import Console

    return Console()


def _read_input(path: Path, allow_bad: bool):
    """The manifest's valid samples, or None (after printing every bad row) when it has bad rows."""
    from avprobe.media.manifest import read_manifest

    res = read_manifest(path)
    if res.problems:
        con = _console()
        for p in res.problems:
            con.print(f"[red]bad row[/red] {path}: {p}")
        if not allow_bad:
            con.print(f"[red]{len(res.problems)} bad row(s): fix them or pass --allow-bad-rows[/red]")
            return None
        con.print(f"[yellow]{len(res.problems)} bad row(s) left out (--allow-bad-rows)[/yellow]")
    return res.samples


def _print_report(report: BuildReport) -> None:
    from rich.table import Table

    t = Table(title=f"audio-caption similarity (threshold {report.threshold})")
    for col in ("pairs", "n", "mean", "median", "p95", "max"):
        t.add_column(col)
    for name, st in (("chosen", report.chosen), ("random", report.random)):
        t.add_row(name, str(st.n), f"{st.mean:.3f}", f"{st.median:.3f}", f"{st.p95:.3f}", f"{st.max:.3f}")
    con = _console()
    con.print(t)
    con.print(f"built {report.built} of {report.requested} from {report.pool} factual clips")
    for reason, k in report.skipped.items():
        con.print(f"  {k} video clip(s) skipped: {reason}")


def _print_failures(groups: dict[str, dict], title: str) -> None:
    """Failures as one row per cause (`manifest.group_failures`), with its first examples."""
    from rich.table import Table

    t = Table(title=title)
    t.add_column("cause")
    t.add_column("samples", justify="right")
    t.add_column("examples")
    for cause, g in groups.items():
        t.add_row(cause, str(g["count"]), ", ".join(e["sample_id"] for e in g["examples"]))
    _console().print(t)


def _write(samples, args, report: BuildReport | None, left_out=()) -> int:
    """Write the manifest and `<out>.report.json`; `left_out`: SampleErrors of input clips the
    split could not use (no audio track), recorded and printed by cause."""
    from avprobe.media.manifest import group_failures, write_manifest

    errors = []
    if args.mux is not None:
        from avprobe.media.mux import mux_samples

        # mux_samples turns each sample's failure into a record, so the manifest and the
        # report below are written whatever the clips hold.
        samples, errors = mux_samples(samples, args.mux)
        for e in errors:
            _console().print(f"[red]mux failed[/red] {e.sample_id}: {e.path}: {e.reason}")
    write_manifest(samples, args.out)
    kinds = Counter(s.kind for s in samples)
    summary = {
        "out": str(args.out),
        "samples": len(samples),
        "kinds": dict(kinds),
        "seed": args.seed,
        "threshold": args.threshold,
        "builder": report.to_dict() if report else None,
        "mux_errors": [asdict(e) for e in errors],
        "mux_failures": group_failures(errors),
        "left_out": [asdict(e) for e in left_out],
        "left_out_causes": group_failures(left_out),
    }
    report_path = args.out.with_suffix(".report.json")
    report_path.write_text(json.dumps(summary, indent=2) + "\n")
    if report is not None:
        _print_report(report)
    if left_out:
        _print_failures(summary["left_out_causes"], f"{len(left_out)} input clip(s) left out by cause")
    if errors:
        _print_failures(summary["mux_failures"], f"{len(errors)} mux failure(s) by cause (kept unmuxed)")
    _console().print(f"wrote {args.out} ({dict(kinds)}) and {report_path}")
    return 1 if errors else 0


def cmd_counterfactual(args) -> int:
    from avprobe.media.counterfactual import build_counterfactuals

    samples = _read_input(args.manifest, args.allow_bad_rows)
    if samples is None:
        return 1
    cf, report = build_counterfactuals(samples, args.n, args.seed, args.threshold)
    rc = _write(cf, args, report)
    return rc or (1 if report.built < args.n else 0)


def cmd_paper_split(args) -> int:
    from avprobe.media.counterfactual import paper_split

    samples = _read_input(args.manifest, args.allow_bad_rows)
    if samples is None:
        return 1
    try:
        split, report, left_out = paper_split(samples, args.n, args.seed, args.threshold)
    except ValueError as exc:
        _console().print(f"[red]error:[/red] {exc}")
        return 1
    return _write(split, args, report, left_out)


def cmd_audiocaps(args) -> int:
    from avprobe.media.audiocaps import import_audiocaps, read_video_captions
    from avprobe.media.manifest import write_manifest

    vcaps = read_video_captions(args.video_captions) if args.video_captions else None
    res = import_audiocaps(args.csv, args.clips, video_captions=vcaps, clip_seconds=args.clip_seconds)
    con = _console()
    write_manifest(res.samples, args.out)
    missing_path = args.out.with_suffix(".missing.tsv")
    missing_path.write_text("youtube_id\tstart_time\taudiocap_ids\tnote\n" + "".join(f"{m}\n" for m in res.missing))
    for p in res.problems:
        con.print(f"[red]bad CSV row[/red] {args.csv}: {p}")
    con.print(
        f"{len(res.samples)} clips found, {len(res.missing)} missing (listed in {missing_path}), "
        f"{len(res.problems)} bad CSV rows; wrote {args.out}"
    )
    return 0 if res.samples else 1


def cmd_validate(args) -> int:
    from rich.table import Table

    from avprobe.media.decode import load_many
    from avprobe.media.manifest import group_failures, read_manifest
    from avprobe.types import SampleError

    res = read_manifest(args.manifest, check_files=True)
    errors = list(res.errors)
    counts = Counter()
    if args.decode:
        for _, out in load_many(res.samples, args.fps, args.max_frames, counts=counts):
            if isinstance(out, SampleError):
                errors.append(out)
    con = _console()
    t = Table(title=str(args.manifest))
    t.add_column("check")
    t.add_column("ok")
    t.add_column("bad")
    t.add_row("rows", str(len(res.samples)), str(len(res.problems)))
    if args.decode:
        t.add_row("decode", str(counts["ok"]), str(counts["failed"]))
    con.print(t)
    for e in errors:
        con.print(f"[red]{e.stage}[/red] {e.sample_id}: {e.path}: {e.reason}")
    if errors:
        _print_failures(group_failures(errors), f"{len(errors)} failure(s) by cause")
    if args.errors_out:
        args.errors_out.write_text("".join(json.dumps(asdict(e)) + "\n" for e in errors))
    return 1 if errors else 0
