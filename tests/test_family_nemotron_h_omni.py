"""Nemotron-H Omni (tracker issue 15, part 2-3) on a tiny model from the real config classes: a
hybrid language model of Mamba-2, attention, MoE and MLP blocks (a Mamba chunk of 8 positions,
far shorter than the prompt), a RADIO tower on tubelets of 2 frames and a Parakeet encoder.
Inputs against the upstream processor's own code; the engine's tokens against a reference
decode (HF's own hybrid cache) and HF generate with the knockout in the attention; the
recorded flow against eager attention (float32, 1e-5); the recurrent state of the shared
prefix shown to be needed (without it the decode departs from the reference)."""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avprobe.adapters import ALIASES, family_class
from avprobe.adapters.nemotron_h_omni import NemotronHOmniAdapter, audio_inputs, audio_token_count
from avprobe.adapters.registry import adapter_class
from avprobe.conditions import Baseline, Knockout, SpanRule
from avprobe.engine import EngineConfig, reference_decode, run
from avprobe.probes import attention as attn
from avprobe.probes.knockout import reference_masks
from avprobe.probes.logit_lens import LensConfig
from avprobe.testing import random_media
from avprobe.types import Media, Role

pytest_plugins = ["pytester"]

QUERY = "describe what you see and hear"
HYP = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROLES = [Role.VIDEO, Role.AUDIO, Role.QUERY]
STEPS = 14


@cache
def _adapter(seed: int = 0) -> NemotronHOmniAdapter:
    return NemotronHOmniAdapter.tiny(seed=seed)


@cache
def _inputs(seed: int = 0, media_seed: int = 0):
    # 5 frames (3 tubelets, the last padded) of 4 tokens and 2.5 s of audio (32 tokens)
    return _adapter(seed).build_inputs(random_media(seconds=2.5, fps=2.0, size=32, seed=media_seed), QUERY)


def test_tiny_model_has_the_features_under_test():
    a, mi = _adapter(), _inputs()
    tc = a.text_config
    assert set(tc.layer_types) == {"linear_attention", "full_attention", "moe", "mlp"}
    assert tc.chunk_size * 4 < mi.prompt_len  # the prefix spans several Mamba chunks
    assert a.layer_kinds == ("recurrent", "attention", "none", "recurrent", "none", "attention")
    assert a.attention_layers == (1, 5) and a.recurrent_layers == (0, 3)
    assert not a.knockout_is_cut
    assert family_class("nemotron_h_omni") is NemotronHOmniAdapter
    assert adapter_class("NemotronH_Omni_Reasoning_V3") is NemotronHOmniAdapter
    assert ALIASES["nemotron-3-nano-omni"].hf_id == "nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning-BF16"


def test_attention_only_families_keep_knockout_as_a_cut():
    from avprobe.testing import tiny_adapter

    for fam in ("qwen2_5_omni", "gemma4"):
        a = tiny_adapter(fam, n_layers=2)
        assert a.knockout_is_cut and a.attention_layers == (0, 1) and a.recurrent_cache() is None


# --- inputs ----------------------------------------------------------------------------------


def _processor_self(a: NemotronHOmniAdapter) -> SimpleNamespace:
    return SimpleNamespace(
        image_start_token="<img>", image_end_token="</img>", image_token="<image>", audio_start_token="<so_start>",
        audio_end_token="<so_end>", audio_token="<so_embedding>", video_temporal_patch_dim=2,
        video_processor=SimpleNamespace(patch_size=a.config.vision_config.patch_size,
                                        downsample_ratio=a.config.downsample_ratio),
        audio_hop_length=160, audio_subsampling_factor=8,
    )


@pytest.mark.parametrize("seconds,fps", [(2.5, 2.0), (3.0, 1.0), (6.0, 2.0)])
def test_layout_equals_the_processors_string(seconds, fps):
    """The processor's own replace_video_token / replace_audio_token / audio count on a stand-in
    self, in the chat turn, tokenized, is our prompt token for token."""
    from transformers.models.nemotron_h_omni.processing_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3Processor as Proc,
    )

    a = _adapter()
    media = random_media(seconds=seconds, fps=fps, size=32, seed=2)
    mi = a.build_inputs(media, QUERY)
    fake = _processor_self(a)
    n_frames = media.frames.shape[0]
    pv = mi.inputs["pixel_values_videos"]
    video = Proc.replace_video_token(fake, {"num_frames": [n_frames], "pixel_values_videos": pv,
                                            "video_metadata": [SimpleNamespace(fps=fps, frames_indices=None)]}, 0)
    n_audio = Proc._estimate_audio_num_embeddings(fake, len(media.waveform))
    audio = Proc.replace_audio_token(fake, {"num_tokens": [n_audio]}, 0)
    text = (f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{video}\n{audio}\n{QUERY}<|im_end|>\n"
            "<|im_start|>assistant\n<think></think>")
    assert mi.input_ids[0].tolist() == a.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert int((mi.roles == int(Role.AUDIO)).sum()) == n_audio == audio_token_count(len(media.waveform))
    n_tub = -(-n_frames // 2)
    assert pv.shape[:2] == (1, n_tub) and int((mi.roles == int(Role.VIDEO)).sum()) == n_tub * 4
    # stamps are text (query); the tiles' brackets special; times: a tubelet at its first frame
    digits = torch.isin(mi.input_ids[0], torch.tensor(a.encode("0123456789:")))
    assert (mi.roles[digits] == int(Role.QUERY)).all()
    assert (mi.roles[mi.input_ids[0] == a.special("image_start")] == int(Role.SPECIAL)).all()
    vt = mi.times[mi.roles == int(Role.VIDEO)].view(n_tub, 4)
    assert torch.allclose(vt[:, 0], torch.arange(n_tub, dtype=torch.float32) * 2 / fps)
    assert float(mi.times[mi.roles == int(Role.AUDIO)][1]) == pytest.approx(0.08)


@pytest.mark.parametrize("shape", [(5, 32, 32), (3, 40, 56), (4, 90, 60)])
def test_tubelets_equal_the_video_processor(shape):
    """Resize, normalisation and tubelet packing equal the upstream video processor's
    `_preprocess` (it needs no torchvision), with the vision config's mean and std."""
    from transformers.models.nemotron_h_omni.video_processing_nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3VideoProcessor,
    )

    a = _adapter()
    vc = a.config.vision_config
    frames = np.random.default_rng(0).integers(0, 255, (*shape, 3), dtype=np.uint8)
    proc = NemotronH_Omni_Reasoning_V3VideoProcessor(norm_mean=list(vc.norm_mean), norm_std=list(vc.norm_std),
                                                     patch_size=vc.patch_size, video_target_num_patches=16)
    ref = proc._preprocess([torch.from_numpy(frames).permute(0, 3, 1, 2)], temporal_patch_size=2)
    ours = a.encode_video(Media(frames=frames, fps=2.0, waveform=None)).tensors["pixel_values_videos"]
    torch.testing.assert_close(ours, ref["pixel_values_videos"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("n_samples", [16_000, 16_000 * 3 + 77, 4_321])
def test_audio_count_equals_what_the_tower_keeps(n_samples):
    a = _adapter()
    wav = (0.1 * np.random.default_rng(1).standard_normal(n_samples)).astype(np.float32)
    feats, mask = audio_inputs(wav, 128)
    with torch.no_grad():
        out = a.model.get_audio_features(feats, mask, return_dict=True)
    assert out.pooler_output.shape[0] == audio_token_count(n_samples)


def test_explicit_positions_and_all_inputs_reproduce_the_models_own():
    a = _adapter()
    for media in (random_media(seconds=2.0, fps=2.0, size=32, seed=4), random_media(video=False),
                  random_media(audio=False, size=32)):
        mi = a.build_inputs(media, QUERY)
        with torch.no_grad():
            own = a.model(**mi.inputs).logits
            explicit = a.model(**a.forward_kwargs(mi)).logits
        assert torch.equal(own, explicit)
    with pytest.raises(ValueError, match="neither"):
        a.build_inputs(Media(frames=None, fps=2.0, waveform=None), QUERY)


def test_video_pruning_is_turned_off():
    """EVS would drop video tokens inside the forward, out of line with the roles."""
    m = NemotronHOmniAdapter.tiny(n_layers=2).model
    m.video_pruning_rate = 0.5
    a = NemotronHOmniAdapter(m, NemotronHOmniAdapter.tiny_tokenizer())
    assert a.model.video_pruning_rate == 0.0


# --- the engine ------------------------------------------------------------------------------


def conditions_strategy(n_layers: int = 6):
    knockout = st.builds(
        lambda rs, layers: Knockout(blocked=tuple(rs), layers=tuple(layers)),
        st.lists(st.sampled_from(ROLES), min_size=1, max_size=2, unique=True),
        st.lists(st.integers(0, n_layers - 1), min_size=1, max_size=4, unique=True),
    )
    return st.lists(knockout, min_size=1, max_size=4, unique=True).map(lambda ks: [Baseline(), *ks])


def _check_flow(adapter, out, last_role):
    att = list(adapter.attention_layers)
    other = [i for i in range(adapter.n_layers) if i not in att]
    np.testing.assert_allclose(out.flow[:, att].sum(-1), 1.0, atol=1e-5)
    assert np.isnan(out.flow[:, other]).all()  # no attention there: no share, never a zero
    if isinstance(out.condition, Knockout):
        for role in out.condition.roles:
            layers = [i for i in out.condition.layers if i in att]
            blocked = out.flow[:, layers, int(role)]
            rows = blocked[1:] if int(role) == last_role else blocked
            assert rows.size == 0 or rows.max() == 0.0


@given(data=st.data())
@HYP
def test_branched_decoding_matches_reference_and_flow_is_exact(data):
    adapter, mi = _adapter(), _inputs()
    conds = data.draw(conditions_strategy())
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=STEPS))
    last_role = int(mi.roles[mi.prompt_len - 1])
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=STEPS)
        assert out.token_ids == ref, out.condition.label()
        _check_flow(adapter, out, last_role)


def test_branched_decoding_matches_fresh_generate():
    """HF generate() per condition (its own hybrid cache: Mamba states and attention keys),
    with the knockout mask applied inside its attention."""
    adapter = _adapter(seed=1)
    mi = adapter.build_inputs(random_media(seconds=2.5, fps=2.0, size=32, seed=3), QUERY)
    L = adapter.n_layers
    conds = [Baseline(), Knockout((Role.VIDEO,), (1,)), Knockout((Role.AUDIO,), (1, 5)),
             Knockout((Role.QUERY,), tuple(range(L))), Knockout((Role.VIDEO, Role.AUDIO), (5,)),
             Knockout((Role.AUDIO,), (0, 2, 3))]  # no attention layer: changes nothing
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=STEPS))
    distinct = {tuple(o.token_ids) for o in res.outputs}
    for out in res.outputs:
        blocked, rule_layers = reference_masks(out.condition, L)
        session = attn.ReferenceKnockout(mi.prompt_len, mi.roles, blocked, rule_layers)
        with attn.installed(adapter.model), attn.using(session), torch.no_grad():
            gen = adapter.model.generate(**mi.inputs, max_new_tokens=STEPS, do_sample=False)
        assert gen[0, mi.prompt_len :].tolist()[: len(out.token_ids)] == out.token_ids, out.condition.label()
    assert len(distinct) > 2, "knockouts changed nothing: the comparison would be vacuous"
    assert res.outputs[-1].token_ids == res.outputs[0].token_ids  # a knockout of no attention layer
    with torch.no_grad():
        plain = adapter.model.generate(**mi.inputs, max_new_tokens=STEPS, do_sample=False)
    base = res.output(Baseline()).token_ids
    assert plain[0, mi.prompt_len :].tolist()[: len(base)] == base


def test_the_recurrent_state_of_the_prefix_is_needed(monkeypatch):
    """Without the recurrent-state hook the decode's Mamba layers start from nothing at every
    step, and the tokens leave the reference: the hook is what makes the branch exact."""
    adapter, mi = _adapter(), _inputs()
    conds = [Baseline(), Knockout((Role.VIDEO, Role.AUDIO), (1, 5))]
    good = run(adapter, mi, conds, EngineConfig(max_new_tokens=STEPS))
    refs = [reference_decode(adapter, mi, c, max_new_tokens=STEPS)[0] for c in conds]
    assert [o.token_ids for o in good.outputs] == refs
    monkeypatch.setattr(NemotronHOmniAdapter, "recurrent_cache", lambda self: None)
    bad = run(adapter, mi, conds, EngineConfig(max_new_tokens=STEPS))
    assert [o.token_ids for o in bad.outputs] != refs


def test_span_rule_knockout_matches_reference():
    adapter = _adapter(seed=2)
    mi = adapter.build_inputs(random_media(seconds=2.0, fps=2.0, size=32, seed=5), QUERY)
    toks = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=8)).outputs[0].token_ids
    rule = SpanRule("own-words", start_ids=frozenset({toks[0]}), end_ids=frozenset())
    conds = [Baseline(), Knockout((rule,), tuple(range(6))), Knockout((Role.VIDEO, rule), (1, 5))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=STEPS))
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=STEPS)
        assert out.token_ids == ref, out.condition.label()


def test_recorded_attention_equals_eager_output_attentions():
    """float32, 1e-5: per attention layer and step the mass per role equals eager attention's."""
    adapter = _adapter(seed=2)  # a seed whose caption names no media token (it could not be fed back)
    mi = _inputs(seed=2)
    out = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=STEPS, suppress_eos=True)).outputs[0]
    P, T = mi.prompt_len, len(out.token_ids)
    gen = out.token_ids[: T - 1]
    assert not set(gen) & {adapter.special(k) for k in ("video", "audio")}
    seq = torch.cat([mi.input_ids, torch.tensor([gen])], dim=1)
    kw = dict(mi.inputs)
    kw["input_ids"], kw["attention_mask"] = seq, torch.ones_like(seq)
    adapter.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            eager = adapter.model(**kw, output_attentions=True)
    finally:
        adapter.model.set_attn_implementation({"text_config": "sdpa"})
    key_roles = torch.cat([mi.roles, torch.full((len(gen),), int(Role.GENERATED))])
    onehot = attn.role_onehot(key_roles).double()
    assert len(eager.attentions) == len(adapter.attention_layers) == 2
    for layer, a in zip(adapter.attention_layers, eager.attentions, strict=True):
        rows = a[0].double().mean(0)[P - 1 : P - 1 + T]  # [T, K]
        np.testing.assert_allclose(out.flow[:, layer], (rows @ onehot).numpy(), atol=1e-5)


@pytest.mark.parametrize("use_norm", [True, False])
def test_logit_lens_covers_every_block_and_its_last_layer_is_the_models_logits(use_norm):
    a, mi = _adapter(), _inputs()
    res = run(a, mi, [Baseline()], EngineConfig(max_new_tokens=2, lens=LensConfig(top_k=3, use_norm=use_norm,
                                                                                    concept_ids=(20, 21))))
    audio_pos = torch.nonzero(mi.roles == int(Role.AUDIO)).flatten()
    assert res.lens.top_ids.shape == (a.n_layers, len(audio_pos), 3)
    with torch.no_grad():
        logits = a.model(**a.forward_kwargs(mi)).logits[0, audio_pos].float()
    if use_norm:
        np.testing.assert_array_equal(res.lens.top_ids[-1], logits.topk(3, -1).indices.numpy())
        probs = torch.softmax(logits, -1)[:, [20, 21]].numpy()
        np.testing.assert_allclose(res.lens.concept_probs[-1], probs, rtol=1e-4, atol=1e-7)
    else:  # the raw last block's output is not the normed one the head reads
        assert not np.allclose(res.lens.top_probs[-1], torch.softmax(logits, -1).topk(3, -1).values.numpy())


def test_load_local_directory_roundtrip(tmp_path):
    """The registry loads the checkpoint by its architecture and reads its depth (the block
    list) from the config alone."""
    from avprobe.adapters import load, ref

    a = NemotronHOmniAdapter.tiny(n_layers=3, seed=3)
    a.model.save_pretrained(tmp_path)
    a.tokenizer.save_pretrained(tmp_path)
    r = ref(str(tmp_path))
    assert (r.architecture, r.n_layers) == ("NemotronH_Omni_Reasoning_V3", 3)
    b = load(str(tmp_path), dtype=torch.float32)
    assert type(b) is NemotronHOmniAdapter and b.eos_ids == a.eos_ids
    mi = b.build_inputs(random_media(seconds=2.0, fps=2.0, size=32), QUERY)
    with torch.no_grad():
        torch.testing.assert_close(b.model(**mi.inputs).logits, a.model(**mi.inputs).logits)


# --- the claims suite, end to end ----------------------------------------------------------------


def test_claims_suite_runs_end_to_end_and_skips_what_needs_a_cut(pytester, tmp_path):
    """`pytest claims/ --model <tiny Nemotron-H Omni dir>`: no error; every claim a verdict or
    a skip with its reason; the claims that read a knockout as removing a modality are skipped
    saying which layers are attention layers; the flow claims read only attention layers."""
    import json
    from pathlib import Path

    d = tmp_path / "tiny-nemotron"
    a = NemotronHOmniAdapter.tiny()
    a.model.save_pretrained(d)
    a.tokenizer.save_pretrained(d)
    (d / "avprobe.json").write_text(json.dumps({"use_audio_in_video": False, "max_pixels": 1024, "judge": "concept"}))
    claims = Path(__file__).resolve().parent.parent / "claims"
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", str(claims), "--model", str(d),
                                        "--limit", "2", "--store", str(tmp_path / "store"))
    out = res.stdout.str()
    assert res.ret in (0, 1), out[-3000:]  # verdicts (1: some claim failed), never an error
    assert "error" not in res.stdout.lines[-1].lower() and "Traceback" not in out
    cut = "needs a knockout that cuts*hybrid model: a knockout blocks attention in its attention layers only " \
          "(layers 1, 5 of 6); its recurrent layers (layers 0, 3) still carry*"
    res.stdout.fnmatch_lines([f"SKIPPED*'barely moves'*{cut}", f"SKIPPED*audio freed*{cut}",
                              f"SKIPPED*own words*{cut}"])
    res.stdout.fnmatch_lines(["SKIPPED*no attention layer in layers 0-0*"])  # the early band is a Mamba layer
    outcomes = res.parseoutcomes()
    assert outcomes.get("skipped", 0) + outcomes.get("passed", 0) + outcomes.get("failed", 0) >= 17
    for line in res.stdout.lines:
        if line.startswith("SKIPPED"):
            assert len(line.split(": ", 1)[-1]) > 10, line  # every skip says why
