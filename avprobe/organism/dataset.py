"""The organism evaluation set (and training clip lists), deterministic, from unseen seeds.

`eval_samples()` gives 500 in-memory `Sample`s: 250 factual and 250 counterfactual (the
video of one source with the audio of another). `write_dataset(out, mp4=True)` also writes
them as mp4 files (h264 video, aac audio) plus a JSONL manifest, so the file path of the
engine can be exercised end to end.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from avprobe.organism.world import (
    EVAL_SEED_BASE,
    FPS,
    SOURCES,
    Clip,
    clip_to_sample,
    train_seed,
)
from avprobe.types import SAMPLE_RATE, Sample

log = logging.getLogger(__name__)

N_EVAL = 500
_AUDIO_SEED_OFFSET = 500_000  # audio seeds sit apart from video seeds inside each range


def _counterfactual_audio(video_index: int, i: int) -> int:
    """A different source for the audio, cycling so every (video, audio) pair appears."""
    return (video_index + 1 + (i // len(SOURCES)) % (len(SOURCES) - 1)) % len(SOURCES)


def eval_clips(n: int = N_EVAL) -> list[Clip]:
    """The evaluation clips: first half factual, second half counterfactual, sources balanced."""
    if n < 2 or n % 2:
        raise ValueError(f"evaluation set size must be even and >= 2, got {n}")
    half = n // 2
    clips = []
    for i in range(n):
        v = i % len(SOURCES)
        a = v if i < half else _counterfactual_audio(v, i - half)
        clips.append(Clip(SOURCES[v], EVAL_SEED_BASE + i, SOURCES[a], EVAL_SEED_BASE + _AUDIO_SEED_OFFSET + i))
    return clips


def eval_samples(n: int = N_EVAL) -> list[Sample]:
    """The evaluation set as in-memory samples (ids `organism-0000` ...)."""
    return [clip_to_sample(c, f"organism-{i:04d}") for i, c in enumerate(eval_clips(n))]


def train_clips(run_seed: int, n: int, kind: str, offset: int = 0,
                audio_sources: tuple[str, ...] | None = None) -> list[Clip]:
    """n training clips of one kind (factual | counterfactual | audio | video) for a run seed.

    Sources are drawn at random (seeded); clip seeds come from `train_seed`, disjoint from
    the evaluation seeds. `offset` separates the pools of one run (indices must not overlap).
    `audio_sources` restricts a counterfactual clip's audio to those sources (the partial
    listener's off-screen sounds).
    """
    rng = np.random.default_rng([run_seed, offset, 7])
    out = []
    for i in range(n):
        v = int(rng.integers(len(SOURCES)))
        idx = offset + i
        vseed, aseed = train_seed(run_seed, 2 * idx), train_seed(run_seed, 2 * idx + 1)
        if kind in ("factual", "video"):
            out.append(Clip(SOURCES[v], vseed, SOURCES[v], aseed))
        elif kind == "counterfactual" and audio_sources:
            allowed = [s for s in audio_sources if s != SOURCES[v]]
            out.append(Clip(SOURCES[v], vseed, allowed[int(rng.integers(len(allowed)))], aseed))
        elif kind == "counterfactual":
            a = (v + 1 + int(rng.integers(len(SOURCES) - 1))) % len(SOURCES)
            out.append(Clip(SOURCES[v], vseed, SOURCES[a], aseed))
        elif kind == "audio":
            out.append(Clip(None, 0, SOURCES[v], aseed))
        elif kind == "any-audio":
            # a video with whatever audio track it had: any source, often not the visible one
            out.append(Clip(SOURCES[v], vseed, SOURCES[int(rng.integers(len(SOURCES)))], aseed))
        else:
            raise ValueError(f"unknown clip kind {kind!r}; expected factual, counterfactual, audio, video or any-audio")
    return out


def write_mp4(path: Path, frames: np.ndarray, waveform: np.ndarray, fps: float = FPS) -> None:
    """Write frames (uint8 [T, H, W, 3]) and a 16 kHz mono waveform as an mp4 (h264 + aac)."""
    import av
    from fractions import Fraction

    with av.open(str(path), mode="w") as container:
        vstream = container.add_stream("h264", rate=Fraction(fps).limit_denominator(1000))
        vstream.width, vstream.height = frames.shape[2], frames.shape[1]
        vstream.pix_fmt = "yuv420p"
        vstream.options = {"crf": "12", "preset": "fast"}
        astream = container.add_stream("aac", rate=SAMPLE_RATE)
        astream.layout = "mono"
        for frame in frames:
            for packet in vstream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        chunk = 1024
        for start in range(0, waveform.size, chunk):
            part = waveform[start : start + chunk].astype(np.float32)[None, :]
            aframe = av.AudioFrame.from_ndarray(part, format="flt", layout="mono")
            aframe.sample_rate = SAMPLE_RATE
            aframe.pts = start
            for packet in astream.encode(aframe):
                container.mux(packet)
        for packet in astream.encode():
            container.mux(packet)


def sample_record(sample: Sample) -> dict:
    """A JSON-able manifest row with every `Sample` field (tuples as lists)."""
    row = asdict(sample)
    row["meta"] = dict(sample.meta)
    return row


def sample_from_record(row: dict) -> Sample:
    """Inverse of `sample_record`."""
    fields = dict(row)
    for key in ("audio_captions", "video_captions", "labels", "video_labels"):
        fields[key] = tuple(fields.get(key, ()))
    fields["meta"] = tuple((str(k), str(v)) for k, v in dict(fields.get("meta", {})).items())
    return Sample(**fields)


def write_dataset(out: Path, n: int = N_EVAL, mp4: bool = False) -> Path:
    """Write the evaluation set's manifest (and mp4 files with `mp4=True`); returns the manifest path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.jsonl"
    rows = []
    for i, (clip, sample) in enumerate(zip(eval_clips(n), eval_samples(n), strict=True)):
        if mp4:
            path = out / f"{sample.id}.mp4"
            media = clip.media()
            write_mp4(path, media.frames, media.waveform)
            sample = Sample(**{**sample.__dict__, "video": str(path.relative_to(out))})
        rows.append(json.dumps(sample_record(sample)))
        if mp4 and (i + 1) % 100 == 0:
            log.info("wrote %d/%d clips", i + 1, n)
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(rows) + "\n")
    tmp.replace(manifest)
    return manifest
