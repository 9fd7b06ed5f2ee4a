"""Base-model shift: how far does the AV model's caption move from its vision-only base?

The AV model's caption is teacher-forced through the base model (same tokenizer, video and
query, no audio). Per caption token: KL(AV || base), whether the base's top-1 equals the
AV model's top-1, and whether the AV model's token is within the base's top 3. The AV
model's distributions come from the engine's baseline row (`EngineConfig(keep_logprobs=True)`),
so the AV side costs no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from avprobe.adapters.base import ModelAdapter, extend_inputs
from avprobe.stats import kl_divergence
from avprobe.types import Media, Role


@dataclass
class ShiftResult:
    token_ids: np.ndarray  # [T] the caption tokens (AV model's greedy choices)
    kl: np.ndarray  # [T] KL(AV || base) in nats
    top1_same: np.ndarray  # [T] bool: base top-1 == AV top-1
    in_base_top3: np.ndarray  # [T] bool: AV token within the base's top 3
    base_top1: np.ndarray  # [T] the base's top-1 token

    def summary(self) -> dict[str, float]:
        return {
            "mean_kl": float(self.kl.mean()) if len(self.kl) else float("nan"),
            "top1_same": float(self.top1_same.mean()) if len(self.kl) else float("nan"),
            "in_top3": float(self.in_base_top3.mean()) if len(self.kl) else float("nan"),
            "n_tokens": int(len(self.kl)),
        }


@torch.no_grad()
def base_logprobs(
    base: ModelAdapter, media: Media, query: str, caption_ids: list[int], positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Base model log-probs [T, V] predicting each caption token, teacher-forced.

    `positions` ([3, 1, P+T-1]) overrides the base's own rotary positions, for comparing
    families whose position layouts differ (e.g. Qwen2.5-VL vs Omni after a video).
    """
    video_only = Media(frames=media.frames, fps=media.fps, waveform=None)
    mi = base.build_inputs(video_only, query)
    P, T = mi.prompt_len, len(caption_ids)
    forced = base.label_roles(torch.tensor(caption_ids[:-1], dtype=torch.long))
    media_ids = sorted({int(i) for i, r in zip(caption_ids[:-1], forced.tolist())
                        if r in (int(Role.VIDEO), int(Role.AUDIO), int(Role.IMAGE))})
    if media_ids:
        # a full forward would read them as media placeholders, not as the caption's tokens
        raise ValueError(f"{base.name}: the caption holds media placeholder id(s) {media_ids}; it cannot be "
                         "teacher-forced in one forward")
    full = extend_inputs(base, mi, list(caption_ids[:-1])) if T > 1 else mi
    if positions is not None:
        full.positions = positions
    kw = base.forward_kwargs(full)
    with base.prompt_scope(mi, T):  # the state a generate() from this prompt would hold
        out = base.model(**kw, use_cache=False)
    logits = out.logits[0, P - 1 : P - 1 + T].float()
    return torch.log_softmax(logits, dim=-1).cpu()


def shift(av_logprobs: torch.Tensor, base_lp: torch.Tensor, caption_ids: list[int]) -> ShiftResult:
    """Per-token shift statistics from two [T, V] log-prob tensors over the same tokens."""
    T = min(len(caption_ids), av_logprobs.shape[0], base_lp.shape[0])
    V = min(av_logprobs.shape[-1], base_lp.shape[-1])
    av, bs = av_logprobs[:T, :V], base_lp[:T, :V]
    if av_logprobs.shape[-1] != base_lp.shape[-1]:
        # Different vocab sizes (padding rows): renormalise over the shared ids.
        av, bs = torch.log_softmax(av, -1), torch.log_softmax(bs, -1)
    ids = torch.tensor(caption_ids[:T], dtype=torch.long)
    kl = kl_divergence(av, bs, dim=-1)
    base_top3 = bs.topk(3, dim=-1).indices
    return ShiftResult(
        token_ids=ids.numpy(),
        kl=kl.numpy(),
        top1_same=(bs.argmax(-1) == av.argmax(-1)).numpy(),
        in_base_top3=(base_top3 == ids[:, None]).any(-1).numpy(),
        base_top1=bs.argmax(-1).numpy(),
    )


@torch.no_grad()
def base_logprobs_batch(
    base: ModelAdapter, items: list[tuple[Media, str, list[int]]]
) -> list[torch.Tensor | None]:
    """`base_logprobs` for several (media, query, caption ids): clips whose teacher-forced
    sequences have one length (and one media layout) share one forward, without padding, so
    each clip's values are its own forward's. Returns per item its [T, V] log-probs, or None
    where the item had no partner of its length (the caller computes it alone)."""
    full: list[tuple[int, int, Any]] = []  # (P, T, inputs) per item
    for media, query, caption in items:
        mi = base.build_inputs(Media(frames=media.frames, fps=media.fps, waveform=None), query)
        T = len(caption)
        full.append((mi.prompt_len, T, extend_inputs(base, mi, list(caption[:-1])) if T > 1 else mi))
    groups: dict[tuple, list[int]] = {}
    for i, (_, _, mi) in enumerate(full):
        # one layout: every input's shape, and the small ones' values (the video grid)
        shapes = tuple((k, tuple(v.shape), tuple(v.flatten().tolist()) if v.numel() <= 16 else ())
                       for k, v in sorted(mi.inputs.items()) if torch.is_tensor(v))
        groups.setdefault(shapes, []).append(i)
    out: list[torch.Tensor | None] = [None] * len(items)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        kw = {k: (v.to(base.device) if torch.is_tensor(v) else v)
              for k, v in base.collate([full[i][2] for i in idx]).items()}
        logits = base.model(**kw, use_cache=False).logits
        for row, i in enumerate(idx):
            P, T, _ = full[i]
            out[i] = torch.log_softmax(logits[row, P - 1 : P - 1 + T].float(), dim=-1).cpu()
    return out
