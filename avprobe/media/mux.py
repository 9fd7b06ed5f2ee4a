"""Write a counterfactual clip: one clip's video stream (copied, not re-encoded) with another
file's audio, trimmed or zero-padded to the video's length and encoded as AAC in an mp4.

The audio keeps its own sample rate (resampled to 48 kHz only when AAC cannot take it) and
channel layout (mono, stereo or 5.1; other layouts are mixed to stereo).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from avprobe.media.decode import MediaError, _open
from avprobe.types import Sample, SampleError

log = logging.getLogger(__name__)

_AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})
_LAYOUT_BY_CHANNELS = {1: "mono", 2: "stereo", 6: "5.1"}
_CHUNK = 1024  # AAC frame size


def video_seconds(path: str | Path) -> float:
    """Duration of a file's first video stream, in seconds."""
    path = Path(path)
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(path, "no video stream to mux onto")
        s = c.streams.video[0]
        if s.duration and s.time_base:
            return float(s.duration * s.time_base)
        rate = s.average_rate or s.guessed_rate
        if s.frames and rate:
            return s.frames / float(rate)
        if c.duration:
            return c.duration / 1e6
    raise MediaError(path, "cannot tell the video's duration")


def _decode_for_aac(path: Path) -> tuple[np.ndarray, int, str]:
    """Audio of `path` as float32 planar [C, n] in an AAC-friendly rate and layout."""
    with _open(path) as c:
        if not c.streams.audio:
            raise MediaError(path, "no audio track to take the audio from")
        s = c.streams.audio[0]
        channels = s.codec_context.channels
        layout = _LAYOUT_BY_CHANNELS.get(channels, "stereo")
        rate = s.rate if s.rate in _AAC_RATES else 48_000
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = []
        try:
            for frame in c.decode(s):
                chunks.extend(f.to_ndarray() for f in resampler.resample(frame))
            chunks.extend(f.to_ndarray() for f in resampler.resample(None))
        except av.FFmpegError as exc:
            raise MediaError(path, f"corrupt audio stream: {exc}") from None
    if not chunks:
        raise MediaError(path, "zero-length clip: the audio stream has no samples")
    return np.concatenate(chunks, axis=1).astype(np.float32), rate, layout


def mux(video_path: str | Path, audio_path: str | Path, out_path: str | Path) -> Path:
    """Write `out_path` (mp4): the video stream of `video_path` copied, audio from `audio_path`
    fitted to the video's length. Written atomically; raises MediaError naming the bad file."""
    video_path, audio_path, out_path = Path(video_path), Path(audio_path), Path(out_path)
    seconds = video_seconds(video_path)
    audio, rate, layout = _decode_for_aac(audio_path)
    n = int(round(seconds * rate))
    if audio.shape[1] >= n:
        audio = audio[:, :n]
    else:
        audio = np.pad(audio, ((0, 0), (0, n - audio.shape[1])))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        with _open(video_path) as src, av.open(str(tmp), "w", format="mp4") as dst:
            v_in = src.streams.video[0]
            v_out = dst.add_stream_from_template(v_in)
            a_out = dst.add_stream("aac", rate=rate, layout=layout)
            a_out.format = "fltp"
            for pkt in src.demux(v_in):
                if pkt.dts is None:  # the demuxer's end-of-stream marker
                    continue
                pkt.stream = v_out
                dst.mux(pkt)
            for start in range(0, n, _CHUNK):
                frame = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(audio[:, start : start + _CHUNK]), format="fltp", layout=layout
                )
                frame.sample_rate = rate
                frame.pts = start
                frame.time_base = Fraction(1, rate)
                for pkt in a_out.encode(frame):
                    dst.mux(pkt)
            for pkt in a_out.encode(None):
                dst.mux(pkt)
    except av.FFmpegError as exc:
        tmp.unlink(missing_ok=True)
        raise MediaError(video_path, f"muxing with {audio_path} failed: {exc}") from None
    tmp.replace(out_path)
    return out_path


def mux_samples(samples: Iterable[Sample], out_dir: str | Path) -> tuple[list[Sample], list[SampleError]]:
    """Mux every counterfactual sample that has a separate audio file into `out_dir/<id>.mp4`.

    A muxed sample's `video` points at the new file and `audio` becomes None (its own track).
    A sample that fails keeps its unmuxed form (still a valid counterfactual) and gets an error
    record; factual samples pass through unchanged.
    """
    out_dir = Path(out_dir)
    out: list[Sample] = []
    errors: list[SampleError] = []
    for s in samples:
        if s.kind != "counterfactual" or s.video is None or s.audio is None:
            out.append(s)
            continue
        target = out_dir / f"{s.id}.mp4"
        try:
            mux(s.video, s.audio, target)
        except MediaError as exc:
            errors.append(SampleError(s.id, "mux", exc.path, exc.reason))
            out.append(s)
            continue
        out.append(replace(s, video=str(target), audio=None))
    log.info("muxed %d clips into %s, %d failed", len(out) - len(errors), out_dir, len(errors))
    return out, errors
