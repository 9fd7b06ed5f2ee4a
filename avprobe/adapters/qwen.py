"""What the Qwen audio-visual families share: ChatML prompts ending turns with `<|im_end|>`,
the `<|vision_bos|>` / `<|audio_bos|>` delimiters, Qwen2-VL patchified video, Whisper audio
features, three-axis M-RoPE positions, and the tiny test models built from their configs.

The three Qwen adapters (`qwen2_5_omni`, `qwen3_omni`, `qwen2_5_vl`) subclass `QwenAdapter`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from avprobe.adapters.base import (
    LANGUAGE_MODEL_PATHS,
    AdapterSettings,
    MediaTokens,
    ModelAdapter,
    ModelInputs,
    Segment,
)
from avprobe.media.processing import (
    WHISPER_SECONDS,
    VisionSpec,
    audio_features,
    patchify_video,
)
from avprobe.types import Media

# The settings the tiny Qwen test models run with (a small pixel budget: few video tokens).
TINY_SETTINGS = AdapterSettings(use_audio_in_video=True, min_pixels=56 * 56, max_pixels=56 * 56 * 4)


class QwenAdapter(ModelAdapter):
    """Base of the Qwen families. Subclasses fill `media_ids` and `compute_positions`."""

    family: ClassVar[str] = "qwen"
    paths: ClassVar[dict[str, str]] = dict(LANGUAGE_MODEL_PATHS)
    special_tokens: ClassVar[dict[str, tuple[str, ...]]] = {
        "video": ("video_token_id", "video_token_index"),
        "audio": ("audio_token_id", "audio_token_index"),
        "image": ("image_token_id", "image_token_index"),
        "vision_start": ("vision_start_token_id",),
        "vision_end": ("vision_end_token_id",),
        "audio_start": ("audio_start_token_id",),
        "audio_end": ("audio_end_token_id",),
        "im_start": ("<|im_start|>",),
        "im_end": ("<|im_end|>",),
    }
    turn_end: ClassVar[str | None] = "im_end"
    position_batch_dim: ClassVar[int] = 1  # M-RoPE positions are [3, B, P]
    vision_defaults: ClassVar[dict[str, Any]] = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}
    # Rotary positions per second of media when the config does not say (see the property).
    default_position_id_per_seconds: ClassVar[float] = 25.0
    # WhisperFeatureExtractor's padding and truncation as the family's processor passes them:
    # Qwen2.5-Omni pads or cuts to the 30 s window, so a longer clip's audio ends at 30 s.
    audio_padding: ClassVar[str] = "max_length"
    audio_truncation: ClassVar[bool] = True
    tiny_name: ClassVar[str] = "tiny-qwen"

    def _config_sources(self) -> tuple[Any, ...]:
        # a checkpoint's full-model config keeps the thinker's ids under thinker_config
        return (self.config, getattr(self.config, "thinker_config", None))

    @property
    def position_id_per_seconds(self) -> float:
        """Rotary positions per second of media, as the model's `get_rope_index` reads them
        (`config.position_id_per_seconds`); the layout must use the same rate or audio and
        video slots receive each other's positions."""
        for src in self._config_sources():
            v = getattr(src, "position_id_per_seconds", None) if src is not None else None
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return self.default_position_id_per_seconds

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

    def _video_time_kwargs(self, second_per_grid: float) -> dict[str, Any]:
        return {"video_second_per_grid": torch.tensor([second_per_grid])}

    def encode_video(self, media: Media) -> MediaTokens:
        spec = self.vision_spec()
        frames = media.frames[: spec.max_frames]
        pv, grid = patchify_video(frames, spec)
        tensors: dict[str, Any] = {"pixel_values_videos": pv.to(self.dtype), "video_grid_thw": grid}
        gt, gh, gw = (int(x) for x in grid[0])
        per_t = gh * gw // spec.merge_size**2
        second_per_grid = self.second_per_grid(spec, media)
        # the model's time axis (layout, positions) and the clip's (the `times` annotation)
        grid_times = np.repeat(np.arange(gt) * second_per_grid, per_t)
        clip_times = np.repeat(np.arange(gt) * (spec.temporal_patch_size / media.fps), per_t)
        tensors.update(self._video_time_kwargs(second_per_grid))
        return MediaTokens(tensors, gt * per_t, grid_times, torch.as_tensor(clip_times, dtype=torch.float32))

    def encode_audio(self, media: Media) -> MediaTokens:
        feats, fmask = audio_features(
            media.waveform, self.n_mels(), padding=self.audio_padding, truncation=self.audio_truncation
        )
        n = self.audio_token_count(int(fmask.sum()))
        dur = media.waveform.size / media.sample_rate
        if self.audio_truncation:
            dur = min(dur, WHISPER_SECONDS)  # the tokens cover only what was kept
        clip_times = torch.arange(n, dtype=torch.float32) * (dur / max(n, 1))
        return MediaTokens({"input_features": feats.to(self.dtype), "feature_attention_mask": fmask}, n,
                           np.zeros(0), clip_times)

    # ---- prompt construction ----------------------------------------------------------
    def media_segments(self, video: MediaTokens | None, audio: MediaTokens | None) -> list[Segment]:
        n_video = video.n_tokens if video is not None else 0
        n_audio = audio.n_tokens if audio is not None else 0
        times = video.times if video is not None else np.zeros(0)
        return [self.media_ids(n_video, n_audio, times)]

    def media_ids(self, n_video: int, n_audio: int, video_times: np.ndarray) -> list[int]:
        """Token ids of the media block for n video and n audio tokens (per family);
        `video_times` are each video token's start on the model's time axis (grid * second_per_grid)."""
        raise NotImplementedError

    def prompt_segments(self, media_ids: list[Segment], query: str) -> list[Segment]:
        """ChatML: [system], user turn (media and query in `settings.prompt_layout` order),
        assistant opener."""
        im_start, im_end = self.special("im_start"), self.special("im_end")
        segs: list[Segment] = []
        if self.settings.system_prompt:
            segs += [[im_start], "system\n" + self.settings.system_prompt, [im_end], "\n"]
        segs += [[im_start], *self.user_content("user\n", media_ids, query), [im_end], "\n", [im_start], "assistant\n"]
        return segs

    def extra_inputs(self, input_ids, roles, video, audio) -> dict[str, Any]:
        """A video without audio must not say use_audio_in_video: the model's own positions
        would then count no video and number its tokens as text. Audio-only inputs keep the
        setting (it changes nothing there), so stored inputs stay."""
        has_video = video is not None and video.n_tokens > 0
        has_audio = audio is not None and audio.n_tokens > 0
        return {"use_audio_in_video": self.settings.use_audio_in_video and (has_audio or not has_video)}

    # ---- positions: three M-RoPE axes [3, 1, P] -------------------------------------------
    def step_positions(self, mi: ModelInputs, t: int, rows: int) -> torch.Tensor:
        last = mi.positions[:, 0, mi.prompt_len - 1]  # [3]: every axis advances by one per token
        return (last + t).view(3, 1, 1).expand(3, rows, 1)

    def decode_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        return {"inputs_embeds": self.embed(tokens)[:, None, :]}

    # ---- tiny models ------------------------------------------------------------------
    @classmethod
    def tiny_model(cls, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
        raise NotImplementedError(f"{cls.__name__} has no tiny model")

    @classmethod
    def tiny(cls, n_layers: int = 4, seed: int = 0, hidden: int = 64,
             settings: AdapterSettings | None = None) -> ModelAdapter:
        from avprobe.adapters.tiny_vocab import tiny_tokenizer  # test fixtures, imported only when asked for

        model = cls.tiny_model(n_layers=n_layers, hidden=hidden, seed=seed)
        return cls(model, tiny_tokenizer(), cls.tiny_settings(settings or TINY_SETTINGS), name=cls.tiny_name)

    @classmethod
    def tiny_settings(cls, settings: AdapterSettings) -> AdapterSettings:
        return settings


def tiny_special_ids() -> dict[str, int]:
    """Ids of the Qwen-Omni specials in the tiny test tokenizer (written into tiny configs)."""
    from avprobe.adapters.tiny_vocab import tiny_tokenizer

    t = tiny_tokenizer()
    g = t.convert_tokens_to_ids
    return {
        "vocab": len(t),
        "pad": g("<|endoftext|>"),
        "eos": g("<|im_end|>"),
        "audio": g("<|AUDIO|>"),
        "audio_start": g("<|audio_bos|>"),
        "audio_end": g("<|audio_eos|>"),
        "video": g("<|VIDEO|>"),
        "vision_start": g("<|vision_bos|>"),
        "vision_end": g("<|vision_eos|>"),
        "image": g("<|IMAGE|>"),
    }


def tiny_text_kwargs(n_layers: int, hidden: int, ids: dict[str, int]) -> dict[str, Any]:
    """A tiny Qwen text config (head_dim 16, M-RoPE sections [2, 3, 3])."""
    head_dim = 16
    return dict(
        vocab_size=ids["vocab"],
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=n_layers,
        num_attention_heads=hidden // head_dim,
        num_key_value_heads=max(1, hidden // head_dim // 2),
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        pad_token_id=ids["pad"],
        eos_token_id=ids["eos"],
        tie_word_embeddings=False,
    )


def tiny_qwen_vision(hidden: int) -> dict[str, Any]:
    """A tiny Qwen2.5 vision tower config (Omni and VL share it)."""
    return dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
        window_size=56,
    )
