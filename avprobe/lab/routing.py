"""Attention routing for organism training: where the caption may read each modality.

The paper's model reads audio in its first layers and video in mid-deep layers, and its visual
prior reaches the sound words through that mid-deep video attention (Fig. 2, Fig. 5). A small
model trained on captions alone puts its attention wherever it likes (the first organisms read
audio late and video early, the reverse of the paper). A *routing profile* plants the paper's
layout by construction: hinge penalties on the attention the model computes itself, so the
profile is learned and nothing is masked at inference.

- Caption rows (the rows that predict the caption: the last prompt row onward, as the engine's
  generated rows) get a share range per modality and depth band: e.g. audio >= 0.5 in the first
  sixth of depth and <= 0.04 after; video 0.25-0.40 in the paper's band and ~0 elsewhere.
- The other text rows after the media (the query) read no media, so that the caption rows are
  the only route from the media to the caption and a knockout of those rows is a cut.
- Audio rows read no video and video rows no audio, so that audio positions stay about the
  sound (what the logit lens reads) and video positions about the sight.

Knockout dropout (`KnockoutDropout`) blocks, in a share of factual batches, the caption rows'
attention to one modality over a band during training, with the caption unchanged: the model
learns to name both sources from the other modality when one is cut (on factual clips they
agree), which is what the paper's flat factual knockout curves (Fig. 5a) show.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from avprobe.conditions import band as band_layers
from avprobe.paper import band_fractions
from avprobe.types import Role

NAME = "avprobe_routing"


@dataclass(frozen=True)
class Share:
    """Caption rows' attention share on one modality in one depth band: kept within [lo, hi]."""

    role: str  # "audio" | "video"
    band: tuple[float, float] | str  # depth fractions [lo, hi) or a name of avprobe.paper.BANDS
    lo: float = 0.0
    hi: float = 1.0
    weight: float = 1.0  # of this share's hinge (a forbidden zone can cost more than a target)


@dataclass(frozen=True)
class KnockoutDropout:
    """In a share `p` of factual batches, caption rows -/-> `role` over `band` while training."""

    role: str
    band: tuple[float, float] | str
    p: float


@dataclass(frozen=True)
class RoutingProfile:
    """Where caption rows read each modality, and how the other rows are kept out of it."""

    name: str
    shares: tuple[Share, ...]
    other_text_cap: float = 0.02  # query rows after the media: media share at most this
    cross_media_cap: float = 0.02  # audio rows -> video keys and video rows -> audio keys
    weight: float = 1.0  # of the routing penalty (mean hinge per layer) against the caption loss
    dropout: tuple[KnockoutDropout, ...] = ()


# Knockout dropout cuts the caption rows from the video at *every* layer: when only the band
# was cut in training, the first try learned a back door (4% of layer 0's attention on the video,
# enough to name the sight: cutting layers 0-1 then recovered more audio than the band did).
_CUT_VIDEO = (KnockoutDropout("video", "all", 0.25),)

def _paper(name: str, outside_cap: float, outside_weight: float) -> RoutingProfile:
    """The paper's layout, with the cap (and its weight) on video outside the band."""
    return RoutingProfile(
        name=name,
        shares=(
            Share("audio", "paper-early", lo=0.5),
            Share("audio", "paper-after-early", hi=0.04),
            Share("video", "paper", lo=0.25, hi=0.4),
            Share("video", (0.0, 15 / 36), hi=outside_cap, weight=outside_weight),
            Share("video", (30 / 36, 1.0), hi=outside_cap, weight=outside_weight),
        ),
        dropout=_CUT_VIDEO,
    )


PROFILES: dict[str, RoutingProfile] = {
    # The paper's layout (Fig. 2): audio 40-50% in the first sixth, then near zero; video
    # 20-40% in layers 15-30 of 36 and little elsewhere; the visual prior acts through it.
    "paper": _paper("paper", outside_cap=0.01, outside_weight=1.0),
    # As "paper", with the video kept out of the other layers ten times harder: under "paper"
    # 4% of layer 0's attention still went to the video, and cutting layers 0-1 recovered half
    # as much audio as cutting the band.
    "paper-strict": _paper("paper-strict", outside_cap=0.005, outside_weight=10.0),
    # The vision-only base (no audio, no factual batches, so no dropout): the paper's video
    # terms, with the caps the base of the deep recipe was trained with (its train.json).
    "vision-base": RoutingProfile(
        name="vision-base",
        shares=(
            Share("video", "paper", lo=0.25, hi=0.4),
            Share("video", (0.0, 15 / 36), hi=0.02),
            Share("video", (30 / 36, 1.0), hi=0.02),
        ),
    ),
    # The reverse of the paper (sight integrated early, sound mid-deep): a counterpart on which
    # the attention-profile and knockout-location claims must fail.
    "flipped": RoutingProfile(
        name="flipped",
        shares=(
            Share("video", "paper-early", lo=0.4),
            Share("video", "paper-after-early", hi=0.01),
            Share("audio", "paper", lo=0.25, hi=0.5),
            Share("audio", (0.0, 15 / 36), hi=0.01),
            Share("audio", (30 / 36, 1.0), hi=0.01),
        ),
        dropout=_CUT_VIDEO,
    ),
}


def profile(name: str) -> RoutingProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown routing profile {name!r}; known: {', '.join(PROFILES)}") from None


def layers_of(spec: tuple[float, float] | str, n_layers: int) -> tuple[int, ...]:
    return band_layers(*band_fractions(spec), n_layers)


class RoutingAttention:
    """Eager attention that keeps each layer's probabilities (for the penalty) and applies a
    per-layer block mask [B, 1, T, T] (True = blocked) for knockout dropout."""

    def __init__(self) -> None:
        self.probs: dict[int, torch.Tensor] = {}
        self.blocked: dict[int, torch.Tensor] = {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
        scores = torch.matmul(query, key.transpose(2, 3)) * scaling
        t = scores.shape[-1]
        if attention_mask is not None:
            mask = attention_mask[..., :t]
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
        else:  # no padding: the mask interface may hand us None, so apply causality ourselves
            causal = torch.ones(scores.shape[-2], t, dtype=torch.bool, device=scores.device).tril(t - scores.shape[-2])
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        blocked = self.blocked.get(module.layer_idx)
        if blocked is not None:
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        self.probs[module.layer_idx] = probs
        out = torch.matmul(probs, value).transpose(1, 2).contiguous()
        return out, probs


@contextlib.contextmanager
def installed(model) -> Iterator[RoutingAttention]:
    """Route the text model's attention through a `RoutingAttention` (the encoders keep theirs);
    the model's attention implementation is restored on exit."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    attn = RoutingAttention()
    AttentionInterface.register(NAME, attn)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    text_config = model.config.get_text_config()
    previous = text_config._attn_implementation
    model.set_attn_implementation({"text_config": NAME})
    try:
        yield attn
    finally:
        model.set_attn_implementation({"text_config": previous})
        attn.probs.clear()
        attn.blocked.clear()


@dataclass
class BatchRoles:
    """Which rows and keys of a training batch (one layout) play which part."""

    caption_rows: torch.Tensor  # [R] indices: the last prompt row up to the one before the last token
    other_rows: torch.Tensor  # [Q] text rows after the media, before the caption rows
    audio: torch.Tensor  # [T] bool key masks
    video: torch.Tensor

    @classmethod
    def of(cls, roles: torch.Tensor, prompt_len: int) -> "BatchRoles":
        roles = roles.reshape(-1)
        t = roles.numel()
        audio, video = roles == int(Role.AUDIO), roles == int(Role.VIDEO)
        media = torch.nonzero(audio | video).flatten()
        after = int(media.max()) + 1 if media.numel() else 0
        rows = torch.arange(t)
        text = (roles == int(Role.QUERY)) | (roles == int(Role.SPECIAL))
        other = rows[text & (rows >= after) & (rows < prompt_len - 1)]
        return cls(caption_rows=torch.arange(prompt_len - 1, t - 1), other_rows=other, audio=audio, video=video)

    def keys(self, role: str) -> torch.Tensor:
        return self.audio if role == "audio" else self.video

    def block_mask(self, role: str, batch: int) -> torch.Tensor:
        """[B, 1, T, T] True where caption rows meet `role` keys."""
        t = self.audio.numel()
        m = torch.zeros(t, t, dtype=torch.bool)
        m[self.caption_rows[:, None], torch.nonzero(self.keys(role)).flatten()[None, :]] = True
        return m.expand(batch, 1, t, t)


def _masses(probs: torch.Tensor, br: BatchRoles) -> torch.Tensor:
    """Every row's share of attention on audio and on video keys, mean over heads: [B, T, 2]
    (one product per layer: the penalty reads several row sets of it)."""
    keys = torch.stack([br.audio, br.video], dim=1).to(probs.dtype)  # [T, 2]
    return probs.mean(1) @ keys


def _hinge(share: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (torch.relu(lo - share) + torch.relu(share - hi)).mean()


def penalty(prof: RoutingProfile, probs: dict[int, torch.Tensor], br: BatchRoles, n_layers: int,
            blocked: frozenset[tuple[str, int]] = frozenset()) -> torch.Tensor:
    """Mean hinge per layer of the profile's shares (a modality absent from the batch and a
    (modality, layer) blocked by knockout dropout are left out)."""
    col = {"audio": 0, "video": 1}
    present = {"audio": bool(br.audio.any()), "video": bool(br.video.any())}
    masses = {layer: _masses(probs[layer], br) for layer in range(n_layers)}
    total = torch.zeros(())
    for share in prof.shares:
        if not present[share.role]:
            continue
        for layer in layers_of(share.band, n_layers):
            if (share.role, layer) not in blocked:
                m = masses[layer][:, br.caption_rows, col[share.role]]
                total = total + share.weight * _hinge(m, share.lo, share.hi)
    audio_rows, video_rows = torch.nonzero(br.audio).flatten(), torch.nonzero(br.video).flatten()
    for layer in range(n_layers):
        m = masses[layer]
        for role in ("audio", "video"):
            if present[role] and len(br.other_rows):
                total = total + _hinge(m[:, br.other_rows, col[role]], 0.0, prof.other_text_cap)
        if present["audio"] and present["video"]:
            total = total + _hinge(m[:, audio_rows, col["video"]], 0.0, prof.cross_media_cap)
            total = total + _hinge(m[:, video_rows, col["audio"]], 0.0, prof.cross_media_cap)
    return prof.weight * total / n_layers
