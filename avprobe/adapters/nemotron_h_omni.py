"""Nemotron-H Omni (`NemotronH_Omni_Reasoning_V3`): video frames and audio into a hybrid
Mamba-2 / attention language model (Nemotron-H), with a RADIO vision tower and a Parakeet
audio encoder.

The language model is a stack of blocks of four kinds (`text_config.layer_types`): Mamba-2
mixers ("linear_attention": a recurrent state carried along the sequence), attention
("full_attention": no rotary embedding at all), MLP and MoE (no mixing across positions).
Only the attention blocks have attention to knock out or record: see `ModelAdapter.layer_kinds`,
`knockout_is_cut` (False here) and the shared-prefix decode's recurrent state
(`ModelAdapter.recurrent_cache`).

Inputs, built without torchvision, as `NemotronH_Omni_Reasoning_V3Processor` builds them:

- video: every kept frame is resized (float32, bicubic with antialias, no rounding, as the
  video processor's `torch.nn.functional.interpolate`) to the aspect-preserving tile of the
  processor's `_compute_target_patches` (`video_target_num_patches`, 1024 patches of 16 px by
  default; `settings.max_pixels` sets it as pixels), scaled by 1/255 and normalised with the
  vision tower's `norm_mean` / `norm_std` (the config's; the processor takes the same values
  from the checkpoint), then every 2 consecutive frames (`video_temporal_patch_size`) are one
  tubelet stacked on the channel axis, the last padded by repeating its frame. Each tubelet is
  written as the processor writes it: "Frame 1 sampled at 0.00 seconds and frame 2 sampled at
  0.50 seconds: <img>" + <image> x tokens-per-tubelet + "</img>", tubelets joined by a newline;
  a frame's time is its index over the frames' rate. Video tokens are the image token: the
  tokenizer has no video token of its own and the model tells video from image by its input.
  EVS (`video_pruning_rate`) is turned off: roles are per token, so every token is kept.
- audio: `ParakeetFeatureExtractor` (numpy; 128 mel bins from the audio config) at 16 kHz,
  "<so_start>" + <so_embedding> x n + "<so_end>", n as the processor estimates it (1 + samples
  // 160 mel frames through log2(8) stride-2 convolutions: 80 ms per token).
- prompt: the Nemotron 3 chat template with thinking off, no BOS: "<|im_start|>system\\n" +
  system prompt + "<|im_end|>\\n" (the template always writes a system turn, empty by default),
  "<|im_start|>user\\n" + video + "\\n" + audio + "\\n" + query + "<|im_end|>\\n<|im_start|>
  assistant\\n<think></think>". The separators between the media blocks and the query are ours
  (the released template was not at hand offline).

Positions are the sequence index: no layer uses them but the causal mask.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from avprobe.adapters.base import AdapterSettings, MediaTokens, ModelAdapter, ModelInputs, Segment
from avprobe.types import Media

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # the Parakeet feature extractor's hop (10 ms)
TARGET_PATCHES = 1024  # NemotronH_Omni_Reasoning_V3VideoProcessor.video_target_num_patches
# Settings of the tiny test model: 32 x 32 px frames (a 4 x 4 patch grid of 8 px) -> 4 tokens per tubelet.
TINY_SETTINGS = AdapterSettings(use_audio_in_video=False, max_pixels=16 * 8 * 8)
TINY_SPECIALS = ("<unk>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<img>", "</img>", "<so_start>",
                 "<so_end>", "<so_embedding>", "<think>", "</think>")


@lru_cache(maxsize=2)
def _feature_extractor(mel_bins: int):
    from transformers import ParakeetFeatureExtractor

    return ParakeetFeatureExtractor(feature_size=mel_bins)


def audio_token_count(n_samples: int, factor: int = 8, kernel: int = 3, stride: int = 2) -> int:
    """Audio tokens of a clip, as `NemotronH_Omni_Reasoning_V3Processor._estimate_audio_num_embeddings`."""
    length = 1 + n_samples // HOP_LENGTH
    add_pad = (kernel - 1) // 2 * 2 - kernel
    for _ in range(int(math.log2(factor))):
        length = (length + add_pad) // stride + 1
    return max(1, length)


def audio_inputs(waveform: np.ndarray, mel_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 kHz mono -> (input_features [1, F, mel_bins], input_features_mask [1, F])."""
    if waveform.ndim != 1:
        raise ValueError(f"waveform must be mono [N], got shape {waveform.shape}")
    out = _feature_extractor(mel_bins)([waveform.astype(np.float32)], sampling_rate=SAMPLE_RATE, return_tensors="np")
    return torch.from_numpy(out["input_features"]).float(), torch.from_numpy(out["attention_mask"]).long()


def target_patches(height: int, width: int, target: int, divisor: int) -> tuple[int, int]:
    """(width, height) in patches: the aspect-preserving tile near `target` patches whose sides
    are multiples of `divisor`, as the video processor's `_compute_target_patches`."""
    aspect = width / max(height, 1)
    ph = max(round(math.sqrt(target / aspect)), 1)
    pw = max(round(math.sqrt(target * aspect)), 1)
    if divisor > 1:
        rh, rw = ph % divisor, pw % divisor
        ph_up, pw_up = ph + (divisor - rh if rh else 0), pw + (divisor - rw if rw else 0)
        if ph_up * pw_up <= target:
            ph, pw = ph_up, pw_up
        else:
            ph, pw = max(divisor, ph - rh), max(divisor, pw - rw)
    return pw, ph


def video_tubelets(frames: np.ndarray, patch: int, divisor: int, target: int, mean, std, temporal: int
                   ) -> tuple[torch.Tensor, int]:
    """uint8 [T, H, W, 3] -> (pixel_values_videos [1, tubelets, temporal*3, h, w] float32,
    tokens per tubelet), as the video processor's `_preprocess`."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("video has no frames")
    n, h, w, _ = frames.shape
    wp, hp = target_patches(h, w, target, divisor)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if (h, w) != (hp * patch, wp * patch):
        x = F.interpolate(x, size=(hp * patch, wp * patch), mode="bicubic", align_corners=False, antialias=True)
    x = (x / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    if n % temporal:
        x = torch.cat([x, x[-1:].expand(temporal - n % temporal, -1, -1, -1)])
    return x.reshape(1, -1, temporal * 3, hp * patch, wp * patch), hp * wp // divisor**2


class NemotronHOmniAdapter(ModelAdapter):
    family: ClassVar[str] = "nemotron_h_omni"
    # the released checkpoints name the pre-port remote-code class; both load as the native one
    architectures: ClassVar[tuple[str, ...]] = ("NemotronH_Omni_Reasoning_V3", "NemotronH_Nano_Omni_Reasoning_V3")
    checkpoints: ClassVar[dict[str, tuple[str, str | None]]] = {
        "NemotronH_Nano_Omni_Reasoning_V3": ("NemotronH_Omni_Reasoning_V3", None),
    }
    paths: ClassVar[dict[str, str]] = {
        "text_model": "language_model.model",
        "layers": "language_model.model.layers",
        "final_norm": "language_model.model.norm_f",
        "embed": "language_model.model.embeddings",
        "unembed": "language_model.lm_head",
    }
    special_tokens: ClassVar[dict[str, tuple[str, ...]]] = {
        "video": ("image_token_id", "<image>"),  # the processor writes video tubelets with the image token
        "audio": ("audio_token_id", "<so_embedding>"),
        "image_start": ("<img>",),
        "image_end": ("</img>",),
        "audio_start": ("<so_start>",),
        "audio_end": ("<so_end>",),
        "turn_start": ("<|im_start|>",),
        "turn_end": ("<|im_end|>",),
        "think_start": ("<think>",),
        "think_end": ("</think>",),
    }
    turn_end: ClassVar[str | None] = "turn_end"
    position_batch_dim: ClassVar[int] = 0  # positions [B, P]

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        if getattr(self.model, "video_pruning_rate", 0.0):
            # EVS drops video tokens inside the forward: the roles and positions built here would
            # no longer line up with the sequence the language model sees
            self.model.video_pruning_rate = 0.0

    # ---- media and prompt -----------------------------------------------------------------
    def encode_video(self, media: Media) -> MediaTokens:
        vc = self.config.vision_config
        frames = media.frames[: self.settings.max_frames]
        patch = int(vc.patch_size)
        divisor = int(round(1 / self.config.downsample_ratio))
        target = self.settings.max_pixels // patch**2 if self.settings.max_pixels else TARGET_PATCHES
        temporal = int(self.config.video_temporal_patch_size)
        pv, per = video_tubelets(frames, patch, divisor, target, vc.norm_mean, vc.norm_std, temporal)
        n_frames, n_tub = int(frames.shape[0]), int(pv.shape[1])
        stamps = np.arange(n_frames) / media.fps
        times = np.repeat(stamps[::temporal][:n_tub], per)  # a tubelet's tokens at its first frame's time
        return MediaTokens({"pixel_values_videos": pv.to(self.dtype)}, n_tub * per, times,
                           torch.as_tensor(times, dtype=torch.float32),
                           layout={"per_tubelet": per, "stamps": stamps, "temporal": temporal})

    def encode_audio(self, media: Media) -> MediaTokens:
        ac = self.config.audio_config
        feats, mask = audio_inputs(media.waveform, int(ac.num_mel_bins))
        n = audio_token_count(len(media.waveform), int(ac.subsampling_factor), int(ac.subsampling_conv_kernel_size),
                              int(ac.subsampling_conv_stride))
        sec = HOP_LENGTH * int(ac.subsampling_factor) / SAMPLE_RATE
        times = torch.arange(n, dtype=torch.float32) * sec
        return MediaTokens({"input_features": feats.to(self.dtype), "input_features_mask": mask}, n,
                           times.numpy().astype(np.float64), times)

    @staticmethod
    def tubelet_label(stamps: np.ndarray, group: int, temporal: int) -> str:
        """The processor's label of one tubelet: its frames, 1-based, with their times."""
        parts = []
        for off in range(temporal):
            i = group * temporal + off
            if i >= len(stamps):
                break
            parts.append(f"{'Frame' if off == 0 else 'frame'} {i + 1} sampled at {float(stamps[i]):.2f} seconds")
        return " and ".join(parts) + ": "

    def media_segments(self, video: MediaTokens | None, audio: MediaTokens | None) -> list[Segment]:
        segs: list[Segment] = []
        if video is not None and video.n_tokens:
            tile = [self.special("image_start"), *[self.special("video")] * video.layout["per_tubelet"],
                    self.special("image_end")]
            n_tub = video.n_tokens // video.layout["per_tubelet"]
            for g in range(n_tub):
                segs += [("\n" if g else "") + self.tubelet_label(video.layout["stamps"], g, video.layout["temporal"]),
                         tile]
            segs.append("\n")
        if audio is not None and audio.n_tokens:
            segs += [[self.special("audio_start"), *[self.special("audio")] * audio.n_tokens,
                      self.special("audio_end")], "\n"]
        return segs

    def prompt_segments(self, media_ids: list[Segment], query: str) -> list[Segment]:
        ts, te = self.special("turn_start"), self.special("turn_end")
        return [[ts], "system\n" + (self.settings.system_prompt or ""), [te], "\n",
                [ts], "user\n", *media_ids, query, [te], "\n",
                [ts], "assistant\n", [self.special("think_start"), self.special("think_end")]]

    # ---- positions: the sequence index (only the causal mask reads them) ------------------
    def compute_positions(self, mi: ModelInputs) -> torch.Tensor:
        return torch.arange(mi.input_ids.shape[1])[None]

    def step_positions(self, mi: ModelInputs, t: int, rows: int) -> torch.Tensor:
        return (mi.positions[0, mi.prompt_len - 1] + t).view(1, 1).expand(rows, 1)

    # ---- tiny model ---------------------------------------------------------------------
    @staticmethod
    def tiny_tokenizer() -> Any:
        """Word-level, with Nemotron-H Omni's specials; digits, ':' and '.' split (the frame stamps)."""
        return _tiny_tokenizer()

    @classmethod
    def tiny(cls, n_layers: int = 6, seed: int = 0, hidden: int = 64, settings: AdapterSettings | None = None,
             **_: Any) -> ModelAdapter:
        """Mamba-2, attention, MoE and MLP blocks (in that cycle: every kind the engine meets),
        a Mamba chunk of 8 positions (a prompt spans many chunks), a 1-layer RADIO tower on 8 px
        patches and a 1-layer Parakeet encoder on 128 mel bins."""
        from transformers import (
            NemotronH_Omni_Reasoning_V3,
            NemotronH_Omni_Reasoning_V3_Config,
            NemotronHConfig,
            ParakeetEncoderConfig,
            RadioConfig,
        )

        tok = _tiny_tokenizer()
        g = tok.convert_tokens_to_ids
        cycle = ["linear_attention", "full_attention", "moe", "linear_attention", "mlp", "full_attention"]
        kinds = [cycle[i % len(cycle)] for i in range(n_layers)]
        text = NemotronHConfig(
            vocab_size=len(tok), hidden_size=hidden, layers_block_type=kinds, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, intermediate_size=hidden * 2, moe_intermediate_size=32,
            moe_shared_expert_intermediate_size=32, mlp_hidden_act="relu2", mamba_hidden_act="silu",
            ssm_state_size=16, mamba_num_heads=8, mamba_n_groups=2, mamba_head_dim=8, mamba_d_conv=4,
            mamba_expand=2, mamba_chunk_size=8, n_routed_experts=4, num_experts_per_tok=2,
            pad_token_id=g("<unk>"), bos_token_id=g("<|im_start|>"), eos_token_id=g("<|im_end|>"),
            tie_word_embeddings=False,
        )
        vision = RadioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2.0, patch_size=8,
                             image_size=32, max_img_size=64, num_cls_tokens=2, num_registers=1,
                             video_temporal_patch_size=2)
        audio = ParakeetEncoderConfig(
            hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64, conv_kernel_size=9,
            convolution_bias=False, subsampling_conv_channels=16, subsampling_conv_kernel_size=3,
            subsampling_conv_stride=2, subsampling_factor=8, num_mel_bins=128, attention_bias=False,
            scale_input=False, projection_hidden_size=64, projection_bias=False)
        cfg = NemotronH_Omni_Reasoning_V3_Config(
            text_config=text, vision_config=vision, audio_config=audio, vision_hidden_size=32,
            projector_hidden_size=64, image_token_id=g("<image>"), video_token_id=g("<video>"),
            audio_token_id=g("<so_embedding>"))
        cfg.architectures = ["NemotronH_Omni_Reasoning_V3"]
        torch.manual_seed(seed)
        model = NemotronH_Omni_Reasoning_V3(cfg).eval()
        return cls(model, tok, settings or TINY_SETTINGS, name="tiny-nemotron-h-omni")


@lru_cache(maxsize=1)
def _tiny_tokenizer() -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from avprobe.adapters.tiny_vocab import WORDS

    words = [*WORDS[1:], "Frame", "frame", "sampled", "at", "seconds", ":", *"0123456789"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    for s in TINY_SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[0-9:.]"), behavior="isolated")])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<unk>", eos_token="<|im_end|>",
        additional_special_tokens=[s for s in TINY_SPECIALS if s not in ("<unk>", "<|im_end|>")],
    )
