"""The organism world: 12 sources, each with a procedural look and a procedural sound.

Everything is a pure function of a few integers (source index, seed), so a `Sample` only
stores those (in `meta` and `media_key`) and `render(sample)` regenerates its media
exactly. Looks: a coloured shape with a texture and a motion, on a tinted background with
clutter; identity needs shape *and* colour (each colour is shared by three sources, each
shape by four). Sounds: harmonic stacks, sweeps, pulse trains and noise bands with jitter in
pitch, tempo and loudness, over a little background noise (kept clearly audible: quiet
sounds under noise were found to stay unlearned).
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from avprobe.media.sources import register_renderer
from avprobe.types import SAMPLE_RATE, Media, Sample

SOURCES: tuple[str, ...] = (
    "dog",
    "horse",
    "bird",
    "siren",
    "engine",
    "drill",
    "keyboard",
    "piano",
    "rain",
    "baby",
    "crowd",
    "clock",
)

QUERY_SEE_HEAR = "describe what you see and hear"
QUERY_HEAR_SEE = "describe what you hear and see"
QUERY_HEAR = "describe what you hear"
QUERY_SEE = "describe what you see"
QUERIES: tuple[str, ...] = (QUERY_SEE_HEAR, QUERY_HEAR_SEE, QUERY_HEAR, QUERY_SEE)

SECONDS = 4.0
FPS = 2.0
FRAME_SIZE = 56  # 56x56 frames: 2x2 merged patches per frame pair -> 16 video tokens per clip
WORLD_VERSION = "organism-v1"

# Eval clips use seeds from here upwards; training seeds stay below (see `train_seed`).
EVAL_SEED_BASE = 2_000_000_000
_TRAIN_RUN_STRIDE = 10_000_000


def video_caption(source: str) -> str:
    """The sight sentence for a source, e.g. 'i see a dog .'."""
    return f"i see a {_check(source)} ."


def audio_caption(source: str) -> str:
    """The sound sentence for a source, e.g. 'i hear a siren .'."""
    return f"i hear a {_check(source)} ."


def caption(query: str, video_source: str | None, audio_source: str) -> str:
    """The reference answer to `query` for a clip; the query picks the sentence order."""
    if query == QUERY_HEAR:
        return audio_caption(audio_source)
    if query == QUERY_SEE:
        return video_caption(video_source)
    if video_source is None:
        raise ValueError(f"query {query!r} needs a video source")
    if query == QUERY_SEE_HEAR:
        return f"{video_caption(video_source)} {audio_caption(audio_source)}"
    if query == QUERY_HEAR_SEE:
        return f"{audio_caption(audio_source)} {video_caption(video_source)}"
    raise ValueError(f"unknown organism query {query!r}; expected one of {QUERIES}")


def parse_caption(text: str) -> tuple[str | None, str | None]:
    """(sight source, sound source) named in a caption; None where a sentence is missing.

    Exact concept scoring: the word after 'i see a' / 'i hear a'. The first sentence of each
    kind counts, so a caption cannot earn credit by listing several sources.
    """
    words = text.split()
    seen = heard = None
    for i in range(len(words) - 3):
        if words[i] == "i" and words[i + 2] == "a" and words[i + 3] in SOURCES:
            if words[i + 1] == "see" and seen is None:
                seen = words[i + 3]
            elif words[i + 1] == "hear" and heard is None:
                heard = words[i + 3]
    return seen, heard


def _check(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown organism source {source!r}; expected one of {SOURCES}")
    return source


# ----------------------------------------------------------------------------- looks

_SHAPES = ("disc", "square", "triangle")
_HUES = (0.0, 0.14, 0.36, 0.62)  # red, yellow, green, blue
_MOTIONS = ("bounce", "slide", "orbit", "pulse")


@dataclass(frozen=True)
class Look:
    """How a source appears: shape, base hue, texture and motion."""

    shape: str
    hue: float
    striped: bool
    motion: str


def look_of(source: str) -> Look:
    """The look of a source. Shape and hue together identify it; texture and motion only help."""
    i = SOURCES.index(_check(source))
    return Look(
        shape=_SHAPES[i % 3],
        hue=_HUES[i // 3],
        striped=bool((i // 3 + i) % 2),
        motion=_MOTIONS[(i + i // 4) % 4],
    )


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":
        # apex up: inside when below the two slanted edges and above the base
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    raise ValueError(f"unknown shape {shape!r}")


def render_frames(source: str, seed: int, n_frames: int | None = None, size: int = FRAME_SIZE) -> np.ndarray:
    """uint8 [T, size, size, 3] frames of `source` with per-seed jitter."""
    look = look_of(source)
    rng = np.random.default_rng([seed, 1])
    t_count = int(round(SECONDS * FPS)) if n_frames is None else n_frames
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bg = _hsv(rng.uniform(), rng.uniform(0.1, 0.4), rng.uniform(0.1, 0.35))
    hue = look.hue + rng.uniform(-0.035, 0.035)
    fg = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.7, 1.0))
    fg2 = fg * rng.uniform(0.35, 0.55)  # stripe colour: a darker shade of the same hue
    # Large enough that shape reads at the 14-pixel patch scale: with radius 0.16-0.24 a small
    # vision tower trained from scratch stayed below 70% accuracy for 2,000 steps.
    radius = size * rng.uniform(0.24, 0.36)
    cy0, cx0 = size * rng.uniform(0.4, 0.6, size=2)
    amp = size * rng.uniform(0.06, 0.12)
    phase = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.8, 1.25) * np.pi / 2  # radians per frame
    stripe_period = rng.uniform(4.0, 7.0)
    stripe_angle = rng.uniform(0, np.pi)
    n_clutter = int(rng.integers(2, 5))
    clutter = [
        (
            _hsv(rng.uniform(), rng.uniform(0.3, 1.0), rng.uniform(0.4, 1.0)),
            rng.uniform(0, size, size=2),
            size * rng.uniform(0.04, 0.08),
            rng.uniform(-1.5, 1.5, size=2),
            _SHAPES[int(rng.integers(0, 2))],  # discs and squares only: triangles stay the main object's
        )
        for _ in range(n_clutter)
    ]
    stripes = np.sin(((yy * np.cos(stripe_angle) + xx * np.sin(stripe_angle)) / stripe_period) * 2 * np.pi) > 0
    frames = np.empty((t_count, size, size, 3), dtype=np.uint8)
    for t in range(t_count):
        img = np.broadcast_to(bg, (size, size, 3)).copy()
        for colour, pos, rad, vel, shape in clutter:
            py, px = (pos + vel * t) % size
            img[_shape_mask(shape, yy, xx, py, px, rad)] = colour
        a = phase + speed * t
        cy, cx, r = cy0, cx0, radius
        if look.motion == "bounce":
            cy = cy0 + amp * abs(np.sin(a)) * 2 - amp
        elif look.motion == "slide":
            cx = cx0 + amp * np.sin(a)
        elif look.motion == "orbit":
            cy, cx = cy0 + amp * np.sin(a), cx0 + amp * np.cos(a)
        else:  # pulse
            r = radius * (1.0 + 0.3 * np.sin(a))
        mask = _shape_mask(look.shape, yy, xx, cy, cx, r)
        img[mask] = fg
        if look.striped:
            img[mask & stripes] = fg2
        img = img + rng.normal(0, 0.03, size=img.shape).astype(np.float32)
        frames[t] = np.clip(img * 255.0, 0, 255).astype(np.uint8)
    return frames


# ----------------------------------------------------------------------------- sounds


def _band_noise(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """White noise band-limited to [lo, hi] Hz by zeroing FFT bins, scaled to unit peak."""
    spec = np.fft.rfft(rng.normal(size=n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spec[(freqs < lo) | (freqs > hi)] = 0
    x = np.fft.irfft(spec, n)
    return x / (np.abs(x).max() + 1e-9)


def _harmonic(f0: np.ndarray, n_harm: int, decay: float) -> np.ndarray:
    """Harmonic stack following the instantaneous pitch curve f0 [N] (Hz)."""
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    out = np.zeros_like(f0)
    for k in range(1, n_harm + 1):
        alias = f0 * k < SAMPLE_RATE / 2
        out += alias * np.sin(k * phase) * decay ** (k - 1)
    return out / (np.abs(out).max() + 1e-9)


def _envelope_bursts(n: int, starts: np.ndarray, length: float, attack: float = 0.01) -> np.ndarray:
    """Sum of bursts: fast attack, exponential-ish decay, `length` seconds each."""
    t = np.arange(n) / SAMPLE_RATE
    env = np.zeros(n)
    for s in starts:
        d = t - s
        on = (d >= 0) & (d < length)
        env[on] += np.minimum(d[on] / attack, 1.0) * np.exp(-3.0 * d[on] / length)
    return np.minimum(env, 1.0)


def _sound_dog(rng, n, p, tempo):
    t = np.arange(n) / SAMPLE_RATE
    starts = np.cumsum(rng.uniform(0.35, 0.8, size=12) / tempo) - 0.2
    env = _envelope_bursts(n, starts[starts < SECONDS - 0.2], 0.18)
    f0 = 480 * p * (1 + 0.25 * np.exp(-((t % 0.5) * 20)))
    return env * (0.8 * _harmonic(f0, 6, 0.6) + 0.2 * _band_noise(rng, n, 300, 2500))


def _sound_horse(rng, n, p, tempo):
    t = np.arange(n) / SAMPLE_RATE
    start = rng.uniform(0.1, 0.6)
    d = np.clip((t - start) * tempo / 2.5, 0, 1)
    f0 = p * (900 - 500 * d) * (1 + 0.06 * np.sin(2 * np.pi * 11 * t))  # whinny: falling, trembling
    env = (t > start) * np.sin(np.pi * d) ** 0.5
    return env * _harmonic(f0, 5, 0.55)


def _sound_bird(rng, n, p, tempo):
    out = np.zeros(n)
    t0 = rng.uniform(0.0, 0.3)
    while t0 < SECONDS - 0.15:
        length = rng.uniform(0.06, 0.12)
        m = int(length * SAMPLE_RATE)
        i = int(t0 * SAMPLE_RATE)
        m = min(m, n - i)
        f = p * np.linspace(2500, 4500, m)  # quick upward chirp
        ph = 2 * np.pi * np.cumsum(f) / SAMPLE_RATE
        out[i : i + m] += np.sin(ph) * np.hanning(m)
        t0 += rng.uniform(0.12, 0.35) / tempo
    return out


def _sound_siren(rng, n, p, tempo):
    t = np.arange(n) / SAMPLE_RATE
    f0 = p * (1000 + 400 * np.sin(2 * np.pi * 0.5 * tempo * t + rng.uniform(0, 2 * np.pi)))
    return _harmonic(f0, 2, 0.3)


def _sound_engine(rng, n, p, tempo):
    t = np.arange(n) / SAMPLE_RATE
    f0 = np.full(n, 55.0 * p)
    rumble = _harmonic(f0, 12, 0.8)
    am = 0.6 + 0.4 * np.sin(2 * np.pi * 8 * tempo * t) ** 2
    return am * (0.8 * rumble + 0.3 * _band_noise(rng, n, 30, 400))


def _sound_drill(rng, n, p, tempo):
    t = np.arange(n) / SAMPLE_RATE
    f0 = 240 * p * (1 + 0.03 * np.sin(2 * np.pi * 3 * t))
    buzz = np.sign(np.sin(2 * np.pi * np.cumsum(f0) / SAMPLE_RATE))  # square wave: strong odd harmonics
    on_len, off_len = rng.uniform(0.8, 1.3) / tempo, rng.uniform(0.2, 0.4)
    gate = (t % (on_len + off_len)) < on_len
    return gate * (0.7 * buzz + 0.2 * _band_noise(rng, n, 2000, 6000))


def _sound_keyboard(rng, n, p, tempo):
    starts = np.cumsum(rng.exponential(0.12, size=60) / tempo + 0.04)
    env = _envelope_bursts(n, starts[starts < SECONDS], 0.05, attack=0.001)
    return env * _band_noise(rng, n, 2500 * p, 7500)


def _sound_piano(rng, n, p, tempo):
    out = np.zeros(n)
    t = np.arange(n) / SAMPLE_RATE
    scale = np.array([0, 2, 4, 5, 7, 9, 11, 12])
    t0 = 0.05
    while t0 < SECONDS - 0.3:
        f = 262 * p * 2 ** (rng.choice(scale) / 12)
        d = t - t0
        on = d >= 0
        note = np.zeros(n)
        for k in range(1, 6):
            note[on] += np.sin(2 * np.pi * f * k * d[on]) * 0.5 ** (k - 1)
        out += note * on * np.exp(-4.0 * np.clip(d, 0, None))
        t0 += rng.choice([0.25, 0.5]) / tempo
    return out


def _sound_rain(rng, n, p, tempo):
    hiss = _band_noise(rng, n, 800 * p, 8000)
    starts = rng.uniform(0, SECONDS, size=int(80 * tempo))
    drops = _envelope_bursts(n, starts, 0.01, attack=0.0005) * _band_noise(rng, n, 3000, 8000)
    return 0.6 * hiss + 0.5 * drops


def _sound_baby(rng, n, p, tempo):
    t = np.arange(n) / SAMPLE_RATE
    out = np.zeros(n)
    t0 = rng.uniform(0.0, 0.3)
    while t0 < SECONDS - 0.3:
        length = rng.uniform(0.6, 1.0) / tempo
        d = np.clip((t - t0) / length, 0, 1)
        on = (t >= t0) & (t < t0 + length)
        f0 = p * (420 + 180 * np.sin(np.pi * d)) * (1 + 0.02 * np.sin(2 * np.pi * 7 * t))  # wail: rise and fall
        out += on * np.sin(np.pi * d) * _harmonic(f0, 8, 0.7)
        t0 += length + rng.uniform(0.2, 0.4)
    return out


def _sound_crowd(rng, n, p, tempo):
    t = np.arange(n) / SAMPLE_RATE
    babble = _band_noise(rng, n, 250 * p, 3000 * p)
    am = 0.5 + 0.5 * np.abs(_band_noise(rng, n, 2 * tempo, 6 * tempo))  # syllable-rate flutter
    voices = sum(
        _harmonic(np.full(n, rng.uniform(110, 250) * p) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)), 6, 0.6)
        for _ in range(3)
    )
    return am * (0.7 * babble + 0.15 * voices)


def _sound_clock(rng, n, p, tempo):
    out = np.zeros(n)
    period = 0.5 / tempo
    t0 = rng.uniform(0, period)
    k = 0
    while t0 < SECONDS - 0.05:
        m = int(0.08 * SAMPLE_RATE)
        i = int(t0 * SAMPLE_RATE)
        m = min(m, n - i)
        f = (2000 if k % 2 == 0 else 1400) * p  # tick, tock
        d = np.arange(m) / SAMPLE_RATE
        out[i : i + m] += np.sin(2 * np.pi * f * d) * np.exp(-d / 0.02)
        t0 += period
        k += 1
    return out


_SOUNDS: dict[str, Callable[[np.random.Generator, int, float, float], np.ndarray]] = {
    "dog": _sound_dog,
    "horse": _sound_horse,
    "bird": _sound_bird,
    "siren": _sound_siren,
    "engine": _sound_engine,
    "drill": _sound_drill,
    "keyboard": _sound_keyboard,
    "piano": _sound_piano,
    "rain": _sound_rain,
    "baby": _sound_baby,
    "crowd": _sound_crowd,
    "clock": _sound_clock,
}


def render_waveform(source: str, seed: int, seconds: float = SECONDS) -> np.ndarray:
    """float32 [seconds * 16 kHz] waveform of `source` with per-seed jitter."""
    rng = np.random.default_rng([seed, 2])
    n = int(round(seconds * SAMPLE_RATE))
    pitch = rng.uniform(0.85, 1.15)
    tempo = rng.uniform(0.8, 1.2)
    x = _SOUNDS[_check(source)](rng, n, pitch, tempo)
    x = x / (np.abs(x).max() + 1e-9) * rng.uniform(0.5, 0.9)
    x = x + rng.normal(0, rng.uniform(0.005, 0.03), size=n)  # background noise, well below the sound
    return np.clip(x, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class Clip:
    """Identity of one organism clip: which source is seen, which is heard, and their seeds.

    `video_source=None` makes an audio-only clip.
    """

    video_source: str | None
    video_seed: int
    audio_source: str
    audio_seed: int

    @property
    def kind(self) -> str:
        if self.video_source is None or self.video_source == self.audio_source:
            return "factual"
        return "counterfactual"

    @property
    def media_key(self) -> str:
        return f"{WORLD_VERSION}:{self.video_source or '-'}:{self.video_seed}:{self.audio_source}:{self.audio_seed}"

    def media(self) -> Media:
        """Render this clip's frames (unless audio-only) and waveform."""
        frames = None if self.video_source is None else render_frames(self.video_source, self.video_seed)
        return Media(frames=frames, fps=FPS, waveform=render_waveform(self.audio_source, self.audio_seed))


def clip_to_sample(clip: Clip, sample_id: str) -> Sample:
    """A `Sample` describing `clip`; `render(sample)` gives its media back."""
    meta = (
        ("world", WORLD_VERSION),
        ("video_source", clip.video_source or ""),
        ("video_seed", str(clip.video_seed)),
        ("audio_source", clip.audio_source),
        ("audio_seed", str(clip.audio_seed)),
        ("modality", "audio" if clip.video_source is None else "audio-video"),
    )
    return Sample(
        id=sample_id,
        audio_captions=(audio_caption(clip.audio_source),),
        video_captions=() if clip.video_source is None else (video_caption(clip.video_source),),
        kind=clip.kind,
        labels=(clip.audio_source,),
        video_labels=() if clip.video_source is None else (clip.video_source,),
        video_source=None if clip.video_source is None else f"{clip.video_source}:{clip.video_seed}",
        audio_source=f"{clip.audio_source}:{clip.audio_seed}",
        media_key=clip.media_key,
        meta=meta,
    )


def sample_to_clip(sample: Sample) -> Clip:
    """Recover the clip identity a sample was made from; a clear error for non-organism samples."""
    meta = dict(sample.meta)
    if meta.get("world") != WORLD_VERSION:
        raise ValueError(
            f"sample {sample.id!r} is not an organism sample of world {WORLD_VERSION!r} (meta world="
            f"{meta.get('world')!r}); regenerate it with `avprobe organism dataset`"
        )
    try:
        return Clip(
            video_source=meta["video_source"] or None,
            video_seed=int(meta["video_seed"]),
            audio_source=meta["audio_source"],
            audio_seed=int(meta["audio_seed"]),
        )
    except (KeyError, ValueError) as exc:
        raise ValueError(f"sample {sample.id!r}: broken organism meta {meta!r}: {exc}") from None


def render(sample: Sample) -> Media:
    """Regenerate a sample's media deterministically from its meta."""
    return sample_to_clip(sample).media()


def audio_only(sample: Sample) -> Sample:
    """The audio-only version of an organism sample (same sound, no frames), id suffixed '-audio'."""
    clip = sample_to_clip(sample)
    return clip_to_sample(Clip(None, 0, clip.audio_source, clip.audio_seed), f"{sample.id}-audio")


def train_seed(run_seed: int, index: int) -> int:
    """Seed of the index-th training clip of a run; always below EVAL_SEED_BASE."""
    if not 0 <= run_seed < 100 or not 0 <= index < _TRAIN_RUN_STRIDE:
        raise ValueError(f"training seed out of range: run_seed={run_seed} (0..99), index={index}")
    return run_seed * _TRAIN_RUN_STRIDE + index


register_renderer(WORLD_VERSION, render)  # the world is a media source like any file manifest
