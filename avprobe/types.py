"""Core value types shared by every part of avprobe.

A `Sample` is what a manifest row or the organism world describes; `Media` is a sample
after decoding (frames + 16 kHz waveform), which is what adapters turn into model inputs.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000

# The Qwen-Omni special tokens in the order the small tokenizers (organisms, tests) give them ids.
OMNI_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",  # pad
    "<|im_start|>",
    "<|im_end|>",  # eos
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
    "<|VIDEO|>",
    "<|vision_bos|>",
    "<|vision_eos|>",
    "<|IMAGE|>",
)


class Role(enum.IntEnum):
    """Role of a sequence position. Prompt positions are labelled from token ids."""

    VIDEO = 0
    AUDIO = 1
    IMAGE = 2
    QUERY = 3  # prompt text, including the chat scaffolding words
    SPECIAL = 4  # special tokens: chat markers, modality delimiters
    GENERATED = 5  # earlier generated tokens (only ever keys, seen from later generated rows)

    @classmethod
    def parse(cls, name: str | Role) -> Role:
        if isinstance(name, Role):
            return name
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown role {name!r}; expected one of {[r.name.lower() for r in cls]}") from None

    @property
    def label(self) -> str:
        return self.name.lower()


N_ROLES = len(Role)


@dataclass(frozen=True)
class Sample:
    """One evaluation item: media references plus reference captions.

    `video`/`audio` are paths; `audio=None` means the video's own audio track. The organism
    world produces samples whose media live in memory: it sets `media_key` (a stable content
    id) and is decoded through `avprobe.organism` instead of files.
    """

    id: str
    video: str | None = None
    audio: str | None = None
    audio_captions: tuple[str, ...] = ()
    video_captions: tuple[str, ...] = ()
    kind: str = "factual"  # factual | counterfactual
    labels: tuple[str, ...] = ()  # optional concept labels of the audio (organism: the sound source)
    video_labels: tuple[str, ...] = ()  # optional concept labels of the video
    video_source: str | None = None  # for counterfactuals: id of the clip the video comes from
    audio_source: str | None = None  # for counterfactuals: id of the clip the audio comes from
    media_key: str | None = None  # content id for in-memory media (organism world)
    meta: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("factual", "counterfactual"):
            raise ValueError(f"sample {self.id!r}: kind must be factual or counterfactual, got {self.kind!r}")

    def content_hash(self) -> str:
        """Hash of what the model sees and what the judge compares against.

        File media are hashed by path plus size and mtime (cheap, changes when the file does);
        in-memory media by `media_key`.
        """
        h = hashlib.sha256()
        for part in (self.id, self.kind, self.media_key or ""):
            h.update(part.encode())
            h.update(b"\0")
        for p in (self.video, self.audio):
            h.update((p or "").encode())
            if p is not None and Path(p).exists():
                st = Path(p).stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(b"\0")
        for caps in (self.audio_captions, self.video_captions, self.labels, self.video_labels):
            h.update("\x1f".join(caps).encode())
            h.update(b"\0")
        return h.hexdigest()[:16]


@dataclass
class Media:
    """Decoded media of one sample.

    frames: uint8 [T, H, W, 3] sampled at `fps`; waveform: float32 [N] mono at 16 kHz.
    Either may be None (audio-only or video-only input).
    """

    frames: np.ndarray | None
    fps: float
    waveform: np.ndarray | None
    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.waveform is not None and self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"waveform must be {SAMPLE_RATE} Hz, got {self.sample_rate} Hz: resample when decoding")
        if self.frames is not None and (self.frames.ndim != 4 or self.frames.shape[-1] != 3):
            raise ValueError(f"frames must be uint8 [T, H, W, 3], got shape {self.frames.shape}")


@dataclass(frozen=True)
class SampleError:
    """A sample that could not be processed: recorded, counted, reported, never dropped."""

    sample_id: str
    stage: str  # decode | inputs | engine | judge ...
    path: str | None
    reason: str


@dataclass
class Batch:
    """Helper container for a list of items plus the errors met while producing them."""

    items: list = field(default_factory=list)
    errors: list[SampleError] = field(default_factory=list)
