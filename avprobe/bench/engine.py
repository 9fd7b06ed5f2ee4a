"""avprobe's engine against the paper's protocol, side by side, on one model and one sweep.

The sweep is the paper's full knockout protocol for one sample: the baseline, G-/->A and
G-/->V windows centred on every depth (1 + 2L conditions), the attention flow and the logit
lens. Methods (see avprobe/bench/naive.py): `naive` (the paper's code: eager, one generate per
condition), `nnsight` (the same written with nnsight, when installed), `careful` (sdpa, one
generate per condition), `engine` (avprobe.engine.run: one prefill, one batched decode of
all conditions with recording and lens) and `floor` (one prefill plus one shared-prefix
batched decode, nothing recorded). Each method's first run is checked against the engine's
tokens for every condition (`check_tokens`: exact in float32, only near-ties of the engine's
logits may flip in bf16) and, where it records one, against the engine's attention flow
(`check_flow`); a failed check is kept in the report, which `avprobe bench` writes before it
fails. The report keeps the engine's tokens per condition.

Timing: all methods run in one process, in rounds (fast methods every round, slow ones in
the first `--slow-repeats`), medians reported. Memory (`--memory`): on the CPU each method
runs once in a child process of its own (`python -m avprobe.bench.cli --child METHOD
...`) and reports its peak RSS above the loaded model and inputs (avprobe.memory.PeakRSS
resets the kernel's high-water mark first); on a GPU each method's first timed run records
`torch.cuda.max_memory_allocated` above the model, in-process (the caching allocator's
figure needs no child). `--prefix-path fused|dense` forces how the engine attends to the
prompt prefix (`EngineConfig.prefix_path`; default auto: the fused CPU kernel
per role segment on long prompts, dense products otherwise and on GPUs), in the children
too, so that the paths can be compared; the report records the path the engine took as
`prefix_path`.

    avprobe bench --shape tiny --repeats 1                   # seconds, a smoke run
    avprobe bench --shape cpu [--prefix-path dense]          # 12 layers, ~2,200-token prompt
    python benchmarks/bench_engine.py --shape cpu            # the same, as a script
    avprobe bench --device cuda --dtype bfloat16 --shape qwen2.5-omni-3b

The command line (options, rendering) is avprobe/bench/cli.py; this module never prints,
except as the memory child, whose one JSON line on stdout is its answer to the parent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import avprobe
from avprobe.adapters.base import AdapterSettings, ModelAdapter, ModelInputs
from avprobe.bench import FAST, METHODS, SHAPES, Shape, limits, naive
from avprobe.conditions import Baseline, Condition, Knockout, sweep
from avprobe.engine import EngineConfig, RunResult, run
from avprobe.memory import PeakRSS
from avprobe.probes.logit_lens import LensConfig
from avprobe.types import Role

log = logging.getLogger(__name__)
QUERY = "describe what you see and hear"


def qwen25_omni_3b_config() -> Any:
    """The Qwen2.5-Omni-3B thinker's architecture (random weights), with the tiny tokenizer's
    special ids: 36 layers, hidden 2048, 16 heads, 2 kv heads, vocab 151936."""
    from transformers import Qwen2_5OmniThinkerConfig

    from avprobe.testing import _ids

    ids = _ids()
    text = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
        num_attention_heads=16, num_key_value_heads=2, head_dim=128, max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        rms_norm_eps=1e-6, pad_token_id=ids["pad"], eos_token_id=ids["eos"], tie_word_embeddings=False,
    )
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=text,
        audio_config=dict(
            num_mel_bins=128, d_model=1280, encoder_layers=32, encoder_attention_heads=20,
            encoder_ffn_dim=5120, output_dim=2048, n_window=100, max_source_positions=1500,
        ),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            fullatt_block_indexes=[7, 15, 23, 31], window_size=112,
        ),
        audio_token_id=ids["audio"], video_token_id=ids["video"], image_token_id=ids["image"],
        audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        pad_token_id=ids["pad"], eos_token_id=ids["eos"],
    )
    cfg.architectures = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    return cfg


def build_adapter(shape: Shape, device: str = "cpu", dtype: str = "float32", seed: int = 0) -> tuple[ModelAdapter, str]:
    """(adapter, description). `organism` loads the trained organism when present."""
    from avprobe.adapters import OmniThinkerAdapter
    from avprobe.testing import tiny_omni, tiny_tokenizer

    pixels = shape.size * (shape.height or shape.size)
    settings = AdapterSettings(use_audio_in_video=True, min_pixels=shape.min_pixels or 56 * 56,
                               max_pixels=shape.max_pixels or pixels)
    if shape.name == "organism":
        try:
            from avprobe.adapters.registry import load

            adapter = load("organism", device=device, dtype=dtype)
            return adapter, "the trained organism"
        except (FileNotFoundError, ValueError, OSError) as exc:
            log.warning("organism not available (%s); using a random 8-layer Omni thinker instead", exc)
            desc = "stand-in: random 8-layer Omni thinker (organism not trained yet)"
    else:
        desc = f"random Omni thinker, {shape.n_layers} layers, hidden {shape.hidden}"
    torch.manual_seed(seed)
    if shape.name == "qwen2.5-omni-3b":
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        with torch.device(device):
            model = Qwen2_5OmniThinkerForConditionalGeneration(qwen25_omni_3b_config())
        desc = "Qwen2.5-Omni-3B thinker architecture, random weights"
    else:
        model = tiny_omni(n_layers=shape.n_layers, hidden=shape.hidden, seed=seed)
    model = model.eval().to(device=device, dtype=getattr(torch, dtype))
    return OmniThinkerAdapter(model, tiny_tokenizer(), settings, name=f"bench-{shape.name}"), desc


def build_inputs(adapter: ModelAdapter, shape: Shape, sample: int) -> ModelInputs:
    from avprobe.testing import random_media

    media = random_media(seconds=shape.seconds, fps=shape.fps, size=shape.size, height=shape.height,
                         seed=1000 + sample)
    return adapter.build_inputs(media, QUERY)


def _distinct_conditions(n_layers: int, window: int) -> tuple[list[Condition], int]:
    """(every distinct condition, in order; how many of them are the paper's sweep)."""
    conds: list[Condition] = [Baseline(), *sweep(Role.AUDIO, n_layers, window), *sweep(Role.VIDEO, n_layers, window)]
    extra = [*sweep((Role.AUDIO, Role.VIDEO), n_layers, window), *sweep(Role.QUERY, n_layers, window)]
    extra += [Knockout((Role.AUDIO,), tuple(range(lo, n_layers))) for lo in range(n_layers)]
    return list(dict.fromkeys(conds + extra)), len(conds)  # distinct, order kept


def max_conditions(n_layers: int, window: int) -> int:
    """The most conditions sweep_conditions can give for this depth and window."""
    return len(_distinct_conditions(n_layers, window)[0])


def sweep_conditions(n_layers: int, window: int, count: int | None = None) -> list[Condition]:
    """The paper's sweep: baseline + G-/->A and G-/->V windows centred on every depth
    (1 + 2L). `count` trims it, or extends it with G-/->A+V and G-/->query sweeps."""
    out, paper = _distinct_conditions(n_layers, window)
    n = paper if count is None else count
    if n > len(out):
        raise ValueError(f"at most {len(out)} distinct conditions for a {n_layers}-layer model, asked for {n}")
    return out[:n]


def engine_config(max_new_tokens: int, record: bool = True, topk: int = 0, prefix_path: str = "auto") -> EngineConfig:
    return EngineConfig(
        max_new_tokens=max_new_tokens, record_attention=record, record_buckets=record,
        lens=LensConfig() if record else None, suppress_eos=True, keep_topk=topk, prefix_path=prefix_path,
    )


# The token check's tolerance by dtype: with random weights a 150k-token vocabulary has many
# near-tied logits, and bf16 arithmetic in two different attention implementations flips some
# of them. A row may then diverge from the engine's only where the engine's own logits for
# the two tokens lie within this fraction of their standard deviation (0 = exact tokens).
TIE_RTOL = {"float64": 0.0, "float32": 0.0, "bfloat16": 0.15, "float16": 0.05}
TOPK = 5  # the engine's best logits kept per step for the check, when TIE_RTOL allows ties


def method_fn(name: str, adapter: ModelAdapter, mi: ModelInputs, conds: list[Condition], T: int,
              first_token: bool = True, topk: int = 0, prefix_path: str = "auto") -> Callable[[], Any]:
    """A zero-argument callable that runs the whole sweep with method `name` (the engine
    keeps its `topk` best logits per step for the token check; engine and floor attend to
    the prefix as `prefix_path` says)."""
    if name == "engine":
        return lambda: run(adapter, mi, conds, engine_config(T, topk=topk, prefix_path=prefix_path))
    if name == "floor":
        return lambda: naive.floor_decode(adapter, mi, conds, T, prefix_path=prefix_path)
    if name == "careful":
        return lambda: naive.careful_sweep(adapter, mi, conds, T)
    if name == "naive":
        return lambda: naive.naive_sweep(adapter, mi, conds, T, first_token=first_token)
    if name == "nnsight":
        return lambda: naive.nnsight_sweep(adapter, mi, conds, T, first_token=first_token)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


def tokens_of(result: Any) -> list[list[int]]:
    if isinstance(result, RunResult):
        return [o.token_ids for o in result.outputs]
    return result.tokens


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextmanager
def cuda_peak(enabled: bool = True) -> Iterator[dict[str, float]]:
    """`with cuda_peak() as m: ...` then m["above_mb"]: the GPU's peak allocated memory during
    the block above what was allocated at its start, and m["base_mb"] (nothing when not
    `enabled`, e.g. on the CPU)."""
    m: dict[str, float] = {}
    if not enabled:
        yield m
        return
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield m
    torch.cuda.synchronize()
    m["base_mb"] = base / 2**20
    m["above_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def time_methods(adapter: ModelAdapter, mi: ModelInputs, conds: list[Condition], T: int, methods: list[str],
                 repeats: int, slow_repeats: int, device: str,
                 tie_rtol: float = 0.0, prefix_path: str = "auto") -> tuple[dict[str, Any], list[list[int]]]:
    """Run every method in rounds; check its tokens against the engine's (`check_tokens`;
    each method's entry has the check's summary); median times. On a GPU each method's
    first run also records its peak allocated memory above the model. Returns (timing, the
    engine's tokens)."""
    topk = TOPK if tie_rtol > 0 else 0
    fns = {m: method_fn(m, adapter, mi, conds, T, topk=topk, prefix_path=prefix_path) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    per_cond: dict[str, list[float]] = {}
    gpu_mb: dict[str, float] = {}  # each method's first run: peak GPU memory above the model
    ref: RunResult | None = None
    checks: dict[str, dict[str, Any]] = {}
    cuda = device.startswith("cuda")
    # warm-up: one short engine run (first calls allocate and register)
    run(adapter, mi, conds[:2], engine_config(2, prefix_path=prefix_path))
    for r in range(max(repeats, slow_repeats)):
        for m in methods:
            if m in FAST and r >= repeats or m not in FAST and r >= slow_repeats:
                continue
            _sync(device)
            with cuda_peak(cuda and m not in gpu_mb) as peak:
                t0 = time.perf_counter()
                res = fns[m]()
                _sync(device)
                times[m].append(time.perf_counter() - t0)
            if peak:
                gpu_mb[m] = peak["above_mb"]
            log.info("%s, round %d: %.2f s%s", m, r, times[m][-1],
                     f", peak {peak['above_mb']:.0f} MB above the model" if peak else "")
            if m == "engine" and ref is None:
                ref = res
            if m not in checks:
                if ref is None:
                    ref = run(adapter, mi, conds, engine_config(T, record=False, topk=topk, prefix_path=prefix_path))
                try:
                    checks[m] = check_tokens(m, tokens_of(res), ref, conds, tie_rtol)
                    checks[m].update(check_flow(m, res, ref, conds, exact=tie_rtol == 0))
                except AssertionError as exc:  # kept in the report; `avprobe bench` fails after writing it
                    checks[m] = {"conditions": len(conds), "identical": None, "failed": str(exc)}
                log.info("%s tokens against the engine's: %s", m, checks[m])
            if getattr(res, "seconds", None):
                per_cond.setdefault(m, []).extend(res.seconds)
            del res
    out: dict[str, Any] = {}
    for m in methods:
        out[m] = {"seconds": statistics.median(times[m]), "runs": times[m],
                  "tokens_equal_engine": checks[m]["identical"] == len(conds), "token_check": checks[m]}
        if "failed" in checks[m]:
            out[m]["failed"] = checks[m]["failed"]
        if m in per_cond:
            out[m]["per_condition_median"] = statistics.median(per_cond[m])
        if m in gpu_mb:
            out[m]["cuda_peak_above_model_mb"] = gpu_mb[m]
    assert ref is not None  # every method ran at least once, and the first one set it
    out["engine"]["prefix_path"] = ref.prefix_path
    return out, tokens_of(ref)


def check_tokens(method: str, toks: list[list[int]], ref: RunResult, conds: list[Condition],
                 tie_rtol: float = 0.0) -> dict[str, Any]:
    """`method`'s tokens against the engine's (`ref`), condition by condition. With
    `tie_rtol` 0 they must be equal. Otherwise a row may diverge at a step where the
    engine's logits for its own token and the method's lie within `tie_rtol` standard
    deviations of that step's logits (a near-tie that reduced precision can flip); the rest
    of that row is then not compared (its context differs). Anything else raises an
    AssertionError naming the method. Returns counts: identical rows, near-tie divergences,
    the largest tie gap seen (in standard deviations) and the tokens equal before divergence."""
    ref_toks = tokens_of(ref)
    if len(toks) != len(ref_toks):
        raise AssertionError(f"{method} returned {len(toks)} conditions, the engine {len(ref_toks)}")
    identical, ties, bad, matched, total = 0, [], [], 0, 0
    for i, (c, a, b) in enumerate(zip(conds, toks, ref_toks)):
        total += len(b)
        if a == b:
            identical += 1
            matched += len(b)
            continue
        t = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        matched += t
        gap = _tie_gap(ref, i, t, a[t]) if tie_rtol > 0 and t < min(len(a), len(b)) else None
        if gap is not None and gap <= tie_rtol:
            ties.append(gap)
        else:
            where = f"step {t}" + (f", gap {gap:.3g} sd" if gap is not None else "")
            bad.append(f"{c.label()} ({where})")
    if bad:
        raise AssertionError(f"{method} and the engine disagree on tokens for {len(bad)} condition(s): {bad[:5]}"
                             + (f" (near-ties within {tie_rtol} sd allowed)" if tie_rtol > 0 else ""))
    return {"conditions": len(conds), "identical": identical, "near_tie_divergences": len(ties),
            "max_tie_gap_sd": max(ties, default=0.0), "tie_rtol": tie_rtol,
            "tokens_equal_before_divergence": matched / total if total else 1.0}


FLOW_ATOL = 1e-4  # float32: the engine's merged attention mass against eager softmax rows


def check_flow(method: str, res: Any, ref: RunResult, conds: list[Condition], exact: bool) -> dict[str, Any]:
    """Where `method` recorded the baseline's attention flow (naive: eager output_attentions;
    careful: explicit softmax), its largest difference from the engine's over the steps
    where their tokens still agree. In float32 (`exact`) it must lie within FLOW_ATOL."""
    flow = getattr(res, "flow", None)
    if flow is None or not isinstance(conds[0], Baseline):
        return {}
    mine, theirs = ref.outputs[0].token_ids, tokens_of(res)[0]
    n = next((j for j, (x, y) in enumerate(zip(mine, theirs)) if x != y), min(len(mine), len(theirs)))
    n = min(n + 1, len(flow), len(ref.outputs[0].flow))  # step n still shares its context
    diff = float(np.abs(np.asarray(flow[:n], dtype=np.float64) - ref.outputs[0].flow[:n]).max())
    if exact and diff > FLOW_ATOL:
        raise AssertionError(f"{method}'s attention flow differs from the engine's by {diff:.3g} (> {FLOW_ATOL})")
    return {"flow_steps_compared": n, "flow_max_abs_diff": diff}


def _tie_gap(ref: RunResult, row: int, step: int, token: int) -> float | None:
    """How far below the engine's chosen logit `token`'s logit was, in standard deviations of
    that step's logits; None when `token` is not among the engine's kept best."""
    if ref.topk is None:
        return None
    values, ids, spread = ref.topk
    hits = (ids[row, step] == token).nonzero()
    if not len(hits):
        return None
    gap = float(values[row, step, 0] - values[row, step, int(hits[0])])
    return gap / max(float(spread[row, step]), 1e-12)


# ---- memory: one child process per method ---------------------------------------------------

def child_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Runs in the child: build, measure the method's peak memory, return it (JSON-able).

    CPU: the peak RSS while the method ran, above the RSS it started from (the loaded model
    and inputs), by avprobe.memory.PeakRSS (the kernel's high-water mark reset just before).
    GPU: `torch.cuda.max_memory_allocated` above what was allocated before the method."""
    shape = SHAPES[args.shape]
    adapter, _ = build_adapter(shape, args.device, args.dtype)
    mi = build_inputs(adapter, shape, 0)
    conds = sweep_conditions(adapter.n_layers, args.window or max(1, adapter.n_layers // 4), args.conditions)
    T = args.new_tokens or shape.new_tokens
    fn = method_fn(args.child, adapter, mi, conds, T, prefix_path=args.prefix_path)
    with cuda_peak(args.device.startswith("cuda")) as gpu, PeakRSS() as rss:
        t0 = time.perf_counter()
        res = fn()
        _sync(args.device)
        seconds = time.perf_counter() - t0
    out: dict[str, Any] = {
        "method": args.child, "conditions": len(conds), "prompt_len": mi.prompt_len, "seconds": seconds,
        "prefix_path": res.prefix_path if isinstance(res, RunResult) else None,
        "rss_before_mb": rss.before_mb, "peak_rss_mb": rss.peak_mb, "peak_above_model_mb": rss.above_mb,
        "rss_how": rss.how,
    }
    if gpu:
        out["cuda_peak_above_model_mb"] = gpu["above_mb"]
        out["cuda_model_mb"] = gpu["base_mb"]
    if isinstance(res, RunResult):
        out["kv_bytes"] = res.memory
    return out


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    """child_memory under the run's settings (threads, prefix path, no autograd)."""
    torch.set_num_threads(args.threads)
    with torch.no_grad():
        return child_memory(args)


def measure_memory(args: argparse.Namespace, method: str, shape: str, conditions: int | None,
                   new_tokens: int | None = None) -> dict[str, Any]:
    """Run `method` once in a child process (`python -m avprobe.bench.cli --child ...`)
    and return its peak memory report."""
    cmd = [sys.executable, "-m", "avprobe.bench.cli", "--child", method, "--shape", shape,
           "--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    if conditions is not None:
        cmd += ["--conditions", str(conditions)]
    if new_tokens is not None:
        cmd += ["--new-tokens", str(new_tokens)]
    if args.window:
        cmd += ["--window", str(args.window)]
    cmd += ["--prefix-path", args.prefix_path]
    # the child imports the avprobe this process runs (a checkout that is not installed too)
    env = dict(os.environ)
    src = str(Path(avprobe.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child for {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the whole benchmark ----------------------------------------------------------------------

def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Timing (and with --memory, memory) for every sample; returns the report dict.
    `args` holds the options of `avprobe bench` (avprobe/bench/cli.py). A method whose
    tokens disagree with the engine's is timed all the same and listed under `failures`
    (`failures(report)`): the caller writes the report, then fails."""
    if "engine" not in args.methods:
        raise ValueError("the ratios and the token check are against the engine: --methods must include engine")
    return _benchmark(args)


def _benchmark(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    adapter, desc = build_adapter(shape, args.device, args.dtype)
    L = adapter.n_layers
    window = args.window or max(1, L // 4)
    conds = sweep_conditions(L, window, args.conditions)
    T = args.new_tokens or shape.new_tokens
    methods = [m for m in args.methods if m != "nnsight" or naive.nnsight_available()]
    skipped = [m for m in args.methods if m not in methods]
    report: dict[str, Any] = {
        "shape": asdict(shape), "model": desc, "device": args.device, "dtype": args.dtype,
        "threads": args.threads, "n_layers": L, "window": window, "conditions": len(conds),
        "new_tokens": T, "methods": methods, "skipped": {m: "nnsight is not importable" for m in skipped},
        "prefix_path_setting": args.prefix_path, "samples": [],
    }
    tie_rtol = TIE_RTOL[args.dtype] if args.tie_rtol is None else args.tie_rtol
    report["tie_rtol"] = tie_rtol
    peaks = limits.device_peaks(args.device, args.dtype, getattr(args, "peak_probe_s", 1.0))
    cost = limits.ModelCost.of(adapter)
    report["peaks"] = peaks.to_json()
    cuda = args.device.startswith("cuda")
    first_inputs = None
    for s in range(args.samples):
        mi = build_inputs(adapter, shape, s)
        if first_inputs is None:
            first_inputs = mi
        log.info("sample %d: %d prompt tokens, %d conditions, %d new tokens", s, mi.prompt_len, len(conds), T)
        timing, tokens = time_methods(adapter, mi, conds, T, methods, args.repeats, args.slow_repeats, args.device,
                                      tie_rtol, prefix_path=args.prefix_path)
        e = timing["engine"]["seconds"]
        ratios = {f"{m}/engine": timing[m]["seconds"] / e for m in methods if m != "engine"}
        if "floor" in timing:
            ratios["engine/floor"] = e / timing["floor"]["seconds"]
        lim = limits.sweep_limit(cost, peaks, mi.prompt_len, len(conds), T)
        for v in timing.values():
            v["x_limit"] = v["seconds"] / lim["seconds"]
        row = {"sample": s, "prompt_len": mi.prompt_len, "timing": timing, "ratios": ratios, "limit": lim,
               # per condition, in sweep order: compares runs (--prefix-path, devices)
               "condition_labels": [c.label() for c in conds], "tokens": tokens}
        report["samples"].append(row)
        report["prefix_path"] = timing["engine"]["prefix_path"]
        if cuda:
            log.info("peak GPU memory above the model (MB): %s",
                     {m: round(v["cuda_peak_above_model_mb"]) for m, v in timing.items()})
    most = max_conditions(L, window)
    counts = [n for n in (5, 49) if n <= most]  # the engine's memory as the sweep grows
    for n in (5, 49) if args.memory else ():
        if n > most:  # a shallow model (tiny) has fewer distinct conditions
            report["skipped"][f"engine_{n}_conditions"] = f"a {L}-layer model has {most} distinct conditions"
    if args.memory and cuda:
        # GPU: the caching allocator's peak is exact in-process (no children needed)
        report["memory"] = {m: {"conditions": len(conds), "seconds": v["runs"][0], "peak_rss_mb": None,
                                "peak_above_model_mb": None, "rss_how": "",
                                "cuda_peak_above_model_mb": v["cuda_peak_above_model_mb"]}
                            for m, v in report["samples"][0]["timing"].items()}
        for n in counts:
            report["memory"][f"engine_{n}_conditions"] = cuda_engine_memory(
                adapter, first_inputs, sweep_conditions(L, window, n), T)
    elif args.memory:
        mem: dict[str, Any] = {}
        for m in methods:
            # naive methods: peak memory is that of one generate (the first, with
            # output_attentions); two conditions suffice and keep the child short.
            n = None if m in FAST else 2
            mem[m] = measure_memory(args, m, args.shape, n if args.conditions is None else min(args.conditions, n or 10**6))
        for n in counts:
            mem[f"engine_{n}_conditions"] = measure_memory(args, "engine", args.shape, n)
        report["memory"] = mem
    if getattr(args, "batch_sweep", 0):
        report["batch_sweep"] = batch_sweep_row(args, shape, adapter, conds, T, peaks, cost)
    if getattr(args, "end_to_end", 0):
        report["end_to_end"] = end_to_end_row(args, shape, adapter, peaks, cost)
    if args.flow_memory:
        report["flow_memory"] = {
            "eager_output_attentions": measure_memory(args, "naive", "flow4k", 1, 8),
            "engine": measure_memory(args, "engine", "flow4k", 1, 8),
        }
    return report


def failures(report: dict[str, Any]) -> list[str]:
    """The token or flow checks that failed, one message each."""
    out = [v["failed"] for row in report["samples"] for v in row["timing"].values() if "failed" in v]
    if report.get("batch_sweep", {}).get("tokens_equal") is False:
        out.append("batched sweep: the batched engine's tokens differ from the one-clip engine's")
    if report.get("end_to_end", {}).get("batched_tokens_equal_engine") is False:
        out.append("end to end: the batched engine's tokens differ from the one-clip engine's")
    return out


def cuda_engine_memory(adapter: ModelAdapter, mi: ModelInputs, conds: list[Condition], T: int) -> dict[str, Any]:
    """One engine run on the GPU: its peak allocated memory above the model, and its K/V bytes."""
    with cuda_peak() as gpu:
        t0 = time.perf_counter()
        res = run(adapter, mi, conds, engine_config(T))
    return {"method": "engine", "conditions": len(conds), "prompt_len": mi.prompt_len,
            "seconds": time.perf_counter() - t0, "peak_rss_mb": None, "peak_above_model_mb": None, "rss_how": "",
            "cuda_peak_above_model_mb": gpu["above_mb"], "kv_bytes": res.memory}


def end_to_end_row(args: argparse.Namespace, shape: Shape, adapter: ModelAdapter, peaks: limits.Peaks,
                   cost: limits.ModelCost) -> dict[str, Any]:
    """The full protocol per clip (avprobe.bench.e2e) over `args.end_to_end` clips, with the
    physical limit per clip: one clip alone, and a batch of clips sharing each step's weight reads.
    The organism runs on its evaluation clips with its vision-only base; other shapes on random
    clips with the model as its own base (the same work as a base of its size)."""
    from avprobe.bench.e2e import end_to_end, protocol_setup
    from avprobe.records import DEFAULT_QUERY, Protocol

    n = args.end_to_end
    queries = adapter.settings.queries or (DEFAULT_QUERY,)
    base: ModelAdapter | None = adapter
    if adapter.name == "organism":
        from avprobe.adapters.registry import load
        from avprobe.media.sources import load_sample_media
        from avprobe.organism.dataset import eval_samples

        base = load(adapter.settings.base_model, device=args.device, dtype=args.dtype) \
            if adapter.settings.base_model else None
        samples = eval_samples()[: (n + len(queries) - 1) // len(queries)]
        media = [load_sample_media(s, fps=adapter.settings.fps, max_frames=adapter.settings.max_frames,
                                   frame_rule=adapter.settings.frame_rule) for s in samples]
    else:
        from avprobe.testing import random_media

        media = [random_media(seconds=shape.seconds, fps=shape.fps, size=shape.size, height=shape.height,
                              seed=2000 + i) for i in range((n + len(queries) - 1) // len(queries))]
    clips = [(m, q) for m in media for q in queries][:n]
    protocol = Protocol(queries=tuple(queries), max_new_tokens=args.new_tokens or Protocol().max_new_tokens)
    methods = [m for m in ("naive", "engine", "batched") if m != "naive" or args.naive_clips > 0]
    row = end_to_end(adapter, base, clips, protocol, args.clips_per_batch, max(args.naive_clips, 1), methods)
    conds, _ = protocol_setup(adapter, protocol)
    P = int(statistics.median(row["prompt_lens"]))
    one = limits.sweep_limit(cost, peaks, P, len(conds), protocol.max_new_tokens)
    k = min(args.clips_per_batch, n)
    many = limits.sweep_limit(cost, peaks, P, len(conds), protocol.max_new_tokens, clips=k)
    row["limit_per_clip_s"] = {"one_clip": one["seconds"], f"{k}_clips_per_batch": many["seconds"] / k}
    for m, v in row["methods"].items():
        lim = many["seconds"] / k if m == "batched" else one["seconds"]
        v["x_limit"] = v["seconds_per_clip"] / lim
    row["base_model"] = base.name if base is not None else None
    return row


def batch_sweep_row(args: argparse.Namespace, shape: Shape, adapter: ModelAdapter, conds: list[Condition], T: int,
                    peaks: limits.Peaks, cost: limits.ModelCost) -> dict[str, Any]:
    """The sweep (the engine's settings: flow, lens, every row to T tokens) of `args.batch_sweep`
    clips, one clip per run against `args.clips_per_batch` clips per `run_batch`, interleaved
    in rounds (`args.repeats`, medians) so that a busy machine's drift hits both alike."""
    from avprobe.engine import run_batch

    n, k = args.batch_sweep, min(args.clips_per_batch, args.batch_sweep)
    mis = [build_inputs(adapter, shape, 100 + i) for i in range(n)]
    cfg = engine_config(T, prefix_path=args.prefix_path)
    run_batch(adapter, [(mi, conds[:2]) for mi in mis[:2]], engine_config(2, prefix_path=args.prefix_path))  # warm-up
    times: dict[str, list[float]] = {"one-clip": [], "batched": []}
    toks: dict[str, list] = {}
    for _ in range(args.repeats):
        for m in times:
            _sync(args.device)
            t0 = time.perf_counter()
            if m == "one-clip":
                res = [run(adapter, mi, conds, cfg) for mi in mis]
            else:
                res = [r for s in range(0, n, k) for r in run_batch(adapter, [(mi, conds) for mi in mis[s : s + k]], cfg)]
            _sync(args.device)
            times[m].append(time.perf_counter() - t0)
            toks.setdefault(m, [tokens_of(r) for r in res])
            del res
    P = int(statistics.median(mi.prompt_len for mi in mis))
    lim_one = limits.sweep_limit(cost, peaks, P, len(conds), T)["seconds"]
    lim_k = limits.sweep_limit(cost, peaks, P, len(conds), T, clips=k)["seconds"] / k
    one = statistics.median(times["one-clip"]) / n
    rows = {}
    for m, ts in times.items():
        per = statistics.median(ts) / n
        rows[m] = {"seconds_per_clip": per, "runs": ts, "x_one_clip": per / one,
                   "x_limit": per / (lim_k if m == "batched" else lim_one)}
    return {"clips": n, "clips_per_batch": k, "conditions": len(conds), "new_tokens": T,
            "prompt_lens": [mi.prompt_len for mi in mis], "methods": rows,
            "limit_per_clip_s": {"one_clip": lim_one, f"{k}_clips_per_batch": lim_k},
            "tokens_equal": toks["batched"] == toks["one-clip"]}
