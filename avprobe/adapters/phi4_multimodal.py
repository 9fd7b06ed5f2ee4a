"""Phi-4-multimodal (`Phi4MultimodalForCausalLM`): images and audio into a Phi-4-mini decoder;
a video is a sequence of frames, each an image, as the model card prompts several frames.

Inputs, built without torchvision, as `Phi4MultimodalProcessor` builds them:

- video: every kept frame (`settings.fps`, `settings.frame_rule`, the decoder's) goes through
  the image processor's dynamic HD layout: a grid of at most `dynamic_hd` crops of
  `vision_config.crop_size` chosen by `_get_crop_layout`, the frame resized into it (bilinear
  with antialias on the uint8 frame, as torchvision's resize does on a CPU with AVX2) and
  padded with white, normalised to [-1, 1] ((x - 127.5) / 127.5, the fused form), a global
  view of the whole grid resized bicubic to one crop placed first; a patch mask per crop.
  Each frame writes `<|image|>` x its token count: the global view's 2x2-pooled patches with a
  newline per row, a separator, the crops' useful pooled patches with a newline per row
  (`_get_num_image_tokens`, here for any crop and patch size; upstream's constants 256 and 16
  are the 448 / 14 case). The frames follow each other with nothing between, as
  "<|image|><|image|>..." placeholders do.
- audio: `Phi4MultimodalFeatureExtractor` (80 log-mel bins, 10 ms hop), `<|audio|>` x
  `audio_embed_sizes` (one token per 80 ms), after the frames.
- prompt: "<|user|>" + frames + audio + query + "<|end|><|assistant|>" ("<|system|>...<|end|>"
  first if `settings.system_prompt`), the model card's format.

The image token of the frames is the only image id avprobe feeds, so its positions are the
`video` role. The model's audio projection is its vision-speech one whenever frames are given.

Positions are the sequence index (one axis). Phi-4 uses LongRoPE: its rotary module picks the
long or the short factors per call from that call's largest position, so `prompt_scope` pins
the set a prefill of the whole prompt picks (long when the prompt is longer than
`original_max_position_embeddings`). A decode that crosses that length keeps the prompt's set;
HF generate would switch to the long set there and recompute its cache (a warning says so).

The checkpoint in transformers' format runs its vision+speech mode with the `vision-lora`
adapter beside the weights (the model card loads it with PEFT): `load_pretrained` loads it
when present and refuses to go on without PEFT rather than probe the bare base.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avprobe.adapters.base import AdapterSettings, MediaTokens, ModelAdapter, ModelInputs, Segment
from avprobe.types import Media

log = logging.getLogger(__name__)

AUDIO_MS_PER_TOKEN = 80  # 10 ms feature frames, compressed 8x (audio_compression_rate)
DYNAMIC_HD = 36  # Phi4MultimodalImageProcessor.dynamic_hd: the most crops per image
VISION_LORA = "vision-lora"  # the adapter the original model runs for image (+ audio) inputs
TINY_SETTINGS = AdapterSettings(use_audio_in_video=False)
# Phi-4's chat specials (token strings of its tokenizer) and the tiny test vocabulary's media ids
PHI4_SPECIALS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|image|>", "<|audio|>")


@lru_cache(maxsize=1)
def _feature_extractor():
    from transformers.models.phi4_multimodal.feature_extraction_phi4_multimodal import (
        Phi4MultimodalFeatureExtractor,
    )

    return Phi4MultimodalFeatureExtractor()


def audio_inputs(waveform: np.ndarray, sample_rate: int = 16_000) -> tuple[torch.Tensor, int]:
    """16 kHz mono -> (audio_input_features [1, F, 80] float32, tokens)."""
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [N], got shape {waveform.shape}")
    fe = _feature_extractor()
    if waveform.size < fe.win_length:
        raise ValueError(f"audio of {waveform.size} samples is shorter than one {fe.win_length}-sample window")
    out = fe(waveform.astype(np.float32), sampling_rate=sample_rate, return_tensors="pt")
    return out["audio_input_features"].float(), int(out["audio_embed_sizes"][0])


# ---- the image processor's dynamic HD layout (Phi4MultimodalImageProcessor, torch only) -------


def _closest_aspect_ratio(aspect: float, ratios: list[tuple[int, int]], width: int, height: int,
                          image_size: int) -> tuple[int, int]:
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best_diff, best = diff, r
        elif diff == best_diff and area > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    return best


def crop_layout(height: int, width: int, image_size: int, max_num: int = DYNAMIC_HD
                ) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """-> ((crops across, crops down), (resized width, height), (pad width, pad height)), as
    `_get_crop_layout`."""
    w_crops, h_crops = math.ceil(width / image_size), math.ceil(height / image_size)
    if w_crops * h_crops > max_num:
        ratios = sorted({(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                         if 1 <= i * j <= max_num}, key=lambda x: x[0] * x[1])
        grid = _closest_aspect_ratio(width / height, ratios, width, height, image_size)
    else:
        grid = (w_crops, h_crops)
    tw, th = image_size * grid[0], image_size * grid[1]
    rw, rh = tw / width, th / height
    if rw < rh:
        size, pad = (tw, int(height * rw)), (0, th - int(height * rw))
    else:
        size, pad = (int(width * rh), th), (tw - int(width * rh), 0)
    if min(size[1], th) < 10 or min(size[0], tw) < 10:
        raise ValueError(f"frame of {width}x{height} has too extreme an aspect ratio for Phi-4's crops ({size})")
    return grid, size, pad


def crop_mask(grid: tuple[int, int], pad: tuple[int, int], patch: int, mask_size: int) -> torch.Tensor:
    """[rows, cols] patch mask of the crop grid: padded patches 0 (`_get_crop_attention_mask`)."""
    mask = torch.ones(mask_size * grid[1], mask_size * grid[0])
    if pad[0] >= patch:
        mask[:, -(pad[0] // patch):] = 0
    if pad[1] >= patch:
        mask[-(pad[1] // patch):, :] = 0
    return mask


def frame_token_count(mask: torch.Tensor, mask_size: int) -> int:
    """Tokens of one frame: the global view's pooled patches and its newline per row, one
    separator, the crops' useful pooled patches and their newline per row."""
    pooled = mask_size // 2 + mask_size % 2  # 2x2 pooling, an odd side padded by one
    rows, cols = mask.shape[0] // mask_size, mask.shape[1] // mask_size
    sub = mask.reshape(rows, mask_size, cols, mask_size).transpose(1, 2)[:, :, 0::2, 0::2]  # [r, c, p, p]
    sub = sub.transpose(1, 2).reshape(rows * pooled, cols * pooled)
    return pooled * pooled + pooled + 1 + int(sub.sum()) + int(sub[:, 0].sum())


def frame_inputs(frames: np.ndarray, crop: int, patch: int, max_crops: int = DYNAMIC_HD
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """uint8 [T, H, W, 3] -> (image_pixel_values [T, 1 + crops, 3, crop, crop] float32,
    image_attention_mask [T, 1 + crops, m, m], image_sizes [T, 2], tokens per frame)."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("video has no frames")
    t, h, w, _ = frames.shape
    m = crop // patch
    grid, (nw, nh), (pw, ph) = crop_layout(h, w, crop, max_crops)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # uint8 [T, C, H, W]
    if (nh, nw) != (h, w):
        # torchvision's resize of uint8 frames (bilinear, antialias) on a CPU: torch's uint8 kernel
        x = F.interpolate(x.contiguous(memory_format=torch.channels_last), size=(nh, nw), mode="bilinear",
                          antialias=True, align_corners=False).contiguous()
    x = F.pad(x, (0, pw, 0, ph), value=255)  # white, right and bottom
    x = (x.float() - 127.5) / 127.5  # rescale by 1/255 and normalise with mean = std = 0.5, fused
    H, W = x.shape[-2:]
    glob = F.interpolate(x, size=(crop, crop), mode="bicubic", align_corners=False, antialias=False)
    crops = x.reshape(t, 3, H // crop, crop, W // crop, crop).permute(0, 2, 4, 1, 3, 5).reshape(t, -1, 3, crop, crop)
    pixels = torch.cat([glob[:, None], crops], dim=1)
    mask = crop_mask(grid, (pw, ph), patch, m)
    crop_masks = mask.reshape(H // crop, m, W // crop, m).transpose(1, 2).reshape(-1, m, m)
    masks = torch.cat([torch.ones(1, m, m), crop_masks])[None].expand(t, -1, -1, -1).contiguous()
    sizes = torch.tensor([[H, W]] * t, dtype=torch.long)
    return pixels, masks, sizes, frame_token_count(mask, m)


class Phi4MultimodalAdapter(ModelAdapter):
    family: ClassVar[str] = "phi4_multimodal"
    architectures: ClassVar[tuple[str, ...]] = ("Phi4MultimodalForCausalLM",)
    paths: ClassVar[dict[str, str]] = {
        "text_model": "model",
        "layers": "model.layers",
        "final_norm": "model.norm",
        "embed": "model.embed_tokens",
        "unembed": "lm_head",
    }
    special_tokens: ClassVar[dict[str, tuple[str, ...]]] = {
        "video": ("image_token_id",),  # vision_config: the frames' image token
        "audio": ("audio_token_id",),  # audio_config
        "system": ("<|system|>",),
        "user": ("<|user|>",),
        "assistant": ("<|assistant|>",),
        "end": ("<|end|>",),
    }
    turn_end: ClassVar[str | None] = "end"
    position_batch_dim: ClassVar[int] = 0  # positions [B, P]
    max_crops: ClassVar[int] = DYNAMIC_HD

    def _config_sources(self) -> tuple[Any, ...]:
        # the media ids live in the vision and audio sub-configs, where the model reads them
        return (self.config, getattr(self.config, "vision_config", None), getattr(self.config, "audio_config", None))

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def load_pretrained(cls, architecture: str, target: str, **kw: Any) -> nn.Module:
        model = super().load_pretrained(architecture, target, **kw)
        if _has_vision_lora(target, bool(kw.get("local_files_only", True))):
            try:
                import peft  # noqa: F401
            except ImportError:
                raise ImportError(
                    f"{target} has {VISION_LORA}/, the LoRA Phi-4-multimodal runs for image and audio inputs; "
                    "install peft (`pip install peft`) so avprobe loads it as the model card does, or merge it into "
                    "the weights and give that directory as --model") from None
            model.load_adapter(target, adapter_name="vision", adapter_kwargs={"subfolder": VISION_LORA})
            model.set_adapter("vision")
        return model

    # ---- media and prompt ----------------------------------------------------------------
    def encode_video(self, media: Media) -> MediaTokens:
        vc = self.config.vision_config
        frames = media.frames[: self.settings.max_frames]
        pixels, masks, sizes, per_frame = frame_inputs(frames, int(vc.crop_size), int(vc.patch_size), self.max_crops)
        n_frames = int(frames.shape[0])
        times = np.repeat(np.arange(n_frames) / media.fps, per_frame)
        tensors = {"image_pixel_values": pixels.to(self.dtype), "image_attention_mask": masks, "image_sizes": sizes}
        return MediaTokens(tensors, n_frames * per_frame, times, torch.as_tensor(times, dtype=torch.float32),
                           layout={"per_frame": per_frame, "n_frames": n_frames})

    def encode_audio(self, media: Media) -> MediaTokens:
        feats, n = audio_inputs(media.waveform, media.sample_rate)
        times = torch.arange(n, dtype=torch.float32) * (AUDIO_MS_PER_TOKEN / 1000.0)
        return MediaTokens({"audio_input_features": feats.to(self.dtype), "audio_embed_sizes": torch.tensor([n])}, n,
                           times.numpy().astype(np.float64), times)

    def media_segments(self, video: MediaTokens | None, audio: MediaTokens | None) -> list[Segment]:
        segs: list[Segment] = []
        if video is not None and video.n_tokens:
            segs.append([self.special("video")] * video.n_tokens)
        if audio is not None and audio.n_tokens:
            segs.append([self.special("audio")] * audio.n_tokens)
        return segs

    def prompt_segments(self, media_ids: list[Segment], query: str) -> list[Segment]:
        end = self.special("end")
        segs: list[Segment] = []
        if self.settings.system_prompt:
            segs += [[self.special("system")], self.settings.system_prompt, [end]]
        segs += [[self.special("user")], *media_ids, query, [end], [self.special("assistant")]]
        return segs

    # ---- positions: the sequence index -----------------------------------------------------
    def compute_positions(self, mi: ModelInputs) -> torch.Tensor:
        return torch.arange(mi.input_ids.shape[1])[None]

    def step_positions(self, mi: ModelInputs, t: int, rows: int) -> torch.Tensor:
        return (mi.positions[0, mi.prompt_len - 1] + t).view(1, 1).expand(rows, 1)

    # LongRoPE's factor set is pinned per prompt (prompt_scope): prompts decode one at a time
    clips_share_a_decode: ClassVar[bool] = False

    @contextlib.contextmanager
    def prompt_scope(self, mi: ModelInputs, n_new: int = 0) -> Iterator[None]:
        """Pin LongRoPE's factor set to the one a prefill of the whole prompt picks: the
        prefill of the prompt minus one token and each decode step would otherwise choose by
        their own largest position (and differ at a prompt of original_max + 1 tokens)."""
        rot = self.text_model.rotary_emb
        if getattr(rot, "rope_type", None) != "longrope":
            yield
            return
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        orig = int(self.text_config.rope_parameters["original_max_position_embeddings"])
        use_long = mi.prompt_len > orig  # HF's prefill: largest position + 1 = prompt_len
        if not use_long and mi.prompt_len + n_new > orig:
            log.warning("%s: a prompt of %d tokens plus %d crosses original_max_position_embeddings=%d: the short "
                        "rotary factors stay (HF generate would switch to the long ones there and recompute its "
                        "cache)", self.name, mi.prompt_len, n_new, orig)
        short = rot.original_inv_freq.detach().clone()
        if use_long:
            pinned, _ = ROPE_INIT_FUNCTIONS["longrope"](self.text_config, short.device, seq_len=orig + 1)
        else:
            pinned = short
        had_long = "long_inv_freq" in rot.__dict__
        saved_long, saved_inv = rot.__dict__.get("long_inv_freq"), rot.inv_freq.detach().clone()
        try:
            # both branches of the model's own choice return the pinned set
            rot.original_inv_freq.copy_(pinned.to(short.dtype))
            rot.long_inv_freq = pinned.to(short.dtype)
            yield
        finally:
            rot.original_inv_freq.copy_(short)
            rot.inv_freq.copy_(saved_inv)
            if had_long:
                rot.long_inv_freq = saved_long
            else:
                rot.__dict__.pop("long_inv_freq", None)

    # ---- tiny model -----------------------------------------------------------------------
    @classmethod
    def tiny(cls, n_layers: int = 4, seed: int = 0, hidden: int = 64, settings: AdapterSettings | None = None,
             original_max: int = 64) -> ModelAdapter:
        """LongRoPE with partial rotary (0.75) switching at `original_max` positions, 56-pixel
        crops of 14-pixel patches (2x2 pooled), a two-block conformer audio encoder."""
        from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

        tok = tiny_phi4_tokenizer()
        g = tok.convert_tokens_to_ids
        head_dim = 16
        half = int(head_dim * 0.75) // 2
        max_pos = 4096
        cfg = Phi4MultimodalConfig(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=n_layers,
            num_attention_heads=hidden // head_dim, num_key_value_heads=max(1, hidden // head_dim // 2),
            max_position_embeddings=max_pos, original_max_position_embeddings=original_max,
            rope_parameters={"rope_type": "longrope", "rope_theta": 10_000.0, "partial_rotary_factor": 0.75,
                             "short_factor": [1.0 + 0.1 * i for i in range(half)],
                             "long_factor": [1.0 + 1.5 * i for i in range(half)],
                             "factor": max_pos / original_max, "original_max_position_embeddings": original_max},
            sliding_window=262_144,  # as the released config: longer than any sequence
            bos_token_id=g("<|endoftext|>"), pad_token_id=g("<|endoftext|>"),
            eos_token_id=[g("<|endoftext|>"), g("<|end|>")], tie_word_embeddings=False,
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=56, crop_size=56, patch_size=14, image_token_id=g("<|image|>")),
            audio_config=dict(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=4,
                              depthwise_separable_out_channel=32, nemo_conv_channels=32, ext_pw_out_channel=32,
                              audio_token_id=g("<|audio|>")),
        )
        cfg.architectures = ["Phi4MultimodalForCausalLM"]
        torch.manual_seed(seed)
        model = Phi4MultimodalForCausalLM(cfg).eval()
        return cls(model, tok, settings or TINY_SETTINGS, name="tiny-phi4-multimodal")


def _has_vision_lora(target: str, local_files_only: bool) -> bool:
    """Whether a checkpoint (a directory or a hub id in the local cache) carries the vision LoRA."""
    if Path(target).is_dir():
        return (Path(target) / VISION_LORA / "adapter_config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(target, f"{VISION_LORA}/adapter_config.json")
    return isinstance(hit, str)


@lru_cache(maxsize=1)
def tiny_phi4_tokenizer() -> Any:
    """Word-level, with Phi-4's chat specials and media placeholders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from avprobe.adapters.tiny_vocab import WORDS  # the shared test words; imports no adapter

    vocab = {w: i for i, w in enumerate(WORDS)}
    for s in PHI4_SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|endoftext|>",
        additional_special_tokens=[s for s in PHI4_SPECIALS if s != "<|endoftext|>"],
    )
