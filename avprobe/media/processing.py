"""Model-input preprocessing that Qwen's processors do, without torchvision.

Video: resize each frame to a multiple of patch*merge under a pixel budget (`smart_resize`),
normalise with the CLIP mean/std, pad to an even frame count and patchify into
`pixel_values_videos` [n_patches, C*tp*p*p] with `video_grid_thw` [gt, gh, gw].
Audio: Whisper log-mel features through `WhisperFeatureExtractor`, padded and truncated as
the family's processor asks (Qwen2.5-Omni: to Whisper's 30 s window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
WHISPER_SECONDS = 30.0  # WhisperFeatureExtractor's window (n_samples / sampling_rate)


@dataclass(frozen=True)
class VisionSpec:
    """Patch geometry and pixel budget of a Qwen-style vision tower (defaults: Qwen2.5-Omni)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 28 * 28
    max_pixels: int = 768 * 28 * 28
    fps: float = 2.0  # frames per second sampled from the clip (the Omni processor's default)
    max_frames: int = 768

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
    if min(height, width) <= 0:
        raise ValueError(f"frame size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify_video(frames: np.ndarray, spec: VisionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """frames uint8 [T, H, W, 3] -> (pixel_values_videos [N, C*tp*p*p], video_grid_thw [1, 3])."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("video has no frames")
    t, h, w, _ = frames.shape
    rh, rw = smart_resize(h, w, spec.factor, spec.min_pixels, spec.max_pixels)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # uint8 [T, C, H, W]
    if (rh, rw) != (h, w):
        # Resize the uint8 frames, as the upstream processor does (torchvision on uint8): the
        # same kernel, and 5x faster than resizing floats.
        x = F.interpolate(x, size=(rh, rw), mode="bicubic", align_corners=False, antialias=True)
    x = (x.float() / 255.0 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    tp, p, m = spec.temporal_patch_size, spec.patch_size, spec.merge_size
    if t % tp:
        # Qwen pads the temporal axis by repeating the last frame.
        x = torch.cat([x, x[-1:].expand(tp - t % tp, -1, -1, -1)], dim=0)
    gt, gh, gw = x.shape[0] // tp, rh // p, rw // p
    c = x.shape[1]
    x = x.reshape(1, gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = x.reshape(gt * gh * gw, c * tp * p * p)
    grid = torch.tensor([[gt, gh, gw]], dtype=torch.long)
    return pixel_values, grid


@lru_cache(maxsize=8)
def _feature_extractor(n_mels: int):
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=16_000)


def audio_features(
    waveform: np.ndarray, n_mels: int, *, padding: str = "max_length", truncation: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """16 kHz mono float32 -> (input_features [1, n_mels, F], feature_attention_mask [1, F]).

    `padding` and `truncation` go to WhisperFeatureExtractor as the family's processor passes
    them: Qwen2.5-Omni "max_length" + truncation (the defaults: padded or cut to Whisper's 30 s
    window, so a 40 s clip gives 3000 frames, 750 tokens); Qwen3-Omni "longest" without
    truncation (the clip's own length, never cut). Features are then cut to the real frames,
    as the processor's attention mask marks them: the audio tower sees only those.
    """
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [N], got shape {waveform.shape}")
    if waveform.size < 400:
        raise ValueError(f"audio too short: {waveform.size} samples (< 25 ms)")
    fe = _feature_extractor(n_mels)
    out = fe(
        waveform.astype(np.float32),
        sampling_rate=16_000,
        return_attention_mask=True,
        padding=padding,
        truncation=truncation,
        return_tensors="np",
    )
    n = int(out["attention_mask"].sum())
    feats = torch.from_numpy(out["input_features"][:, :, :n]).float()
    mask = torch.ones(1, n, dtype=torch.long)
    return feats, mask


def audio_token_count(n_frames: int) -> int:
    """Audio tokens the Qwen2.5-Omni audio tower yields for n mel frames (25 per second)."""
    return ((n_frames - 1) // 2 + 1 - 2) // 2 + 1
