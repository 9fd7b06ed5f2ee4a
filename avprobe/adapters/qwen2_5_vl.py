"""Qwen2.5-VL: the vision-only base of Qwen2.5-Omni, for the base-model shift analysis."""

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
from avprobe.media.processing import VisionSpec
from avprobe.types import Media, Role


class QwenVLAdapter(QwenAdapter):
    family: ClassVar[str] = "qwen2_5_vl"
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2_5_VLForConditionalGeneration",)
    has_audio: ClassVar[bool] = False
    vision_defaults = {"min_pixels": 128 * 28 * 28, "max_pixels": 768 * 28 * 28}
    tiny_name: ClassVar[str] = "tiny-vl"

    def media_ids(self, n_video: int, n_audio: int, video_times: np.ndarray) -> list[int]:
        if not n_video:
            raise ValueError(f"{self.name} is vision-only: the sample has no video frames")
        return [self.special("vision_start")] + [self.special("video")] * n_video + [self.special("vision_end")]

    def second_per_grid(self, spec: VisionSpec, media: Media) -> float:
        """Qwen2_5_VLProcessor (5.x) divides by the sampled rate from the video's metadata
        (`VideoMetadata.sampled_fps`, frames kept / duration), i.e. the clip's effective fps."""
        return spec.temporal_patch_size / media.fps

    def _video_time_kwargs(self, second_per_grid: float) -> dict[str, Any]:
        return {"second_per_grid_ts": torch.tensor([second_per_grid])}

    def extra_inputs(self, input_ids, roles, video, audio) -> dict[str, Any]:
        # Without mm_token_type_ids VL silently falls back to 1-D positions.
        return {"mm_token_type_ids": self._token_types(roles)[None]}

    @staticmethod
    def _token_types(roles: torch.Tensor) -> torch.Tensor:
        tt = torch.zeros_like(roles)
        tt[roles == int(Role.IMAGE)] = 1
        tt[roles == int(Role.VIDEO)] = 2
        return tt

    def compute_positions(self, mi: ModelInputs) -> torch.Tensor:
        inp = mi.inputs
        if "mm_token_type_ids" not in inp:
            inp["mm_token_type_ids"] = self._token_types(mi.roles)[None]
        with torch.no_grad():
            pos, _ = self.model.model.get_rope_index(
                inp["input_ids"],
                mm_token_type_ids=inp["mm_token_type_ids"],
                video_grid_thw=inp.get("video_grid_thw"),
                second_per_grid_ts=inp.get("second_per_grid_ts"),
                attention_mask=inp["attention_mask"],
            )
        return pos

    @classmethod
    def tiny_model(cls, n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        ids = tiny_special_ids()
        cfg = Qwen2_5_VLConfig(
            text_config=tiny_text_kwargs(n_layers, hidden, ids),
            vision_config=tiny_qwen_vision(hidden),
            video_token_id=ids["video"], image_token_id=ids["image"],
            vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
            pad_token_id=ids["pad"], eos_token_id=ids["eos"],
        )
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        torch.manual_seed(seed)
        return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def vl_state_dict_from_thinker(thinker_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2.5-Omni thinker weights -> Qwen2.5-VL names: drop the audio tower and fuse the
    vision attention's separate q/k/v into VL's `attn.qkv`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in thinker_sd.items():
        if k.startswith("model.audio_tower."):
            continue
        if ".attn.q." in k and k.startswith("model.visual."):
            suffix = k.rsplit(".", 1)[1]
            stem = k[: k.index(".attn.q.")]
            out[f"{stem}.attn.qkv.{suffix}"] = torch.cat(
                [thinker_sd[f"{stem}.attn.{n}.{suffix}"] for n in ("q", "k", "v")], dim=0
            )
            continue
        if any(f".attn.{n}." in k for n in ("k", "v")) and k.startswith("model.visual."):
            continue
        out[k] = v
    return out


def thinker_state_dict_from_vl(vl_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL weights -> thinker names (the inverse of `vl_state_dict_from_thinker`;
    the thinker's audio tower is not covered)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in vl_sd.items():
        if ".attn.qkv." in k and k.startswith("model.visual."):
            stem, suffix = k[: k.index(".attn.qkv.")], k.rsplit(".", 1)[1]
            for n, part in zip(("q", "k", "v"), v.chunk(3, dim=0)):
                out[f"{stem}.attn.{n}.{suffix}"] = part.clone()
            continue
        out[k] = v
    return out
