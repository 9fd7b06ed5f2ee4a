"""Decoding real containers with PyAV: frame sampling, audio resampling/downmixing, bad input.

All clips are generated here with PyAV (tests/media_factory.py); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from media_factory import corrupt, frame_index, frame_level, make_audio, make_empty, make_video, truncate

from avprobe.media import processing
from avprobe.media.decode import (
    DEFAULT_FRAME_RULE,
    FRAME_RULES,
    MediaError,
    decode_audio,
    decode_video,
    load_many,
    load_media,
    sample_indices,
)
from avprobe.types import SAMPLE_RATE, Media, Sample, SampleError


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "av": make_video(d / "av.mp4", seconds=2.0, fps=10, audio_freqs=(440.0,)),
        "silent": make_video(d / "silent.mp4", seconds=1.0, fps=10, audio_rate=None),
        "odd": make_video(d / "odd.mp4", seconds=1.0, fps=10, size=(37, 51)),
        "long": make_video(d / "long.mp4", seconds=60.0, fps=2, size=(16, 16), audio_rate=8000),
        "wav": make_audio(d / "tone.wav", seconds=1.5, rate=16_000, freqs=(1000.0,)),
    }


def _peak_hz(x: np.ndarray, rate: int = SAMPLE_RATE) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.fft.rfftfreq(x.size, 1 / rate)[spec.argmax()])


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


# --- frame sampling ---------------------------------------------------------------------


def test_sample_indices_ten_second_clip():
    # 10 s at 25 fps sampled at 2 fps: 20 frames
    assert sample_indices(250, 25.0, fps=2.0, rule="floor").tolist() == [int(np.floor(k * 12.5)) for k in range(20)]
    want = [round(k * 249 / 19) for k in range(20)]  # ends on the last frame
    assert sample_indices(250, 25.0, fps=2.0, rule="linspace").tolist() == want
    assert sample_indices(250, 25.0, fps=2.0).tolist() == want  # the default: the paper's release


def test_frame_rules_match_their_upstream_formulas():
    """linspace: qwen-omni-utils' torch.linspace(0, total - 1, n).round(); floor: transformers'
    Qwen2VLVideoProcessor.sample_frames, torch.arange(0, total, total / n).int()."""
    torch = pytest.importorskip("torch")
    for total, video_fps in [(297, 30.0), (250, 25.0), (300, 29.97), (1441, 23.976), (7, 30.0), (3000, 60.0)]:
        lin = sample_indices(total, video_fps, rule="linspace")
        n = lin.size
        assert lin.tolist() == torch.linspace(0, total - 1, n).round().long().tolist()
        floor = sample_indices(total, video_fps, rule="floor")
        assert floor.tolist() == torch.arange(0, total, total / n).int().tolist()[:n]
    assert DEFAULT_FRAME_RULE == "linspace" and FRAME_RULES == ("linspace", "floor")
    with pytest.raises(ValueError, match="frame rule"):
        sample_indices(10, 10.0, rule="nearest")


def test_sample_indices_min_and_cap():
    assert len(sample_indices(10, 10.0, fps=2.0)) == 4  # 1 s clip: raised to min_frames
    assert len(sample_indices(3000, 25.0, fps=2.0, max_frames=16)) == 16
    assert sample_indices(1, 25.0).tolist() == [0]  # a single frame is kept, patchify pads it


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 5000),
    video_fps=st.floats(1.0, 120.0),
    fps=st.floats(0.1, 8.0),
    max_frames=st.integers(2, 800),
    rule=st.sampled_from(["linspace", "floor"]),
)
def test_sample_indices_properties(total, video_fps, fps, max_frames, rule):
    idx = sample_indices(total, video_fps, fps, max_frames, rule=rule)
    assert idx.size >= 1
    assert np.all(np.diff(idx) > 0), "indices must be strictly increasing"
    assert idx[0] == 0 and idx[-1] < total
    if total >= 2:
        assert idx.size % 2 == 0 and idx.size <= max(max_frames, 2)
    if rule == "linspace" and idx.size >= 2:
        assert idx[-1] == total - 1
    assert idx.size == sample_indices(total, video_fps, fps, max_frames, rule="floor").size  # rules differ only in which


@pytest.mark.parametrize(
    ("rule", "at_2fps", "at_5fps"),
    [
        ("floor", [0, 5, 10, 15], list(range(0, 20, 2))),
        ("linspace", [0, 6, 13, 19], [0, 2, 4, 6, 8, 11, 13, 15, 17, 19]),
    ],
)
def test_decode_video_picks_the_right_frames(clips, rule, at_2fps, at_5fps):
    frames, fps = decode_video(clips["av"], fps=2.0, frame_rule=rule)
    assert frames.dtype == np.uint8 and frames.shape == (4, 48, 64, 3)
    assert [frame_index(f, 20) for f in frames] == at_2fps
    assert fps == pytest.approx(2.0)
    frames, fps = decode_video(clips["av"], fps=5.0, frame_rule=rule)
    assert [frame_index(f, 20) for f in frames] == at_5fps
    assert fps == pytest.approx(5.0)
    m = load_media(Sample("s", video=str(clips["av"]), audio_captions=("x",)), fps=2.0, frame_rule=rule)
    assert [frame_index(f, 20) for f in m.frames] == at_2fps


@pytest.mark.parametrize(("rule", "step"), [("floor", 12.0), ("linspace", 119 / 9)])
def test_long_clip_is_capped_and_spans_the_clip(clips, rule, step):
    frames, fps = decode_video(clips["long"], fps=2.0, max_frames=10, frame_rule=rule)
    assert frames.shape[0] == 10
    assert fps == pytest.approx(10 / 60.0)  # effective rate keeps the true time axis
    # levels wrap after ~56 frames: compare the grey levels of the sampled source frames
    got = np.array([f.mean() for f in frames])
    want = [frame_level(int(np.floor(k * step)) if rule == "floor" else round(k * step)) for k in range(10)]
    np.testing.assert_allclose(got, want, atol=2.5)


def test_odd_frame_size_decodes_and_patchifies(clips):
    frames, _ = decode_video(clips["odd"], fps=2.0)
    assert frames.shape[1:] == (37, 51, 3)
    spec = processing.VisionSpec()
    pixels, grid = processing.patchify_video(frames, spec)
    gt, gh, gw = grid[0].tolist()
    assert gt == frames.shape[0] // 2 and gh % spec.merge_size == 0 and gw % spec.merge_size == 0
    assert pixels.shape == (gt * gh * gw, 3 * 2 * 14 * 14)


# --- audio ------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["wav", "flac", "mp3", "m4a", "ogg"])
def test_audio_formats(tmp_path, ext):
    path = make_audio(tmp_path / f"a.{ext}", seconds=1.0, rate=44_100 if ext != "ogg" else 48_000, freqs=(440.0,))
    x = decode_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(x.size - SAMPLE_RATE) < 0.1 * SAMPLE_RATE  # codec priming may add a frame
    assert _peak_hz(x) == pytest.approx(440.0, abs=5)
    assert _rms(x[2000:-2000]) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resampling_keeps_tone_and_length(tmp_path, rate):
    path = make_audio(tmp_path / "a.wav", seconds=2.0, rate=rate, freqs=(1000.0,))
    x = decode_audio(path)
    assert x.size == pytest.approx(2 * SAMPLE_RATE, abs=2)
    assert _peak_hz(x) == pytest.approx(1000.0, abs=2)
    assert _rms(x[1000:-1000]) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)


def test_resampling_removes_content_above_nyquist(tmp_path):
    # A 10 kHz tone cannot exist at 16 kHz: it must be filtered out, not aliased to 6 kHz.
    x = decode_audio(make_audio(tmp_path / "hi.wav", seconds=1.0, rate=44_100, freqs=(10_000.0,)))
    assert _rms(x[2000:-2000]) < 0.01


def test_stereo_downmix_is_channel_mean(tmp_path):
    x = decode_audio(make_audio(tmp_path / "st.flac", seconds=1.0, rate=16_000, freqs=(440.0, 0.0)))
    assert _rms(x) == pytest.approx(0.25 / np.sqrt(2), rel=0.02)  # (L + R) / 2 with R silent
    t = np.arange(x.size) / SAMPLE_RATE
    np.testing.assert_allclose(x, 0.25 * np.sin(2 * np.pi * 440 * t), atol=2e-4)


def test_five_one_downmix_is_channel_mean(tmp_path):
    freqs = (300.0, 0.0, 0.0, 0.0, 0.0, 700.0)  # FL and BR carry tones, the rest silent
    x = decode_audio(make_audio(tmp_path / "s51.wav", seconds=1.0, rate=48_000, freqs=freqs))
    t = np.arange(x.size) / SAMPLE_RATE
    want = (0.5 * np.sin(2 * np.pi * 300 * t) + 0.5 * np.sin(2 * np.pi * 700 * t)) / 6
    inner = slice(500, -500)  # filter edge effects at the ends
    np.testing.assert_allclose(x[inner], want[inner], atol=2e-3)


def test_video_own_track_and_separate_audio(clips):
    m = load_media(Sample("s", video=str(clips["av"]), audio_captions=("x",)))
    assert isinstance(m, Media) and m.frames.shape[0] == 4
    assert _peak_hz(m.waveform[2000:-2000]) == pytest.approx(440.0, abs=5)
    # A separate 1.5 s file on a 2 s video: padded to the video's length with silence.
    m = load_media(Sample("s", video=str(clips["av"]), audio=str(clips["wav"]), audio_captions=("x",)))
    assert m.waveform.size == 2 * SAMPLE_RATE
    assert _peak_hz(m.waveform[:20000]) == pytest.approx(1000.0, abs=2)
    assert np.all(m.waveform[int(1.55 * SAMPLE_RATE) :] == 0)


def test_audio_only_sample(clips):
    m = load_media(Sample("s", audio=str(clips["wav"]), audio_captions=("x",)))
    assert m.frames is None and m.waveform.size == int(1.5 * SAMPLE_RATE)


def test_decoded_media_feeds_feature_extraction(clips):
    m = load_media(Sample("s", video=str(clips["av"]), audio_captions=("x",)))
    feats, mask = processing.audio_features(m.waveform, n_mels=128)
    assert feats.shape[:2] == (1, 128) and mask.shape == (1, feats.shape[2])
    assert feats.shape[2] == pytest.approx(m.waveform.size / 160, abs=2)  # 100 mel frames per second


# --- bad input ----------------------------------------------------------------------------


def _err(fn, *args, **kw) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn(*args, **kw)
    return info.value


def test_missing_file(tmp_path):
    e = _err(decode_video, tmp_path / "nope.mp4")
    assert e.path.endswith("nope.mp4") and "not found" in e.reason


def test_truncated_container_without_index(tmp_path):
    p = truncate(make_video(tmp_path / "t.mp4", seconds=2.0), 0.5)  # moov at the end: gone
    e = _err(decode_video, p)
    assert e.path == str(p) and "cannot open" in e.reason


def test_truncated_container_with_index(tmp_path):
    p = truncate(make_video(tmp_path / "t.mp4", seconds=2.0, faststart=True), 0.5)
    assert "truncated" in _err(decode_video, p).reason
    assert _err(decode_audio, p).path == str(p)


def test_corrupt_container(tmp_path):
    p = corrupt(make_video(tmp_path / "c.mp4", seconds=2.0, faststart=True))
    assert "corrupt" in _err(decode_video, p).reason
    garbage = tmp_path / "g.mp4"
    garbage.write_bytes(b"not a video at all " * 50)
    assert "cannot open" in _err(decode_video, garbage).reason


def test_video_without_audio_needs_an_audio_file(clips):
    s = Sample("s", video=str(clips["silent"]), audio_captions=("x",))
    e = _err(load_media, s)
    assert e.path == str(clips["silent"]) and "no audio track" in e.reason and "audio" in e.reason
    m = load_media(Sample("s", video=str(clips["silent"]), audio=str(clips["wav"]), audio_captions=("x",)))
    assert m.waveform.size == SAMPLE_RATE  # trimmed to the 1 s video


def test_audio_only_file_given_as_video(clips):
    e = _err(decode_video, clips["wav"])
    assert "no video stream" in e.reason and "audio-only" in e.reason


@pytest.mark.parametrize("kind", ["video", "audio"])
def test_zero_length_clip(tmp_path, kind):
    p = make_empty(tmp_path / ("z.mp4" if kind == "video" else "z.wav"), kind)
    e = _err(decode_video if kind == "video" else decode_audio, p)
    assert "zero-length" in e.reason
    empty = tmp_path / "e.mp4"
    empty.write_bytes(b"")
    assert "0 bytes" in _err(decode_video, empty).reason


def test_load_many_records_errors_and_goes_on(clips, tmp_path):
    bad = truncate(make_video(tmp_path / "bad.mp4"), 0.3)
    samples = [
        Sample("missing", video=str(tmp_path / "gone.mp4"), audio_captions=("x",)),
        Sample("good", video=str(clips["av"]), audio_captions=("x",)),
        Sample("silent", video=str(clips["silent"]), audio_captions=("x",)),
        Sample("bad", video=str(bad), audio_captions=("x",)),
        Sample("audio_only", audio=str(clips["wav"]), audio_captions=("x",)),
    ]
    counts: Counter = Counter()
    out = list(load_many(samples, counts=counts))
    assert [s.id for s, _ in out] == [s.id for s in samples]
    kinds = {s.id: type(r).__name__ for s, r in out}
    assert kinds == {
        "missing": "SampleError",
        "good": "Media",
        "silent": "SampleError",
        "bad": "SampleError",
        "audio_only": "Media",
    }
    assert counts == Counter(ok=2, failed=3)
    errs = {s.id: r for s, r in out if isinstance(r, SampleError)}
    assert errs["missing"].path.endswith("gone.mp4") and errs["missing"].stage == "decode"
    assert errs["bad"].path == str(bad) and errs["bad"].reason


# --- agreement with the upstream processor --------------------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None,
    reason="torchvision not installed: the upstream Qwen video processor needs it (run on a GPU box)",
)
def test_inputs_match_upstream_qwen_processor(tmp_path):
    """Our decode + patchify equals Qwen2.5-Omni's video processor on the same clip.

    The Omni processor delegates video to Qwen2VLVideoProcessor with the Omni pixel budget
    (128*28*28 .. 768*28*28) and fps 2; we call it the same way (decoding the file itself).
    """
    from transformers import Qwen2VLVideoProcessor

    clip = make_video(tmp_path / "clip.mp4", seconds=3.0, fps=25, size=(360, 640))
    spec = processing.VisionSpec()
    frames, fps = decode_video(clip, fps=spec.fps, max_frames=spec.max_frames, frame_rule="floor")
    ours, grid = processing.patchify_video(frames, spec)
    vp = Qwen2VLVideoProcessor(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
        do_sample_frames=True,
        fps=spec.fps,
    )
    ref = vp(videos=[str(clip)], return_tensors="pt")
    assert ref["video_grid_thw"].tolist() == grid.tolist()
    diff = (ref["pixel_values_videos"].float() - ours).abs()
    # upstream resizes uint8 frames (rounding to whole levels), we resize in float: < 2 levels
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 2.5 / 255 / min(processing.CLIP_STD)


def _cached_omni_processor():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed: the upstream Qwen processors need it (run on a GPU box)")
    from transformers import Qwen2_5OmniProcessor

    try:
        return Qwen2_5OmniProcessor.from_pretrained("Qwen/Qwen2.5-Omni-3B", local_files_only=True)
    except OSError:
        pytest.skip("Qwen/Qwen2.5-Omni-3B processor files are not in the local HF cache")


def test_inputs_match_qwen2_5_omni_processor(tmp_path):
    """Full Qwen2_5OmniProcessor (needs its files in the HF cache): video and audio inputs."""
    proc = _cached_omni_processor()
    clip = make_video(tmp_path / "clip.mp4", seconds=4.0, fps=25, size=(360, 640), audio_rate=44_100)
    spec = processing.VisionSpec()
    media = load_media(Sample("c", video=str(clip), audio_captions=("x",)), fps=spec.fps, frame_rule="floor")
    pixels, grid = processing.patchify_video(media.frames, spec)
    feats, mask = processing.audio_features(media.waveform, n_mels=proc.feature_extractor.feature_size)
    ref = proc(
        text=[f"{proc.video_token}{proc.audio_token}"],
        videos=[str(clip)],
        audio=[media.waveform],
        videos_kwargs={"fps": spec.fps, "do_sample_frames": True},
        return_tensors="pt",
    )
    assert ref["video_grid_thw"].tolist() == grid.tolist()
    diff = (ref["pixel_values_videos"].float() - pixels).abs()
    assert float(diff.mean()) < 0.01 and float(diff.max()) < 2.5 / 255 / min(processing.CLIP_STD)
    n = int(ref["feature_attention_mask"].sum())
    assert n == mask.shape[1]
    np.testing.assert_allclose(ref["input_features"][0, :, :n].numpy(), feats[0].numpy(), atol=1e-4)
    # the processor is told fps 2.0: 2 / 2.0, whatever the effective rate
    assert float(ref["video_second_per_grid"][0]) == pytest.approx(spec.temporal_patch_size / spec.fps)
