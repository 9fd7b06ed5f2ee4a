"""Records per second of the organism's full protocol, the one-clip engine against the batched
engine, side by side in one run (what `avprobe collect --clips-per-batch 1|N` computes):

    python benchmarks/bench_collect.py --samples 100 --clips-per-batch 8

Both run `avprobe.pipeline.collect.collect` (captions, flow, lens, the knockout sweep with the
own-words rule, the base-model shift; store writes included) into fresh stores, on the same
preloaded model and base, in alternating chunks of samples (a busy machine's drift hits both
alike). The report also keeps each chunk's seconds and the median over chunks of the two
methods' rate ratio: a load spike that hits one method's chunk moves the overall ratio, not
the median. At the end the two stores must hold the same files, byte for byte. Writes a JSON
report (--out) and prints a summary; exits 1 if the stores differ.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch loads: a shared machine by default
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="organism")
    p.add_argument("--samples", type=int, default=100, help="organism evaluation samples (x its queries = records)")
    p.add_argument("--clips-per-batch", type=int, default=8)
    p.add_argument("--chunk", type=int, default=10, help="samples per alternating chunk")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", type=Path, default=None, help="cProfile the batched runs into this file")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/collect-organism.json"))
    args = p.parse_args(argv)

    import torch

    from avprobe.adapters import ref
    from avprobe.pipeline.collect import collect
    from avprobe.pipeline.gather import load_samples
    from avprobe.records import Protocol
    from avprobe.store import Store
    from avprobe.types import SampleError

    torch.set_num_threads(args.threads)
    mref = ref(args.model)
    adapter = mref.load(device="cpu")
    base = ref(mref.settings.base_model).load(device="cpu") if mref.settings.base_model else None
    protocol = Protocol(queries=mref.settings.queries)
    samples, _ = load_samples(f"organism:{args.samples if args.samples % 2 == 0 else args.samples + 1}")
    samples = samples[: args.samples]
    runs = {"one-clip": 1, "batched": args.clips_per_batch}
    seconds = {k: 0.0 for k in runs}
    records = {k: 0 for k in runs}
    failed = {k: 0 for k in runs}
    chunks: list[dict[str, float]] = []  # per chunk: each method's seconds and records
    prof = None
    if args.profile is not None:
        import cProfile

        prof = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        stores = {k: Store(Path(tmp) / k) for k in runs}
        for start in range(0, len(samples), args.chunk):
            chunk = samples[start : start + args.chunk]
            row: dict[str, float] = {}
            for name, n in runs.items():
                if prof is not None and name == "batched":
                    prof.enable()
                t0 = time.perf_counter()
                done = 0
                for item in collect(adapter, chunk, stores[name], protocol, get_base=lambda: base, clips_per_batch=n):
                    records[name] += not isinstance(item, SampleError)
                    failed[name] += isinstance(item, SampleError)
                    done += not isinstance(item, SampleError)
                dt = time.perf_counter() - t0
                seconds[name] += dt
                row[f"{name}_s"], row[f"{name}_records"] = dt, done
                if prof is not None and name == "batched":
                    prof.disable()
            chunks.append(row)
            print(f"{start + len(chunk)} samples: " + ", ".join(
                f"{k} {records[k] / seconds[k]:.2f} records/s" for k in runs), flush=True)
        files = {k: {str(f.relative_to(stores[k].root)): f.read_bytes() for f in sorted(stores[k].root.rglob("*"))
                     if f.is_file()} for k in runs}
    same = files["one-clip"] == files["batched"]
    rate = {k: records[k] / seconds[k] for k in runs}
    ratios = sorted((c["batched_records"] / c["batched_s"]) / (c["one-clip_records"] / c["one-clip_s"])
                    for c in chunks if c["batched_records"] and c["one-clip_records"])
    median = (ratios[(len(ratios) - 1) // 2] + ratios[len(ratios) // 2]) / 2 if ratios else float("nan")
    report = {
        "model": mref.name, "samples": len(samples), "queries": len(protocol.queries), "threads": args.threads,
        "clips_per_batch": args.clips_per_batch, "seconds": seconds, "records": records, "failed": failed,
        "records_per_s": rate, "batched_over_one_clip": rate["batched"] / rate["one-clip"],
        "median_chunk_ratio": median, "chunks": chunks,
        "stored_files": len(files["one-clip"]), "stores_identical": same,
        "command": "python benchmarks/bench_collect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("records_per_s", "batched_over_one_clip", "median_chunk_ratio",
                                             "stores_identical")}))
    if prof is not None:
        prof.dump_stats(str(args.profile))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
