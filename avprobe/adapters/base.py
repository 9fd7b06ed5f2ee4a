"""The ModelAdapter interface: everything model-specific lives behind it.

An adapter knows how to (1) build model inputs for a decoded sample without torchvision,
(2) label every prompt position's role from token ids, (3) compute the model's explicit
(M-RoPE) positions, and (4) find its canonical parts: `layers`, `final_norm`, `unembed`,
`embed`, `text_model`. Probes and the engine speak only these canonical names.

Adapters are mostly data: subclasses fill `paths` and a few class attributes and override
only what their family does differently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from avprobe.media.decode import DEFAULT_FRAME_RULE, FRAME_RULES
from avprobe.media.processing import WHISPER_SECONDS, VisionSpec, audio_features, patchify_video
from avprobe.types import Media, Role

log = logging.getLogger(__name__)

# A prompt is a list of segments: text (tokenized) or explicit token ids (specials, media).
Segment = str | list[int]


@dataclass(frozen=True)
class AdapterSettings:
    """How a model is prompted. Saved as `avprobe.json` next to local weights."""

    use_audio_in_video: bool = True  # the paper's setting for Qwen2.5-Omni
    system_prompt: str | None = None
    fps: float = 2.0  # video frames sampled per second
    min_pixels: int | None = None  # None: the family's processor default
    max_pixels: int | None = None
    max_frames: int = 768
    base_model: str | None = None  # the vision-only base for the shift analysis
    judge: str | None = None  # the default fidelity judge for this model
    seconds_per_chunk: float = 2.0  # audio-in-video interleaving chunk (Qwen2.5-Omni)
    queries: tuple[str, ...] | None = None  # prompts to run (None: "describe what you see and hear")
    # Which source frames a decoded clip keeps (`avprobe.media.decode.sample_indices`):
    # "linspace" = linspace(0, total-1, n).round(), qwen-omni-utils' rule, which the paper's
    # release ran; "floor" = floor(i*total/n), transformers' Qwen2VLVideoProcessor. Only file
    # decoding uses it: the organisms' in-memory clips are rendered at `fps` and never sampled.
    frame_rule: str = DEFAULT_FRAME_RULE

    def __post_init__(self) -> None:
        if self.frame_rule not in FRAME_RULES:
            raise ValueError(f"frame_rule must be one of {', '.join(FRAME_RULES)}; got {self.frame_rule!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterSettings:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known - {"family"}
        if unknown:
            log.warning("ignoring unknown adapter settings: %s", sorted(unknown))
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("queries") is not None:
            kw["queries"] = tuple(kw["queries"])
        return cls(**kw)


@dataclass
class ModelInputs:
    """Inputs of one prompt (batch 1) plus per-position annotations.

    roles: [P] Role values; times: [P] seconds into the clip for video/audio positions,
    NaN elsewhere; positions: [3, 1, P] explicit rotary positions; labels: [1, P] with -100
    outside the answer (only when an answer was given, for training / teacher forcing).
    """

    inputs: dict[str, Any]
    roles: torch.Tensor
    times: torch.Tensor
    positions: torch.Tensor
    prompt_len: int
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def role_positions(self, role: Role) -> torch.Tensor:
        return torch.nonzero(self.roles == int(role)).flatten()


class ModelAdapter:
    """Base adapter. Subclasses set the class attributes and override the hooks."""

    family: ClassVar[str] = "base"
    architectures: ClassVar[tuple[str, ...]] = ()
    # canonical name -> attribute path on the loaded model
    paths: ClassVar[dict[str, str]] = {
        "text_model": "model.language_model",
        "layers": "model.language_model.layers",
        "final_norm": "model.language_model.norm",
        "embed": "model.language_model.embed_tokens",
        "unembed": "lm_head",
    }
    has_audio: ClassVar[bool] = True
    vision_defaults: ClassVar[dict[str, Any]] = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}
    # Rotary positions per second of media when the config does not say (see the property).
    default_position_id_per_seconds: ClassVar[float] = 25.0
    # WhisperFeatureExtractor's padding and truncation as the family's processor passes them:
    # Qwen2.5-Omni pads or cuts to the 30 s window, so a longer clip's audio ends at 30 s.
    audio_padding: ClassVar[str] = "max_length"
    audio_truncation: ClassVar[bool] = True

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        settings: AdapterSettings | None = None,
        name: str | None = None,
        revision: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or AdapterSettings()
        self.name = name or type(model).__name__
        self.revision = revision or "unknown"
        self.config = model.config
        self._specials = self._special_ids()

    # ---- canonical parts -------------------------------------------------------------
    def _get(self, canonical: str) -> Any:
        obj: Any = self.model
        for part in self.paths[canonical].split("."):
            obj = getattr(obj, part)
        return obj

    @property
    def text_model(self) -> nn.Module:
        return self._get("text_model")

    @property
    def layers(self) -> nn.ModuleList:
        return self._get("layers")

    @property
    def final_norm(self) -> nn.Module:
        return self._get("final_norm")

    @property
    def embed(self) -> nn.Module:
        return self._get("embed")

    @property
    def unembed(self) -> nn.Module:
        return self._get("unembed")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.text_config, self.config):
            eos = getattr(src, "eos_token_id", None) if src is not None else None
            if eos is None:
                continue
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
        im_end = self._token_id("<|im_end|>")
        if im_end is not None:
            ids.add(im_end)
        return ids

    # ---- tokens and roles ------------------------------------------------------------
    def _token_id(self, token: str) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return None if tid is None or tid == unk else int(tid)

    def _cfg(self, *names: str) -> int | None:
        for src in (self.config, getattr(self.config, "thinker_config", None)):
            for n in names:
                v = getattr(src, n, None) if src is not None else None
                if isinstance(v, int):
                    return v
        return None

    def _special_ids(self) -> dict[str, int | None]:
        return {
            "video": self._cfg("video_token_id", "video_token_index"),
            "audio": self._cfg("audio_token_id", "audio_token_index"),
            "image": self._cfg("image_token_id", "image_token_index"),
            "vision_start": self._cfg("vision_start_token_id"),
            "vision_end": self._cfg("vision_end_token_id"),
            "audio_start": self._cfg("audio_start_token_id"),
            "audio_end": self._cfg("audio_end_token_id"),
            "im_start": self._token_id("<|im_start|>"),
            "im_end": self._token_id("<|im_end|>"),
        }

    @property
    def position_id_per_seconds(self) -> float:
        """Rotary positions per second of media, as the model's `get_rope_index` reads them
        (`config.position_id_per_seconds`); the layout must use the same rate or audio and
        video slots receive each other's positions."""
        for src in (self.config, getattr(self.config, "thinker_config", None)):
            v = getattr(src, "position_id_per_seconds", None) if src is not None else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return self.default_position_id_per_seconds

    def special(self, name: str) -> int:
        tid = self._specials.get(name)
        if tid is None:
            raise ValueError(f"{self.name}: no id for special token {name!r} in config or tokenizer")
        return tid

    def label_roles(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Role of every position, from token ids alone (never from contiguous ranges)."""
        ids = input_ids.reshape(-1)
        roles = torch.full_like(ids, int(Role.QUERY))
        special_ids = {v for k, v in self._specials.items() if v is not None and k not in ("video", "audio", "image")}
        special_ids.update(int(i) for i in getattr(self.tokenizer, "all_special_ids", []) or [])
        for mod in ("video", "audio", "image"):
            special_ids.discard(self._specials.get(mod))
        if special_ids:
            roles[torch.isin(ids, torch.tensor(sorted(special_ids), device=ids.device))] = int(Role.SPECIAL)
        for name, role in (("video", Role.VIDEO), ("audio", Role.AUDIO), ("image", Role.IMAGE)):
            tid = self._specials.get(name)
            if tid is not None:
                roles[ids == tid] = int(role)
        return roles

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=True).strip()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ---- vision / audio preprocessing -------------------------------------------------
    def vision_spec(self) -> VisionSpec:
        vc = getattr(self.config, "vision_config", None)
        s = self.settings
        return VisionSpec(
            patch_size=int(getattr(vc, "patch_size", 14)),
            temporal_patch_size=int(getattr(vc, "temporal_patch_size", 2)),
            merge_size=int(getattr(vc, "spatial_merge_size", 2)),
            min_pixels=s.min_pixels or self.vision_defaults["min_pixels"],
            max_pixels=s.max_pixels or self.vision_defaults["max_pixels"],
            fps=s.fps,
            max_frames=s.max_frames,
        )

    def n_mels(self) -> int:
        ac = getattr(self.config, "audio_config", None)
        return int(getattr(ac, "num_mel_bins", 128))

    def audio_token_count(self, n_frames: int) -> int:
        return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1

    def second_per_grid(self, spec: VisionSpec, media: Media) -> float:
        """Seconds one temporal grid spans for the model's positions: what the upstream Omni
        processor sets, temporal_patch_size / the fps it is told (`settings.fps`), not the
        clip's effective sampling rate (a capped or rounded frame count does not move it)."""
        return spec.temporal_patch_size / self.settings.fps

    # ---- prompt construction ----------------------------------------------------------
    def media_segments(self, n_video: int, n_audio: int, video_times: np.ndarray) -> list[int]:
        """Token ids of the media block for n video and n audio tokens (family-specific);
        `video_times` are each video token's start on the model's time axis (grid * second_per_grid)."""
        raise NotImplementedError

    def prompt_segments(self, media_ids: list[int], query: str) -> list[Segment]:
        """ChatML: [system], user turn with the media block then the query, assistant opener."""
        im_start, im_end = self.special("im_start"), self.special("im_end")
        segs: list[Segment] = []
        if self.settings.system_prompt:
            segs += [[im_start], "system\n" + self.settings.system_prompt, [im_end], "\n"]
        segs += [[im_start], "user\n", media_ids, query, [im_end], "\n", [im_start], "assistant\n"]
        return segs

    def _tokenize_segments(self, segs: list[Segment]) -> list[int]:
        ids: list[int] = []
        for s in segs:
            ids += self.encode(s) if isinstance(s, str) else list(s)
        return ids

    def build_inputs(self, media: Media, query: str, answer: str | None = None) -> ModelInputs:
        """Model inputs for one sample and query (batch 1). `answer` appends a teacher-forced
        reply (plus the closing im_end) with labels on it."""
        tensors: dict[str, Any] = {}
        n_video = n_audio = 0
        grid_times = clip_times = np.zeros(0)
        spec = self.vision_spec()
        if media.frames is not None:
            frames = media.frames[: spec.max_frames]
            pv, grid = patchify_video(frames, spec)
            tensors["pixel_values_videos"] = pv.to(self.dtype)
            tensors["video_grid_thw"] = grid
            gt, gh, gw = (int(x) for x in grid[0])
            per_t = gh * gw // spec.merge_size**2
            n_video = gt * per_t
            second_per_grid = self.second_per_grid(spec, media)
            # the model's time axis (layout, positions) and the clip's (the `times` annotation)
            grid_times = np.repeat(np.arange(gt) * second_per_grid, per_t)
            clip_times = np.repeat(np.arange(gt) * (spec.temporal_patch_size / media.fps), per_t)
            tensors.update(self._video_time_kwargs(second_per_grid))
        if media.waveform is not None and self.has_audio:
            feats, fmask = audio_features(
                media.waveform, self.n_mels(), padding=self.audio_padding, truncation=self.audio_truncation
            )
            tensors["input_features"] = feats.to(self.dtype)
            tensors["feature_attention_mask"] = fmask
            n_audio = self.audio_token_count(int(fmask.sum()))
        if n_video == 0 and n_audio == 0:
            raise ValueError("sample has neither video frames nor (for this model) audio")
        media_ids = self.media_segments(n_video, n_audio, grid_times)
        ids = self._tokenize_segments(self.prompt_segments(media_ids, query))
        prompt_len = len(ids)
        labels = None
        if answer is not None:
            ans = self.encode(answer) + [self.special("im_end")]
            labels = torch.tensor([[-100] * prompt_len + ans])
            ids = ids + ans
        input_ids = torch.tensor([ids])
        tensors["input_ids"] = input_ids
        tensors["attention_mask"] = torch.ones_like(input_ids)
        tensors.update(self._forward_flags(has_video=n_video > 0, has_audio=n_audio > 0))
        roles = self.label_roles(input_ids)
        times = self._position_times(roles, clip_times, n_audio, media)
        mi = ModelInputs(
            inputs=tensors,
            roles=roles,
            times=times,
            positions=torch.zeros(0),
            prompt_len=prompt_len,
            labels=labels,
        )
        mi.positions = self.compute_positions(mi)
        return mi

    def _position_times(
        self, roles: torch.Tensor, video_times: np.ndarray, n_audio: int, media: Media
    ) -> torch.Tensor:
        times = torch.full(roles.shape, float("nan"))
        vpos = torch.nonzero(roles == int(Role.VIDEO)).flatten()
        if len(vpos):
            times[vpos] = torch.as_tensor(video_times, dtype=torch.float32)
        apos = torch.nonzero(roles == int(Role.AUDIO)).flatten()
        if len(apos) and media.waveform is not None:
            dur = media.waveform.size / media.sample_rate
            if self.audio_truncation:
                dur = min(dur, WHISPER_SECONDS)  # the tokens cover only what was kept
            times[apos] = torch.arange(len(apos), dtype=torch.float32) * (dur / max(len(apos), 1))
        return times

    def _video_time_kwargs(self, second_per_grid: float) -> dict[str, Any]:
        return {"video_second_per_grid": torch.tensor([second_per_grid])}

    def _forward_flags(self, has_video: bool, has_audio: bool) -> dict[str, Any]:
        """Flags passed to forward. A video without audio must not say use_audio_in_video:
        the model's own positions would then count no video and number its tokens as text.
        Audio-only inputs keep the setting (it changes nothing there), so stored inputs stay."""
        return {"use_audio_in_video": self.settings.use_audio_in_video and (has_audio or not has_video)}

    def compute_positions(self, mi: ModelInputs) -> torch.Tensor:
        """Explicit rotary positions [3, 1, P] for the whole sequence (family-specific)."""
        raise NotImplementedError

    def forward_kwargs(self, mi: ModelInputs, upto: int | None = None) -> dict[str, Any]:
        """Kwargs for `model(...)` over positions [:upto], with explicit positions."""
        kw = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in mi.inputs.items()}
        if upto is not None:
            kw["input_ids"] = kw["input_ids"][:, :upto]
            kw["attention_mask"] = kw["attention_mask"][:, :upto]
            kw["position_ids"] = mi.positions[:, :, :upto].to(self.device)
        else:
            kw["position_ids"] = mi.positions.to(self.device)
        return kw

    def collate(self, items: list[ModelInputs]) -> dict[str, Any]:
        """Batch samples that share one layout (same token sequence length and media shapes)."""
        lens = {int(mi.input_ids.shape[1]) for mi in items}
        if len(lens) != 1:
            raise ValueError(f"collate needs one layout; got sequence lengths {sorted(lens)}")
        out: dict[str, Any] = {}
        for key, first in items[0].inputs.items():
            vals = [mi.inputs[key] for mi in items]
            out[key] = torch.cat(vals, dim=0) if torch.is_tensor(first) else first
        out["position_ids"] = torch.cat([mi.positions for mi in items], dim=1)
        if items[0].labels is not None:
            out["labels"] = torch.cat([mi.labels for mi in items], dim=0)
        return out



def extend_inputs(adapter: ModelAdapter, mi: ModelInputs, ids: list[int]) -> ModelInputs:
    """Append token ids (e.g. a caption to teacher-force) to a prompt; positions recomputed
    the model's own way. `prompt_len` is unchanged."""
    extra = torch.tensor([ids], dtype=mi.input_ids.dtype)
    inputs = dict(mi.inputs)
    inputs["input_ids"] = torch.cat([mi.input_ids, extra], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(extra)], dim=1)
    roles = torch.cat([mi.roles, torch.full((len(ids),), int(Role.GENERATED))])
    times = torch.cat([mi.times, torch.full((len(ids),), float("nan"))])
    out = ModelInputs(inputs=inputs, roles=roles, times=times, positions=torch.zeros(0), prompt_len=mi.prompt_len)
    out.positions = adapter.compute_positions(out)
    return out
