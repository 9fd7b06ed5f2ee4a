"""End to end: the full protocol per clip (captions, attention flow, logit lens, the knockout
sweep, the base-model shift), clips per second, side by side in one process:

- `naive`: the paper's code per clip (eager attention, one generate per condition, the flow
  from output_attentions, a lens forward), then the base model's teacher-forced pass. It does
  the role knockouts only (rule knockouts are the engine's; leaving them out favours naive)
  and decodes every condition to max_new_tokens (HF's min_new_tokens, as the sweep bench);
- `engine`: the one-clip engine (`engine.run`) per clip, then the base model's pass per clip;
- `batched`: `clips_per_batch` clips per `engine.run_batch`, the base model's passes batched
  over clips of one length (`probes.base_shift.base_logprobs_batch`).

The engine rows run the pipeline's protocol (`records.Protocol`: its conditions, lens and
EOS); media are decoded and inputs built before the clock starts (the collect pipeline
overlaps them with the model in a worker thread; `avprobe collect` is measured on its own in
benchmarks/). The batched engine's tokens must equal the one-clip engine's for every clip and
condition (checked; the report says so); naive's are compared and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from avprobe.adapters.base import ModelAdapter, ModelInputs
from avprobe.bench import naive
from avprobe.conditions import Condition, Knockout
from avprobe.engine import EngineConfig, RunResult, run, run_batch
from avprobe.probes.base_shift import base_logprobs, base_logprobs_batch, shift
from avprobe.probes.knockout import sight_rule
from avprobe.probes.logit_lens import LensConfig
from avprobe.records import Protocol
from avprobe.types import Media

log = logging.getLogger(__name__)


def protocol_setup(adapter: ModelAdapter, protocol: Protocol) -> tuple[list[Condition], EngineConfig]:
    """The pipeline's conditions and engine settings for `protocol` (as avprobe collect runs it)."""
    conds = protocol.conditions(adapter.n_layers, sight_rule(adapter) if protocol.own_words else None)
    lens = LensConfig(top_k=protocol.lens_top_k, use_norm=protocol.lens_norm) if protocol.lens else None
    cfg = EngineConfig(max_new_tokens=protocol.max_new_tokens, lens=lens, keep_logprobs=protocol.shift,
                       record_attention=protocol.flow, record_buckets=protocol.flow)
    return conds, cfg


def _shift_one(base: ModelAdapter | None, media: Media, query: str, res: RunResult) -> Any:
    if base is None or res.logprobs is None:
        return None
    cap = res.outputs[0].token_ids
    return shift(res.logprobs, base_logprobs(base, media, query, cap), cap)


def run_engine(adapter: ModelAdapter, base: ModelAdapter | None, clips: Sequence[tuple[Media, str, ModelInputs]],
               conds: list[Condition], cfg: EngineConfig) -> list[list[list[int]]]:
    """The one-clip engine and the shift, clip by clip -> tokens per clip and condition."""
    out = []
    for media, query, mi in clips:
        res = run(adapter, mi, conds, cfg)
        _shift_one(base, media, query, res)
        out.append([o.token_ids for o in res.outputs])
    return out


def run_batched(adapter: ModelAdapter, base: ModelAdapter | None, clips: Sequence[tuple[Media, str, ModelInputs]],
                conds: list[Condition], cfg: EngineConfig, clips_per_batch: int) -> list[list[list[int]]]:
    """`clips_per_batch` clips per batched decode, the shift batched over clips of one length."""
    out = []
    for s in range(0, len(clips), clips_per_batch):
        group = clips[s : s + clips_per_batch]
        results = run_batch(adapter, [(mi, conds) for _, _, mi in group], cfg)
        lps: list[Any] = [None] * len(group)
        if base is not None:
            lps = base_logprobs_batch(base, [(m, q, r.outputs[0].token_ids) for (m, q, _), r in zip(group, results)])
        for (media, query, _), res, lp in zip(group, results, lps):
            if lp is None:
                _shift_one(base, media, query, res)
            elif res.logprobs is not None:
                shift(res.logprobs, lp, res.outputs[0].token_ids)
            out.append([o.token_ids for o in res.outputs])
    return out


def run_naive(adapter: ModelAdapter, base: ModelAdapter | None, clips: Sequence[tuple[Media, str, ModelInputs]],
              conds: list[Condition], cfg: EngineConfig) -> list[list[list[int]]]:
    """The paper's code per clip (role knockouts only), then the base model's pass."""
    roles_only = [c for c in conds if not (isinstance(c, Knockout) and c.rules)]
    out = []
    for media, query, mi in clips:
        res = naive.naive_sweep(adapter, mi, roles_only, cfg.max_new_tokens, lens=cfg.lens)
        if base is not None:
            base_logprobs(base, media, query, res.tokens[0])
        out.append(res.tokens)
    return out


def end_to_end(adapter: ModelAdapter, base: ModelAdapter | None, clips: Sequence[tuple[Media, str]],
               protocol: Protocol, clips_per_batch: int, naive_clips: int = 1,
               methods: Sequence[str] = ("naive", "engine", "batched")) -> dict[str, Any]:
    """Time every method over the clips (naive over the first `naive_clips`): seconds per clip
    and clips per second, the batched/one-clip ratio and the token checks."""
    conds, cfg = protocol_setup(adapter, protocol)
    if base is None:
        cfg = replace(cfg, keep_logprobs=False)
    inputs = [(m, q, adapter.build_inputs(m, q)) for m, q in clips]
    run(adapter, inputs[0][2], conds[:2], replace(cfg, max_new_tokens=2))  # warm-up
    rows: dict[str, Any] = {}
    toks: dict[str, list] = {}
    for m in methods:
        use = inputs[:naive_clips] if m == "naive" else inputs
        t0 = time.perf_counter()
        if m == "naive":
            toks[m] = run_naive(adapter, base, use, conds, cfg)
        elif m == "engine":
            toks[m] = run_engine(adapter, base, use, conds, cfg)
        elif m == "batched":
            toks[m] = run_batched(adapter, base, use, conds, cfg, clips_per_batch)
        else:
            raise ValueError(f"unknown end-to-end method {m!r}")
        if adapter.device.type == "cuda":
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        rows[m] = {"clips": len(use), "seconds": sec, "seconds_per_clip": sec / len(use),
                   "clips_per_s": len(use) / sec}
        log.info("end to end, %s: %d clips in %.2f s", m, len(use), sec)
    out: dict[str, Any] = {"conditions": len(conds), "max_new_tokens": protocol.max_new_tokens,
                           "clips_per_batch": clips_per_batch, "shift": base is not None,
                           "prompt_lens": [mi.prompt_len for _, _, mi in inputs], "methods": rows}
    if "engine" in toks and "batched" in toks:
        out["batched_tokens_equal_engine"] = toks["batched"] == toks["engine"]
        rows["batched"]["x_engine"] = rows["batched"]["seconds_per_clip"] / rows["engine"]["seconds_per_clip"]
    if "engine" in toks and "naive" in toks:
        roles_only = [i for i, c in enumerate(conds) if not (isinstance(c, Knockout) and c.rules)]
        n = len(toks["naive"])
        # naive decodes past an EOS (min_new_tokens): its tokens up to the engine's length
        same = sum(toks["naive"][c][j][: len(toks["engine"][c][i])] == toks["engine"][c][i]
                   for c in range(n) for j, i in enumerate(roles_only))
        out["naive_conditions_equal_engine_prefix"] = f"{same} of {n * len(roles_only)}"
        rows["naive"]["x_engine"] = rows["naive"]["seconds_per_clip"] / rows["engine"]["seconds_per_clip"]
    return out
