"""Generate small test clips with PyAV (no system ffmpeg, no files in the repo).

Frames encode their own index: frame i is a flat grey of level `frame_level(i)`, so a test
can read back which source frames a decoder sampled (`frame_index`). Audio is a sine per
channel at a known frequency, so tests can check resampling and downmixing numerically.

Other test modules may import these helpers (`from tests.media_factory import make_video`
or, with tests/ on sys.path, `from media_factory import ...`).
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVEL_STEP = 4  # grey levels between consecutive frames; x264 at crf 0-10 keeps flat greys within +-2
LEVEL_BASE = 16

# extension -> (container format, audio codec, sample format)
_AUDIO_FORMATS = {
    ".wav": ("wav", "pcm_s16le", "s16"),
    ".flac": ("flac", "flac", "s16"),
    ".mp3": ("mp3", "libmp3lame", "fltp"),
    ".m4a": ("ipod", "aac", "fltp"),
    ".aac": ("adts", "aac", "fltp"),
    ".ogg": ("ogg", "libopus", "flt"),
    ".mka": ("matroska", "flac", "s16"),
}

_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}


def frame_level(i: int) -> int:
    """Grey level of source frame i (wraps after ~60 frames)."""
    return LEVEL_BASE + (i * LEVEL_STEP) % (256 - 2 * LEVEL_BASE)


def frame_index(frame: np.ndarray, n_source_frames: int) -> int:
    """Source index of a decoded frame [H, W, 3] (the nearest level among the first n frames)."""
    level = float(frame.mean())
    levels = np.array([frame_level(i) for i in range(n_source_frames)], dtype=np.float64)
    return int(np.argmin(np.abs(levels - level)))


def tone(seconds: float, rate: int, freqs: Sequence[float], amplitude: float = 0.5) -> np.ndarray:
    """Float32 [channels, n] sines, one frequency per channel (0 Hz = silence)."""
    n = int(round(seconds * rate))
    t = np.arange(n, dtype=np.float64) / rate
    rows = [amplitude * np.sin(2 * np.pi * f * t) if f > 0 else np.zeros(n) for f in freqs]
    return np.asarray(rows, dtype=np.float32)


def _encode_audio(container, stream, signal: np.ndarray, sample_fmt: str, layout: str, rate: int) -> None:
    """Feed [channels, n] float32 into an opened audio stream in 1024-sample frames."""
    chunk = 1024
    for start in range(0, signal.shape[1], chunk):
        block = signal[:, start : start + chunk]
        if sample_fmt == "s16":
            data = (np.clip(block, -1, 1) * 32767).astype(np.int16).T.reshape(1, -1)  # packed
        elif sample_fmt == "flt":
            data = np.ascontiguousarray(block.T.reshape(1, -1))  # packed float
        else:  # planar float
            data = np.ascontiguousarray(block)
        frame = av.AudioFrame.from_ndarray(data, format=sample_fmt, layout=layout)
        frame.sample_rate = rate
        frame.pts = start
        frame.time_base = Fraction(1, rate)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def make_audio(
    path: str | Path,
    seconds: float = 1.0,
    rate: int = 16_000,
    freqs: Sequence[float] = (440.0,),
    amplitude: float = 0.5,
) -> Path:
    """Write an audio file (format from the extension: wav flac mp3 m4a aac ogg mka).

    One channel per entry of `freqs` (1 -> mono, 2 -> stereo, 6 -> 5.1).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt, codec, sample_fmt = _AUDIO_FORMATS[path.suffix.lower()]
    layout = _LAYOUTS[len(freqs)]
    if codec == "libopus":
        rate = 48_000  # opus only encodes at its own rates; decoding must resample anyway
    signal = tone(seconds, rate, freqs, amplitude)
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate, layout=layout)
        stream.format = sample_fmt
        _encode_audio(container, stream, signal, sample_fmt, layout, rate)
    return path


def make_video(
    path: str | Path,
    seconds: float = 1.0,
    fps: int = 10,
    size: tuple[int, int] = (48, 64),
    audio_rate: int | None = 16_000,
    audio_freqs: Sequence[float] = (440.0,),
    codec: str = "libx264",
    faststart: bool = False,
    texture: bool = False,
    bframes: int = 0,
) -> Path:
    """Write a video (mp4 unless the extension says otherwise); size is (height, width).

    Frame i is flat grey `frame_level(i)`, or with `texture=True` a moving colour pattern with
    noise (realistic decode cost, for benchmarks). `audio_rate=None` writes no audio track.
    Odd sizes are written in yuv444p (4:2:0 needs even dimensions). A .webm gets Opus audio
    (48 kHz; webm takes no AAC), any other container AAC. `bframes` > 0 lets x264 reorder
    frames: in an .mkv the first packets then come out of the demuxer without a dts.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    n_frames = int(round(seconds * fps))
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        vs = container.add_stream(codec, rate=fps)
        vs.height, vs.width = h, w
        vs.pix_fmt = "yuv444p" if (h % 2 or w % 2) and codec == "libx264" else "yuv420p"
        if codec == "libx264":
            vs.options = {"crf": "23" if texture else "4", "preset": "ultrafast"}
            if bframes:
                vs.options = {**vs.options, "bf": str(bframes)}
            vs.thread_count = 1
        as_ = None
        webm = path.suffix.lower() == ".webm"
        a_fmt = "flt" if webm else "fltp"
        if audio_rate is not None:
            if webm:
                audio_rate = 48_000  # opus only encodes at its own rates
            as_ = container.add_stream("libopus" if webm else "aac", rate=audio_rate, layout=_LAYOUTS[len(audio_freqs)])
            as_.format = a_fmt
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n_frames):
            if texture:
                base = (np.stack([xx + 3 * i, yy + 2 * i, xx + yy - i], axis=-1) % 256).astype(np.int16)
                img = np.clip(base + rng.integers(-12, 13, size=base.shape), 0, 255).astype(np.uint8)
            else:
                img = np.full((h, w, 3), frame_level(i), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vs.encode(frame):
                container.mux(packet)
        for packet in vs.encode(None):
            container.mux(packet)
        if as_ is not None:
            signal = tone(seconds, audio_rate, audio_freqs)
            _encode_audio(container, as_, signal, a_fmt, _LAYOUTS[len(audio_freqs)], audio_rate)
    return path


def truncate(path: str | Path, keep: float = 0.5) -> Path:
    """Cut a file to the first `keep` fraction of its bytes (a download that stopped)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    return path


def corrupt(path: str | Path, seed: int = 0) -> Path:
    """Overwrite the middle half of a file with random bytes, keeping its length."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(seed)
    lo, hi = len(data) // 4, 3 * len(data) // 4
    data[lo:hi] = rng.integers(0, 256, hi - lo, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def make_empty(path: str | Path, kind: str = "video") -> Path:
    """A valid container header with a stream but no frames (a zero-length clip)."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        if kind == "video":
            s = container.add_stream("libx264", rate=10)
            s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        else:
            container.add_stream("pcm_s16le", rate=16_000)
        container.start_encoding()  # writes the header even though no frame follows
    return path
