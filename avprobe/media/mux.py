"""Write a counterfactual clip: one clip's video stream (copied, not re-encoded) with another
file's audio, trimmed or zero-padded to the video's length.

The container is mp4 with AAC audio when mp4 can hold the video's codec, otherwise Matroska
(.mkv) with FLAC audio (VP8, for one: mp4 has no mapping for it). Either way the audio decodes
to exactly the video's duration, the length `load_media` fits a separate audio file to, so a
muxed and an unmuxed counterfactual decode alike. The audio keeps its own sample rate
(resampled to 48 kHz only when AAC cannot take it) and channel layout (mono, stereo or 5.1;
other layouts are mixed to stereo).

Every written file is opened again and decoded (first video frame, all of the audio) before
it counts as muxed; one that does not decode is a MediaError, never a silent success.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from avprobe.media.decode import MediaError, _open, probe_video
from avprobe.types import Sample, SampleError

log = logging.getLogger(__name__)

_AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350})
_LAYOUT_BY_CHANNELS = {1: "mono", 2: "stereo", 6: "5.1"}
_CHUNK = 1024  # AAC frame size
# (container format, file suffix, audio codec), in order of preference.
_CONTAINERS = (("mp4", ".mp4", "aac"), ("matroska", ".mkv", "flac"))


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


def _container_for(path: Path, stream) -> tuple[str, str, str]:
    """(format, suffix, audio codec) of the first container that can hold `stream` as it is.

    Asked of PyAV itself (a template stream on an in-memory container): its check is the
    one the real mux would fail.
    """
    for fmt, suffix, audio_codec in _CONTAINERS:
        try:
            with av.open(io.BytesIO(), "w", format=fmt) as probe:
                probe.add_stream_from_template(stream)
        except ValueError:
            continue
        return fmt, suffix, audio_codec
    raise MediaError(path, f"video codec {stream.codec_context.name!r} can be copied into neither mp4 nor mkv")


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


def _video_plan(path: Path) -> tuple[tuple[str, str, str], int, list[int] | None]:
    """(container for it, packet count, dts to give the packets) of the first video stream.

    The dts list is None when the demuxer gave every packet one. Matroska stores no dts, so
    with B-frames its first packets come without one; mp4 needs them all, so they are rebuilt
    from the pts: the sorted pts, shifted back by the reorder delay (the least shift that
    keeps every dts <= its pts). Rebuilt for every packet, so the series is monotonic.
    """
    with _open(path) as c:
        if not c.streams.video:
            raise MediaError(path, "no video stream to mux onto")
        s = c.streams.video[0]
        container = _container_for(path, s)
        stamps = [(p.pts, p.dts) for p in c.demux(s) if p.size]  # size 0: end-of-stream marker
    if not stamps:
        raise MediaError(path, "zero-length clip: the video stream has no packets")
    if all(d is not None for _, d in stamps):
        return container, len(stamps), None
    untimed = [i for i, (p, _) in enumerate(stamps) if p is None]
    if untimed:
        raise MediaError(path, f"video packet {untimed[0]} has neither a pts nor a dts: it cannot be placed")
    pts = [p for p, _ in stamps]
    order = sorted(pts)
    delay = max(o - p for o, p in zip(order, pts))  # >= 0: the differences sum to 0
    return container, len(stamps), [o - delay for o in order]


def _audio_frames(audio: np.ndarray, layout: str, rate: int, codec: str, lead: int):
    """AudioFrames of `audio` for `codec`; `lead` samples of silence go first, their pts negative."""
    if lead:
        audio = np.pad(audio, ((0, 0), (lead, 0)))
    for start in range(0, audio.shape[1], _CHUNK):
        block = audio[:, start : start + _CHUNK]
        if codec == "flac":  # FLAC takes integers only: packed s16
            data = (np.clip(block, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format="s16", layout=layout)
        else:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=layout)
        frame.sample_rate = rate
        frame.pts = start - lead
        frame.time_base = Fraction(1, rate)
        yield frame


def _check_decodes(path: Path, shown: Path, n_packets: int, n_samples: int) -> None:
    """Raise MediaError (naming `shown`) unless the muxed file at `path` holds every video
    packet, starts on a keyframe, decodes a first video frame and decodes to `n_samples` of audio."""
    try:
        with av.open(str(path)) as c:
            if not c.streams.video or not c.streams.audio:
                raise MediaError(shown, "muxed file lacks its video or its audio stream")
            pkts = [p for p in c.demux(c.streams.video[0]) if p.size]
        if len(pkts) != n_packets:
            raise MediaError(shown, f"muxed file holds {len(pkts)} of the source's {n_packets} video packets")
        if not pkts[0].is_keyframe:
            raise MediaError(shown, "muxed video does not start on a keyframe: it would not decode")
        with av.open(str(path)) as c:
            if next(c.decode(video=0), None) is None:
                raise MediaError(shown, "muxed video decodes to no frame")
        with av.open(str(path)) as c:
            got = sum(f.samples for f in c.decode(audio=0))
    except av.FFmpegError as exc:
        raise MediaError(shown, f"muxed file does not decode: {exc}") from None
    if got != n_samples:
        raise MediaError(shown, f"muxed audio decodes to {got} samples, not the video's {n_samples}")


def mux(video_path: str | Path, audio_path: str | Path, out_path: str | Path) -> Path:
    """Write the video stream of `video_path` (copied) with audio from `audio_path` fitted to
    the video's length; returns the path written.

    That is `out_path` when mp4 can hold the video codec, else `out_path` with suffix .mkv.
    Written atomically and checked to decode; raises MediaError naming the bad file.
    """
    video_path, audio_path, out_path = Path(video_path), Path(audio_path), Path(out_path)
    (fmt, suffix, audio_codec), n_packets, new_dts = _video_plan(video_path)
    out_path = out_path.with_suffix(suffix)
    # The duration load_media fits a separate audio file to (frames / rate), so both agree.
    total, fps = probe_video(video_path)
    audio, rate, layout = _decode_for_aac(audio_path)
    n = round(total / fps * rate)
    if n <= 0:
        raise MediaError(video_path, "video too short to carry any audio")
    audio = audio[:, :n] if audio.shape[1] >= n else np.pad(audio, ((0, 0), (0, n - audio.shape[1])))
    # AAC decodes whole 1024-sample frames and FFmpeg's mp4 demuxer does not trim the last
    # one, so its padding would lengthen the clip by up to 1023 samples (a 251st audio token
    # on a 10 s clip). The padding goes in front instead, before pts 0, where the mp4 edit
    # list (which already hides the encoder's priming) skips it exactly.
    lead = (-n) % _CHUNK if audio_codec == "aac" else 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    try:
        with _open(video_path) as src, av.open(str(tmp), "w", format=fmt) as dst:
            v_in = src.streams.video[0]
            v_out = dst.add_stream_from_template(v_in)
            a_out = dst.add_stream(audio_codec, rate=rate, layout=layout)
            a_out.format = "s16" if audio_codec == "flac" else "fltp"
            i = 0
            for pkt in src.demux(v_in):
                if not pkt.size:  # the demuxer's end-of-stream marker
                    continue
                if new_dts is not None:
                    pkt.dts = new_dts[i]
                i += 1
                pkt.stream = v_out
                dst.mux(pkt)
            for frame in _audio_frames(audio, layout, rate, audio_codec, lead):
                for pkt in a_out.encode(frame):
                    dst.mux(pkt)
            for pkt in a_out.encode(None):
                dst.mux(pkt)
        _check_decodes(tmp, out_path, n_packets, n)
    except av.FFmpegError as exc:
        tmp.unlink(missing_ok=True)
        raise MediaError(video_path, f"muxing with {audio_path} failed: {exc}") from None
    except BaseException:  # a half-written or undecodable file never stays behind
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(out_path)
    return out_path


def mux_samples(samples: Iterable[Sample], out_dir: str | Path) -> tuple[list[Sample], list[SampleError]]:
    """Mux every counterfactual sample that has a separate audio file into `out_dir/<id>.mp4`
    (`.mkv` when mp4 cannot hold its video codec).

    A muxed sample's `video` points at the new file and `audio` becomes None (its own track).
    A sample that fails, for whatever reason, keeps its unmuxed form (still a valid
    counterfactual) and gets an error record; the others go on. Factual samples pass through.
    """
    out_dir = Path(out_dir)
    out: list[Sample] = []
    errors: list[SampleError] = []
    muxed = 0
    for s in samples:
        if s.kind != "counterfactual" or s.video is None or s.audio is None:
            out.append(s)
            continue
        try:
            target = mux(s.video, s.audio, out_dir / f"{s.id}.mp4")
        except MediaError as exc:
            errors.append(SampleError(s.id, "mux", exc.path, exc.reason))
            out.append(s)
            continue
        except Exception as exc:  # noqa: BLE001
            # What the checks in mux did not foresee still becomes this sample's record: the
            # other samples go on and the caller still writes its manifest and report.
            errors.append(SampleError(s.id, "mux", s.video, f"{type(exc).__name__}: {exc}"))
            out.append(s)
            continue
        muxed += 1
        out.append(replace(s, video=str(target), audio=None))
    log.info("muxed %d clips into %s, %d failed", muxed, out_dir, len(errors))
    return out, errors
