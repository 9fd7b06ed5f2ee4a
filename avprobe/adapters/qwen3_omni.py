"""Qwen3-Omni-MoE thinker: same inputs as Qwen2.5-Omni; different audio length formula,
interleaving (per video grid, by time), rotary positions per second from its config (the
released checkpoint: 13), and audio padded to its own length, never cut at 30 s."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from avprobe.adapters.base import AdapterSettings
from avprobe.adapters.qwen import tiny_special_ids, tiny_text_kwargs
from avprobe.adapters.qwen2_5_omni import OmniThinkerAdapter


class Qwen3OmniThinkerAdapter(OmniThinkerAdapter):
    family: ClassVar[str] = "qwen3_omni"
    architectures: ClassVar[tuple[str, ...]] = (
        "Qwen3OmniMoeThinkerForConditionalGeneration",
        "Qwen3OmniMoeForConditionalGeneration",
    )
    checkpoints: ClassVar[dict[str, tuple[str, str | None]]] = {
        "Qwen3OmniMoeForConditionalGeneration": ("Qwen3OmniMoeForConditionalGeneration", "thinker"),
    }
    tiny_name: ClassVar[str] = "tiny-qwen3-omni"
    default_position_id_per_seconds: ClassVar[float] = 13.0  # the processor's, if a config lacks it
    vision_defaults = {"min_pixels": 128 * 32 * 32, "max_pixels": 768 * 32 * 32}
    # its processor: padding=True (the clip's own length), truncation=False (never cut at 30 s)
    audio_padding: ClassVar[str] = "longest"
    audio_truncation: ClassVar[bool] = False

    def audio_token_count(self, n_frames: int) -> int:
        n_window = int(getattr(getattr(self.config, "audio_config", None), "n_window", 50))
        chunk = n_window * 2
        rem = n_frames % chunk
        feat = (rem - 1) // 2 + 1
        return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (n_frames // chunk) * 13

    def interleave(self, n_video: int, n_audio: int, video_times: np.ndarray, v: int, a: int) -> list[int]:
        """Each video token goes at its start time, audio tokens fill in by position id."""
        vt = video_times * self.position_id_per_seconds
        ids = [self.special("audio_start")]
        i = j = 0
        while i < len(vt) and j < n_audio:
            if vt[i] <= j:
                ids.append(v)
                i += 1
            else:
                ids.append(a)
                j += 1
        ids += [v] * (len(vt) - i) + [a] * (n_audio - j)
        ids.append(self.special("audio_end"))
        return ids

    @classmethod
    def tiny_settings(cls, settings: AdapterSettings) -> AdapterSettings:
        # patch 16: a 64-pixel frame budget (the 56-pixel one of the 14-pixel families)
        return AdapterSettings(**{**settings.__dict__, "min_pixels": 64 * 64, "max_pixels": 64 * 64 * 4})

    @classmethod
    def tiny_model(cls, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
        from transformers import (
            Qwen3OmniMoeThinkerConfig,
            Qwen3OmniMoeThinkerForConditionalGeneration,
        )

        ids = tiny_special_ids()
        text = tiny_text_kwargs(n_layers, hidden, ids)
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
        text["rope_parameters"] = {
            "rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True,
        }
        cfg = Qwen3OmniMoeThinkerConfig(
            text_config=text,
            audio_config=dict(
                num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                output_dim=hidden, n_window=50, n_window_infer=800, downsample_hidden_size=16,
                max_source_positions=1500,
            ),
            vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                num_position_embeddings=64,
            ),
            audio_token_id=ids["audio"], video_token_id=ids["video"], image_token_id=ids["image"],
            audio_start_token_id=ids["audio_start"], vision_start_token_id=ids["vision_start"],
        )
        cfg.vision_end_token_id = ids["vision_end"]
        cfg.audio_end_token_id = ids["audio_end"]
        cfg.architectures = ["Qwen3OmniMoeThinkerForConditionalGeneration"]
        torch.manual_seed(seed)
        return Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
