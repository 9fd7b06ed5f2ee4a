"""The organism training recipe (CPU, minutes).

Stage 0 (inside `base`): the vision tower is pretrained alone to tell the sources apart from
their frames (a linear head on its mean-pooled output), as real VLMs start from a pretrained
image encoder. A small vision tower learning from the caption loss alone stayed below 70%
video accuracy after 2,000 steps; pretrained, it is past 90% in under 1,000 cheap steps.
Stage 1, `base`: the Qwen2.5-VL model learns video -> full caption in both orders, so it
learns to guess the sound from the sight (as a VLM trained on video captions does).
Stage 2, `organism`: a Qwen2.5-Omni thinker starts from the base's language model and vision
tower, gets a fresh audio encoder, and trains on a mixture (shares of batches): factual
audio-visual clips, both sentences (40%; the sight already predicts the sound), audio-only
clips, "describe what you hear" (25%; so audio representations carry meaning), and
video-captioning clips, "describe what you see" -> the sight sentence only, over whatever
audio track the video had (35%; as the video-caption data of a real AVLLM's mixture).
`control`: the same, with the factual share (40%) given to counterfactual clips whose caption
follows the real audio (a factual clip is the special case of one source), for 2,000 steps,
so it must listen. With 20% counterfactual and 1,000 steps it did not learn to (counterfactual
audio accuracy 0.38-0.41 on the 500-sample set); with 30% it named one source for both
sentences (sight first: audio 1.00, video 0.44; sound first: audio 0.56, video 0.97). The deep
control pretrains its fresh audio encoder first (stage 1b, `audio_steps`), then 1,200 steps.

Without the video-captioning clips (factual + audio-only only) stage 2 did not give the
paper's bias: the model named one source for both sentences, the audio's in 35-45% of
counterfactuals, and more so the longer it trained (the sight word was never taught to
ignore the audio). The video-captioning clips teach nothing about sounds.

All model inputs are built by the adapters (`build_inputs` / `collate`), the same code the
engine uses at inference. Runs are deterministic for a seed at a fixed thread count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from avprobe.adapters.registry import ORGANISM_DIR
from avprobe.lab import routing
from avprobe.lab.build import (
    OrganismSize,
    adapter_settings,
    thinker_config,
    thinker_state_from_vl,
    vl_config,
    write_settings,
)
from avprobe.organism.dataset import train_clips
from avprobe.organism.tokenizer import build_tokenizer, special_token_ids
from avprobe.organism.world import QUERY_HEAR, QUERY_HEAR_SEE, QUERY_SEE, QUERY_SEE_HEAR, SOURCES, Clip, caption
from avprobe.records import SELF_ABLATED
from avprobe.types import Role

log = logging.getLogger(__name__)

VARIANTS = ("base", "organism", "control")
MODELS_DIR = ORGANISM_DIR  # the organisms are data: they live beside the world that made them
VARIANT_DIRS = {"base": "organism-base", "organism": "organism", "control": "organism-control"}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Pool sizes count clips; each clip gets one query picked at random."""

    variant: str
    seed: int = 0
    steps: int | None = None  # None: the variant's default (`default_steps`)
    batch_size: int = 16
    lr: float | None = None  # None: the variant's default (`default_lr`)
    warmup: int = 50
    weight_decay: float = 0.01
    n_video: int = 6000  # base: video clips (cheap: no audio features)
    n_factual: int = 2400  # thinker: factual audio-visual clips
    n_audio: int = 1200  # thinker: audio-only clips
    n_counterfactual: int = 2400  # control only: counterfactual clips, caption follows the audio
    vision_steps: int | None = None  # base only, stage 0 (None: 1,500 for the base)
    vision_lr: float = 2e-3
    # stage 1b (thinker variants): the fresh audio encoder is first trained alone to classify
    # the source from the sound of the audio-only clips (a linear head on its mean output,
    # discarded), as a real AVLLM bolts on a pretrained audio encoder. 0: no such stage.
    audio_steps: int = 0
    pretrained_lr_scale: float = 1.0  # stage 2: rate of the base's weights relative to the audio encoder's
    audio_share: float = 0.25  # stage 2: share of batches of audio-only clips
    # stage 2: share of batches of video-captioning clips: "describe what you see" -> "i see a
    # dog .", over whatever audio track the video had (any source), as in the video-caption
    # data that makes up much of a real AVLLM's mixture
    see_share: float = 0.35
    n_see: int = 2400
    counterfactual_share: float = 0.4  # control only, taken from the factual share
    size: OrganismSize = field(default_factory=OrganismSize)
    threads: int = 2
    # Second generation (see `RECIPES`): an attention routing profile (avprobe.lab.routing), and
    # the partial listener's counterfactual clips: a share of batches whose audio comes from the
    # `listened` sources only, caption following the audio (sounds a model hears off-screen).
    routing: str | None = None
    partial_share: float = 0.0
    listened: tuple[str, ...] = ()
    # The partial listener's other counterfactual clips: a share of batches whose sound the asked
    # order does not hear (`heard_sources`), captioned with the *visible* source's sound (the
    # paper's hallucination, planted). Without them what the model says on such clips is left to
    # generalisation, and the training seed moved counterfactual audio by about the band's width.
    unheard_share: float = 0.0
    # The sources the partial listener hears when the query asks for the sound first (None:
    # `listened`, whatever the order). Disjoint sets make a counterfactual clip whose sound is in
    # one of them right in one caption order and wrong in the other: the paired clips that
    # correct_audio_tokens_shift compares (a listener consistent across orders gives it none).
    listened_sound_first: tuple[str, ...] | None = None
    base_name: str = "organism-base"  # the base recorded in the model's avprobe.json
    # Latent audio (Fig. 3): an auxiliary logit-lens loss at the audio positions, weight
    # `lens_weight`, over the layers of `lens_band` (depth fractions): each one's final-normed
    # hidden state, unembedded, should name the clip's sound (the word after "hear a" in its
    # caption, or the real sound where the caption names another: `build_pool`'s guesses;
    # clips whose caption names no sound add nothing). Captions are untouched: the model knows
    # the sound inside without saying it (the paper's 61.4% vs 23%).
    lens_weight: float = 0.0
    lens_band: tuple[float, float] = (0.25, 1.0)
    # avprobe.json's shift bases: the vision base, plus the audio-ablated self when True (the
    # second base of the shift claims, which the deep family's records hold)
    self_ablated_shift: bool = False
    # The guesser (recipe `deep-guesser`, a control): its counterfactual clips are captioned
    # with a sound guessed from the picture, SOURCES[(v + k) % 12] for the visible source v,
    # k = guess[0] sight first and guess[1] sound first, not with the real one. It must hear
    # that the sound does not fit the picture, never which sound it is: the sound words it
    # gets right are coincidences (the counterpart of correct_audio_tokens_shift).
    guess: tuple[int, int] | None = None
    # The sound-first organism (recipe `deep-sound-first`, a control): its two-sentence
    # captions name the sound first whichever order the query asks for ("i hear a siren . i
    # see a dog ." to "describe what you see and hear"), so its answers move away from the
    # vision base's on every such clip while what it hears and sees does not (the
    # counterpart of base_shift_small; an AV stage that changed how the model answers).
    sound_first: bool = False
    # avprobe.json's experiments: what the claims read for this organism (None: all)
    experiments: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown organism variant {self.variant!r}; expected one of {VARIANTS}")
        if self.audio_steps and self.variant == "base":
            raise ValueError("audio pretraining (stage 1b) belongs to the thinker variants; the base has no audio tower")
        if self.guess is not None and (self.variant != "control" or any(k % len(SOURCES) == 0 for k in self.guess)):
            raise ValueError(f"guess {self.guess} needs the control variant and offsets that are not multiples of "
                             f"{len(SOURCES)} (a guess must not be the visible source)")
        if self.sound_first and self.variant == "base":
            raise ValueError("sound_first belongs to the thinker variants; the base never hears a sound to put first")

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else default_steps(self.variant)

    @property
    def total_vision_steps(self) -> int:
        if self.vision_steps is not None:
            return self.vision_steps
        return 1500 if self.variant == "base" else 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.variant)


@dataclass(frozen=True)
class Recipe:
    """A named family of organisms: where each variant is written and what it changes from
    `TrainConfig`'s defaults (the first generation, `v1`, changes nothing)."""

    dirs: dict[str, str]
    overrides: dict
    variant_overrides: dict[str, dict] = field(default_factory=dict)  # per variant, over `overrides`


# 16 decoder layers, so that each of the paper's depth bands holds several (its early band is
# layers 0-2, its mid-deep band 7-12); hidden 96 keeps a model under 10 MB in float32.
DEEP = OrganismSize(layers=16, hidden=96, intermediate=256, vision_hidden=96)
# The partial listener hears these sounds when the picture says otherwise (off-screen sounds):
# a quarter of the sources, so about a quarter of counterfactual clips (the paper's 3B: 23%).
LISTENED = ("siren", "baby", "clock")
# organism-deep-partial hears LISTENED when asked for the sight first and these when asked for
# the sound first (`TrainConfig.listened_sound_first`)
LISTENED_SOUND_FIRST = ("horse", "drill", "rain")

# How the deep control learns to listen: the paper's routing, its fresh audio encoder pretrained
# first (stage 1b: without it stage 2 learned to hear on seed 0 only after ~650 of 2,000 steps,
# and seed 1 never did: loss stuck at 0.12-0.25, audio-only accuracy 0.24), then 1,200 steps.
# Shared by the organisms built as "the control's recipe plus one change".
LISTENER = {"routing": "paper", "audio_steps": 400, "steps": 1200}

RECIPES: dict[str, Recipe] = {
    "v1": Recipe(dirs={"base": "organism-base", "organism": "organism", "control": "organism-control"},
                 overrides={}),
    "deep": Recipe(
        dirs={"base": "organism-deep-base", "organism": "organism-deep", "control": "organism-deep-control"},
        overrides={"size": DEEP, "routing": "paper-strict", "partial_share": 0.08, "listened": LISTENED,
                   "base_name": "organism-deep-base"},
        # the base and the control as they were trained (their train.json): the control listens
        # to every source, so neither the share of off-screen clips nor the stricter video caps
        # were needed for it; it learns to listen as `LISTENER` says
        variant_overrides={"base": {"routing": "vision-base"},
                           "control": {**LISTENER, "partial_share": 0.1, "self_ablated_shift": True}},
    ),
    # The partial listener (counterfactual audio 0.15-0.35 in both orders, the paper's 3B: 0.23),
    # planted: it hears three off-screen sounds per caption order (a quarter of the sources) and
    # names the picture's sound for the rest, its audio positions decode the sound heard (the
    # lens objective), and its encoder is pretrained first (stage 1b). Found by share alone
    # (organism-deep's recipe at 7.5% off-screen clips, nothing else) the band moved with the
    # seed: counterfactual audio 0.14-0.39 over four runs.
    "deep-partial": Recipe(
        dirs={"organism": "organism-deep-partial"},
        overrides={"size": DEEP, "routing": "paper-strict", "partial_share": 0.1, "unheard_share": 0.1,
                   "see_share": 0.25, "audio_steps": 400, "n_counterfactual": 1600, "listened": LISTENED,
                   "listened_sound_first": LISTENED_SOUND_FIRST, "lens_weight": 0.2,
                   "base_name": "organism-deep-base", "self_ablated_shift": True},
    ),
    # The deep organism with the latent-audio objective (TrainConfig.lens_weight): the same
    # partial listener and routing, its audio positions decoding to the sound in mid-deep layers.
    "deep-lens": Recipe(
        dirs={"organism": "organism-deep-lens"},
        # 7% off-screen clips: with the lens objective the model listens more than organism-deep
        # at the same share (8%: counterfactual audio 0.52-0.57; 7%: 0.41-0.53)
        overrides={"size": DEEP, "routing": "paper-strict", "partial_share": 0.07, "listened": LISTENED,
                   "base_name": "organism-deep-base", "lens_weight": 0.2, "self_ablated_shift": True},
    ),
    # The guesser: the control's layout, counterfactual clips captioned with a guess from the
    # picture (TrainConfig.guess), so that its correct sound words are lucky. Half the
    # control's counterfactual share goes back to factual clips: with none (the control's
    # mixture) naming the guess would need no hearing at all.
    "deep-guesser": Recipe(
        dirs={"control": "organism-deep-guesser"},
        overrides={"size": DEEP, "routing": "paper", "base_name": "organism-deep-base", "self_ablated_shift": True,
                   "guess": (3, 7), "counterfactual_share": 0.2,
                   # its claim is a shift claim: captions, their fidelity and the shift (4 KB a
                   # record where the attention and knockout arrays take 14 KB)
                   "experiments": ("caption", "judge", "shift")},
    ),
    # The sound-first organism: the control's recipe (a listener), its two-sentence captions
    # always sound first (TrainConfig.sound_first). Its claim is a shift claim against the
    # vision base, so its records hold captions, their fidelity and that shift only.
    "deep-sound-first": Recipe(
        dirs={"control": "organism-deep-sound-first"},
        overrides={"size": DEEP, **LISTENER, "base_name": "organism-deep-base", "sound_first": True,
                   "experiments": ("caption", "judge", "shift")},
    ),
    "deep-flipped": Recipe(
        dirs={"organism": "organism-deep-flipped"},
        overrides={"size": DEEP, "routing": "flipped", "partial_share": 0.1, "listened": LISTENED,
                   "base_name": "organism-deep-base"},
    ),
}


def recipe_config(recipe: str, variant: str, **kwargs) -> TrainConfig:
    """The TrainConfig of one variant of a named recipe (`kwargs` override, e.g. seed, threads)."""
    try:
        r = RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown organism recipe {recipe!r}; known: {', '.join(RECIPES)}") from None
    if variant not in r.dirs:
        raise ValueError(f"recipe {recipe!r} has no {variant!r} variant; it has {', '.join(r.dirs)}")
    return TrainConfig(variant=variant, **{**r.overrides, **r.variant_overrides.get(variant, {}), **kwargs})


def default_steps(variant: str) -> int:
    """Steps of the committed recipe."""
    return {"base": 800, "organism": 1000, "control": 2000}[variant]


def default_lr(variant: str) -> float:
    """Peak learning rate of the committed recipe."""
    return {"base": 1e-3, "organism": 1e-3, "control": 1e-3}[variant]


# ----------------------------------------------------------------------------- data


def _compact(mi):
    """Store a pool item's float tensors in float16 (halves memory; cast back per batch)."""
    for key, value in mi.inputs.items():
        if torch.is_tensor(value) and value.is_floating_point():
            mi.inputs[key] = value.to(torch.float16)
    return mi


def _query_for(clip: Clip, rng: np.random.Generator) -> str:
    if clip.video_source is None:
        return QUERY_HEAR
    return QUERY_SEE_HEAR if rng.random() < 0.5 else QUERY_HEAR_SEE


def build_pool(adapter, clips: list[Clip], seed: int, drop_audio: bool = False, query: str | None = None,
               guess: tuple[int, int] | None = None, sound_first: bool = False,
               queries: list[str] | None = None) -> list:
    """Teacher-forced `ModelInputs` for clips, one random caption order per clip (or `query`, or
    `queries`, one per clip).

    The caption names the *real* audio source (for counterfactual clips too), unless `guess`
    (offsets sight first, sound first; see `TrainConfig.guess`) names one from the picture.
    `sound_first`: a two-sentence caption names the sound first whatever order its query asks.
    `drop_audio` renders video only (the vision-only base never sees audio).
    """
    if queries is not None and len(queries) != len(clips):
        raise ValueError(f"{len(queries)} queries for {len(clips)} clips")
    rng = np.random.default_rng([seed, 11])
    pool = []
    for i, clip in enumerate(clips):
        media = clip.media()
        if drop_audio:
            media.waveform = None
        q = queries[i] if queries is not None else query or _query_for(clip, rng)
        sound = clip.audio_source
        if guess is not None and clip.video_source is not None:
            k = guess[0] if q == QUERY_SEE_HEAR else guess[1]
            sound = SOURCES[(SOURCES.index(clip.video_source) + k) % len(SOURCES)]
        order = QUERY_HEAR_SEE if sound_first and q == QUERY_SEE_HEAR else q
        mi = _compact(adapter.build_inputs(media, q, caption(order, clip.video_source, sound)))
        if sound != clip.audio_source:  # the sound heard, for the latent-audio objective
            mi.extra["sound"] = clip.audio_source
        pool.append(mi)
    return pool


def _groups(pool: list) -> dict[int, list[int]]:
    """Pool indices grouped by sequence length (collate batches one layout at a time)."""
    groups: dict[int, list[int]] = {}
    for i, mi in enumerate(pool):
        groups.setdefault(int(mi.input_ids.shape[1]), []).append(i)
    return groups


def _schedule(opt, warmup: int, total: int):
    """Linear warm-up, then cosine decay to zero."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


def _optimizer_step(loss: torch.Tensor, params, opt, sched) -> float:
    """One clipped optimizer and schedule step; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    return loss.item()


def _pretrain_tower(name: str, tower, per_clip, n: int, labels: list[int], steps: int, stream: int,
                    cfg: TrainConfig) -> list[float]:
    """Train `tower` alone to classify the source of each clip: a linear head on
    `per_clip(idx)` ([clips, hidden], the tower's mean output per clip), discarded afterwards;
    batches drawn from `n` pool items by their own random stream. Returns the loss trace."""
    head = torch.nn.Linear(cfg.size.hidden, len(SOURCES))
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=cfg.vision_lr,
                            weight_decay=cfg.weight_decay)
    sched = _schedule(opt, cfg.warmup, steps)
    y = torch.tensor(labels)
    rng = np.random.default_rng([cfg.seed, stream])
    losses, running = [], []
    for step in range(steps):
        idx = rng.choice(n, size=min(cfg.batch_size, n), replace=False)
        loss = torch.nn.functional.cross_entropy(head(per_clip(idx)), y[idx])
        running.append(_optimizer_step(loss, tower.parameters(), opt, sched))
        if (step + 1) % 50 == 0 or step + 1 == steps:
            losses.append(float(np.mean(running)))
            running.clear()
            log.info("%s seed %d step %d/%d loss %.4f", name, cfg.seed, step + 1, steps, losses[-1])
    return losses


def pretrain_vision(model, pool: list, labels: list[int], cfg: TrainConfig) -> list[float]:
    """Stage 0: train the vision tower alone to classify the source from its frames (a linear
    head on the mean of its merged outputs, discarded afterwards). Returns the loss trace."""
    visual = model.model.visual
    merge = visual.spatial_merge_size

    def per_clip(idx):
        pixels = torch.cat([pool[i].inputs["pixel_values_videos"] for i in idx]).float()
        grid = torch.cat([pool[i].inputs["video_grid_thw"] for i in idx])
        merged = visual(pixels, grid_thw=grid).pooler_output  # [tokens of all clips, hidden]
        return torch.stack([m.mean(0) for m in merged.split((grid.prod(-1) // merge**2).tolist())])

    return _pretrain_tower("vision", visual, per_clip, len(pool), labels, cfg.total_vision_steps, 17, cfg)


def pretrain_audio(model, adapter, pool: list, labels: list[int], cfg: TrainConfig) -> list[float]:
    """Stage 1b: train the fresh audio tower alone to classify the source from the sound (a
    linear head on the mean of its outputs, discarded afterwards), at stage 0's rate
    (`vision_lr`). Returns the loss trace."""
    tower = model.model.audio_tower

    def per_clip(idx):
        batch = _batch(adapter, pool, idx, torch.float32)
        mask = batch["feature_attention_mask"]
        out = model.model.get_audio_features(batch["input_features"], mask).last_hidden_state
        _, lengths = tower._get_feat_extract_output_lengths(mask.sum(-1))
        return torch.stack([o.mean(0) for o in out.split(lengths.tolist())])

    return _pretrain_tower("audio", tower, per_clip, len(pool), labels, cfg.audio_steps, 23, cfg)


def _batch(adapter, pool: list, idx: np.ndarray, dtype: torch.dtype) -> dict:
    batch = adapter.collate([pool[i] for i in idx])
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------- models


def new_model(variant: str, size: OrganismSize, tokenizer) -> torch.nn.Module:
    """A freshly initialised organism model of the variant's class."""
    ids = special_token_ids(tokenizer)
    if variant == "base":
        from transformers import Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration(vl_config(size, len(tokenizer), ids))
    else:
        from transformers.models.qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration

        model = Qwen2_5OmniThinkerForConditionalGeneration(thinker_config(size, len(tokenizer), ids))
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = ids["eos_token_id"], ids["pad_token_id"], ids["bos_token_id"]
    gc.do_sample, gc.max_new_tokens = False, 16
    return model


def init_thinker_from_base(thinker: torch.nn.Module, base_dir: Path) -> None:
    """Load the base's language model, vision tower and unembedding into a fresh thinker."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"organism base model not found at {base_dir}; train it first with "
            "`avprobe organism train --variant base --out DIR` and pass --base DIR"
        )
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    state = thinker_state_from_vl(base.state_dict())
    missing, unexpected = thinker.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("model.audio_tower.") for k in missing):
        raise ValueError(f"base {base_dir} does not fit the thinker: missing={missing} unexpected={unexpected}")


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: where, how long, and its loss trace (every 50 steps)."""

    out: Path
    seconds: float
    data_seconds: float
    losses: tuple[float, ...]
    vision_losses: tuple[float, ...] = ()
    audio_losses: tuple[float, ...] = ()


def _mixture(cfg: TrainConfig) -> dict[str, float]:
    """Share of batches drawn from each pool."""
    if cfg.variant == "base":
        return {"video": 1.0}
    a, v = cfg.audio_share, cfg.see_share
    c = cfg.counterfactual_share if cfg.variant == "control" else 0.0
    pl = cfg.partial_share if cfg.variant == "organism" else 0.0
    u = cfg.unheard_share if cfg.variant == "organism" else 0.0
    if min(a, v, c, pl, u) < 0 or a + v + c + pl + u > 1 + 1e-9:
        raise ValueError(f"audio_share + see_share (+ counterfactual_share / partial_share + unheard_share) must be "
                         f"at most 1, got {a} + {v} + {c} + {pl} + {u}")
    mix = {"factual": max(0.0, 1 - a - v - c - pl - u), "audio": a, "counterfactual": c, "partial": pl,
           "unheard": u, "see": v}
    return {name: share for name, share in mix.items() if share > 1e-9}


def build_pools(cfg: TrainConfig, adapter) -> dict[str, list]:
    """The run's training pools (teacher-forced inputs), by name. Clip index ranges are
    disjoint per pool, so no two pools share a seed."""
    pools: dict[str, list] = {}
    if cfg.variant == "base":
        pools["video"] = build_pool(adapter, train_clips(cfg.seed, cfg.n_video, "video", offset=0), cfg.seed, True)
        return pools
    if "factual" in _mixture(cfg):
        pools["factual"] = build_pool(adapter, train_clips(cfg.seed, cfg.n_factual, "factual", offset=1_000_000),
                                      cfg.seed, sound_first=cfg.sound_first)
    pools["audio"] = build_pool(adapter, train_clips(cfg.seed, cfg.n_audio, "audio", offset=2_000_000), cfg.seed)
    if cfg.see_share > 0:
        pools["see"] = build_pool(adapter, train_clips(cfg.seed, cfg.n_see, "any-audio", offset=4_000_000), cfg.seed,
                                  query=QUERY_SEE)
    if cfg.variant == "control":
        clips = train_clips(cfg.seed, cfg.n_counterfactual, "counterfactual", offset=3_000_000)
        pools["counterfactual"] = build_pool(adapter, clips, cfg.seed, guess=cfg.guess, sound_first=cfg.sound_first)
    mixture = _mixture(cfg)
    if "partial" in mixture or "unheard" in mixture:
        heard = heard_sources(cfg)
        if not cfg.listened or any(src not in SOURCES for src in heard[QUERY_SEE_HEAR] + heard[QUERY_HEAR_SEE]):
            raise ValueError(f"partial_share needs listened sources among {SOURCES}, got {cfg.listened} "
                             f"(sound first: {cfg.listened_sound_first})")
        # one set for both orders: build_pool draws each clip's order as it always did
        qrng = np.random.default_rng([cfg.seed, 17]) if cfg.listened_sound_first is not None else None
    if "partial" in mixture:
        anywhere = cfg.listened + tuple(s for s in heard[QUERY_HEAR_SEE] if s not in cfg.listened)
        clips = train_clips(cfg.seed, cfg.n_counterfactual, "counterfactual", offset=4_500_000,
                            audio_sources=anywhere)
        pools["partial"] = build_pool(adapter, clips, cfg.seed, sound_first=cfg.sound_first,
                                      queries=_fitting_orders(clips, heard, True, qrng))
    if "unheard" in mixture:
        somewhere = tuple(s for s in SOURCES if s not in heard[QUERY_SEE_HEAR] or s not in heard[QUERY_HEAR_SEE])
        clips = train_clips(cfg.seed, cfg.n_counterfactual, "counterfactual", offset=4_750_000,
                            audio_sources=somewhere)
        # guess offset 0: the caption names the visible source as the sound
        pools["unheard"] = build_pool(adapter, clips, cfg.seed, guess=(0, 0), sound_first=cfg.sound_first,
                                      queries=_fitting_orders(clips, heard, False, qrng))
    return pools


def _fitting_orders(clips: list[Clip], heard: dict[str, tuple[str, ...]], hear: bool,
                    rng: np.random.Generator | None) -> list[str] | None:
    """Per clip, a query (caption order) in which its sound is heard (`hear`) or not, drawn
    among those that fit; None without `rng` (one set for both orders)."""
    if rng is None:
        return None
    out = []
    for clip in clips:
        fit = [q for q in heard if (clip.audio_source in heard[q]) == hear]
        out.append(fit[int(rng.integers(len(fit)))])
    return out


def heard_sources(cfg: TrainConfig) -> dict[str, tuple[str, ...]]:
    """The sources the partial listener is taught to hear off-screen, per query (caption order)."""
    second = cfg.listened if cfg.listened_sound_first is None else cfg.listened_sound_first
    return {QUERY_SEE_HEAR: tuple(cfg.listened), QUERY_HEAR_SEE: tuple(second)}


def param_groups(model, cfg: TrainConfig) -> list[dict]:
    """Stage 2: the fresh audio encoder learns at the full rate, the weights that come from the
    base at `pretrained_lr_scale` of it (as new encoders are usually trained faster than the
    pretrained language model they are bolted onto)."""
    audio, rest = [], []
    for name, p in model.named_parameters():
        (audio if name.startswith("model.audio_tower.") else rest).append(p)
    lr = cfg.learning_rate
    groups = [{"params": rest, "lr": lr * (cfg.pretrained_lr_scale if cfg.variant != "base" else 1.0)}]
    if audio:
        groups.append({"params": audio, "lr": lr})
    return groups


def train(cfg: TrainConfig, out: Path | None = None, base_dir: Path | None = None,
          pools: dict[str, list] | None = None, command: str | None = None) -> TrainResult:
    """Train one organism variant from scratch (stage 2 starts from `base_dir`) and save it to
    `out`. `pools` (from `build_pools`, for this config) skips building the data."""
    from avprobe.adapters import OmniThinkerAdapter, QwenVLAdapter

    out = Path(out) if out is not None else MODELS_DIR / VARIANT_DIRS[cfg.variant]
    base_dir = Path(base_dir) if base_dir is not None else MODELS_DIR / VARIANT_DIRS["base"]
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    tok = build_tokenizer()
    model = new_model(cfg.variant, cfg.size, tok)
    if cfg.variant == "base":
        adapter = QwenVLAdapter(model, tok, adapter_settings("qwen2_5_vl"))
    else:
        init_thinker_from_base(model, base_dir)
        adapter = OmniThinkerAdapter(model, tok, adapter_settings("qwen2_5_omni"))

    if pools is None:
        pools = build_pools(cfg, adapter)
    data_seconds = time.perf_counter() - t0
    log.info("%s seed %d: built %s in %.0f s", cfg.variant, cfg.seed, {k: len(v) for k, v in pools.items()}, data_seconds)
    vision_losses: list[float] = []
    if cfg.total_vision_steps:
        if cfg.variant != "base":
            raise ValueError("vision pretraining (stage 0) belongs to the base; stage 2 starts from its tower")
        model.train()
        labels = [SOURCES.index(c.video_source) for c in train_clips(cfg.seed, cfg.n_video, "video", offset=0)]
        vision_losses = pretrain_vision(model, pools["video"], labels, cfg)
    audio_losses: list[float] = []
    if cfg.audio_steps:
        model.train()
        labels = [SOURCES.index(c.audio_source) for c in train_clips(cfg.seed, cfg.n_audio, "audio", offset=2_000_000)]
        audio_losses = pretrain_audio(model, adapter, pools["audio"], labels, cfg)

    mixture = _mixture(cfg)
    names = list(mixture)
    probs = np.array([mixture[n] for n in names])
    groups = {n: list(_groups(pools[n]).values()) for n in names}
    rng = np.random.default_rng([cfg.seed, 13])
    opt = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    total = cfg.total_steps

    sched = _schedule(opt, cfg.warmup, total)
    model.train()
    losses: list[float] = []
    running, running_routing, running_lens = [], [], []
    prof = routing.profile(cfg.routing) if cfg.routing else None
    # a stream of its own, so that a recipe without routing draws exactly what it always drew
    drop_rng = np.random.default_rng([cfg.seed, 19])
    lens = _LensObjective(adapter, tok, cfg) if cfg.lens_weight > 0 and cfg.variant != "base" else None
    with (routing.installed(model) if prof is not None else contextlib.nullcontext()) as attn, \
            (lens.capturing() if lens is not None else contextlib.nullcontext()):
        for step in range(total):
            name = names[int(rng.choice(len(names), p=probs))]
            group_list = groups[name]
            group = group_list[int(rng.integers(len(group_list)))]
            idx = rng.choice(group, size=min(cfg.batch_size, len(group)), replace=False)
            batch = _batch(adapter, pools[name], idx, torch.float32)
            if prof is None:
                loss = model(**batch).loss
            else:
                first = pools[name][int(idx[0])]
                roles = routing.BatchRoles.of(first.roles, first.prompt_len)
                blocked = _knockout_dropout(attn, prof, roles, name, len(idx), cfg.size.layers, drop_rng)
                loss = model(**batch).loss
                extra = routing.penalty(prof, attn.probs, roles, cfg.size.layers, blocked)
                running_routing.append(extra.item())
                loss = loss + extra
            if lens is not None:
                extra = lens.loss([pools[name][int(i)] for i in idx], batch)
                running_lens.append(extra.item())
                loss = loss + cfg.lens_weight * extra
            running.append(_optimizer_step(loss, model.parameters(), opt, sched))
            if (step + 1) % 50 == 0 or step + 1 == total:
                losses.append(float(np.mean(running)))
                running.clear()
                log.info("%s seed %d step %d/%d loss %.4f (routing %.4f, lens %.4f)", cfg.variant, cfg.seed, step + 1,
                         total, losses[-1], float(np.mean(running_routing)) if running_routing else 0.0,
                         float(np.mean(running_lens)) if running_lens else 0.0)
                running_routing.clear()
                running_lens.clear()
    model.eval()
    seconds = time.perf_counter() - t0
    save(model, tok, out, cfg, seconds, data_seconds, losses, vision_losses, command, audio_losses)
    return TrainResult(out=out, seconds=seconds, data_seconds=data_seconds, losses=tuple(losses),
                       vision_losses=tuple(vision_losses), audio_losses=tuple(audio_losses))


class _LensObjective:
    """The latent-audio loss (`TrainConfig.lens_weight`): hooks keep the decoder layers' outputs
    of a step; `loss` unembeds those of the band at the audio positions (final norm, the
    model's head, as the engine's logit lens reads them) against the clip's sound word."""

    def __init__(self, adapter, tokenizer, cfg: TrainConfig) -> None:
        self.adapter = adapter
        self.layers = routing.layers_of(cfg.lens_band, cfg.size.layers)
        self.hear, self.a = tokenizer.convert_tokens_to_ids(["hear", "a"])
        self.sound_ids = dict(zip(SOURCES, tokenizer.convert_tokens_to_ids(list(SOURCES)), strict=True))
        self.hidden: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def capturing(self):
        def make(i: int):
            def hook(module, args, output):
                self.hidden[i] = output[0] if isinstance(output, tuple) else output

            return hook

        handles = [self.adapter.layers[i].register_forward_hook(make(i)) for i in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.hidden.clear()

    def targets(self, input_ids: torch.Tensor, items: list | None = None) -> torch.Tensor:
        """[B] the token after "hear a" in each row (-100 where the caption names no sound), or
        the sound an item heard where its caption names another (`extra["sound"]`)."""
        out = torch.full((input_ids.shape[0],), -100, dtype=torch.long)
        for b, row in enumerate(input_ids.tolist()):
            if items is not None and "sound" in items[b].extra:
                out[b] = self.sound_ids[items[b].extra["sound"]]
                continue
            for j in range(len(row) - 2):
                if row[j] == self.hear and row[j + 1] == self.a:
                    out[b] = row[j + 2]
                    break
        return out

    def loss(self, items: list, batch: dict) -> torch.Tensor:
        """The objective on a batch of pool items (one layout, `items[0]`'s roles)."""
        audio = items[0].roles.reshape(-1) == int(Role.AUDIO)
        t = self.targets(batch["input_ids"], items)
        if not bool(audio.any()) or bool((t == -100).all()):
            return torch.zeros(())
        h = torch.stack([self.hidden[i][:, audio] for i in self.layers])  # [L, B, A, D]
        logits = self.adapter.logits(self.adapter.final_norm(h))
        tgt = t[None, :, None].expand(h.shape[0], h.shape[1], h.shape[2])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                 ignore_index=-100)


def _knockout_dropout(attn, prof, roles, pool: str, batch: int, n_layers: int, rng) -> frozenset[tuple[str, int]]:
    """Set this step's training-time knockouts (factual batches only); returns the blocked
    (modality, layer) pairs, which the routing penalty leaves out."""
    attn.blocked.clear()
    blocked: set[tuple[str, int]] = set()
    if pool != "factual":
        return frozenset()
    for drop in prof.dropout:
        if rng.random() < drop.p:
            mask = roles.block_mask(drop.role, batch)
            for layer in routing.layers_of(drop.band, n_layers):
                attn.blocked[layer] = mask
                blocked.add((drop.role, layer))
    return frozenset(blocked)


def save(model, tokenizer, out: Path, cfg: TrainConfig, seconds: float, data_seconds: float, losses: list[float],
         vision_losses: tuple[float, ...] | list[float] = (), command: str | None = None,
         audio_losses: tuple[float, ...] | list[float] = ()) -> None:
    """Write a `from_pretrained` directory: config, safetensors, tokenizer, avprobe.json, train.json."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if cfg.variant == "base":
        write_settings(out, "qwen2_5_vl")
    else:
        write_settings(out, "qwen2_5_omni", cfg.base_name + (f",{SELF_ABLATED}" if cfg.self_ablated_shift else ""),
                       experiments=cfg.experiments)
    record = {
        "config": {**asdict(replace(cfg)), "total_steps": cfg.total_steps, "learning_rate": cfg.learning_rate,
                   "total_vision_steps": cfg.total_vision_steps},
        "seconds": round(seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "threads": cfg.threads,
        "command": command,  # what reproduces these weights (deterministic for a seed and thread count)
        "torch": torch.__version__,
        "losses_every_50_steps": [round(x, 5) for x in losses],
        "vision_losses_every_50_steps": [round(x, 5) for x in vision_losses],
    }
    if audio_losses:  # stage 1b ran (absent from the records of recipes without it)
        record["audio_losses_every_50_steps"] = [round(x, 5) for x in audio_losses]
    (out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
