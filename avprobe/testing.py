"""Tiny random models of every supported family, built from the real config classes.

Used by the tests and the benchmarks: no weights are downloaded. Each adapter class builds
its own family's tiny model (`ModelAdapter.tiny`); `tiny_adapter(family)` asks it. The
tokenizers are small word-level ones carrying the family's special tokens, so prompts go
through the real adapter code. Ids of the specials are placed at the end of the vocabulary
and written into the configs, as the organisms do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from avprobe.adapters.base import ModelAdapter
from avprobe.adapters.qwen import TINY_SETTINGS  # noqa: F401  (re-exported: the tests import it from here)
from avprobe.types import Media

# The tiny vocabularies live beside the adapters (their tiny() builders use them); re-exported here.
from avprobe.adapters.tiny_vocab import (  # noqa: E402,F401
    GEMMA4_SPECIALS,
    SPECIALS,
    WORDS,
    tiny_gemma4_tokenizer,
    tiny_tokenizer,
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
