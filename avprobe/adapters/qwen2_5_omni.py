"""Qwen2.5-Omni thinker (the paper's main model). Talker, if loaded, is not used."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from avprobe.adapters.base import ModelInputs
from avprobe.adapters.qwen import (
    QwenAdapter,
    tiny_qwen_vision,
    tiny_special_ids,
    tiny_text_kwargs,
)


def chunk_bounds(values: np.ndarray, per_chunk: float) -> list[tuple[int, int]]:
    """Split monotone `values` into runs at successive multiples of `per_chunk`.

    Mirrors the Qwen2.5-Omni processor: one boundary per crossing, at most one chunk advanced
    per token, so inputs match the upstream layout token for token.
    """
    bounds: list[tuple[int, int]] = []
    start, chunk = 0, 1
    for i, v in enumerate(values):
        if v >= chunk * per_chunk:
            bounds.append((start, i))
            start, chunk = i, chunk + 1
    bounds.append((start, len(values)))
    return bounds


class OmniThinkerAdapter(QwenAdapter):
    family: ClassVar[str] = "qwen2_5_omni"
    architectures: ClassVar[tuple[str, ...]] = (
        "Qwen2_5OmniThinkerForConditionalGeneration",
        "Qwen2_5OmniForConditionalGeneration",
        "Qwen2_5OmniModel",
    )
    # a full checkpoint (thinker + talker) loads whole; the thinker is what is probed
    checkpoints: ClassVar[dict[str, tuple[str, str | None]]] = {
        "Qwen2_5OmniForConditionalGeneration": ("Qwen2_5OmniForConditionalGeneration", "thinker"),
        "Qwen2_5OmniModel": ("Qwen2_5OmniForConditionalGeneration", "thinker"),
    }
    tiny_name: ClassVar[str] = "tiny-omni"

    def media_ids(self, n_video: int, n_audio: int, video_times: np.ndarray) -> list[int]:
        v, a = self.special("video"), self.special("audio")
        vb, ve = self.special("vision_start"), self.special("vision_end")
        ab, ae = self.special("audio_start"), self.special("audio_end")
        if n_video and n_audio and self.settings.use_audio_in_video:
            return [vb, *self.interleave(n_video, n_audio, video_times, v, a), ve]
        ids: list[int] = []
        if n_video:
            ids += [vb] + [v] * n_video + [ve]
        if n_audio:
            ids += [ab] + [a] * n_audio + [ae]
        return ids

    def interleave(self, n_video: int, n_audio: int, video_times: np.ndarray, v: int, a: int) -> list[int]:
        """audio_bos [video chunk][audio chunk]... audio_eos, in `seconds_per_chunk` chunks."""
        per_chunk = self.position_id_per_seconds * self.settings.seconds_per_chunk
        vchunks = chunk_bounds(video_times * self.position_id_per_seconds, per_chunk)
        achunks = chunk_bounds(np.arange(n_audio, dtype=np.float64), per_chunk)
        ids = [self.special("audio_start")]
        for j in range(max(len(vchunks), len(achunks))):
            if j < len(vchunks):
                ids += [v] * (vchunks[j][1] - vchunks[j][0])
            if j < len(achunks):
                ids += [a] * (achunks[j][1] - achunks[j][0])
        ids.append(self.special("audio_end"))
        return ids

    def _rope_model(self) -> Any:
        return self.model.model

    def compute_positions(self, mi: ModelInputs) -> torch.Tensor:
        inp = mi.inputs
        fmask = inp.get("feature_attention_mask")
        with torch.no_grad():
            pos, _ = self._rope_model().get_rope_index(
                inp["input_ids"],
                None,
                inp.get("video_grid_thw"),
                inp["attention_mask"],
                bool(inp.get("use_audio_in_video")) and "input_features" in inp and "video_grid_thw" in inp,
                fmask.sum(-1) if fmask is not None else None,
                inp.get("video_second_per_grid"),
            )
        return pos

    @classmethod
    def tiny_model(cls, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
        from transformers import (
            Qwen2_5OmniThinkerConfig,
            Qwen2_5OmniThinkerForConditionalGeneration,
        )

        ids = tiny_special_ids()
        cfg = Qwen2_5OmniThinkerConfig(
            text_config=tiny_text_kwargs(n_layers, hidden, ids),
            audio_config=dict(
                num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                output_dim=hidden, n_window=50, max_source_positions=1500,
            ),
            vision_config=tiny_qwen_vision(hidden),
            audio_token_id=ids["audio"], video_token_id=ids["video"], image_token_id=ids["image"],
            audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"],
            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
            pad_token_id=ids["pad"], eos_token_id=ids["eos"],
        )
        cfg.architectures = ["Qwen2_5OmniThinkerForConditionalGeneration"]
        torch.manual_seed(seed)
        return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
