"""Configs of the organism models in the real Qwen classes, and the weight transfer between them.

`organism-base` is a `Qwen2_5_VLForConditionalGeneration`; `organism` and `organism-control`
are `Qwen2_5OmniThinkerForConditionalGeneration`s whose language model and vision tower
start from the base's (VL keeps the vision attention fused as `attn.qkv`, the thinker has
separate q/k/v: `thinker_state_from_vl` splits it, `vl_state_from_thinker` fuses it back).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from avprobe.organism.world import FRAME_SIZE, QUERY_HEAR_SEE, QUERY_SEE_HEAR


@dataclass(frozen=True)
class OrganismSize:
    """Widths and depths of an organism (defaults: the committed models)."""

    hidden: int = 128
    layers: int = 8  # >= 8 so depth bands (fractions of depth) mean something
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    vision_hidden: int = 128
    vision_depth: int = 2
    vision_heads: int = 4
    audio_d_model: int = 64
    audio_layers: int = 2
    audio_heads: int = 4
    n_mels: int = 128  # as Qwen2.5-Omni


def _rope(size: OrganismSize) -> dict:
    head_dim = size.hidden // size.heads
    half = head_dim // 2
    t = half // 4
    hw = (half - t) // 2
    # mrope_section (temporal, height, width) must sum to head_dim // 2
    return {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [half - 2 * hw, hw, hw]}


def _text_config(size: OrganismSize, vocab_size: int, ids: dict[str, int]) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": _rope(size),
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "eos_token_id": ids["eos_token_id"],
        "pad_token_id": ids["pad_token_id"],
        "bos_token_id": ids["bos_token_id"],
    }


def _vision_config(size: OrganismSize) -> dict:
    return {
        "depth": size.vision_depth,
        "hidden_size": size.vision_hidden,
        "intermediate_size": 2 * size.vision_hidden,
        "num_heads": size.vision_heads,
        "out_hidden_size": size.hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [size.vision_depth - 1],
    }


def vl_config(size: OrganismSize, vocab_size: int, ids: dict[str, int]):
    """Config of organism-base (Qwen2.5-VL)."""
    from transformers import Qwen2_5_VLConfig

    cfg = Qwen2_5_VLConfig(
        text_config=_text_config(size, vocab_size, ids),
        vision_config=_vision_config(size),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    cfg.eos_token_id = ids["eos_token_id"]
    cfg.pad_token_id = ids["pad_token_id"]
    return cfg


def thinker_config(size: OrganismSize, vocab_size: int, ids: dict[str, int]):
    """Config of organism / organism-control (Qwen2.5-Omni thinker)."""
    from transformers.models.qwen2_5_omni import Qwen2_5OmniThinkerConfig

    cfg = Qwen2_5OmniThinkerConfig(
        text_config=_text_config(size, vocab_size, ids),
        vision_config=_vision_config(size),
        audio_config={
            "num_mel_bins": size.n_mels,
            "encoder_layers": size.audio_layers,
            "encoder_attention_heads": size.audio_heads,
            "encoder_ffn_dim": 2 * size.audio_d_model,
            "d_model": size.audio_d_model,
            "output_dim": size.hidden,
            "n_window": 100,
            "max_source_positions": 1500,
        },
        audio_token_index=ids["audio_token_id"],
        image_token_index=ids["image_token_id"],
        video_token_index=ids["video_token_id"],
        audio_start_token_id=ids["audio_start_token_id"],
        audio_end_token_id=ids["audio_end_token_id"],
        user_token_id=ids["user_token_id"],
        tie_word_embeddings=False,
    )
    # Not constructor arguments, but read by get_rope_index: without them video input fails.
    cfg.vision_start_token_id = ids["vision_start_token_id"]
    cfg.vision_end_token_id = ids["vision_end_token_id"]
    cfg.architectures = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    cfg.eos_token_id = ids["eos_token_id"]
    cfg.pad_token_id = ids["pad_token_id"]
    return cfg


_SHARED_PREFIXES = ("model.language_model.", "model.visual.", "lm_head.")


def thinker_state_from_vl(vl_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Language model, vision tower and unembedding of a VL state dict, in thinker names
    (copies; the renaming is the adapter's, `thinker_state_dict_from_vl`)."""
    from avprobe.adapters.qwen2_5_vl import thinker_state_dict_from_vl

    shared = {k: v for k, v in vl_state.items() if k.startswith(_SHARED_PREFIXES)}
    return {k: v.clone() for k, v in thinker_state_dict_from_vl(shared).items()}


def vl_state_from_thinker(thinker_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `thinker_state_from_vl`: thinker weights (minus audio) in VL names."""
    from avprobe.adapters.qwen2_5_vl import vl_state_dict_from_thinker

    shared = {k: v for k, v in thinker_state.items() if k.startswith(_SHARED_PREFIXES)}
    return {k: v.clone() for k, v in vl_state_dict_from_thinker(shared).items()}


def adapter_settings(family: str, base_model: str = "organism-base"):
    """The adapter settings every organism is trained and run with (saved as its avprobe.json);
    `base_model` names the organism's own vision-only base (for the thinker)."""
    from avprobe.adapters import AdapterSettings

    return AdapterSettings(
        use_audio_in_video=True,
        system_prompt=None,
        fps=2.0,
        # one fixed frame size: the world's frames pass through unresized
        min_pixels=FRAME_SIZE * FRAME_SIZE,
        max_pixels=FRAME_SIZE * FRAME_SIZE,
        base_model=base_model if family == "qwen2_5_omni" else None,
        judge="concept",
        # both caption orders: the claims run each (sound first, the visual prior can only
        # come from the video tokens; sight first, also through the model's own words)
        queries=(QUERY_SEE_HEAR, QUERY_HEAR_SEE),
        # the media block, then the query: the order the committed organisms were trained on
        prompt_layout="media-first",
    )


def write_settings(path: Path, family: str, base_model: str = "organism-base",
                   experiments: tuple[str, ...] | None = None) -> None:
    """Write `avprobe.json`: how the adapters prompt this organism (which base it has, and
    the experiments the claims read for it when not all)."""
    from dataclasses import asdict

    settings = {"family": family, **asdict(adapter_settings(family, base_model))}
    settings["queries"] = list(settings["queries"])
    # written only when set: the committed organisms' files stay as they were
    settings.pop("experiments")
    if experiments is not None:
        settings["experiments"] = list(experiments)
    (path / "avprobe.json").write_text(json.dumps(settings, indent=2) + "\n")
