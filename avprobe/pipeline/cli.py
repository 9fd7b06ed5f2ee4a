"""`avprobe collect`: compute and store everything the claims need, resumably and in shards.

    avprobe collect --model organism --samples organism --experiments caption,judge,flow,lens,knockout,shift
    accelerate launch --multi_gpu --num_processes 4 -m avprobe collect --model qwen2.5-omni --samples clips.jsonl

Every record goes to the result store as soon as it is computed (atomic writes), so a run
that is killed resumes where it stopped: a rerun reads what is there and computes the rest.
Under `accelerate launch` (or any launcher setting RANK / WORLD_SIZE, or `--shard R/N`),
sample i goes to process i % N; all processes write the same store, whose keys do not depend
on the sharding, so the merged store equals a single-process run. The command keeps only
counters (never the records), so memory stays flat over any number of samples.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the experiments, their parsing and their protocol live beside `gather_evidence`, which reads
# a model's own subset too (importing this module from there would make a circle)
from avprobe.pipeline.gather import EXPERIMENTS, parse_experiments, protocol_for

log = logging.getLogger(__name__)


# ---- sharding ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """This process's part of the samples: those with index % world == rank."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"bad shard {self.rank}/{self.world}: need 0 <= rank < world")

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank

    def select(self, items: Iterable[Any]) -> Iterator[Any]:
        """The items this shard owns, lazily."""
        return (x for i, x in enumerate(items) if self.owns(i))

    def __str__(self) -> str:
        return f"{self.rank}/{self.world}"


def shard_from(spec: str | None = None, env: Mapping[str, str] | None = None) -> Shard:
    """`--shard R/N` if given, else RANK / WORLD_SIZE as set by `accelerate launch`
    (torchrun) and other launchers, else the whole set."""
    if spec:
        try:
            r, n = (int(x) for x in spec.split("/"))
        except ValueError:
            raise ValueError(f"--shard {spec!r}: write RANK/WORLD, e.g. 0/4") from None
        return Shard(r, n)
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK={env.get('RANK')!r} / WORLD_SIZE={env.get('WORLD_SIZE')!r} are not integers") from None
    return Shard(rank, world)


# ---- the command ------------------------------------------------------------------------

def run_collect(args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Run one process's share of the collection through `gather` (counters only); returns
    its counters and run info."""
    from avprobe.adapters import ref as make_ref
    from avprobe.pipeline.gather import clips_per_batch, gather, load_samples
    from avprobe.store import Store

    clips_per_batch(args.clips_per_batch)  # a bad value fails before any work
    if args.experiments is not None:
        parse_experiments(args.experiments)  # a bad list fails before the model loads
    shard = shard_from(args.shard)
    from dataclasses import replace

    from avprobe.records import shift_bases

    mref = make_ref(args.model, local_files_only=not args.allow_download)
    # default: what the claims read for this model (all, unless its avprobe.json names a subset)
    experiments = parse_experiments(args.experiments or mref.settings.experiments or EXPERIMENTS)
    vision_base, self_ablated = shift_bases(args.base_model or mref.settings.base_model)
    protocol = protocol_for(experiments, mref.settings.queries, args.max_new_tokens)
    if self_ablated and protocol.shift:
        protocol = replace(protocol, self_shift=True)
    samples, manifest_errors = load_samples(args.samples, args.limit)
    store = Store(args.store)

    judge = None
    if "judge" in experiments:
        from avprobe.judge.cli import judge_from_args

        args.judge = args.judge or mref.settings.judge or "openai"
        judge = judge_from_args(args, cache=store)  # a bad spec or missing URL fails before any compute

    mine = list(shard.select(samples))
    info = {
        "model": mref.name, "revision": mref.revision, "protocol": protocol.key(),
        "experiments": sorted(experiments), "samples_spec": args.samples, "store": str(args.store),
        "shard": {"rank": shard.rank, "world": shard.world},
        "judge": getattr(judge, "label", None),
    }
    log.info("%s: %d samples (shard %s), protocol %s, experiments %s, store %s", mref.name, len(mine), shard,
             protocol.key(), ",".join(sorted(experiments)), args.store)
    errors_file = None
    if args.errors_out is not None:
        path = args.errors_out if shard.world == 1 else _part_path(args.errors_out, shard).with_suffix(".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        errors_file = path.open("w")
        info["errors_out"] = str(path)

    def on_failure(err: Any) -> None:
        """Every failed sample's cause, one JSON line each, written as it happens."""
        if errors_file is not None:
            from dataclasses import asdict

            errors_file.write(json.dumps(asdict(err)) + "\n")
            errors_file.flush()

    try:
        result = gather(
            mref, mine, store, protocol, judge=judge, on_failure=on_failure,
            base_model=vision_base if "shift" in experiments else None,
            device=args.device, dtype=args.dtype, allow_download=args.allow_download, refresh=args.refresh,
            keep=False,  # only counters: memory stays flat over any number of samples
            # Bad manifest rows are nobody's shard: rank 0 reports them, once.
            manifest_errors=manifest_errors if shard.rank == 0 else (),
            progress=not args.no_progress and shard.rank == 0,
            label=mref.name + (f" [shard {shard}]" if shard.world > 1 else ""),
            clips_per_batch=clips_per_batch(args.clips_per_batch),
        )
    finally:
        if judge is not None:
            judge.close()
        if errors_file is not None:
            errors_file.close()
    counts = result.counts
    counts.peak_rss_mb = _peak_rss_mb()
    return counts, info


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (its own: not a parent's)."""
    from avprobe.memory import process_peak_mb

    return process_peak_mb()


def _part_path(path: Path, shard: Shard) -> Path:
    return path.with_name(f"{path.stem}.rank{shard.rank}-of-{shard.world}{path.suffix or '.json'}")


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _merge_parts(path: Path, world: int, since: float, timeout: float,
                 run_id: str | None = None) -> tuple[Any, list[int]]:
    """Wait for every shard's summary of this run (its `run_id` where the launcher gives one,
    else written after `since`); -> merged counts, missing ranks."""
    from avprobe.pipeline.gather import CollectCounts

    deadline = time.monotonic() + timeout
    parts: dict[int, CollectCounts] = {}
    while True:
        for r in range(world):
            p = _part_path(path, Shard(r, world))
            if r not in parts and p.is_file() and p.stat().st_mtime >= since:
                try:
                    doc = json.loads(p.read_text())
                    if run_id is not None and doc["run"].get("run_id") != run_id:
                        continue  # another run's summary: wait for this run's
                    parts[r] = CollectCounts.from_json(doc["counts"])
                except (ValueError, KeyError):
                    pass  # being written by a non-atomic writer: read it next time
        if len(parts) == world or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = [r for r in range(world) if r not in parts]
    return CollectCounts.merge(parts[r] for r in sorted(parts)), missing


def print_summary(counts: Any, info: Mapping[str, Any], title: str) -> None:
    """The end-of-run summary: computed / cached / failed (reasons grouped) / unscored."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    c = counts
    rate = (c.computed + c.cached) / c.elapsed_s if c.elapsed_s > 0 else math.nan
    console.print(
        f"[bold]{title}[/bold]: {c.samples} samples x {c.queries} queries = {c.records} records: "
        f"[green]{c.computed} computed[/green], {c.cached} cached, "
        f"[{'red' if c.failed else 'green'}]{c.failed} samples failed[/] "
        f"({c.elapsed_s:.1f} s, {rate:.2f} records/s, peak RSS {c.peak_rss_mb:.0f} MB; protocol {info.get('protocol')})"
    )
    if c.failures:
        t = Table(title="failures by reason", show_lines=False)
        t.add_column("stage: error")
        t.add_column("samples", justify="right")
        t.add_column("example")
        for group, g in sorted(c.failures.items(), key=lambda kv: -kv[1]["count"]):
            ex = g["examples"][0] if g["examples"] else {}
            t.add_row(group, str(g["count"]), f"{ex.get('sample_id', '')}: {ex.get('reason', '')}"[:120])
        console.print(t)
    if info.get("judge"):
        by = ", ".join(f"{k} {v}" for k, v in sorted(c.unscored_by_error.items())) or "none"
        console.print(f"judge {info['judge']}: {c.judged} items, {c.judged - c.unscored} scored, "
                      f"[{'yellow' if c.unscored else 'green'}]{c.unscored} unscored[/] ({by}); "
                      f"{c.no_reference} without a reference")


def _cmd_collect(args: argparse.Namespace) -> int:
    from avprobe.pipeline.gather import GatherError
    from avprobe.store import StoreError

    started = time.time()
    run_id = args.run_id or os.environ.get("TORCHELASTIC_RUN_ID")  # set alike on every rank by the launcher
    if args.summary_json is not None:
        try:
            mine = shard_from(args.shard)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
        if mine.world > 1:  # a previous run's summary of this rank must never be merged into this one
            _part_path(args.summary_json, mine).unlink(missing_ok=True)
    try:
        counts, info = run_collect(args)
    except (ValueError, FileNotFoundError, StoreError, GatherError) as exc:
        log.error("%s", exc)
        return 2
    shard = Shard(**info["shard"])
    title = "collect" + (f" shard {shard}" if shard.world > 1 else "")
    print_summary(counts, info, title)
    total = counts
    if args.summary_json is not None:
        info["run_id"] = run_id
        payload = {"run": info, "counts": counts.to_json()}
        if shard.world == 1:
            _write_json(args.summary_json, payload)
        else:
            _write_json(_part_path(args.summary_json, shard), payload)
            if shard.rank == 0:
                # A few seconds of slack: the launcher starts every rank at about the same time.
                total, missing = _merge_parts(args.summary_json, shard.world, started - 60, args.merge_timeout,
                                              run_id)
                merged_info = {**info, "shard": {"rank": 0, "world": shard.world}, "missing_shards": missing}
                _write_json(args.summary_json, {"run": merged_info, "counts": total.to_json()})
                if missing:
                    log.error("no summary from shard(s) %s after %.0f s; %s counts only the others",
                              missing, args.merge_timeout, args.summary_json)
                print_summary(total, merged_info, f"collect, {shard.world - len(missing)} of {shard.world} shards")
    ok = total.computed + total.cached
    return 1 if total.records and ok == 0 else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `avprobe collect`."""
    p = subparsers.add_parser(
        "collect", help="compute and store what the claims need (resumable, shardable)",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--model", required=True, help="alias (qwen2.5-omni, organism, ...), HF id or local directory")
    p.add_argument("--samples", default="organism", metavar="MANIFEST|organism[:N]",
                   help="a JSONL/CSV manifest, or the organism evaluation set (default organism = 500 samples)")
    p.add_argument("--experiments", default=None, metavar="LIST",
                   help=f"comma-separated subset of {','.join(EXPERIMENTS)} (default: what the claims read: all, or "
                        "the subset the model's avprobe.json names)")
    p.add_argument("--store", type=Path, default=Path("fixtures"), metavar="DIR", help="result store (default fixtures)")
    p.add_argument("--limit", type=int, metavar="N", help="first N samples, half factual and half counterfactual")
    p.add_argument("--refresh", action="store_true", help="recompute records already in the store")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int, metavar="N",
                   help="caption length (default 32; another value is another protocol, not read by the claims)")
    p.add_argument("--base-model", dest="base_model", metavar="M",
                   help="shift base(s): a vision-only model, self-ablated (the model with the audio removed), or "
                        "M,self-ablated for both (default: the model's own setting)")
    p.add_argument("--device", default="auto", help="torch device (default auto: cuda:LOCAL_RANK if a GPU exists, else cpu)")
    p.add_argument("--dtype", default="auto", help="torch dtype (default auto)")
    p.add_argument("--allow-download", dest="allow_download", action="store_true", help="let transformers download weights")
    p.add_argument("--shard", metavar="R/N", help="take samples i with i %% N == R (default: RANK/WORLD_SIZE of the launcher)")
    p.add_argument("--summary-json", dest="summary_json", type=Path, metavar="FILE",
                   help="also write the summary as JSON (sharded: one file per shard, merged by rank 0)")
    p.add_argument("--merge-timeout", dest="merge_timeout", type=float, default=3600.0, metavar="S",
                   help="how long rank 0 waits for the other shards' summaries (default 3600)")
    p.add_argument("--errors-out", dest="errors_out", type=Path, metavar="FILE.jsonl",
                   help="every failed sample's cause as JSON lines (the summary groups them; sharded: one per rank)")
    p.add_argument("--run-id", dest="run_id", metavar="ID",
                   help="identifies this run's shard summaries (default: the launcher's TORCHELASTIC_RUN_ID)")
    p.add_argument("--clips-per-batch", dest="clips_per_batch", default="auto", metavar="N|auto",
                   help="records computed in one batched decode (1 = the one-clip engine; default auto: by memory, "
                        "at most 8); the records are the same")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("judge (with --experiments ...,judge)")
    g.add_argument("--judge", default=None, metavar="SPEC",
                   help="concept | openai[:MODEL] | transformers:MODEL_OR_PATH | embedding (default: the model's, else openai)")
    g.add_argument("--judge-url", dest="judge_url", metavar="URL", help="OpenAI-compatible base URL (else $AVPROBE_JUDGE_URL)")
    g.add_argument("--judge-concurrency", dest="judge_concurrency", type=int, metavar="N", help="parallel judge requests (default 8)")
    g.add_argument("--judge-timeout", dest="judge_timeout", type=float, metavar="S", help="seconds one attempt of a judge request may take in all (connect to last byte)")
    g.add_argument("--judge-retries", dest="judge_retries", type=int, metavar="N", help="retries on 429, 5xx, timeouts (default 4)")
    g.add_argument("--judge-batch-size", dest="judge_batch_size", type=int, metavar="N", help="batch size of the transformers judge")
    p.set_defaults(func=_cmd_collect)

