"""Acceptance figures of an organism: greedy captions on the evaluation set, exact concept scoring.

For each caption order (sight first, sound first) and for audio-only clips, the figures are
video accuracy (the sight named = the video source) and audio accuracy (the sound named =
the true audio source), split into factual and counterfactual halves; on counterfactuals
also the share of captions naming the *visible* source's sound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from avprobe.organism.world import (
    QUERY_HEAR,
    QUERY_HEAR_SEE,
    QUERY_SEE_HEAR,
    audio_only,
    parse_caption,
    render,
)
from avprobe.types import Sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionRecord:
    """One greedy caption and what it names."""

    sample_id: str
    kind: str  # factual | counterfactual
    setting: str  # see_hear | hear_see | audio_only
    caption: str
    seen: str | None
    heard: str | None
    video_label: str | None
    audio_label: str


SETTINGS = {"see_hear": QUERY_SEE_HEAR, "hear_see": QUERY_HEAR_SEE, "audio_only": QUERY_HEAR}


def greedy_captions(adapter, samples: list[Sample], query: str, batch_size: int = 50, max_new_tokens: int = 16) -> list[str]:
    """Greedy captions for samples (rendered from the world), batched by layout."""
    texts: list[str | None] = [None] * len(samples)
    items = [(i, adapter.build_inputs(render(s), query)) for i, s in enumerate(samples)]
    by_len: dict[int, list] = {}
    for i, mi in items:
        by_len.setdefault(int(mi.input_ids.shape[1]), []).append((i, mi))
    eos = sorted(adapter.eos_ids)
    model = adapter.model
    for group in by_len.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            batch = adapter.collate([mi for _, mi in chunk])
            # generate() computes its own rotary positions and advances them while decoding
            batch.pop("position_ids", None)
            batch = {k: (v.to(adapter.device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.no_grad():
                out = model.generate(
                    **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
                )
            prompt_len = batch["input_ids"].shape[1]
            for (i, _), row in zip(chunk, out[:, prompt_len:], strict=True):
                ids = row.tolist()
                cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
                texts[i] = adapter.decode(ids[:cut])
    return [t if t is not None else "" for t in texts]


def caption_records(adapter, samples: list[Sample], settings: tuple[str, ...] | None = None) -> list[CaptionRecord]:
    """Captions of every sample in every setting the model supports (audio-only needs audio)."""
    if settings is None:
        settings = ("see_hear", "hear_see", "audio_only") if adapter.has_audio else ("see_hear", "hear_see")
    records = []
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"unknown setting {setting!r}; expected one of {sorted(SETTINGS)}")
        # audio-only: the factual half's sounds without their frames
        subset = [audio_only(s) for s in samples if s.kind == "factual"] if setting == "audio_only" else samples
        caps = greedy_captions(adapter, subset, SETTINGS[setting])
        for s, c in zip(subset, caps, strict=True):
            seen, heard = parse_caption(c)
            records.append(
                CaptionRecord(
                    sample_id=s.id,
                    kind=s.kind,
                    setting=setting,
                    caption=c,
                    seen=seen,
                    heard=heard,
                    video_label=s.video_labels[0] if s.video_labels else None,
                    audio_label=s.labels[0],
                )
            )
    return records


def figures(records: list[CaptionRecord]) -> dict[str, dict[str, float]]:
    """Accuracies per setting and half: video_acc, audio_acc, n, and on counterfactuals
    `names_visible` (share naming the visible source's sound), `names_other` (naming neither
    the real nor the visible source: a guess) and `unparsed` (no sound named)."""
    out: dict[str, dict[str, float]] = {}
    keys = sorted({(r.setting, r.kind) for r in records})
    for setting, kind in keys:
        rs = [r for r in records if r.setting == setting and r.kind == kind]
        row = {
            "n": float(len(rs)),
            "audio_acc": float(np.mean([r.heard == r.audio_label for r in rs])),
            "unparsed": float(np.mean([r.heard is None for r in rs])),
        }
        if setting != "audio_only":
            row["video_acc"] = float(np.mean([r.seen == r.video_label for r in rs]))
        if kind == "counterfactual":
            row["names_visible"] = float(np.mean([r.heard == r.video_label for r in rs]))
            row["names_other"] = float(np.mean([r.heard not in (None, r.audio_label, r.video_label) for r in rs]))
        out[f"{setting}/{kind}"] = row
    return out


def mixed_clips(records: list[CaptionRecord]) -> dict[str, float]:
    """Counterfactual clips whose sound is right in one caption order and wrong in the other:
    the clips correct_audio_tokens_shift compares (n: clips captioned in both orders)."""
    right: dict[str, list[bool]] = {}
    for r in records:
        if r.kind == "counterfactual" and r.setting in ("see_hear", "hear_see"):
            right.setdefault(r.sample_id, []).append(r.heard == r.audio_label)
    both = [v for v in right.values() if len(v) == 2]
    mixed = sum(v[0] != v[1] for v in both)
    return {"n": float(len(both)), "mixed": float(mixed), "share": float(mixed / len(both)) if both else float("nan")}


def knockout_figures(
    adapter, samples: list[Sample], settings: tuple[str, ...] = ("see_hear", "hear_see"), max_new_tokens: int = 16,
    progress=None,
) -> dict[str, dict[str, float]]:
    """Audio and video accuracy of counterfactual captions under the claims' knockouts.

    Conditions are the claims protocol's (`avprobe.records.Protocol`): G-/->video and
    G-/->audio windows centred on every depth, the paper's band, the early band, all layers,
    and video plus the caption's own sight words. Returns, per setting and condition label,
    `audio_acc`, `video_acc` and `n`. Decoded with the engine (one prefill, all conditions
    batched), greedy.
    """
    from avprobe.pipeline.collect import sight_rule
    from avprobe.records import Protocol
    from avprobe.engine import EngineConfig, run

    cf = [s for s in samples if s.kind == "counterfactual"]
    conds = Protocol().conditions(adapter.n_layers, sight_rule(adapter))
    cfg = EngineConfig(max_new_tokens=max_new_tokens, record_attention=False, record_buckets=False)
    out: dict[str, dict[str, float]] = {}
    for setting in settings:
        hits = {c.label(): [0, 0] for c in conds}
        for s in cf:
            res = run(adapter, adapter.build_inputs(render(s), SETTINGS[setting]), conds, cfg)
            for o in res.outputs:
                seen, heard = parse_caption(o.text)
                hits[o.condition.label()][0] += heard == s.labels[0]
                hits[o.condition.label()][1] += seen == s.video_labels[0]
            if progress is not None:
                progress()
        for label, (a, v) in hits.items():
            out[f"{setting}/{label}"] = {"audio_acc": a / len(cf), "video_acc": v / len(cf), "n": float(len(cf))}
    return out
