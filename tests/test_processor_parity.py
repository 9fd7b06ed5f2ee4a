"""Inputs equal to the upstream processors' (tracker issue 14).

The upstream Qwen processors need torchvision for video, which this machine lacks, so their
own methods are called on stand-in `self`s (the real WhisperFeatureExtractor included), and
positions come from the real models' `get_rope_index`, built tiny from the config classes.
The organisms' inputs are pinned by digests taken before any of these changes: their stored
results are keyed without the inputs, so they must not move.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from media_factory import make_video

from avprobe.adapters import load
from avprobe.adapters.base import AdapterSettings
from avprobe.media.decode import load_media
from avprobe.testing import TINY_SETTINGS, random_media, tiny_adapter
from avprobe.types import SAMPLE_RATE, Media, Role, Sample

QUERY = "describe what you see and hear"

# --- the organisms' inputs are frozen ------------------------------------------------------

ANSWER = "i see a dog . i hear a siren ."
# sha256 (16 hex) of every input tensor, roles, times, positions, labels and prompt_len, as
# computed by `_digest` at commit 06155d1 (before issue 14). Both trained organisms share
# one tokenizer and config, so their digests agree.
_OMNI = {
    ("organism-0000", "describe what you see and hear", None): "5217e0018ad93f55",
    ("organism-0000", "describe what you hear and see", None): "3a0891889ca2cf32",
    ("organism-0000", "describe what you see and hear", ANSWER): "f2cfc5fd8ee1a773",
    ("organism-0250", "describe what you see and hear", None): "a8aeca679338ad32",
    ("organism-0499", "describe what you hear and see", None): "87e76e8754840a65",
    ("organism-0250-audio", "describe what you see and hear", None): "0d61eb76ffbbe94c",
    ("organism-0250-audio", "describe what you see and hear", ANSWER): "f8226fc0ee143e99",
}
ORGANISM_DIGESTS = {
    "organism": _OMNI,
    "organism-control": _OMNI,
    # the vision-only base, given the clips' frames alone (as the shift analysis does)
    "organism-base": {
        ("organism-0000", "describe what you see and hear", None): "a335d815462c2580",
        ("organism-0250", "describe what you hear and see", None): "19bfacf29da76a37",
        ("organism-0499", "describe what you see and hear", ANSWER): "67849ac8cfe68a1f",
    },
}


def _digest(mi) -> str:
    h = hashlib.sha256()
    items = dict(mi.inputs)
    items.update(roles=mi.roles, times=mi.times, positions=mi.positions, labels=mi.labels, prompt_len=mi.prompt_len)
    for k in sorted(items):
        v = items[k]
        h.update(k.encode())
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", sorted(ORGANISM_DIGESTS))
def test_organism_inputs_are_byte_identical_to_before(name):
    from avprobe.media.sources import load_sample_media
    from avprobe.organism.dataset import eval_samples
    from avprobe.organism.world import audio_only

    a = load(name)
    samples = {s.id: s for s in eval_samples()}
    for sid in ("organism-0000", "organism-0250"):
        samples[f"{sid}-audio"] = audio_only(samples[sid])
    got, want = {}, ORGANISM_DIGESTS[name]
    for sid, query, answer in want:
        media = load_sample_media(samples[sid], fps=a.settings.fps, max_frames=a.settings.max_frames)
        if name == "organism-base":
            media = Media(frames=media.frames, fps=media.fps, waveform=None)
        got[(sid, query, answer)] = _digest(a.build_inputs(media, query, answer=answer))
    assert got == want


# --- upstream stand-ins ------------------------------------------------------------------


class _FakeVideoProcessor:
    temporal_patch_size = 2
    merge_size = 2

    def __init__(self, grid: torch.Tensor) -> None:
        self.grid = grid

    def __call__(self, videos, **kwargs):
        return {"video_grid_thw": self.grid}


def upstream_second_per_grid(family: str, grid: torch.Tensor, fps: float | None) -> float:
    """`video_second_per_grid` as the upstream processor's `_process_videos` sets it."""
    proc = _processor_cls(family)
    fake = SimpleNamespace(video_processor=_FakeVideoProcessor(grid), replace_video_token=lambda *a, **k: "")
    videos_kwargs = {} if fps is None else {"fps": fps}
    out, _ = proc._process_videos(fake, [None], videos_kwargs=videos_kwargs)
    return float(out["video_second_per_grid"][0])


def upstream_audio(family: str, waveform: np.ndarray, n_mels: int = 128) -> dict:
    """The upstream processor's `_process_audio` with the real WhisperFeatureExtractor and the
    processor's own audio kwargs."""
    from transformers import WhisperFeatureExtractor

    proc = _processor_cls(family)
    fake = SimpleNamespace(
        feature_extractor=WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE),
        replace_audio_token=lambda *a, **k: "",
        n_window=50,
    )
    kwargs = dict(proc.audio_kwargs)
    kwargs.setdefault("return_tensors", "np")
    out, _ = proc._process_audio(fake, [waveform], **kwargs)
    return out


def upstream_layout(family: str, grid: torch.Tensor, n_audio: int, second_per_grid: float, per_second: float,
                    chunk_s: float = 2.0) -> str:
    """The upstream audio-in-video placeholder string, B/E around V (video) and A (audio)."""
    proc = _processor_cls(family)
    fake = SimpleNamespace(
        audio_bos_token="B", audio_eos_token="E", video_token="V", audio_token="A",
        video_processor=SimpleNamespace(merge_size=2),
    )
    fake.get_chunked_index = lambda idx, n: proc.get_chunked_index(fake, idx, n)
    video_inputs = {"video_grid_thw": [grid[0].numpy()], "video_second_per_grid": [second_per_grid]}
    return proc.replace_video_with_audio_token(
        fake, video_inputs, 0, {"num_audio_tokens": [n_audio]}, 0,
        position_id_per_seconds=per_second, seconds_per_chunk=chunk_s,
    )


def _processor_cls(family: str):
    if family == "qwen2_5_omni":
        from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

        return Qwen2_5OmniProcessor
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor

    return Qwen3OmniMoeProcessor


def _layout(a, mi) -> str:
    ids = mi.input_ids[0].tolist()
    start, end = ids.index(a.special("audio_start")), ids.index(a.special("audio_end"))
    return "B" + "".join({a.special("video"): "V", a.special("audio"): "A"}[t] for t in ids[start + 1 : end]) + "E"


def _upstream_positions(a, mi, use_audio_in_video: bool, second_per_grid: float | None,
                        audio_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    inp = mi.inputs
    if audio_seqlens is None and "feature_attention_mask" in inp:
        audio_seqlens = inp["feature_attention_mask"].sum(-1)
    with torch.no_grad():
        pos, _ = a.model.model.get_rope_index(
            inp["input_ids"], None, inp.get("video_grid_thw"), inp["attention_mask"], use_audio_in_video,
            audio_seqlens, None if second_per_grid is None else torch.tensor([second_per_grid]),
        )
    return pos


# --- 1. seconds per video grid --------------------------------------------------------------


@pytest.fixture(scope="module")
def clip_9_9s(tmp_path_factory):
    """9.9 s at 30 fps: 297 frames, 18 sampled at 2 fps (effective 1.82 fps)."""
    return make_video(tmp_path_factory.mktemp("parity") / "c.mp4", seconds=9.9, fps=30)


@pytest.mark.parametrize("with_audio", [False, True])
def test_video_positions_of_a_9_9s_30fps_clip_equal_upstream(clip_9_9s, with_audio):
    a = tiny_adapter("qwen2_5_omni")
    media = load_media(Sample("c", video=str(clip_9_9s), audio_captions=("x",)), fps=a.settings.fps)
    assert media.frames.shape[0] == 18 and media.fps == pytest.approx(18 / 9.9)
    if not with_audio:
        media = Media(frames=media.frames, fps=media.fps, waveform=None)
    mi = a.build_inputs(media, QUERY)
    grid = mi.inputs["video_grid_thw"]
    # the processor is told settings.fps (2.0), or not told at all: 2 / 2.0 either way
    spg = upstream_second_per_grid("qwen2_5_omni", grid, a.settings.fps)
    assert spg == upstream_second_per_grid("qwen2_5_omni", grid, None) == 1.0
    assert float(mi.inputs["video_second_per_grid"][0]) == spg
    if with_audio:
        n_audio = int((mi.roles == int(Role.AUDIO)).sum())
        assert _layout(a, mi) == upstream_layout("qwen2_5_omni", grid, n_audio, spg, 25)
    want = _upstream_positions(a, mi, with_audio, spg)
    assert torch.equal(mi.positions, want)
    video = mi.role_positions(Role.VIDEO)
    if not with_audio:
        # im_start, user, vision_bos, then 9 grids of 1 s at 25 positions a second
        assert int(mi.positions[0, 0, video].max()) == 3 + 8 * 25 == 203  # was 223 (1.1 s a grid)
    # the times annotation stays in clip seconds: grid k starts at frame 2k of 18 over 9.9 s
    times = mi.times[video].numpy()
    assert float(times.max()) == pytest.approx(16 / (18 / 9.9), rel=1e-6)


def test_vl_seconds_per_grid_is_the_sampled_rate(clip_9_9s):
    """Qwen2.5-VL's processor (5.x) takes the sampled fps from the video metadata."""
    a = tiny_adapter("qwen2_5_vl")
    media = load_media(Sample("c", video=str(clip_9_9s), audio_captions=("x",)), fps=a.settings.fps)
    mi = a.build_inputs(Media(frames=media.frames, fps=media.fps, waveform=None), QUERY)
    sampled_fps = 18 / 297 * 30.0  # VideoMetadata.sampled_fps
    assert float(mi.inputs["second_per_grid_ts"][0]) == pytest.approx(2 / sampled_fps)


# --- 2. audio longer than 30 s -------------------------------------------------------------


def test_audio_over_30s_is_cut_to_30s_like_upstream():
    a = tiny_adapter("qwen2_5_omni")
    media = random_media(seconds=40.0, video=False, seed=3)
    mi = a.build_inputs(media, "describe what you hear")
    ref = upstream_audio("qwen2_5_omni", media.waveform)
    assert int(ref["num_audio_tokens"][0]) == 750
    assert int((mi.roles == int(Role.AUDIO)).sum()) == 750  # was 1000
    n = int(ref["feature_attention_mask"].sum())
    assert n == 3000 and mi.inputs["input_features"].shape[-1] == n
    np.testing.assert_array_equal(mi.inputs["input_features"][0].numpy(), ref["input_features"][0, :, :n])
    assert torch.equal(mi.positions, _upstream_positions(a, mi, False, None, torch.tensor([n])))
    # the 750 tokens span the 30 s the model hears
    times = mi.times[mi.role_positions(Role.AUDIO)]
    assert float(times[1] - times[0]) == pytest.approx(0.04) and float(times.max()) < 30.0


@pytest.mark.parametrize("seconds", [4.0, 10.0, 29.99])
def test_audio_under_30s_features_equal_upstream(seconds):
    a = tiny_adapter("qwen2_5_omni")
    media = random_media(seconds=seconds, video=False, seed=5)
    mi = a.build_inputs(media, "describe what you hear")
    ref = upstream_audio("qwen2_5_omni", media.waveform)
    n = int(ref["feature_attention_mask"].sum())
    assert int((mi.roles == int(Role.AUDIO)).sum()) == int(ref["num_audio_tokens"][0])
    np.testing.assert_array_equal(mi.inputs["input_features"][0].numpy(), ref["input_features"][0, :, :n])


def test_audio_in_video_over_30s_layout_equals_upstream():
    a = tiny_adapter("qwen2_5_omni")
    media = random_media(seconds=40.0, fps=0.5, seed=2)  # 20 frames: 10 grids of 2 frames
    mi = a.build_inputs(media, QUERY)
    n_audio = int(upstream_audio("qwen2_5_omni", media.waveform)["num_audio_tokens"][0])
    grid = mi.inputs["video_grid_thw"]
    spg = upstream_second_per_grid("qwen2_5_omni", grid, a.settings.fps)
    assert _layout(a, mi) == upstream_layout("qwen2_5_omni", grid, n_audio, spg, 25)
    assert torch.equal(mi.positions, _upstream_positions(a, mi, True, spg))


@pytest.mark.parametrize("seconds", [4.0, 4.003, 40.0])
def test_qwen3_omni_audio_features_equal_upstream(seconds):
    """Qwen3-Omni's processor pads to the clip's own length and never truncates: its last
    frame and its frame count (4.003 s: 400, not 401) differ from a 30 s window's."""
    a = tiny_adapter("qwen3_omni")
    media = random_media(seconds=seconds, video=False, seed=3)
    mi = a.build_inputs(media, "describe what you hear")
    ref = upstream_audio("qwen3_omni", media.waveform)
    n = int(ref["feature_attention_mask"].sum())
    assert int((mi.roles == int(Role.AUDIO)).sum()) == int(ref["num_audio_tokens"][0])
    np.testing.assert_array_equal(mi.inputs["input_features"][0].numpy(), ref["input_features"][0, :, :n])


# --- 4. Qwen3-Omni's positions per second come from its config --------------------------------


@pytest.mark.parametrize("per_second", [None, 13])
@pytest.mark.parametrize("seconds", [3.0, 5.0])
def test_qwen3_omni_layout_and_positions_follow_the_config(per_second, seconds):
    a = tiny_adapter("qwen3_omni")
    if per_second is not None:
        a.config.position_id_per_seconds = per_second  # the released checkpoint's value
    pps = a.config.position_id_per_seconds
    assert a.position_id_per_seconds == pps
    mi = a.build_inputs(random_media(seconds=seconds, seed=1), QUERY)
    grid = mi.inputs["video_grid_thw"]
    spg = upstream_second_per_grid("qwen3_omni", grid, a.settings.fps)
    n_audio = int((mi.roles == int(Role.AUDIO)).sum())
    assert _layout(a, mi) == upstream_layout("qwen3_omni", grid, n_audio, spg, pps)
    assert torch.equal(mi.positions, _upstream_positions(a, mi, True, spg))
    # every slot holds a position of its own kind: video slots the grids' times, audio slots 0, 1, ...
    gt, gh, gw = grid[0].tolist()
    st = float(mi.positions[0, 0, mi.role_positions(Role.VIDEO)].min())
    t_video = mi.positions[0, 0, mi.role_positions(Role.VIDEO)] - st
    want_t = torch.arange(gt).float().repeat_interleave(gh * gw // 4) * spg * pps
    assert torch.equal(t_video, want_t)
    t_audio = mi.positions[0, 0, mi.role_positions(Role.AUDIO)] - st
    assert torch.equal(t_audio, torch.arange(n_audio).float())


# --- 5. video-only samples ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni"])
def test_video_only_sample_does_not_claim_audio_in_video(family):
    a = tiny_adapter(family)
    assert a.settings.use_audio_in_video
    mi = a.build_inputs(random_media(audio=False, seed=8), QUERY)
    assert mi.inputs["use_audio_in_video"] is False
    assert torch.equal(mi.positions, _upstream_positions(a, mi, False, 1.0))
    with torch.no_grad():  # the model's own positions (no position_ids) are the explicit ones
        own = a.model(**mi.inputs).logits
        explicit = a.model(**a.forward_kwargs(mi)).logits
    assert torch.equal(own, explicit)
    # audio and video together keep the setting
    assert a.build_inputs(random_media(seed=8), QUERY).inputs["use_audio_in_video"] is True


# --- 3. frame rule as a setting ------------------------------------------------------------


def test_frame_rule_is_an_adapter_setting():
    assert AdapterSettings().frame_rule == "linspace"  # what the paper's release ran
    assert AdapterSettings.from_dict({"frame_rule": "floor"}).frame_rule == "floor"
    assert TINY_SETTINGS.frame_rule == "linspace"
    with pytest.raises(ValueError, match="frame_rule"):
        AdapterSettings(frame_rule="nearest")
