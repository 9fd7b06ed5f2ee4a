"""Tiny random models of every supported family, built from the real config classes.

Used by the tests and the benchmarks: no weights are downloaded. The tokenizer is a small
word-level one carrying the Qwen-Omni special tokens, so prompts go through the real
adapter code. Ids of the specials are placed at the end of the vocabulary and written into
the configs, as the organisms do.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import torch

from avprobe.adapters.base import AdapterSettings, ModelAdapter
from avprobe.types import OMNI_SPECIAL_TOKENS, Media

SPECIALS = OMNI_SPECIAL_TOKENS
WORDS = (
    "[UNK] system user assistant describe what you see and hear in the video i a an . , dog siren "
    "horse bird engine drill keyboard piano rain baby crowd clock"
).split()


@lru_cache(maxsize=1)
def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=[s for s in SPECIALS if s not in ("<|endoftext|>", "<|im_end|>")],
    )
    return fast


def _ids() -> dict[str, int]:
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


def _text_kwargs(n_layers: int, hidden: int, ids: dict[str, int]) -> dict[str, Any]:
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


def tiny_omni(n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    ids = _ids()
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=_text_kwargs(n_layers, hidden, ids),
        audio_config=dict(
            num_mel_bins=128, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
            output_dim=hidden, n_window=50, max_source_positions=1500,
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
            window_size=56,
        ),
        audio_token_id=ids["audio"], video_token_id=ids["video"], image_token_id=ids["image"],
        audio_start_token_id=ids["audio_start"], audio_end_token_id=ids["audio_end"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        pad_token_id=ids["pad"], eos_token_id=ids["eos"],
    )
    cfg.architectures = ["Qwen2_5OmniThinkerForConditionalGeneration"]
    torch.manual_seed(seed)
    return Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()


def tiny_qwen3_omni(n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    ids = _ids()
    text = _text_kwargs(n_layers, hidden, ids)
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


def tiny_vl(n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = _ids()
    cfg = Qwen2_5_VLConfig(
        text_config=_text_kwargs(n_layers, hidden, ids),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
            window_size=56,
        ),
        video_token_id=ids["video"], image_token_id=ids["image"],
        vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"],
        pad_token_id=ids["pad"], eos_token_id=ids["eos"],
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


TINY_SETTINGS = AdapterSettings(use_audio_in_video=True, min_pixels=56 * 56, max_pixels=56 * 56 * 4)


def tiny_adapter(family: str = "qwen2_5_omni", **kw: Any) -> ModelAdapter:
    """A tiny random model of `family` wrapped in its adapter."""
    from avprobe.adapters import OmniThinkerAdapter, Qwen3OmniThinkerAdapter, QwenVLAdapter

    settings = kw.pop("settings", TINY_SETTINGS)
    if family == "qwen2_5_omni":
        return OmniThinkerAdapter(tiny_omni(**kw), tiny_tokenizer(), settings, name="tiny-omni")
    if family == "qwen3_omni":
        s = AdapterSettings(**{**settings.__dict__, "min_pixels": 64 * 64, "max_pixels": 64 * 64 * 4})
        return Qwen3OmniThinkerAdapter(tiny_qwen3_omni(**kw), tiny_tokenizer(), s, name="tiny-qwen3-omni")
    if family == "qwen2_5_vl":
        return QwenVLAdapter(tiny_vl(**kw), tiny_tokenizer(), settings, name="tiny-vl")
    raise ValueError(f"unknown family {family!r}")


def random_media(seconds: float = 4.0, fps: float = 2.0, size: int = 56, seed: int = 0, audio: bool = True,
                 video: bool = True, height: int | None = None) -> Media:
    """Random frames (`size` wide, `height` high, square by default) and noise audio."""
    rng = np.random.default_rng(seed)
    h = size if height is None else height
    frames = rng.integers(0, 255, (int(seconds * fps), h, size, 3), dtype=np.uint8) if video else None
    wav = (0.1 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32) if audio else None
    return Media(frames=frames, fps=fps, waveform=wav)
