"""Decode real clips with PyAV: video frames at a target fps, audio as 16 kHz mono float32.

Frame sampling: `n = total / video_fps * fps`, clamped to [min_frames, max_frames], floored to
a multiple of the temporal patch (2), as both qwen-omni-utils and transformers'
`Qwen2VLVideoProcessor.sample_frames` count them. Which n frames is a rule (`frame_rule`):
"linspace" picks `linspace(0, total - 1, n).round()` (qwen-omni-utils, which the paper's
release ran; the default), "floor" picks `floor(i * total / n)` (transformers' sampler). The
returned fps is the effective rate, `n / duration`, so a capped long clip keeps its true time
axis. Resizing and patchifying happen later in `processing.patchify_video`.

Audio is downmixed as the mean of all channels (what `librosa.load(mono=True)` does; LFE
included) and resampled with a polyphase filter (`scipy.signal.resample_poly`).

Every failure is a `MediaError(path, reason)`; `load_many` turns them into `SampleError`
records so a batch goes on.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np

from avprobe.types import SAMPLE_RATE, Media, Sample, SampleError

log = logging.getLogger(__name__)

DEFAULT_FPS = 2.0
DEFAULT_MAX_FRAMES = 768  # Qwen2.5-Omni's FPS_MAX_FRAMES
DEFAULT_MIN_FRAMES = 4
FRAME_FACTOR = 2  # temporal patch size: sampled frame counts are multiples of it
FRAME_RULES = ("linspace", "floor")
DEFAULT_FRAME_RULE = "linspace"  # qwen-omni-utils' rule, the one the paper's release ran

# A container's frame count may overstate what decodes by a frame or two (edit lists, B-frame
# tails); beyond this slack a short stream is a truncated file, not a rounding issue.
_FRAME_SLACK = 0.02
_AUDIO_SLACK = 0.9  # decoded audio below this share of the header's duration = truncated


class MediaError(Exception):
    """A clip that cannot be decoded: names the file and the cause."""

    def __init__(self, path: str | Path | None, reason: str) -> None:
        self.path = None if path is None else str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


def _open(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise MediaError(p, "file not found")
    if not p.is_file():
        raise MediaError(p, "not a regular file")
    if p.stat().st_size == 0:
        raise MediaError(p, "empty file (0 bytes): zero-length clip")
    try:
        return av.open(str(p))
    except av.FFmpegError as exc:
        raise MediaError(p, f"cannot open container (truncated or corrupt?): {exc}") from None


def sample_indices(
    total_frames: int,
    video_fps: float,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    min_frames: int = DEFAULT_MIN_FRAMES,
    frame_factor: int = FRAME_FACTOR,
    rule: str = DEFAULT_FRAME_RULE,
) -> np.ndarray:
    """Indices of the source frames to keep, by `rule` (see the module docstring).

    A clip with fewer frames than `frame_factor` keeps all its frames (patchify pads by
    repeating the last one).
    """
    if total_frames <= 0:
        raise ValueError(f"total_frames must be positive, got {total_frames}")
    if video_fps <= 0 or fps <= 0:
        raise ValueError(f"fps must be positive, got video_fps={video_fps}, fps={fps}")
    if rule not in FRAME_RULES:
        raise ValueError(f"frame rule must be one of {', '.join(FRAME_RULES)}; got {rule!r}")
    cap = math.floor(min(max_frames, total_frames) / frame_factor) * frame_factor
    n = total_frames / video_fps * fps
    n = min(max(n, min_frames), cap, total_frames)
    n = math.floor(n / frame_factor) * frame_factor
    if n <= 0:
        return np.arange(total_frames)
    if rule == "linspace":
        import torch

        # torch's float32 linspace and half-to-even round, as qwen-omni-utils computes them,
        # so ties round the same way
        return torch.linspace(0, total_frames - 1, n).round().long().numpy()
    return np.floor(np.arange(n) * (total_frames / n)).astype(np.int64)


def _no_streams(container, path: Path) -> None:
    if not container.streams:
        raise MediaError(path, "no audio or video streams: an empty (zero-length) clip")


def _video_stream(container, path: Path):
    _no_streams(container, path)
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        hint = " (an audio-only file: put it in the `audio` column instead)" if "audio" in kinds else ""
        raise MediaError(path, f"no video stream; streams found: {kinds or 'none'}{hint}")
    return container.streams.video[0]


def _frame_rate(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _count_frames(path: Path) -> int:
    """Frame count when the header has none (mkv, webm): count packets, no decoding."""
    with _open(path) as c:
        s = c.streams.video[0]
        return sum(1 for pkt in c.demux(s) if pkt.size)


def probe_video(path: str | Path) -> tuple[int, float]:
    """(frame count, frame rate) of a file's first video stream, from the header when it has them."""
    path = Path(path)
    with _open(path) as c:
        s = _video_stream(c, path)
        total, rate = int(s.frames or 0), _frame_rate(s)
        if rate <= 0 and s.duration and s.time_base and total:
            rate = total / float(s.duration * s.time_base)
    if total <= 0:
        total = _count_frames(path)
    if total <= 0:
        raise MediaError(path, "zero-length clip: the video stream has no frames")
    if rate <= 0:
        raise MediaError(path, "video stream has no frame rate")
    return total, rate


def probe_audio(path: str | Path) -> None:
    """Check, from the container's header alone (nothing decoded), that a file has an audio
    track: MediaError naming the file and the streams it has otherwise."""
    path = Path(path)
    with _open(path) as c:
        _no_streams(c, path)
        if not c.streams.audio:
            kinds = sorted({s.type for s in c.streams})
            raise MediaError(path, f"no audio track; streams found: {kinds or 'none'}")


def decode_video(
    path: str | Path,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    *,
    min_frames: int = DEFAULT_MIN_FRAMES,
    frame_factor: int = FRAME_FACTOR,
    frame_rule: str = DEFAULT_FRAME_RULE,
) -> tuple[np.ndarray, float]:
    """Decode sampled frames of a clip: (frames uint8 [T, H, W, 3] RGB, effective fps)."""
    path = Path(path)
    total, video_fps = probe_video(path)
    idx = sample_indices(total, video_fps, fps, max_frames, min_frames, frame_factor, frame_rule)
    wanted = {int(i): k for k, i in enumerate(idx)}
    last = int(idx[-1])
    out: list[np.ndarray | None] = [None] * len(idx)
    decoded = 0
    prev: np.ndarray | None = None
    with _open(path) as c:
        stream = c.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(c.decode(stream)):
                decoded = i + 1
                if i in wanted:
                    prev = frame.to_ndarray(format="rgb24")
                    out[wanted[i]] = prev
                if i >= last:
                    break
        except av.FFmpegError as exc:
            raise MediaError(path, f"corrupt video stream at frame {decoded} of {total}: {exc}") from None
    missing = [k for k, f in enumerate(out) if f is None]
    if missing:
        if decoded == 0 or decoded < total * (1 - _FRAME_SLACK) - 1:
            raise MediaError(path, f"truncated or corrupt video: decoded {decoded} of {total} frames")
        # Header over-counted by a frame or two: repeat the last decoded frame.
        for k in missing:
            out[k] = prev
    frames = np.stack(out)  # type: ignore[arg-type]
    effective_fps = len(idx) / (total / video_fps)
    return frames, effective_fps


def _to_mono(path: Path, container, stream) -> tuple[np.ndarray, int]:
    """Decode one audio stream to float64 mono at its own rate: (samples, rate)."""
    resampler = av.AudioResampler(format="fltp")  # float planar; layout and rate kept
    chunks: list[np.ndarray] = []
    rate = 0
    try:
        for frame in container.decode(stream):
            rate = rate or frame.sample_rate
            if frame.sample_rate != rate:
                raise MediaError(path, f"sample rate changes mid-stream ({rate} -> {frame.sample_rate} Hz)")
            for f in resampler.resample(frame):
                chunks.append(f.to_ndarray().astype(np.float64).mean(axis=0))
        for f in resampler.resample(None):
            chunks.append(f.to_ndarray().astype(np.float64).mean(axis=0))
    except av.FFmpegError as exc:
        raise MediaError(path, f"corrupt audio stream: {exc}") from None
    if not chunks or rate <= 0:
        return np.zeros(0), rate
    return np.concatenate(chunks), rate


def resample(x: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Polyphase resampling of a mono signal from `rate` to `target` Hz."""
    if rate == target or x.size == 0:
        return x
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(x, target // g, int(rate) // g)


def decode_audio(
    path: str | Path,
    sample_rate: int = SAMPLE_RATE,
    *,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode the first audio stream of a file (audio file or video's own track) to mono float32.

    Raises MediaError when the file has no audio stream, no samples, or ends well before its
    header says it should (a truncated download).
    """
    path = Path(path)
    with _open(path) as c:
        _no_streams(c, path)
        if not c.streams.audio:
            kinds = sorted({s.type for s in c.streams})
            raise MediaError(path, f"no audio track; streams found: {kinds or 'none'}")
        stream = c.streams.audio[0]
        header_s = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else None
        if header_s is None and c.duration:
            header_s = c.duration / 1e6
        x, rate = _to_mono(path, c, stream)
    if x.size == 0:
        raise MediaError(path, "zero-length clip: the audio stream has no samples")
    got_s = x.size / rate
    if header_s and got_s < _AUDIO_SLACK * header_s - 0.1:
        raise MediaError(path, f"truncated or corrupt audio: decoded {got_s:.2f} s of {header_s:.2f} s")
    y = resample(x, rate, sample_rate)
    if max_seconds is not None:
        y = y[: int(round(max_seconds * sample_rate))]
    return np.ascontiguousarray(y, dtype=np.float32)


def fit_length(x: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad a waveform to exactly n samples."""
    if x.size >= n:
        return x[:n]
    return np.concatenate([x, np.zeros(n - x.size, dtype=x.dtype)])


def load_media(
    sample: Sample,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    *,
    min_frames: int = DEFAULT_MIN_FRAMES,
    max_audio_seconds: float | None = None,
    frame_rule: str = DEFAULT_FRAME_RULE,
) -> Media:
    """Decode a file-backed sample's frames (picked by `frame_rule`) and 16 kHz mono audio.

    Audio comes from `sample.audio` when set, else from the video's own track (a video with no
    audio track and no audio file is an error). A separate audio file is trimmed or zero-padded
    to the video's duration, as `avprobe dataset counterfactual --mux` does, so a muxed and an
    unmuxed counterfactual decode alike.
    """
    if sample.media_key is not None and sample.video is None and sample.audio is None:
        raise MediaError(None, f"sample {sample.id!r} holds in-memory media: decode it through avprobe.organism")
    if sample.video is None and sample.audio is None:
        raise MediaError(None, f"sample {sample.id!r} names neither a video nor an audio file")
    frames, eff_fps = None, fps
    if sample.video is not None:
        frames, eff_fps = decode_video(sample.video, fps, max_frames, min_frames=min_frames, frame_rule=frame_rule)
    if sample.audio is not None:
        wav = decode_audio(sample.audio, max_seconds=max_audio_seconds)
        if sample.video is not None:
            total, video_fps = probe_video(sample.video)
            wav = fit_length(wav, int(round(total / video_fps * SAMPLE_RATE)))
    else:
        try:
            wav = decode_audio(sample.video, max_seconds=max_audio_seconds)  # type: ignore[arg-type]
        except MediaError as exc:
            if exc.reason.startswith("no audio track"):
                raise MediaError(
                    sample.video,
                    "video has no audio track and the sample names no audio file: "
                    "set the manifest's `audio` column",
                ) from None
            raise
    return Media(frames=frames, fps=eff_fps, waveform=wav)


def load_many(
    samples: Iterable[Sample],
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    *,
    counts: Counter | None = None,
    **kwargs,
) -> Iterator[tuple[Sample, Media | SampleError]]:
    """Decode samples one by one, yielding (sample, Media) or (sample, SampleError).

    A sample that fails never stops the batch. Pass a `Counter` as `counts` to get
    `ok` / `failed` totals (they are also logged at the end).
    """
    counts = Counter() if counts is None else counts
    for sample in samples:
        try:
            media = load_media(sample, fps, max_frames, **kwargs)
        except MediaError as exc:
            counts["failed"] += 1
            yield sample, SampleError(sample.id, "decode", exc.path, exc.reason)
            continue
        except (ValueError, OSError, av.FFmpegError) as exc:
            # Anything the decoders did not foresee still becomes a record, not a crash.
            counts["failed"] += 1
            path = sample.video or sample.audio
            yield sample, SampleError(sample.id, "decode", path, f"{type(exc).__name__}: {exc}")
            continue
        counts["ok"] += 1
        yield sample, media
    log.info("decoded %d samples, %d failed", counts["ok"], counts["failed"])
