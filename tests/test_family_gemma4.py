"""Gemma 4 (tracker issue 15, part 2) on a tiny model from the real config classes: sliding
window layers (a 16-key window, far shorter than the prompt), key/value layers shared by the
last half, per-layer inputs, keys equal to values in full layers, bidirectional frames in the
prompt and a final soft-cap. Inputs against the upstream processor's own code; the engine's
tokens against a reference decode and HF generate with the knockout in the attention; the
recorded flow against eager attention (float32, 1e-5)."""

from __future__ import annotations

from functools import cache, lru_cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avprobe.adapters import ALIASES, family_class
from avprobe.adapters.gemma4 import Gemma4Adapter, audio_inputs, patchify_frames
from avprobe.adapters.registry import adapter_class
from avprobe.conditions import Baseline, Knockout, SpanRule, sweep
from avprobe.engine import EngineConfig, reference_decode, run
from avprobe.probes import attention as attn
from avprobe.probes.knockout import reference_masks
from avprobe.probes.logit_lens import LensConfig
from avprobe.testing import random_media, tiny_adapter
from avprobe.types import Media, Role

QUERY = "describe what you see and hear"
HYP = settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROLES = [Role.VIDEO, Role.AUDIO, Role.QUERY]


@cache
def _adapter(seed: int = 0) -> Gemma4Adapter:
    return tiny_adapter("gemma4", n_layers=4, seed=seed)


@cache
def _inputs(seed: int = 0, media_seed: int = 0):
    # 2 frames of 64 tokens and 50 audio tokens: a ~200-token prompt against a 16-key window
    return _adapter(seed).build_inputs(random_media(seconds=2.0, fps=1.0, seed=media_seed), QUERY)


def test_tiny_model_has_the_features_under_test():
    a = _adapter()
    tc = a.text_config
    assert tc.sliding_window == 16 < _inputs().prompt_len
    assert "sliding_attention" in tc.layer_types and "full_attention" in tc.layer_types
    assert tc.kv_sharing_modes.count("reuse") == 2
    assert tc.final_logit_softcapping and tc.hidden_size_per_layer_input and tc.attention_k_eq_v
    assert tc.use_bidirectional_attention == "vision"
    assert family_class("gemma4") is Gemma4Adapter
    assert adapter_class("Gemma4ForConditionalGeneration") is Gemma4Adapter
    assert ALIASES["gemma-4-e4b"].hf_id == "google/gemma-4-E4B-it"


# --- inputs ----------------------------------------------------------------------------------


def _processor_self(a: Gemma4Adapter) -> SimpleNamespace:
    from transformers.models.gemma4.feature_extraction_gemma4 import (
        Gemma4AudioFeatureExtractor,
    )

    t = a.tokenizer
    return SimpleNamespace(
        boi_token="<|image>", eoi_token="<image|>", video_token="<|video|>", audio_token="<|audio|>",
        boa_token="<|audio>", eoa_token="<audio|>", feature_extractor=Gemma4AudioFeatureExtractor(),
        audio_seq_length=750, image_token_ids=[t.convert_tokens_to_ids("<|image|>")],
        video_token_ids=[t.convert_tokens_to_ids("<|video|>")], audio_token_ids=[t.convert_tokens_to_ids("<|audio|>")],
    )


@pytest.mark.parametrize("seconds,fps", [(2.0, 1.0), (3.0, 2.0), (65.0, 0.25)])
def test_layout_equals_the_processors_string(seconds, fps):
    """The processor's own replace_video_token / replace_audio_token on a stand-in self,
    tokenized, is our media block token for token (mm:ss stamps included, 01:04 past a minute)."""
    from transformers.models.gemma4.processing_gemma4 import Gemma4Processor

    a = _adapter()
    media = random_media(seconds=seconds, fps=fps, seed=2)
    mi = a.build_inputs(media, QUERY)
    fake = _processor_self(a)
    n_frames = media.frames.shape[0]
    per_frame = int((mi.inputs["video_position_ids"][0] != -1).all(-1).sum()) // 4  # real patches / 2x2 pooling
    video = Gemma4Processor.replace_video_token(
        fake, {"num_soft_tokens_per_video": [per_frame],
               "video_metadata": [SimpleNamespace(fps=fps, timestamps=list(np.arange(n_frames) / fps))]}, 0)
    fe = fake.feature_extractor([media.waveform], return_tensors="np")
    audio = Gemma4Processor.replace_audio_token(fake, {"input_features_mask": fe["input_features_mask"]}, 0)
    expected = a.tokenizer(f"<bos><|turn>user\n{video}{audio}{QUERY}<turn|>\n<|turn>model\n",
                           add_special_tokens=False)["input_ids"]
    assert mi.input_ids[0].tolist() == expected
    n_audio = int((mi.roles == int(Role.AUDIO)).sum())
    assert n_audio == Gemma4Processor._compute_audio_num_tokens(fake, media.waveform, 16_000) == min(round(seconds * 25), 750)  # cut at 30 s
    assert int((mi.roles == int(Role.VIDEO)).sum()) == n_frames * per_frame
    # mm_token_type_ids as the processor's; stamps are text (query), frame brackets special
    from transformers.processing_utils import ProcessorMixin

    assert mi.inputs["mm_token_type_ids"][0].tolist() == ProcessorMixin.create_mm_token_type_ids(fake, [expected])[0]
    digits = torch.isin(mi.input_ids[0], torch.tensor(a.encode("0123456789:")))
    assert (mi.roles[digits] == int(Role.QUERY)).all()
    assert (mi.roles[mi.input_ids[0] == a.special("image_start")] == int(Role.SPECIAL)).all()
    # times: each video token at its frame's time, audio at 40 ms per token
    vt = mi.times[mi.roles == int(Role.VIDEO)].view(n_frames, per_frame)
    assert torch.equal(vt[:, 0], torch.arange(n_frames, dtype=torch.float32) / fps)
    assert float(mi.times[mi.roles == int(Role.AUDIO)][1]) == pytest.approx(0.04)


def test_frames_equal_the_pil_image_processor_where_no_resize_is_needed():
    """At the processor's target size (no resize) patches and patch positions equal
    Gemma4ImageProcessorPil's per frame (the video processor's steps, torchvision aside)."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import (
        Gemma4ImageProcessorPil,
    )

    a = _adapter()
    vc = a.config.vision_config
    frames = np.random.default_rng(0).integers(0, 255, (3, 112, 160, 3), dtype=np.uint8)
    pv, pos, per_frame = patchify_frames(frames, vc.patch_size, vc.pooling_kernel_size, 70)
    proc = Gemma4ImageProcessorPil(patch_size=vc.patch_size, pooling_kernel_size=vc.pooling_kernel_size,
                                   max_soft_tokens=70)
    ref = proc([f for f in frames], return_tensors="pt")
    torch.testing.assert_close(pv, ref["pixel_values"].float(), rtol=0, atol=1e-7)
    assert torch.equal(pos, ref["image_position_ids"].long())
    assert [per_frame] * 3 == list(ref["num_soft_tokens_per_image"])
    # a frame of another size is resized to the processor's rule: 56 px -> 128 px, 64 tokens
    _, _, n = patchify_frames(frames[:, :56, :56], vc.patch_size, vc.pooling_kernel_size, 70)
    assert n == 64


def test_audio_features_and_count_equal_the_processor_and_the_tower():
    a = _adapter()
    wav = (0.1 * np.random.default_rng(1).standard_normal(16_000 * 3 + 77)).astype(np.float32)
    feats, mask, n = audio_inputs(wav)
    with torch.no_grad():
        out = a.model.model.get_audio_features(feats, mask, return_dict=True)
    assert int(out.attention_mask.sum()) == n  # the tower keeps exactly n soft tokens


def test_explicit_positions_and_all_inputs_reproduce_the_models_own():
    a = _adapter()
    for media in (random_media(seconds=2.0, fps=1.0, seed=4), random_media(video=False), random_media(audio=False)):
        mi = a.build_inputs(media, QUERY)
        with torch.no_grad():
            own = a.model(**mi.inputs).logits
            explicit = a.model(**a.forward_kwargs(mi)).logits
        assert torch.equal(own, explicit)
    with pytest.raises(ValueError, match="neither"):
        a.build_inputs(Media(frames=None, fps=2.0, waveform=None), QUERY)


def test_fully_bidirectional_config_is_refused():
    with pytest.raises(ValueError, match="causal"):
        Gemma4Adapter.tiny(n_layers=2, bidirectional="all")


# --- the engine ------------------------------------------------------------------------------


def conditions_strategy(n_layers: int = 4):
    knockout = st.builds(
        lambda rs, layers: Knockout(blocked=tuple(rs), layers=tuple(layers)),
        st.lists(st.sampled_from(ROLES), min_size=1, max_size=2, unique=True),
        st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=4, unique=True),
    )
    return st.lists(knockout, min_size=1, max_size=4, unique=True).map(lambda ks: [Baseline(), *ks])


@given(data=st.data())
@HYP
def test_branched_decoding_matches_reference_and_flow_is_exact(data):
    adapter, mi = _adapter(), _inputs()
    conds = data.draw(conditions_strategy())
    # 20 steps: past the 16-key window, so the rows' own keys leave it too
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=20))
    last_role = int(mi.roles[mi.prompt_len - 1])
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=20)
        assert out.token_ids == ref, out.condition.label()
        np.testing.assert_allclose(out.flow.sum(-1), 1.0, atol=1e-5)
        if isinstance(out.condition, Knockout):
            for role in out.condition.roles:
                blocked = out.flow[:, list(out.condition.layers), int(role)]
                # the first step's row is the last prompt token's: its own role is not blocked
                rows = blocked[1:] if int(role) == last_role else blocked
                assert rows.size == 0 or rows.max() == 0.0  # empty when EOS came first


def test_branched_decoding_matches_fresh_generate():
    """HF generate() per condition (its own sliding caches and shared layers), with the
    knockout mask applied inside its attention."""
    adapter = _adapter(seed=1)
    mi = adapter.build_inputs(random_media(seconds=2.0, fps=1.0, seed=3), QUERY)
    L = adapter.n_layers
    conds = [Baseline(), *sweep(Role.VIDEO, L, 2), Knockout((Role.AUDIO,), (0, 1)),
             Knockout((Role.QUERY,), tuple(range(L))), Knockout((Role.VIDEO, Role.AUDIO), (2, 3))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=24))
    distinct = {tuple(o.token_ids) for o in res.outputs}
    for out in res.outputs:
        blocked, rule_layers = reference_masks(out.condition, L)
        session = attn.ReferenceKnockout(mi.prompt_len, mi.roles, blocked, rule_layers)
        with attn.installed(adapter.model), attn.using(session), torch.no_grad():
            gen = adapter.model.generate(**mi.inputs, max_new_tokens=24, do_sample=False)
        assert gen[0, mi.prompt_len :].tolist()[: len(out.token_ids)] == out.token_ids, out.condition.label()
    assert len(distinct) > 2, "knockouts changed nothing: the comparison would be vacuous"
    # and the baseline is the model's own greedy decode, no avprobe attention at all
    with torch.no_grad():
        plain = adapter.model.generate(**mi.inputs, max_new_tokens=24, do_sample=False)
    base = res.output(Baseline()).token_ids
    assert plain[0, mi.prompt_len :].tolist()[: len(base)] == base


def test_span_rule_knockout_matches_reference():
    adapter = _adapter(seed=2)
    mi = adapter.build_inputs(random_media(seconds=2.0, fps=1.0, seed=5), QUERY)
    toks = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=10)).outputs[0].token_ids
    rule = SpanRule("own-words", start_ids=frozenset({toks[0]}), end_ids=frozenset())
    conds = [Baseline(), Knockout((rule,), (0, 1, 2, 3)), Knockout((Role.VIDEO, rule), (1, 3))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=20))
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=20)
        assert out.token_ids == ref, out.condition.label()


@pytest.mark.parametrize("window", [16, 4096])
def test_recorded_attention_equals_eager_output_attentions(window):
    """float32, 1e-5: per layer (sliding, full and shared) and step the mass per role equals
    eager attention's, with the window cutting the prompt (16) and not (4096)."""
    adapter = Gemma4Adapter.tiny(n_layers=4, sliding_window=window)
    mi = adapter.build_inputs(random_media(seconds=2.0, fps=1.0, seed=1), QUERY)
    out = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=20, suppress_eos=True)).outputs[0]
    P, T = mi.prompt_len, len(out.token_ids)
    gen = out.token_ids[: T - 1]
    assert not set(gen) & {adapter.special(k) for k in ("video", "audio", "image")}
    seq = torch.cat([mi.input_ids, torch.tensor([gen])], dim=1)
    kw = dict(mi.inputs)
    kw["input_ids"], kw["attention_mask"] = seq, torch.ones_like(seq)
    kw["mm_token_type_ids"] = torch.cat([mi.inputs["mm_token_type_ids"], torch.zeros(1, len(gen), dtype=torch.long)], 1)
    adapter.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            eager = adapter.model(**kw, output_attentions=True)
    finally:
        adapter.model.set_attn_implementation({"text_config": "sdpa"})
    key_roles = torch.cat([mi.roles, torch.full((len(gen),), int(Role.GENERATED))])
    onehot = attn.role_onehot(key_roles).double()
    assert len(eager.attentions) == adapter.n_layers
    for layer, a in enumerate(eager.attentions):
        rows = a[0].double().mean(0)[P - 1 : P - 1 + T]  # [T, K]
        np.testing.assert_allclose(out.flow[:, layer], (rows @ onehot).numpy(), atol=1e-5)
    if window == 16:  # the sliding layers saw none of the frames from the first generated row on
        sliding = [i for i, t in enumerate(adapter.text_config.layer_types) if t == "sliding_attention"]
        assert out.flow[:, sliding, int(Role.VIDEO)].max() == 0.0


@pytest.mark.parametrize("path", ["fused", "dense"])
def test_fused_and_dense_prefix_paths_agree_under_the_window(path):
    assert attn._fused_cpu_available()
    adapter, mi = _adapter(), _inputs()
    rule = SpanRule("any-a", token_ids=frozenset({int(t) for t in mi.input_ids[0, :4]}))
    conds = [Baseline(), Knockout((Role.VIDEO,), (1, 2)), Knockout((Role.AUDIO, rule), (0, 3)),
             Knockout((Role.QUERY,), (0, 1, 2, 3))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=20, prefix_path=path))
    other = run(adapter, mi, conds, EngineConfig(max_new_tokens=20, prefix_path="dense" if path == "fused" else "fused"))
    for a, b in zip(res.outputs, other.outputs, strict=True):
        assert a.token_ids == b.token_ids, a.condition.label()
        np.testing.assert_allclose(a.flow, b.flow, atol=1e-5)
    np.testing.assert_allclose(res.bucket_flow, other.bucket_flow, atol=1e-5)
    # the per-second buckets of the baseline add up to its per-role flow
    for role in ("video", "audio"):
        cols = [i for i, lbl in enumerate(res.bucket_labels) if lbl.startswith(role + "@")]
        np.testing.assert_allclose(res.bucket_flow[:, :, cols].sum(-1),
                                   res.outputs[0].flow[:, :, int(Role.parse(role))], atol=1e-5)


def test_empty_knockout_equals_baseline_bit_for_bit():
    adapter, mi = _adapter(), _inputs()
    empty = Knockout(blocked=(Role.VIDEO,), layers=())
    res = run(adapter, mi, [Baseline(), empty, Knockout((Role.AUDIO,), (0, 1, 2, 3))], EngineConfig(max_new_tokens=8))
    assert res.outputs[0].token_ids == res.outputs[1].token_ids
    assert np.array_equal(res.outputs[0].flow, res.outputs[1].flow)
    assert not np.array_equal(res.outputs[0].flow, res.outputs[2].flow)


@pytest.mark.parametrize("use_norm", [True, False])
def test_logit_lens_covers_shared_layers_and_its_last_layer_is_the_models_logits(use_norm):
    a, mi = _adapter(), _inputs()
    res = run(a, mi, [Baseline()], EngineConfig(max_new_tokens=2, lens=LensConfig(top_k=3, use_norm=use_norm,
                                                                                    concept_ids=(20, 21))))
    audio_pos = torch.nonzero(mi.roles == int(Role.AUDIO)).flatten()
    assert res.lens.top_ids.shape == (a.n_layers, len(audio_pos), 3)
    with torch.no_grad():
        logits = a.model(**a.forward_kwargs(mi)).logits[0, audio_pos].float()  # soft-capped by the model
    if use_norm:
        np.testing.assert_array_equal(res.lens.top_ids[-1], logits.topk(3, -1).indices.numpy())
        probs = torch.softmax(logits, -1)[:, [20, 21]].numpy()
        np.testing.assert_allclose(res.lens.concept_probs[-1], probs, rtol=1e-4, atol=1e-7)
    # the shared layers (2, 3) keep every audio position: not the last row only
    assert (res.lens.top_probs[2:] > 0).all()


def test_load_local_directory_roundtrip(tmp_path):
    """The registry loads a Gemma 4 checkpoint by its architecture (no name of it in the
    registry) and reads its depth from the config alone."""
    from avprobe.adapters import load, ref

    a = Gemma4Adapter.tiny(n_layers=2, seed=3)
    a.model.save_pretrained(tmp_path)
    a.tokenizer.save_pretrained(tmp_path)
    r = ref(str(tmp_path))
    assert (r.architecture, r.n_layers) == ("Gemma4ForConditionalGeneration", 2)
    b = load(str(tmp_path), dtype=torch.float32)
    assert type(b) is Gemma4Adapter and b.eos_ids == a.eos_ids
    mi = b.build_inputs(random_media(seconds=2.0, fps=1.0), QUERY)
    with torch.no_grad():
        torch.testing.assert_close(b.model(**mi.inputs).logits, a.model(**mi.inputs).logits)
