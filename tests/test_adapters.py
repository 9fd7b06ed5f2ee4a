"""Adapters: layouts equal the upstream processors', roles come from token ids, the registry
fails clearly, the base model shares the thinker's weights, the logit lens agrees with the
model's own logits."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from avprobe.adapters import UnsupportedModel, load, supported
from avprobe.adapters.qwen2_5_vl import thinker_state_dict_from_vl, vl_state_dict_from_thinker
from avprobe.adapters.registry import adapter_class
from avprobe.conditions import Baseline
from avprobe.engine import EngineConfig, run
from avprobe.probes.base_shift import base_logprobs, shift
from avprobe.probes.logit_lens import LensConfig
from avprobe.testing import random_media, tiny_adapter, tiny_tokenizer
from avprobe.types import Media, Role

QUERY = "describe what you see and hear"


def _upstream_layout(processor_cls, n_video_grid, hw_tokens, n_audio, second_per_grid, per_second, chunk_s=2.0):
    """Call the upstream processor's own interleaving method on a stand-in `self`."""
    fake = SimpleNamespace(
        audio_bos_token="B", audio_eos_token="E", video_token="V", audio_token="A",
        video_processor=SimpleNamespace(merge_size=1),
    )
    fake.get_chunked_index = lambda idx, n: processor_cls.get_chunked_index(fake, idx, n)
    video_inputs = {"video_grid_thw": [np.array([n_video_grid, 1, hw_tokens])], "video_second_per_grid": [second_per_grid]}
    audio_inputs = {"num_audio_tokens": [n_audio]}
    return processor_cls.replace_video_with_audio_token(
        fake, video_inputs, 0, audio_inputs, 0, position_id_per_seconds=per_second, seconds_per_chunk=chunk_s
    )


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni"])
@given(seconds=st.sampled_from([2.0, 3.0, 4.0, 5.0, 7.0]), fps=st.sampled_from([1.0, 2.0, 4.0]))
@settings(max_examples=10, deadline=None)
def test_audio_in_video_layout_matches_upstream_processor(family, seconds, fps):
    if family == "qwen2_5_omni":
        from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor as Proc
    else:
        from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import Qwen3OmniMoeProcessor as Proc
    a = _adapter(family)
    mi = a.build_inputs(random_media(seconds=seconds, fps=fps), QUERY)
    ids = mi.input_ids[0].tolist()
    sp = {k: a.special(k) for k in ("video", "audio", "audio_start", "audio_end")}
    start = ids.index(sp["audio_start"])
    end = ids.index(sp["audio_end"])
    ours = "".join({sp["video"]: "V", sp["audio"]: "A"}[t] for t in ids[start + 1 : end])
    gt, gh, gw = mi.inputs["video_grid_thw"][0].tolist()
    per_t = gh * gw // 4
    n_audio = ours.count("A")
    # the processor is told the sampling fps (settings.fps), whatever rate the frames came at
    second_per_grid = 2 / a.settings.fps
    assert float(mi.inputs["video_second_per_grid"][0]) == second_per_grid
    upstream = _upstream_layout(Proc, gt, per_t, n_audio, second_per_grid, a.config.position_id_per_seconds)
    assert "B" + ours + "E" == upstream
    # roles are read from ids, so interleaved chunks are labelled exactly
    roles = mi.roles[start + 1 : end].tolist()
    assert roles == [int(Role.VIDEO) if c == "V" else int(Role.AUDIO) for c in ours]
    assert ours.count("V") == gt * per_t


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni", "qwen2_5_vl"])
def test_explicit_positions_reproduce_the_models_own(family):
    a = _adapter(family)
    mi = a.build_inputs(random_media(seed=4), QUERY)
    with torch.no_grad():
        own = a.model(**mi.inputs).logits
        explicit = a.model(**a.forward_kwargs(mi)).logits
    assert torch.equal(own, explicit)


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni"])
def test_audio_only_and_video_only_inputs(family):
    a = _adapter(family)
    audio_only = a.build_inputs(random_media(video=False), "describe what you hear")
    assert int((audio_only.roles == int(Role.VIDEO)).sum()) == 0
    assert int((audio_only.roles == int(Role.AUDIO)).sum()) > 0
    video_only = a.build_inputs(random_media(audio=False), QUERY)
    assert int((video_only.roles == int(Role.AUDIO)).sum()) == 0
    with torch.no_grad():
        a.model(**a.forward_kwargs(audio_only))
        a.model(**a.forward_kwargs(video_only))
    with pytest.raises(ValueError, match="neither"):
        a.build_inputs(Media(frames=None, fps=2.0, waveform=None), QUERY)


def test_vision_only_base_rejects_audio_only_sample():
    a = _adapter("qwen2_5_vl")
    with pytest.raises(ValueError):
        a.build_inputs(random_media(video=False), QUERY)


def test_unknown_architecture_lists_supported_and_how_to_register():
    with pytest.raises(UnsupportedModel) as e:
        adapter_class("LlamaForCausalLM")
    msg = str(e.value)
    for arch in supported():
        assert arch in msg
    assert "register_adapter" in msg


def test_missing_model_fails_with_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="--model DIR"):
        load(str(tmp_path / "nope"))


def test_load_local_directory_roundtrip(tmp_path):
    a = _adapter("qwen2_5_omni")
    a.model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "avprobe.json").write_text('{"use_audio_in_video": true, "min_pixels": 3136, "max_pixels": 12544}')
    b = load(str(tmp_path), dtype=torch.float32)
    assert type(b).__name__ == "OmniThinkerAdapter"
    assert b.settings.min_pixels == 3136 and b.revision.startswith("local-")
    mi = b.build_inputs(random_media(), QUERY)
    with torch.no_grad():
        torch.testing.assert_close(b.model(**mi.inputs).logits, a.model(**mi.inputs).logits)


def test_vl_with_thinker_weights_gives_zero_kl():
    """The base-model shift's sanity check: identical weights and positions -> KL = 0."""
    omni = _adapter("qwen2_5_omni")
    vl = tiny_adapter("qwen2_5_vl", n_layers=4)
    missing, unexpected = vl.model.load_state_dict(vl_state_dict_from_thinker(omni.model.state_dict()), strict=False)
    assert not unexpected and not missing
    media = random_media(seed=6, audio=False)
    mi = omni.build_inputs(media, QUERY)
    res = run(omni, mi, [Baseline()], EngineConfig(max_new_tokens=6, keep_logprobs=True))
    caption = res.outputs[0].token_ids
    from avprobe.adapters.base import extend_inputs

    positions = extend_inputs(omni, mi, caption[:-1]).positions
    base_lp = base_logprobs(vl, media, QUERY, caption, positions=positions)
    r = shift(res.logprobs, base_lp, caption)
    assert np.abs(r.kl).max() < 1e-5
    assert r.top1_same.all() and r.in_base_top3.all()
    # A different base (fresh random weights) does shift: the statistic can fail.
    other = tiny_adapter("qwen2_5_vl", n_layers=4, seed=9)
    r2 = shift(res.logprobs, base_logprobs(other, media, QUERY, caption), caption)
    assert r2.kl.mean() > 0.01


def test_weight_mapping_roundtrip():
    sd = _adapter("qwen2_5_omni").model.state_dict()
    back = thinker_state_dict_from_vl(vl_state_dict_from_thinker(sd))
    for k, v in back.items():
        assert torch.equal(v, sd[k])
    assert set(sd) - set(back) == {k for k in sd if k.startswith("model.audio_tower.")}


@pytest.mark.parametrize("use_norm", [True, False])
def test_logit_lens_last_layer_matches_model_logits(use_norm):
    a = _adapter("qwen2_5_omni")
    mi = a.build_inputs(random_media(seed=7), QUERY)
    res = run(a, mi, [Baseline()], EngineConfig(max_new_tokens=2, lens=LensConfig(top_k=3, use_norm=use_norm,
                                                                                    concept_ids=(20, 21))))
    lens = res.lens
    audio_pos = torch.nonzero(mi.roles == int(Role.AUDIO)).flatten()
    assert lens.use_norm is use_norm
    assert lens.top_ids.shape == (a.n_layers, len(audio_pos), 3)
    with torch.no_grad():
        logits = a.model(**a.forward_kwargs(mi)).logits[0, audio_pos].float()
    top = logits.topk(3, -1).indices.numpy()
    if use_norm:  # with the final norm the last layer is exactly the model's own prediction
        np.testing.assert_array_equal(lens.top_ids[-1], top)
        probs = torch.softmax(logits, -1)[:, [20, 21]].numpy()
        np.testing.assert_allclose(lens.concept_probs[-1], probs, rtol=1e-4, atol=1e-7)
    else:  # without it the distributions differ (RMSNorm rescales; the flag matters)
        probs = torch.softmax(logits, -1).topk(3, -1).values.numpy()
        assert not np.allclose(lens.top_probs[-1], probs, rtol=1e-3)


_CACHE: dict = {}


def _adapter(family):
    if family not in _CACHE:
        _CACHE[family] = tiny_adapter(family, n_layers=4)
    return _CACHE[family]
