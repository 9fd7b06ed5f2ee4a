"""Gemma 4 (`Gemma4ForConditionalGeneration`): video frames and audio, one rotary axis,
sliding-window and full-attention layers, key/value layers shared across the last layers.

Inputs, built without torchvision, as `Gemma4Processor` builds them:

- video: every kept frame is resized to the processor's aspect-preserving size for
  `max_soft_tokens` soft tokens (`get_aspect_ratio_preserving_size`, imported from upstream),
  bicubic with antialias in float32 then rounded to uint8, as torchvision's resize does for
  uint8 frames; scaled by 1/255 (mean 0, std 1), cut into patch_size patches (channels
  last) with their (x, y) patch positions, padded with -1 positions to the patch budget. The
  frames are the ones avprobe's decoder keeps (`settings.fps`, `settings.frame_rule`), not
  the video processor's own sampler (32 frames by default). Each frame is written as the
  processor does: "mm:ss <|image>" + <|video|> x tokens-per-frame + "<image|>", frames joined
  by a space, the stamp being the frame's time in the clip (frame index / the frames' rate).
  The stamps are plain text: they get the role `query`, as other scaffolding words do.
- audio: `Gemma4AudioFeatureExtractor` (numpy) with the processor's defaults (padded to a
  multiple of 128 samples, cut at 30 s), "<|audio>" + <|audio|> x n + "<audio|>", n from the
  mask through the audio tower's two stride-2 convolutions (40 ms per token).
- prompt: "<bos><|turn>user\\n" + frames + audio + query + "<turn|>\\n<|turn>model\\n" (a
  system turn first if `settings.system_prompt`; the query before the frames with
  `settings.prompt_layout = "text-first"`, not checked against Gemma's chat template), the chat
  template with thinking off;
  `mm_token_type_ids` as the processor's (1 image, 2 video, 3 audio), which the model reads
  for its bidirectional attention over each frame's tokens.

Positions are the sequence index (one axis); each layer type keeps its own rotary
parameters inside the model. Logits carry the model's final soft-cap.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from avprobe.adapters.base import (
    LANGUAGE_MODEL_PATHS,
    AdapterSettings,
    MediaTokens,
    ModelAdapter,
    ModelInputs,
    Segment,
)
from avprobe.types import Media

AUDIO_MS_PER_TOKEN = 40  # Gemma4Processor.audio_ms_per_token: the tower's 4x reduction of 10 ms frames
# Settings of the tiny test model: a short clip's frames, as the Qwen tiny models get.
TINY_SETTINGS = AdapterSettings(use_audio_in_video=False)


@lru_cache(maxsize=1)
def _feature_extractor():
    from transformers.models.gemma4.feature_extraction_gemma4 import (
        Gemma4AudioFeatureExtractor,
    )

    return Gemma4AudioFeatureExtractor()


def audio_inputs(waveform: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """16 kHz mono -> (input_features [1, F, 128], input_features_mask [1, F] bool, tokens)."""
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [N], got shape {waveform.shape}")
    out = _feature_extractor()([waveform.astype(np.float32)], return_tensors="np")
    mask = out["input_features_mask"][0]
    # Gemma4Processor.replace_audio_token: the mask through two stride-2 convolutions
    t = len(mask)
    for _ in range(2):
        t = (t + 2 - 3) // 2 + 1
        mask = mask[::2][:t]
    return (torch.from_numpy(out["input_features"]).float(), torch.from_numpy(out["input_features_mask"]),
            int(mask.sum()))


def patchify_frames(frames: np.ndarray, patch_size: int, pooling: int, max_soft_tokens: int
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """uint8 [T, H, W, 3] -> (pixel_values_videos [T, max_patches, p*p*3] float32,
    video_position_ids [T, max_patches, 2], soft tokens per frame), as Gemma4VideoProcessor."""
    from transformers.models.gemma4.processing_gemma4 import (
        get_aspect_ratio_preserving_size,
    )

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("video has no frames")
    t, h, w, _ = frames.shape
    max_patches = max_soft_tokens * pooling**2
    th, tw = get_aspect_ratio_preserving_size(height=h, width=w, patch_size=patch_size, max_patches=max_patches,
                                              pooling_kernel_size=pooling)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # uint8 [T, C, H, W]
    if (th, tw) != (h, w):
        # torchvision resizes uint8 bicubic in float32, then rounds and clamps back to uint8
        x = F.interpolate(x.float(), size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    x = x.float() / 255.0
    ph, pw = th // patch_size, tw // patch_size
    patches = x.reshape(t, 3, ph, patch_size, pw, patch_size).permute(0, 2, 4, 3, 5, 1).reshape(t, ph * pw, -1)
    gx, gy = torch.meshgrid(torch.arange(pw), torch.arange(ph), indexing="xy")
    pos = torch.stack([gx, gy], dim=-1).reshape(ph * pw, 2)[None].repeat(t, 1, 1)
    pad = max_patches - ph * pw
    if pad > 0:
        patches = F.pad(patches, (0, 0, 0, pad), value=0.0)
        pos = F.pad(pos, (0, 0, 0, pad), value=-1)
    return patches, pos, ph * pw // pooling**2


def timestamp(seconds: float) -> str:
    """mm:ss, as Gemma4Processor writes a frame's time."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


class Gemma4Adapter(ModelAdapter):
    family: ClassVar[str] = "gemma4"
    architectures: ClassVar[tuple[str, ...]] = ("Gemma4ForConditionalGeneration",)
    paths: ClassVar[dict[str, str]] = dict(LANGUAGE_MODEL_PATHS)
    special_tokens: ClassVar[dict[str, tuple[str, ...]]] = {
        "video": ("video_token_id",),
        "audio": ("audio_token_id",),
        "image": ("image_token_id",),
        "image_start": ("boi_token_id",),
        "image_end": ("eoi_token_id",),
        "audio_start": ("boa_token_id",),
        "audio_end": ("eoa_token_index", "eoa_token_id"),
        "bos": ("bos_token_id",),
        "turn_start": ("<|turn>",),
        "turn_end": ("<turn|>",),
    }
    turn_end: ClassVar[str | None] = "turn_end"
    position_batch_dim: ClassVar[int] = 0  # positions [B, P]
    per_token_inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "mm_token_type_ids")
    max_soft_tokens: ClassVar[int] = 70  # Gemma4VideoProcessor's per-frame budget

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if getattr(self.text_config, "use_bidirectional_attention", None) == "all":
            # every prompt and generated row would see later keys: not a causal decoder
            raise ValueError(f"{self.name}: use_bidirectional_attention='all' is not a causal model; avprobe "
                             "decodes causal models only")

    # ---- media and prompt -----------------------------------------------------------------
    def encode_video(self, media: Media) -> MediaTokens:
        vc = self.config.vision_config
        frames = media.frames[: self.settings.max_frames]
        pv, pos, per_frame = patchify_frames(frames, int(vc.patch_size), int(vc.pooling_kernel_size),
                                             self.max_soft_tokens)
        n_frames = int(frames.shape[0])
        stamps = np.arange(n_frames) / media.fps  # each frame's time in the clip
        tensors = {"pixel_values_videos": pv.to(self.dtype), "video_position_ids": pos,
                   "num_frames_per_video": torch.tensor([n_frames])}
        times = np.repeat(stamps, per_frame)
        return MediaTokens(tensors, n_frames * per_frame, times, torch.as_tensor(times, dtype=torch.float32),
                           layout={"per_frame": per_frame, "stamps": stamps})

    def encode_audio(self, media: Media) -> MediaTokens:
        feats, mask, n = audio_inputs(media.waveform)
        times = torch.arange(n, dtype=torch.float32) * (AUDIO_MS_PER_TOKEN / 1000.0)
        return MediaTokens({"input_features": feats.to(self.dtype), "input_features_mask": mask}, n,
                           times.numpy().astype(np.float64), times)

    def media_segments(self, video: MediaTokens | None, audio: MediaTokens | None) -> list[Segment]:
        segs: list[Segment] = []
        if video is not None and video.n_tokens:
            frame = [self.special("image_start"), *[self.special("video")] * video.layout["per_frame"],
                     self.special("image_end")]
            for i, s in enumerate(video.layout["stamps"]):
                # the text between specials is tokenized on its own, as in the processor's string
                segs += [(" " if i else "") + timestamp(float(s)) + " ", frame]
        if audio is not None and audio.n_tokens:
            segs.append([self.special("audio_start"), *[self.special("audio")] * audio.n_tokens,
                         self.special("audio_end")])
        return segs

    def prompt_segments(self, media_ids: list[Segment], query: str) -> list[Segment]:
        ts, te = self.special("turn_start"), self.special("turn_end")
        segs: list[Segment] = [[self.special("bos")]]
        if self.settings.system_prompt:
            segs += [[ts], "system\n" + self.settings.system_prompt, [te], "\n"]
        segs += [[ts], *self.user_content("user\n", media_ids, query), [te], "\n", [ts], "model\n"]
        return segs

    def extra_inputs(self, input_ids, roles, video, audio) -> dict[str, Any]:
        """mm_token_type_ids from the soft-token ids, as the processor's: the model reads them
        for the bidirectional attention within each frame (use_bidirectional_attention='vision')."""
        tt = torch.zeros_like(input_ids)
        for name, kind in (("image", 1), ("video", 2), ("audio", 3)):
            tid = self._specials.get(name)
            if tid is not None:
                tt[input_ids == tid] = kind
        return {"mm_token_type_ids": tt}

    # ---- positions: the sequence index -----------------------------------------------------
    def compute_positions(self, mi: ModelInputs) -> torch.Tensor:
        return torch.arange(mi.input_ids.shape[1])[None]

    def step_positions(self, mi: ModelInputs, t: int, rows: int) -> torch.Tensor:
        return (mi.positions[0, mi.prompt_len - 1] + t).view(1, 1).expand(rows, 1)

    # ---- running the model --------------------------------------------------------------
    def decode_inputs(self, tokens: torch.Tensor) -> dict[str, Any]:
        """A generated media soft-token id is fed as the model feeds it without media: as the
        pad token (Gemma4Model.forward swaps it out of the embeddings and per-layer inputs)."""
        mm = [self._specials[k] for k in ("image", "video", "audio") if self._specials.get(k) is not None]
        ids = torch.where(torch.isin(tokens, torch.tensor(mm, device=tokens.device)),
                          int(self.text_config.pad_token_id), tokens)
        return {"input_ids": ids[:, None]}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.unembed(hidden)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap is not None:  # as Gemma4ForConditionalGeneration.forward
            logits = torch.tanh(logits / cap) * cap
        return logits

    def prefill_logits_to_keep(self, n: int, all_rows: bool = False) -> int | torch.Tensor:
        # An int lets the model run its key/value-sharing layers on the kept rows only; a
        # tensor of indices keeps every row in every layer (the logit lens reads them).
        if all_rows and getattr(self.text_config, "num_kv_shared_layers", 0):
            return torch.tensor([n - 1])
        return 1

    # ---- tiny model ---------------------------------------------------------------------
    @classmethod
    def tiny(cls, n_layers: int = 4, seed: int = 0, hidden: int = 64, settings: AdapterSettings | None = None,
             sliding_window: int = 16, kv_shared: int | None = None, bidirectional: str | None = "vision",
             ) -> ModelAdapter:
        """Sliding layers with a 16-key window, full layers every second layer (and last),
        the last half of the layers sharing keys and values, per-layer inputs, keys equal to
        values in full layers, a final soft-cap: every Gemma 4 feature the engine meets."""
        from transformers import Gemma4Config, Gemma4ForConditionalGeneration

        from avprobe.adapters.tiny_vocab import tiny_gemma4_tokenizer  # test fixtures, imported only when asked for

        tok = tiny_gemma4_tokenizer()
        g = tok.convert_tokens_to_ids
        vocab = len(tok)
        layer_types = ["full_attention" if i % 2 else "sliding_attention" for i in range(n_layers)]
        layer_types[-1] = "full_attention"
        if kv_shared is None:
            kv_shared = n_layers // 2 if n_layers >= 4 else 0
        text = dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
            attention_k_eq_v=True, num_global_key_value_heads=1, max_position_embeddings=4096,
            sliding_window=sliding_window, layer_types=layer_types, num_kv_shared_layers=kv_shared,
            hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab, final_logit_softcapping=30.0,
            use_bidirectional_attention=bidirectional, pad_token_id=g("<pad>"),
            eos_token_id=[g("<eos>"), g("<turn|>")], bos_token_id=g("<bos>"), tie_word_embeddings=True,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
            },
        )
        cfg = Gemma4Config(
            text_config=text,
            # the audio tower's convolutions take 128 mel bins into subsampling_conv_channels[0]
            audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              subsampling_conv_channels=[128, 4], output_proj_dims=32),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               num_key_value_heads=2, head_dim=16, patch_size=8, pooling_kernel_size=2,
                               position_embedding_size=64),
            boi_token_id=g("<|image>"), eoi_token_id=g("<image|>"), image_token_id=g("<|image|>"),
            video_token_id=g("<|video|>"), boa_token_id=g("<|audio>"), eoa_token_index=g("<audio|>"),
            audio_token_id=g("<|audio|>"),
        )
        cfg.architectures = ["Gemma4ForConditionalGeneration"]
        torch.manual_seed(seed)
        model = Gemma4ForConditionalGeneration(cfg).eval()
        return cls(model, tok, settings or TINY_SETTINGS, name="tiny-gemma4")

