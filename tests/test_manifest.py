"""Manifest loading/validation (JSONL and CSV) and the AudioCaps importer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from media_factory import make_audio, make_video

from avprobe.media.audiocaps import candidate_stems, import_audiocaps, read_audiocaps_csv
from avprobe.media.manifest import ManifestError, load_manifest, read_manifest, write_manifest
from avprobe.types import Sample


def _jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


GOOD = {"id": "a", "video": "clips/a.mp4", "audio_captions": ["a dog barks"], "video_captions": ["a dog"]}


def test_good_jsonl_row_becomes_sample_with_resolved_paths(tmp_path):
    m = _jsonl(
        tmp_path / "m.jsonl",
        [
            GOOD,
            {
                "id": "b",
                "video": "/abs/b.mp4",
                "audio": "../x/b.wav",
                "audio_captions": ["rain", "rain falls"],
                "labels": ["rain"],
                "kind": "counterfactual",
                "video_source": "a",
                "audio_source": "c",
                "youtube_id": "xyz",
            },
        ],
    )
    a, b = load_manifest(m)
    assert a == Sample(
        "a",
        video=str(tmp_path / "clips/a.mp4"),
        audio_captions=("a dog barks",),
        video_captions=("a dog",),
    )
    assert b.video == "/abs/b.mp4" and b.audio == str(tmp_path / "../x/b.wav")
    assert b.kind == "counterfactual" and b.labels == ("rain",) and b.audio_source == "c"
    assert dict(b.meta) == {"youtube_id": "xyz"}


def test_all_bad_rows_reported_at_once_with_line_numbers(tmp_path):
    m = _jsonl(
        tmp_path / "m.jsonl",
        [
            GOOD,  # line 1
            "{not json",  # 2
            {"id": "c", "video": "c.mp4", "audio_captions": []},  # 3: empty captions
            {"id": "d", "video": "d.mp4", "audio_captions": ["ok", "  "]},  # 4: empty caption
            b'{"id": "e", "video": "e.mp4", "audio_captions": ["caf\xe9"]}',  # 5: latin-1 byte
            {"id": "a", "video": "a2.mp4", "audio_captions": ["dup"]},  # 6: duplicate id
            {"id": "f", "audio_captions": ["x"]},  # 7: no media
            {"id": "g", "video": "g.mp4", "audio_captions": ["x"], "kind": "counterfactual"},  # 8
            {"id": "h", "video": "h.mp4", "audio_captions": ["x"], "kind": "weird"},  # 9
            {"video": "i.mp4", "audio_captions": ["x"]},  # 10: no id
            ["a", "list"],  # 11
        ],
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(m)
    problems = info.value.problems
    assert [p.line for p in problems] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    text = str(info.value)
    for needle in ("line 2", "JSON", "audio_captions is empty", "audio_captions[1] is empty", "UTF-8",
                   "duplicate id (first on line 1)", "neither video nor audio", "video_source",
                   "kind must be", "id is missing", "JSON object"):
        assert needle in text, needle
    res = read_manifest(m)  # lenient form: good rows kept, bad rows as error records
    assert [s.id for s in res.samples] == ["a"]
    assert len(res.errors) == 10 and res.errors[0].path == f"{m}:2" and res.errors[0].stage == "manifest"


def test_csv_manifest_with_list_cells(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(
        "id,video,audio,audio_captions,video_captions,labels,kind\n"
        'a,a.mp4,,a dog barks,"[""a dog"", ""a brown dog""]",dog,factual\n'
        'b,b.mp4,b.wav,"[""rain""]",,"[""rain"", ""water""]",\n'
        "c,c.mp4,,,,,\n"
        'd,d.mp4,,"[broken",,,\n',
        encoding="utf-8",
    )
    res = read_manifest(m)
    a, b = res.samples
    assert a.audio_captions == ("a dog barks",) and a.video_captions == ("a dog", "a brown dog")
    assert a.labels == ("dog",) and a.audio is None
    assert b.audio == str(tmp_path / "b.wav") and b.labels == ("rain", "water") and b.kind == "factual"
    assert [(p.line, p.id) for p in res.problems] == [(4, "c"), (5, "d")]
    assert "audio_captions is empty" in str(res.problems[0])
    assert "not a valid JSON array" in str(res.problems[1])


def test_csv_non_utf8_line_is_reported(tmp_path):
    m = tmp_path / "m.csv"
    m.write_bytes(b"id,video,audio_captions\na,a.mp4,fine\nb,b.mp4,caf\xe9 noise\n")
    res = read_manifest(m)
    assert [s.id for s in res.samples] == ["a"]
    assert res.problems[0].line == 3 and "UTF-8" in str(res.problems[0])


def test_check_files(tmp_path):
    make_video(tmp_path / "a.mp4", seconds=0.5)
    m = _jsonl(tmp_path / "m.jsonl", [{**GOOD, "video": "a.mp4"}, {**GOOD, "id": "b", "video": "b.mp4"}])
    assert len(read_manifest(m).samples) == 2
    res = read_manifest(m, check_files=True)
    assert [s.id for s in res.samples] == ["a"] and "video file not found" in str(res.problems[0])


def test_write_then_read_round_trip(tmp_path):
    samples = [
        Sample("x", video=str(tmp_path / "v" / "x.mp4"), audio_captions=("a", "b"), video_captions=("c",),
               labels=("l",), meta=(("youtube_id", "q"),)),
        Sample("y", video="/elsewhere/y.mp4", audio=str(tmp_path / "y.wav"), audio_captions=("d",),
               kind="counterfactual", video_source="x", audio_source="z"),
    ]
    out = write_manifest(samples, tmp_path / "m.jsonl")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["video"] == "v/x.mp4" and rows[1]["video"] == "/elsewhere/y.mp4"  # relative when inside
    assert load_manifest(out) == samples


def test_unknown_format(tmp_path):
    p = tmp_path / "m.txt"
    p.write_text("x")
    with pytest.raises(ManifestError, match="use .jsonl or .csv"):
        read_manifest(p)


# --- AudioCaps ------------------------------------------------------------------------------

AUDIOCAPS_CSV = """audiocap_id,youtube_id,start_time,caption
103,--0w1YA1Hm4,30,A vehicle driving as a man and woman are talking
101,--0w1YA1Hm4,30,A man speaks as a car drives by
7,-AheI8Epim4,10,Birds chirp and a pigeon coos
8,-BUWGM7qeUM,0,Wind blows hard
9,-CZ1LIc8aos,20,Water runs from a faucet
10,-DmTvNaK1hk,40,
11,-EaZ7EJJUl0,abc,Dogs bark
"""


def test_audiocaps_import_groups_captions_and_lists_missing(tmp_path):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(AUDIOCAPS_CSV)
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    make_video(clips / "--0w1YA1Hm4_30.000_40.000.mp4", seconds=0.5)  # yt-dlp style
    make_video(clips / "sub" / "Y-AheI8Epim4.mkv", seconds=0.5)  # AudioSet style, nested
    make_audio(clips / "-BUWGM7qeUM.wav", seconds=0.5)  # audio only: not enough for AV
    res = import_audiocaps(csv_path, clips)
    ids = [s.id for s in res.samples]
    assert ids == ["--0w1YA1Hm4_30", "-AheI8Epim4_10"]
    first = res.samples[0]
    assert first.audio_captions == ("A man speaks as a car drives by", "A vehicle driving as a man and woman are talking")
    assert first.video.endswith("--0w1YA1Hm4_30.000_40.000.mp4") and first.audio is None
    assert dict(first.meta) == {"audiocap_ids": "101,103", "start_time": "30", "youtube_id": "--0w1YA1Hm4"}
    missing = {m.youtube_id: m for m in res.missing}
    assert set(missing) == {"-BUWGM7qeUM", "-CZ1LIc8aos"}
    assert "audio only" in missing["-BUWGM7qeUM"].note and missing["-CZ1LIc8aos"].note == "not found"
    assert len(res.problems) == 2 and "line 7" in res.problems[0] and "start_time" in res.problems[1]


def test_audiocaps_manifest_round_trip(tmp_path):
    csv_path = tmp_path / "a.csv"
    csv_path.write_text(AUDIOCAPS_CSV)
    make_video(tmp_path / "clips" / "-CZ1LIc8aos_20.mp4", seconds=0.5)
    res = import_audiocaps(csv_path, tmp_path / "clips", video_captions={"-CZ1LIc8aos": ["a sink"]})
    out = write_manifest(res.samples, tmp_path / "m.jsonl")
    (s,) = load_manifest(out, check_files=True)
    assert s.video_captions == ("a sink",) and s.audio_captions == ("Water runs from a faucet",)


def test_audiocaps_csv_needs_its_columns(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("id,caption\n1,hi\n")
    with pytest.raises(ValueError, match="youtube_id"):
        read_audiocaps_csv(p)


def test_candidate_stems():
    stems = candidate_stems("abc", 30.0)
    for want in ("abc", "Yabc", "abc_30", "abc_30_40", "abc_30.000_40.000", "Yabc_30.000_40.000", "abc_30000_40000"):
        assert want in stems
    assert len(stems) == len(set(stems))


# --- failures grouped by cause (issue 14) -------------------------------------------------------


def test_failures_group_by_cause_not_by_the_first_words():
    from avprobe.media.manifest import MAX_EXAMPLES, failure_cause, group_failures
    from avprobe.types import SampleError

    causes = [  # ten different causes; the old grouping (text before the first colon) made seven groups
        "ValueError: could not broadcast input array from shape (3,) into shape (2,)",
        "ValueError: zero-size array to reduction operation maximum which has no identity",
        "OSError: [Errno 28] No space left on device",
        "OSError: [Errno 13] Permission denied",
        "cannot open container (truncated or corrupt?): [Errno 1094995529] Invalid data found when processing input: '{p}'",
        "cannot open container (truncated or corrupt?): [Errno 1414092869] Immediate exit requested: '{p}'",
        "corrupt audio stream: [Errno 1094995529] Invalid data found when processing input",
        "truncated or corrupt video: decoded 3 of 10 frames",
        "truncated or corrupt audio: decoded 0.42 s of 10.00 s",
        "file not found",
    ]
    errors = []
    for k, reason in enumerate(causes):
        for j in range(4):  # each cause on four files, its particulars differing
            path = f"/data/clips/c{k}_{j}.mp4"
            r = reason.format(p=path).replace("3 of 10", f"{3 + j} of {10 + j}").replace("0.42 s", f"0.{42 + j} s")
            errors.append(SampleError(f"s{k}_{j}", "decode", path, r))
    groups = group_failures(errors)
    assert len(groups) == 10
    assert all(g["count"] == 4 and len(g["examples"]) == MAX_EXAMPLES for g in groups.values())
    assert [e["sample_id"] for e in groups[failure_cause(errors[0])]["examples"]] == ["s0_0", "s0_1", "s0_2"]
    assert failure_cause(errors[0]).startswith("decode: ValueError: could not broadcast")
    assert failure_cause(errors[29]) == "decode: truncated or corrupt video: decoded <n> of <n> frames"
    assert "/data" not in failure_cause(errors[16])  # the file's path is no part of the cause
    # Same words in another stage are another group.
    assert failure_cause(SampleError("x", "mux", None, "file not found")) != failure_cause(errors[-1])
