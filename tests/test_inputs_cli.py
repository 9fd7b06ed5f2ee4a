"""`avprobe inputs`: the layout a model will see, on clips of odd durations and rates."""

from __future__ import annotations

import json

import pytest

from avprobe.cli import main

from media_factory import make_video


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    return {"9.9s@30": make_video(d / "a.mp4", seconds=9.9, fps=30), "40s@10": make_video(d / "b.mp4", seconds=40, fps=10)}


def _inputs(capsys, clip) -> dict:
    assert main(["inputs", str(clip), "--model", "organism", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inputs_report_grid_positions_and_roles(clips, capsys):
    info = _inputs(capsys, clips["9.9s@30"])
    assert info["video_second_per_grid"] == [1.0]  # 2 / fps 2, as the upstream processor (not 1.1)
    assert info["video"]["source_frames"] == 297 and len(info["video"]["frame_indices"]) == info["video"]["frames"]
    assert info["settings"]["frame_rule"] == "linspace"
    runs = [r["role"] for r in info["role_runs"]]
    assert "video" in runs and "audio" in runs and runs[-1] != "video"
    assert sum(info["tokens_per_role"].values()) == info["prompt_len"]
    assert "<video x" in info["prompt"] and "describe what you see and hear" in info["prompt"]
    assert set(info["positions_per_role"]) >= {"video", "audio"}


def test_inputs_cut_audio_at_30_seconds(clips, capsys):
    info = _inputs(capsys, clips["40s@10"])
    assert info["tokens_per_role"]["audio"] == 750  # Whisper's 30 s, as upstream


def test_inputs_missing_clip_is_one_message(tmp_path, caplog):
    assert main(["inputs", str(tmp_path / "nope.mp4"), "--model", "organism"]) == 2
