"""Tiny random models of every supported family, built from the real config classes.

Used by the tests and the benchmarks: no weights are downloaded. Each adapter class builds
its own family's tiny model (`ModelAdapter.tiny`); `tiny_adapter(family)` asks it. The
tokenizers are small word-level ones carrying the family's special tokens, so prompts go
through the real adapter code. Ids of the specials are placed at the end of the vocabulary
and written into the configs, as the organisms do.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from avprobe.adapters.base import ModelAdapter
from avprobe.adapters.qwen import TINY_SETTINGS  # noqa: F401  (re-exported: the tests import it from here)
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


# Gemma 4's specials (ids from the config; these strings only name them in the tiny vocabulary)
GEMMA4_SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|video|>",
    "<|audio>", "<audio|>", "<|audio|>",
)


@lru_cache(maxsize=1)
def tiny_gemma4_tokenizer() -> Any:
    """Word-level, with Gemma 4's specials, digits and ':' split (the frames' mm:ss stamps)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [*WORDS, "model", ":", *"0123456789"]
    vocab = {w: i for i, w in enumerate(words)}
    for s in GEMMA4_SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(r"[0-9:]"), behavior="isolated")])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
        additional_special_tokens=[s for s in GEMMA4_SPECIALS if s not in ("<pad>", "<bos>", "<eos>")],
    )


def _ids() -> dict[str, int]:
    from avprobe.adapters.qwen import tiny_special_ids

    return tiny_special_ids()


def _text_kwargs(n_layers: int, hidden: int, ids: dict[str, int]) -> dict[str, Any]:
    from avprobe.adapters.qwen import tiny_text_kwargs

    return tiny_text_kwargs(n_layers, hidden, ids)


# The tiny HF models alone (the benchmarks build their adapters around them).
def tiny_omni(n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
    from avprobe.adapters.qwen2_5_omni import OmniThinkerAdapter

    return OmniThinkerAdapter.tiny_model(n_layers=n_layers, hidden=hidden, seed=seed)


def tiny_qwen3_omni(n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
    from avprobe.adapters.qwen3_omni import Qwen3OmniThinkerAdapter

    return Qwen3OmniThinkerAdapter.tiny_model(n_layers=n_layers, hidden=hidden, seed=seed)


def tiny_vl(n_layers: int = 4, hidden: int = 64, seed: int = 0) -> Any:
    from avprobe.adapters.qwen2_5_vl import QwenVLAdapter

    return QwenVLAdapter.tiny_model(n_layers=n_layers, hidden=hidden, seed=seed)


def tiny_adapter(family: str = "qwen2_5_omni", **kw: Any) -> ModelAdapter:
    """A tiny random model of `family` wrapped in its adapter: the family's adapter class
    builds it (`ModelAdapter.tiny`), so a new family needs no change here."""
    from avprobe.adapters.registry import UnsupportedModel, family_class

    try:
        cls = family_class(family)
    except UnsupportedModel:
        raise ValueError(f"unknown family {family!r}") from None
    return cls.tiny(**kw)


def random_media(seconds: float = 4.0, fps: float = 2.0, size: int = 56, seed: int = 0, audio: bool = True,
                 video: bool = True, height: int | None = None) -> Media:
    """Random frames (`size` wide, `height` high, square by default) and noise audio."""
    rng = np.random.default_rng(seed)
    h = size if height is None else height
    frames = rng.integers(0, 255, (int(seconds * fps), h, size, 3), dtype=np.uint8) if video else None
    wav = (0.1 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32) if audio else None
    return Media(frames=frames, fps=fps, waveform=wav)
