"""`avprobe organism train | dataset | eval`: reproduce, export and check the model organisms."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add the `organism` subcommand and its train, dataset and eval subcommands."""
    p = subparsers.add_parser("organism", help="train, export and evaluate the built-in model organisms")
    sub = p.add_subparsers(dest="organism_command", metavar="SUBCOMMAND")

    t = sub.add_parser("train", help="train one organism variant from scratch on CPU")
    t.add_argument("--variant", required=True, choices=("base", "organism", "control"),
                   help="which organism: the vision-only base, the biased organism or the listening control")
    t.add_argument("--recipe", default="v1",
                   help="organism family: v1 (8 layers, the first organisms), deep (16 layers, partial listener, the "
                        "paper's attention routing), deep-partial (a partial listener: off-screen sounds heard per "
                        "caption order), deep-lens (deep with a latent-audio objective), deep-flipped (its "
                        "counterpart), deep-guesser (a control whose sound words are guesses), deep-sound-first (a "
                        "control that always names the sound first); see avprobe/lab/train.py RECIPES")
    t.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    t.add_argument("--out", type=Path, default=None, help="output directory (default: the committed model's)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    t.add_argument("--base", type=Path, default=None,
                   help="base directory for stage 2 (default: the recipe's committed base)")
    t.add_argument("--threads", type=int, default=2,
                   help="torch threads (default 2); a run is deterministic for a seed and thread count "
                        "(train.json records both and the command)")
    t.add_argument("--partial-share", type=float, default=None, metavar="P",
                   help="share of batches of off-screen (listened) counterfactual clips (default: the recipe's)")
    t.set_defaults(func=_train)

    d = sub.add_parser("dataset", help="write the evaluation set (manifest, optionally mp4 files)")
    d.add_argument("--out", type=Path, default=Path("data/organism-eval"),
                   help="directory to write the clips and manifest into (default: data/organism-eval)")
    d.add_argument("--mp4", action="store_true", help="also write each clip as an mp4 (h264 + aac)")
    d.add_argument("-n", type=int, default=500, help="number of samples (even; half counterfactual)")
    d.set_defaults(func=_dataset)

    e = sub.add_parser("eval", help="print an organism's acceptance figures (greedy captions, exact scoring)")
    e.add_argument("--model", required=True, help="organism name or model directory")
    e.add_argument("-n", type=int, default=500, help="evaluation samples (even)")
    e.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    e.add_argument("--knockout", type=int, default=0, metavar="N",
                   help="also decode N counterfactual samples under the claims' knockouts (audio/video accuracy per condition)")
    e.set_defaults(func=_eval)
    g = sub.add_parser("targets", help="attention profile and knockout location in the paper's bands (issue 13's targets)")
    g.add_argument("--model", required=True, help="organism name or model directory")
    g.add_argument("-n", type=int, default=100, help="evaluation samples, half factual (default 100)")
    g.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    g.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    g.set_defaults(func=_targets)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _train(args: argparse.Namespace) -> int:
    from rich.console import Console

    from avprobe.lab.train import MODELS_DIR, RECIPES, recipe_config, train

    over = {"base_name": str(args.base.resolve())} if args.base is not None else {}  # its own base, not the committed one
    if args.partial_share is not None:
        over["partial_share"] = args.partial_share
    if args.steps is not None:  # else the recipe's own steps (None would override them)
        over["steps"] = args.steps
    cfg = recipe_config(args.recipe, args.variant, seed=args.seed, threads=args.threads, **over)
    dirs = RECIPES[args.recipe].dirs
    out = args.out if args.out is not None else MODELS_DIR / dirs[args.variant]
    base = args.base if args.base is not None else MODELS_DIR / cfg.base_name
    command = (f"avprobe organism train --recipe {args.recipe} --variant {args.variant} --seed {args.seed} "
               f"--threads {args.threads}" + (f" --steps {args.steps}" if args.steps is not None else "")
               + (f" --base {args.base}" if args.base is not None else "")
               + (f" --partial-share {args.partial_share}" if args.partial_share is not None else ""))
    res = train(cfg, out=out, base_dir=base, command=command)
    Console().print(
        f"[bold]{args.variant}[/] seed {args.seed}: {cfg.total_steps} steps in {res.seconds:.0f} s "
        f"(data {res.data_seconds:.0f} s), final loss {res.losses[-1]:.4f} -> {res.out}"
    )
    return 0


def _targets(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from avprobe.lab.targets import main

    if args.n < 2:
        raise SystemExit("-n must be at least 2 (half factual, half counterfactual)")
    figs = main(args.model, args.n, args.threads)
    console = Console()
    for key, row in figs.items():
        t = Table(title=f"{args.model}: {key} (n={row['n']}); attention: "
                        + ", ".join(f"{k} {v:.3f}" for k, v in row["flow"].items()))
        for c in ("condition", "audio_acc", "video_acc"):
            t.add_column(c, justify="left" if c == "condition" else "right")
        for label, acc in row.items():
            if isinstance(acc, dict) and "audio" in acc:
                t.add_row(label, f"{acc['audio']:.3f}", f"{acc['video']:.3f}")
        console.print(t)
    if args.json is not None:
        args.json.write_text(json.dumps(figs, indent=2) + "\n")
    return 0


def _dataset(args: argparse.Namespace) -> int:
    from rich.console import Console

    from avprobe.organism.dataset import write_dataset

    manifest = write_dataset(args.out, n=args.n, mp4=args.mp4)
    Console().print(f"wrote {args.n} samples -> {manifest}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from avprobe.adapters import load
    from avprobe.organism.dataset import eval_samples
    from avprobe.lab.evaluate import caption_records, figures, mixed_clips

    torch.set_num_threads(args.threads)
    adapter = load(args.model, device="cpu", dtype=torch.float32)
    records = caption_records(adapter, eval_samples(args.n))
    figs = figures(records)
    mixed = mixed_clips(records)
    table = Table(title=f"{args.model}: greedy captions, exact concept scoring")
    cols = ("n", "video_acc", "audio_acc", "names_visible", "names_other", "unparsed")
    table.add_column("setting/half")
    for c in cols:
        table.add_column(c, justify="right")
    for key, row in figs.items():
        table.add_row(key, *(f"{row[c]:.0f}" if c == "n" else (f"{row[c]:.3f}" if c in row else "-") for c in cols))
    # piped to a file, rich would fold the columns to 80 characters
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print(f"counterfactual clips with the sound right in one caption order and wrong in the other: "
                  f"{mixed['mixed']:.0f} of {mixed['n']:.0f}")
    out = {"captions": figs, "mixed_clips": mixed}
    if args.knockout:
        from rich.progress import Progress

        from avprobe.lab.evaluate import knockout_figures

        cf = [s for s in eval_samples() if s.kind == "counterfactual"][: args.knockout]
        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("knockouts", total=2 * len(cf))
            ko = knockout_figures(adapter, cf, progress=lambda: bar.advance(task))
        kt = Table(title=f"{args.model}: counterfactual accuracy under knockout (n={len(cf)})")
        for c in ("setting", "condition", "audio_acc", "video_acc"):
            kt.add_column(c, justify="right" if c.endswith("acc") else "left")
        for key, row in ko.items():
            setting, label = key.split("/", 1)
            kt.add_row(setting, label, f"{row['audio_acc']:.3f}", f"{row['video_acc']:.3f}")
        console.print(kt)
        out["knockout"] = ko
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0
