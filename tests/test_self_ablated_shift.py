"""The audio-ablated self as a shift base (tracker issue 15, item 4): the same model on the same
prompt with the audio removed, teacher-forced on the AV caption, for every family; stored beside
the vision-only base's shift under a protocol field that leaves existing keys as they were."""

from __future__ import annotations

import numpy as np
import pytest

from avprobe.conditions import Baseline
from avprobe.engine import EngineConfig, run
from avprobe.media.sources import load_sample_media
from avprobe.pipeline.collect import compute_record
from avprobe.probes.base_shift import base_logprobs, shift
from avprobe.records import SHIFT_BASES, Protocol, shift_bases
from avprobe.testing import random_media, tiny_adapter
from avprobe.types import Media, Sample

QUERY = "describe what you see and hear"
FAMILIES = ("qwen2_5_omni", "gemma4", "phi4_multimodal")


def _media(family: str, audio: bool = True) -> Media:
    size, height = (100, 60) if family == "phi4_multimodal" else (56, None)
    return random_media(seconds=2.0, fps=2.0 if family == "qwen2_5_omni" else 1.0, size=size, height=height,
                        audio=audio, seed=4)


def test_existing_protocol_keys_are_unchanged_and_the_new_base_has_its_own():
    # Keys of the committed fixtures' protocols (measured before the field existed).
    assert Protocol().key() == "8696d29765eb"
    assert Protocol(knockout=False).key() == "2e23235ae1da"
    assert Protocol(self_shift=True).key() not in {Protocol().key(), Protocol(knockout=False).key()}


def test_base_spec():
    assert shift_bases(None) == (None, False)
    assert shift_bases("qwen2.5-vl-3b") == ("qwen2.5-vl-3b", False)
    assert shift_bases("self-ablated") == (None, True)
    assert shift_bases("qwen2.5-vl-3b, self-ablated") == ("qwen2.5-vl-3b", True)
    with pytest.raises(ValueError, match="at most one"):
        shift_bases("a,b")


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_forcing_the_model_on_its_own_input_does_not_shift(family):
    """With nothing to remove (a clip without audio) the self base is the model on the very
    input it decoded: KL 0 and the same top-1 at every token. So the teacher-forced pass lines
    up with the engine's decode position for position (rotary layout, pinned state included)."""
    a = tiny_adapter(family, n_layers=2)
    media = _media(family, audio=False)
    mi = a.build_inputs(media, QUERY)
    res = run(a, mi, [Baseline()], EngineConfig(max_new_tokens=8, keep_logprobs=True, suppress_eos=True))
    caption = res.outputs[0].token_ids
    r = shift(res.logprobs, base_logprobs(a, media, QUERY, caption), caption)
    assert len(r.kl) == len(caption) == 8
    assert np.abs(r.kl).max() < 1e-4 and r.top1_same.all() and r.in_base_top3.all()


@pytest.mark.parametrize("family", FAMILIES)
def test_record_holds_the_self_ablated_shift_beside_the_vision_base(family):
    a = tiny_adapter(family, n_layers=2, seed=1)
    media = _media(family)
    sample = Sample(id="s1", kind="factual", video="v.mp4", audio="a.wav", audio_captions=("a dog",))
    proto = Protocol(max_new_tokens=6, knockout=False, lens=False, self_shift=True)
    base = tiny_adapter(family, n_layers=2, seed=5)  # any other model stands in for a vision-only base
    rec = compute_record(a, sample, media, QUERY, proto, base=base)
    for prefix in SHIFT_BASES.values():
        assert len(rec.arrays[f"{prefix}_kl"]) == len(rec.conditions[0]["token_ids"])
    assert rec.meta["self_shift"]["ablation"] == "audio removed"
    assert rec.meta["self_shift"]["base_model"] == f"{a.name} (audio removed)"
    assert rec.meta["shift"]["base_model"] == base.name
    # removing the audio moves a random model's distribution: the statistic can tell
    assert rec.arrays["self_shift_kl"].mean() > 1e-4
    # the default protocol computes no self shift: records keep their old form
    plain = compute_record(a, sample, media, QUERY, Protocol(max_new_tokens=6, knockout=False, lens=False), base=base)
    assert "self_shift_kl" not in plain.arrays and "self_shift" not in plain.meta
    # a clip without audio has nothing to ablate: no self shift, no error
    silent = compute_record(a, sample, _media(family, audio=False), QUERY, proto, base=None)
    assert "self_shift_kl" not in silent.arrays


def test_a_caption_holding_a_media_id_is_an_explained_gap_not_a_lost_record():
    """A full forward reads a media placeholder id as media: that caption cannot be teacher-forced.
    The record keeps its captions and says why the shift is missing."""
    a = tiny_adapter("gemma4", n_layers=2)
    media = _media("gemma4")
    with pytest.raises(ValueError, match="media placeholder"):
        base_logprobs(a, media, QUERY, [a.special("video"), a.special("turn_end")])
    sample = Sample(id="s1", kind="factual", video="v.mp4", audio="a.wav")
    proto = Protocol(max_new_tokens=6, knockout=False, lens=False, self_shift=True)
    with pytest.MonkeyPatch.context() as mp:
        import avprobe.engine as engine

        real = engine._run_clips

        def media_caption(*args, **kw):
            results = real(*args, **kw)
            results[0].outputs[0].token_ids[:2] = [a.special("video"), a.special("video")]
            return results

        mp.setattr(engine, "_run_clips", media_caption)
        rec = compute_record(a, sample, media, QUERY, proto)
    assert "self_shift_kl" not in rec.arrays and "media placeholder" in rec.meta["self_shift"]["error"]
    assert rec.conditions[0]["token_ids"][0] == a.special("video")


def test_organism_sample_media_load_for_the_claims_run():
    """The claims' end-to-end runs use the organism world's samples: they carry audio and video."""
    from avprobe.pipeline.gather import load_samples

    samples, _ = load_samples("organism", 2)
    media = load_sample_media(samples[0], fps=2.0, max_frames=8)
    assert media.frames is not None and media.waveform is not None
