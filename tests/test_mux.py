"""`--mux` on awkward sources (issue 14): a VP8 webm, an h264 MKV whose packets lack a dts, an
AAC track whose encoder tail would lengthen the clip; every muxed file is checked to decode."""

from __future__ import annotations

import itertools
import json

import av
import numpy as np
import pytest
from media_factory import frame_index, make_audio, make_video

import avprobe.media.counterfactual as cf_mod
import avprobe.media.mux as mux_mod
from avprobe.cli import main as cli_main
from avprobe.media.decode import MediaError, decode_video, load_media
from avprobe.media.manifest import load_manifest, write_manifest
from avprobe.media.mux import mux, mux_samples
from avprobe.types import SAMPLE_RATE, Sample


def _cf(sid, video, audio) -> Sample:
    return Sample(sid, video=str(video), audio=str(audio), audio_captions=("x",), kind="counterfactual",
                  video_source="v", audio_source="a")


def _video_packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def _same_sound(a, b):
    """Two lossy decodes of one tone, in the same place: a one-sample shift alone would give a
    mean difference near 0.09 at these frequencies; AAC's own noise stays well under 0.02."""
    d = np.abs(a - b)
    assert d.mean() < 0.02 and d.max() < 0.1, (d.mean(), d.max())


def _tokens(waveform) -> int:
    """Audio tokens of a 16 kHz waveform, through the feature extractor the engine uses."""
    from avprobe.media.processing import audio_features, audio_token_count

    return audio_token_count(int(audio_features(waveform, 128)[1].sum()))


# --- 1. a codec mp4 cannot hold ---------------------------------------------------------------


def test_vp8_webm_is_copied_into_mkv_and_decodes_like_unmuxed(tmp_path):
    video = make_video(tmp_path / "v.webm", seconds=1.0, codec="libvpx")
    audio = make_audio(tmp_path / "a.m4a", seconds=1.5, rate=44_100, freqs=(1000.0,))
    s = _cf("w", video, audio)
    out, errors = mux_samples([s], tmp_path / "mux")
    assert errors == []
    assert out[0].video == str(tmp_path / "mux" / "w.mkv") and out[0].audio is None
    assert _video_packets(out[0].video) == _video_packets(video)  # copied, not re-encoded
    m, u = load_media(out[0]), load_media(s)
    assert m.frames.shape == u.frames.shape
    assert abs(m.waveform.size - u.waveform.size) <= 1
    n, edge = min(m.waveform.size, u.waveform.size), SAMPLE_RATE // 20
    _same_sound(m.waveform[edge : n - edge], u.waveform[edge : n - edge])


def _unrelated_embed(texts):
    """Fake embedder: every caption its own direction, so any two clips may be paired."""
    return np.eye(len(texts), dtype=np.float32)


def test_cli_mux_records_a_failing_sample_and_still_writes_manifest_and_report(tmp_path, monkeypatch):
    monkeypatch.setattr(cf_mod, "_default_embed", _unrelated_embed)  # no model load: the media is under test
    rows = []
    for i, c in enumerate(["a dog barks", "a man speaks", "rain falls on a roof", "a car engine revs"]):
        ext = "webm" if i % 2 else "mp4"
        codec = "libvpx" if i % 2 else "libx264"
        make_video(tmp_path / "clips" / f"c{i}.{ext}", seconds=0.6, codec=codec, audio_freqs=(300.0 + 100 * i,))
        rows.append(Sample(f"c{i}", video=str(tmp_path / "clips" / f"c{i}.{ext}"), audio_captions=(c,)))
    manifest = write_manifest(rows, tmp_path / "in.jsonl")
    out = tmp_path / "cf.jsonl"
    args = ["dataset", "counterfactual", str(manifest), "--out", str(out), "--n", "3", "--mux", str(tmp_path / "mux")]
    assert cli_main(args) == 0
    cf = load_manifest(out, check_files=True)
    assert len(cf) == 3 and all(s.audio is None for s in cf)
    for s in cf:  # webm videos go into .mkv, the others into .mp4
        assert s.video.endswith(".mkv" if int(s.video_source[1:]) % 2 else ".mp4")
    assert cli_main(["dataset", "validate", str(out), "--decode"]) == 0

    real = mux_mod.mux
    doomed = cf[0].id

    def flaky(video, audio, target):
        if target.stem == doomed:
            raise ValueError("something nobody foresaw")
        return real(video, audio, target)

    monkeypatch.setattr(mux_mod, "mux", flaky)
    out.unlink()
    assert cli_main(args) == 1
    again = {s.id: s for s in load_manifest(out, check_files=True)}
    assert len(again) == 3 and again[doomed].audio is not None  # kept unmuxed, still valid
    assert sum(s.audio is None for s in again.values()) == 2  # the others went on
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert [(e["sample_id"], e["stage"]) for e in report["mux_errors"]] == [(doomed, "mux")]
    assert "ValueError: something nobody foresaw" in report["mux_errors"][0]["reason"]
    assert list(report["mux_failures"]) == ["mux: ValueError: something nobody foresaw"]


# --- 2. packets without dts; every output checked --------------------------------------------


def test_h264_mkv_packets_without_dts_mux_into_a_decodable_mp4(tmp_path):
    video = make_video(tmp_path / "v.mkv", seconds=1.0, fps=10, bframes=2)
    with av.open(str(video)) as c:
        first = next(p for p in c.demux(c.streams.video[0]) if p.size)
        assert first.is_keyframe and first.dts is None  # the case at hand: matroska keeps no dts
    audio = make_audio(tmp_path / "a.wav", seconds=1.0)
    out = mux(video, audio, tmp_path / "m.mp4")
    assert out.suffix == ".mp4"
    assert _video_packets(out) == _video_packets(video)  # nothing dropped, keyframe included
    frames, _ = decode_video(out, fps=10)
    assert [frame_index(f, 10) for f in frames] == list(range(10))


def _drop_first_video_packet(src, dst_path):
    """An mp4 whose video lacks its first (key) packet: what the old muxer wrote."""
    with av.open(str(src)) as s, av.open(str(dst_path), "w", format="mp4") as d:
        streams = {st.index: d.add_stream_from_template(st) for st in s.streams}
        seen = False
        for p in s.demux():
            if not p.size:
                continue
            if p.stream.type == "video" and not seen:
                seen = True
                continue
            p.stream = streams[p.stream.index]
            d.mux(p)
    return dst_path


def test_check_decodes_rejects_a_muxed_file_that_would_not_decode(tmp_path):
    src = make_video(tmp_path / "v.mp4", seconds=1.0, fps=10, audio_rate=16_000)
    bad = _drop_first_video_packet(src, tmp_path / "bad.mp4")
    n_audio = 16_384  # what make_video's AAC track decodes to (its tail untrimmed)
    with pytest.raises(MediaError, match="10 video packets"):
        mux_mod._check_decodes(bad, bad, 10, n_audio)
    with pytest.raises(MediaError, match="keyframe"):
        mux_mod._check_decodes(bad, bad, 9, n_audio)
    with pytest.raises(MediaError, match="audio decodes to"):
        mux_mod._check_decodes(src, src, 10, 16_000)
    mux_mod._check_decodes(src, src, 10, n_audio)


def test_a_muxed_file_that_fails_its_check_is_a_failure_not_a_success(tmp_path, monkeypatch):
    video = make_video(tmp_path / "v.mp4", seconds=0.6)
    audio = make_audio(tmp_path / "a.wav", seconds=0.6)
    real = mux_mod._audio_frames
    monkeypatch.setattr(mux_mod, "_audio_frames", lambda *a: itertools.islice(real(*a), 2))  # audio cut short
    out, errors = mux_samples([_cf("s", video, audio)], tmp_path / "mux")
    assert out[0].audio == str(audio)  # kept unmuxed
    assert len(errors) == 1 and "audio decodes to" in errors[0].reason
    assert errors[0].path == str(tmp_path / "mux" / "s.mp4")
    assert not list((tmp_path / "mux").iterdir())  # nothing half-written left behind


# --- 3. the AAC tail --------------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "rate"), [(10.0, 16_000), (2.0, 44_100), (1.3, 48_000)])
def test_muxed_aac_decodes_to_the_unmuxed_length(tmp_path, seconds, rate):
    video = make_video(tmp_path / "v.mp4", seconds=seconds, fps=10, audio_rate=None)
    audio = make_audio(tmp_path / "a.m4a", seconds=seconds + 0.5, rate=rate, freqs=(700.0,))
    s = _cf("c", video, audio)
    out, errors = mux_samples([s], tmp_path / "mux")
    assert errors == [] and out[0].video.endswith(".mp4")
    m, u = load_media(out[0]), load_media(s)
    assert u.waveform.size == round(seconds * SAMPLE_RATE)
    assert abs(m.waveform.size - u.waveform.size) <= 1
    n, edge = min(m.waveform.size, u.waveform.size), SAMPLE_RATE // 20  # AAC smears the onset and the cut
    _same_sound(m.waveform[edge : n - edge], u.waveform[edge : n - edge])
    if seconds == 10.0:
        assert _tokens(m.waveform) == _tokens(u.waveform) == 250  # was 251 muxed
