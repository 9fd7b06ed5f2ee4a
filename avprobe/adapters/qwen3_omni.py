"""Qwen3-Omni-MoE thinker: same inputs as Qwen2.5-Omni; different audio length formula,
interleaving (per video grid, by time), rotary positions per second from its config (the
released checkpoint: 13), and audio padded to its own length, never cut at 30 s."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from avprobe.adapters.qwen2_5_omni import OmniThinkerAdapter


class Qwen3OmniThinkerAdapter(OmniThinkerAdapter):
    family: ClassVar[str] = "qwen3_omni"
    architectures: ClassVar[tuple[str, ...]] = (
        "Qwen3OmniMoeThinkerForConditionalGeneration",
        "Qwen3OmniMoeForConditionalGeneration",
    )
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
