"""`avprobe bench`: avprobe's engine against the paper's protocol (see avprobe/bench/engine.py).

    avprobe bench --shape tiny --repeats 1                   # seconds, a smoke run
    avprobe bench --shape cpu --memory [--prefix-path dense]
    python benchmarks/bench_engine.py --shape cpu            # the same command, as a script

Writes the report JSON (`--out`) and prints it as tables. `pip install -e .[bench]` adds the
nnsight peer (the `nnsight` method; skipped, and said so, without it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from avprobe.bench import METHODS, SHAPES


def _at_least_one(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by `avprobe bench`, the script and the memory child)."""
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu", help="model and prompt shape to measure (default cpu)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"],
                   help="model dtype (default float32)")
    p.add_argument("--samples", type=_at_least_one, default=1, help="samples per round (default 1)")
    p.add_argument("--conditions", type=_at_least_one, default=None, help="default: 1 + 2 x layers (the paper's sweep)")
    p.add_argument("--window", type=int, default=None, help="knockout window (default: layers // 4)")
    p.add_argument("--new-tokens", type=_at_least_one, default=None, help="tokens generated per condition (default: the shape's)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="engine is always needed: ratios and the token check are against it")
    p.add_argument("--repeats", type=_at_least_one, default=3, help="rounds for engine and floor")
    p.add_argument("--slow-repeats", type=_at_least_one, default=1, help="rounds for naive, careful, nnsight")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine)")
    p.add_argument("--memory", action="store_true", help="peak memory per method (child processes)")
    p.add_argument("--flow-memory", action="store_true", help="attention-flow memory at ~4,300 prompt tokens")
    p.add_argument("--prefix-path", choices=["auto", "fused", "dense"], default="auto",
                   help="how the engine attends to the prompt prefix: the fused CPU kernel per role segment, dense "
                        "products, or auto (fused on long CPU prompts); to compare them")
    p.add_argument("--tie-rtol", type=float, default=None,
                   help="token check: a row may diverge from the engine's only at a near-tie of the engine's logits "
                        "within this many standard deviations (default: 0 = exact in float32/64, 0.15 in bfloat16, 0.05 in float16)")
    p.add_argument("--end-to-end", dest="end_to_end", type=int, default=0, metavar="CLIPS",
                   help="also time the full protocol per clip (captions, flow, lens, sweep, shift) over CLIPS clips: "
                        "naive, the one-clip engine and the batched engine (--clips-per-batch)")
    p.add_argument("--batch-sweep", dest="batch_sweep", type=int, default=0, metavar="CLIPS",
                   help="also time the sweep of CLIPS clips: the one-clip engine clip by clip against the batched "
                        "engine (--clips-per-batch clips per decode), per clip, with the physical limit")
    p.add_argument("--clips-per-batch", dest="clips_per_batch", type=_at_least_one, default=8,
                   help="clips per batched decode in the end-to-end row (default 8)")
    p.add_argument("--naive-clips", dest="naive_clips", type=int, default=1,
                   help="clips the naive end-to-end row runs (it is slow; 0 leaves it out)")
    p.add_argument("--peak-probe-s", dest="peak_probe_s", type=float, default=1.0,
                   help="seconds the CPU peak probes (matrix product, copy) may take")
    p.add_argument("--out", type=Path, default=Path("reports/bench.json"), help="JSON report to write (default reports/bench.json)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # the memory child's method


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with the benchmark's options (the memory child parses with it)."""
    p = argparse.ArgumentParser(prog="avprobe bench", description=__doc__.splitlines()[0])
    add_arguments(p)
    return p


def register(subparsers) -> None:
    """Add the `bench` subcommand."""
    p = subparsers.add_parser("bench", help="time and measure the engine against the paper's protocol",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=_bench)


def _bench(args: argparse.Namespace) -> int:
    if args.child:  # the memory child (`python -m avprobe.bench.cli --child ...`): one JSON line
        from avprobe.bench.engine import run_child

        print(json.dumps(run_child(args)))
        return 0
    from avprobe.bench.engine import benchmark, failures

    report = benchmark(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    render(report)
    bad = failures(report)
    if bad:  # after the report is written: the timings are kept, the run still fails
        raise AssertionError("; ".join(bad))
    return 0


def render(report: dict[str, Any]) -> None:
    """Print the report as rich tables."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    path = {"fused": "the fused CPU kernel per role segment", "dense": "dense matrix products"}.get(
        report.get("prefix_path", ""), "?")
    con.print(f"[bold]{report['model']}[/] on {report['device']} ({report['dtype']}, {report['threads']} threads): "
              f"{report['conditions']} conditions x {report['new_tokens']} tokens, window {report['window']}, "
              f"prompt prefix through {path}")
    for m, why in report["skipped"].items():
        con.print(f"[yellow]skipped {m}: {why}")
    if "peaks" in report:
        con.print(f"device peaks for the physical limit: {report['peaks']['source']}")
    for s in report["samples"]:
        lim = s.get("limit")
        title = f"sample {s['sample']}: {s['prompt_len']} prompt tokens (median seconds)"
        if lim:
            title += (f"; physical limit {lim['seconds']:.3g} s ({lim['bound']}-bound decode: "
                      f"{lim['step_bytes_first'] / 1e6:.1f} MB and {lim['step_flops_first'] / 1e9:.2f} GFLOP per step)")
        t = Table(title=title)
        gpu = any("cuda_peak_above_model_mb" in v for v in s["timing"].values())
        for col in ("method", "seconds", "x engine", "x limit", "per condition", *(["GPU MB"] if gpu else [])):
            t.add_column(col, justify="right")
        for m, v in s["timing"].items():
            ratio = v["seconds"] / s["timing"]["engine"]["seconds"]
            pc = v.get("per_condition_median")
            xl = v.get("x_limit")
            row = [m, f"{v['seconds']:.2f}", f"{ratio:.2f}", f"{xl:.1f}" if xl else "", f"{pc:.2f}" if pc else ""]
            t.add_row(*row, *([_mb(v.get("cuda_peak_above_model_mb"))] if gpu else []))
        con.print(t)
        exact = [m for m, v in s["timing"].items() if v["tokens_equal_engine"]]
        if exact:
            con.print(f"tokens equal to the engine's for every condition: {', '.join(exact)}")
        for m, v in s["timing"].items():
            c = v["token_check"]
            if "failed" in v:
                con.print(f"[red]{v['failed']}")
            elif not v["tokens_equal_engine"]:
                con.print(f"{m}: {c['identical']} of {c['conditions']} conditions equal to the engine's tokens, "
                          f"{c['near_tie_divergences']} diverge at a near-tie (largest gap {c['max_tie_gap_sd']:.3f} "
                          f"sd <= {c['tie_rtol']}); {c['tokens_equal_before_divergence']:.1%} of tokens equal")
    if "memory" in report:
        gpu = any("cuda_peak_above_model_mb" in v for v in report["memory"].values())
        t = Table(title="peak memory while the method ran, above the loaded model and inputs (MB)")
        cols = ["run", "conditions", "seconds", "peak RSS", "RSS above model"]
        cols += ["GPU above model"] if gpu else []
        for col in cols + ["prefix K/V", "suffix K/V"]:
            t.add_column(col, justify="right")
        for name, v in report["memory"].items():
            kv = v.get("kv_bytes") or {}
            row = [name, str(v["conditions"]), f"{v['seconds']:.1f}", _mb(v["peak_rss_mb"]),
                   _mb(v["peak_above_model_mb"])]
            row += [_mb(v.get("cuda_peak_above_model_mb"))] if gpu else []
            row += [f"{kv['prefix'] / 2**20:.1f}" if kv else "", f"{kv['suffix'] / 2**20:.1f}" if kv else ""]
            t.add_row(*row)
        con.print(t)
        how = {v.get("rss_how") for v in report["memory"].values()}
        con.print(f"RSS peaks by {', '.join(sorted(h for h in how if h))} (avprobe/memory.py)")
    if "end_to_end" in report:
        e = report["end_to_end"]
        t = Table(title=f"end to end: the full protocol per clip ({e['conditions']} conditions x {e['max_new_tokens']} "
                        f"tokens, flow, lens, shift {'on' if e['shift'] else 'off'}); "
                        f"batched = {e['clips_per_batch']} clips per batch")
        for col in ("method", "clips", "s per clip", "clips/s", "x engine", "x limit"):
            t.add_column(col, justify="right")
        for m, v in e["methods"].items():
            t.add_row(m, str(v["clips"]), f"{v['seconds_per_clip']:.3f}", f"{v['clips_per_s']:.2f}",
                      f"{v['x_engine']:.3f}" if "x_engine" in v else "1", f"{v['x_limit']:.1f}")
        con.print(t)
        con.print(f"physical limit per clip (s): {e['limit_per_clip_s']}; batched tokens equal the one-clip engine's: "
                  f"{e.get('batched_tokens_equal_engine')}; naive: {e.get('naive_conditions_equal_engine_prefix', '-')}")
    if "batch_sweep" in report:
        b = report["batch_sweep"]
        t = Table(title=f"the sweep of {b['clips']} clips ({b['conditions']} conditions x {b['new_tokens']} tokens, "
                        f"prompts of {min(b['prompt_lens'])}-{max(b['prompt_lens'])} tokens), per clip")
        for col in ("method", "s per clip", "x one-clip", "x limit"):
            t.add_column(col, justify="right")
        for m, v in b["methods"].items():
            t.add_row(m, f"{v['seconds_per_clip']:.3f}", f"{v['x_one_clip']:.3f}", f"{v['x_limit']:.1f}")
        con.print(t)
        con.print(f"batched tokens equal the one-clip engine's for every clip and condition: {b['tokens_equal']}")
    if "flow_memory" in report:
        f = report["flow_memory"]
        key = "cuda_peak_above_model_mb" if "cuda_peak_above_model_mb" in f["engine"] else "peak_above_model_mb"
        e, n = f["engine"][key], f["eager_output_attentions"][key]
        if e is None or n is None:
            con.print("attention flow memory: n/a (no memory reading on this system)")
        else:
            con.print(f"attention flow at {f['engine']['prompt_len']} prompt tokens: engine {e:.0f} MB, "
                      f"eager output_attentions {n:.0f} MB (engine/eager = {e / n:.3f})")


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def child_main(argv: list[str] | None = None) -> int:
    """The memory child's entry (see avprobe.bench.engine.measure_memory): one method, its
    peak memory as one JSON line on stdout, which is what the parent reads."""
    args = build_parser().parse_args(argv)
    if not args.child:
        raise SystemExit("python -m avprobe.bench.cli is the memory child; run `avprobe bench` instead")
    return _bench(args)


if __name__ == "__main__":
    import sys

    sys.exit(child_main())
