"""Phi-4-multimodal (tracker issue 15) on a tiny model from the real config classes: LongRoPE
with partial rotary factors switching at a short original length, dynamic-HD frame crops with
padding and a global view, a conformer audio encoder. Inputs against the upstream processor's
own code (its image processor run with the two torchvision primitives it calls supplied by
torch); the engine's tokens against a reference decode and HF generate with the knockout in the
attention; the recorded flow against eager attention (float32, 1e-5)."""

from __future__ import annotations

import contextlib
import importlib
import sys
import types
from functools import cache
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avprobe.adapters import ALIASES, family_class
from avprobe.adapters.phi4_multimodal import Phi4MultimodalAdapter, audio_inputs, frame_inputs
from avprobe.adapters.registry import adapter_class
from avprobe.conditions import Baseline, Knockout, SpanRule, sweep
from avprobe.engine import EngineConfig, reference_decode, run
from avprobe.probes import attention as attn
from avprobe.probes.knockout import reference_masks
from avprobe.probes.logit_lens import LensConfig
from avprobe.testing import random_media, tiny_adapter
from avprobe.types import Media, Role

QUERY = "describe what you see and hear"
HYP = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROLES = [Role.VIDEO, Role.AUDIO, Role.QUERY]


def _media(seed: int = 0, seconds: float = 2.0) -> Media:
    # 100 x 60 frames: resized into a 2 x 2 grid of 56-pixel crops with three padded patch rows
    return random_media(seconds=seconds, fps=1.0, size=100, height=60, seed=seed)


@cache
def _adapter(seed: int = 0, original_max: int = 64) -> Phi4MultimodalAdapter:
    return tiny_adapter("phi4_multimodal", n_layers=4, seed=seed, original_max=original_max)


@cache
def _inputs(seed: int = 0):
    return _adapter(seed).build_inputs(_media(), QUERY)


def _media_ids(a: Phi4MultimodalAdapter) -> set[int]:
    return {a.special("video"), a.special("audio")}


def test_tiny_model_has_the_features_under_test():
    a, mi = _adapter(), _inputs()
    tc = a.text_config
    assert tc.rope_parameters["rope_type"] == "longrope" and tc.rope_parameters["partial_rotary_factor"] == 0.75
    assert tc.rope_parameters["original_max_position_embeddings"] == 64 < mi.prompt_len
    assert mi.inputs["image_pixel_values"].shape[1] == 5  # the global view and 2 x 2 crops
    assert family_class("phi4_multimodal") is Phi4MultimodalAdapter
    assert adapter_class("Phi4MultimodalForCausalLM") is Phi4MultimodalAdapter
    assert ALIASES["phi-4-multimodal"].hf_id == "microsoft/Phi-4-multimodal-instruct"
    assert type(a.text_model).__name__ == "Phi4MultimodalModel" and a.n_layers == 4


# --- inputs ----------------------------------------------------------------------------------


def test_layout_equals_the_processors_string():
    """The processor's own replace_image_token / replace_audio_token on a stand-in self (one
    <|image|> per frame, then <|audio|>), tokenized, is our prompt token for token; the model
    consumes exactly those counts (its index_put refuses any other)."""
    from transformers.models.phi4_multimodal.feature_extraction_phi4_multimodal import (
        Phi4MultimodalFeatureExtractor,
    )
    from transformers.models.phi4_multimodal.processing_phi4_multimodal import Phi4MultimodalProcessor

    a = _adapter()
    for media in (_media(seed=2, seconds=3.0), random_media(seconds=2.0, fps=2.0, size=56, seed=3)):
        mi = a.build_inputs(media, QUERY)
        n_frames = media.frames.shape[0]
        per_frame = int((mi.roles == int(Role.VIDEO)).sum()) // n_frames
        fake = SimpleNamespace(image_token="<|image|>", audio_token="<|audio|>")
        images = "".join(Phi4MultimodalProcessor.replace_image_token(fake, {"num_img_tokens": [per_frame] * n_frames}, i)
                         for i in range(n_frames))
        fe = Phi4MultimodalFeatureExtractor()(media.waveform, sampling_rate=16_000, return_tensors="pt")
        audio = Phi4MultimodalProcessor.replace_audio_token(fake, {"audio_embed_sizes": fe["audio_embed_sizes"]}, 0)
        expected = a.tokenizer(f"<|user|>{images}{audio}{QUERY}<|end|><|assistant|>",
                               add_special_tokens=False)["input_ids"]
        assert mi.input_ids[0].tolist() == expected
        torch.testing.assert_close(mi.inputs["audio_input_features"], fe["audio_input_features"], rtol=0, atol=0)
        # the stamps: each frame's tokens at its time, audio at 80 ms per token
        vt = mi.times[mi.roles == int(Role.VIDEO)].view(n_frames, per_frame)
        assert torch.equal(vt[:, 0], torch.arange(n_frames, dtype=torch.float32) / media.fps)
        assert float(mi.times[mi.roles == int(Role.AUDIO)][1]) == pytest.approx(0.08)
        with torch.no_grad():
            a.model(**mi.inputs)  # raises on any count the image or audio embedding does not write
    # the chat specials are special, the query words query
    assert (mi.roles[: 1] == int(Role.SPECIAL)).all() and (mi.roles[-2:] == int(Role.SPECIAL)).all()
    assert int((mi.roles == int(Role.QUERY)).sum()) == len(QUERY.split())


@pytest.fixture
def upstream_image_processor(monkeypatch):
    """Phi4MultimodalImageProcessor's module, imported with the two torchvision functions its
    dynamic_preprocess calls supplied by torch as torchvision computes them on a CPU (uint8
    bilinear resize with antialias; a constant pad): the rest is the upstream code as it is."""

    def resize(image, size, interpolation=None, antialias=True):
        assert image.dtype == torch.uint8 and interpolation is None  # the call upstream makes
        out = F.interpolate(image[None].contiguous(memory_format=torch.channels_last), size=list(size),
                            mode="bilinear", antialias=True, align_corners=False)
        return out[0].contiguous()

    def pad(image, padding, fill):
        left, top, right, bottom = padding
        assert left == top == 0 and fill == [255, 255, 255]
        return F.pad(image, (0, right, 0, bottom), value=255)

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.resize, functional.pad = resize, pad
    pkgs = {"torchvision": types.ModuleType("torchvision"), "torchvision.transforms": types.ModuleType("t"),
            "torchvision.transforms.v2": types.ModuleType("v2"), "torchvision.transforms.v2.functional": functional}
    pkgs["torchvision.transforms.v2"].functional = functional
    name = "transformers.models.phi4_multimodal.image_processing_phi4_multimodal"
    for k, v in pkgs.items():
        monkeypatch.setitem(sys.modules, k, v)
    monkeypatch.delitem(sys.modules, name, raising=False)
    mod = importlib.import_module(name)
    monkeypatch.delitem(sys.modules, name)  # not left behind for other tests
    return mod


def _upstream_preprocess(mod, frames: np.ndarray, crop: int, patch: int, dynamic_hd: int):
    from transformers.image_utils import SizeDict

    cls = mod.Phi4MultimodalImageProcessor
    ns = SimpleNamespace()
    for m in ("dynamic_preprocess", "_get_crop_layout", "find_closest_aspect_ratio", "_get_crop_attention_mask",
              "_get_num_image_tokens", "pad_to_max_num_crops", "pad_mask_to_max_num_crops"):
        setattr(ns, m, types.MethodType(getattr(cls, m), ns))

    def rescale_and_normalize(images, do_rescale, rescale_factor, do_normalize, image_mean, image_std):
        # TorchvisionBackend's fused form: mean and std scaled by 1 / rescale_factor, then normalize
        mean = torch.tensor(image_mean) * (1.0 / rescale_factor)
        std = torch.tensor(image_std) * (1.0 / rescale_factor)
        return (images.to(torch.float32) - mean[:, None, None]) / std[:, None, None]

    def resize(image, size, resample=None, antialias=True):  # torchvision on a float tensor: interpolate
        assert resample == mod.PILImageResampling.BICUBIC and not antialias
        return F.interpolate(image[None], size=(size.height, size.width), mode="bicubic", align_corners=False,
                             antialias=False)[0]

    ns.rescale_and_normalize, ns.resize = rescale_and_normalize, resize
    images = [torch.from_numpy(f).permute(2, 0, 1).contiguous() for f in frames]
    return cls._preprocess(ns, images, do_resize=True, size=SizeDict(height=crop, width=crop),
                           resample=mod.PILImageResampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
                           do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=patch,
                           dynamic_hd=dynamic_hd, return_tensors="pt")


@pytest.mark.parametrize("h,w,crop,patch,max_crops", [
    (448, 448, 448, 14, 36),  # one crop, no resize
    (300, 500, 448, 14, 36),  # resized into 2 x 1 crops, padded rows
    (1000, 1400, 448, 14, 4),  # more crops than allowed: the closest aspect ratio among 4
    (60, 100, 56, 14, 36),  # the tiny model's crops
])
def test_frames_equal_the_upstream_image_processor(upstream_image_processor, h, w, crop, patch, max_crops):
    frames = np.random.default_rng(h + w).integers(0, 255, (2, h, w, 3), dtype=np.uint8)
    ref = _upstream_preprocess(upstream_image_processor, frames, crop, patch, max_crops)
    pixels, masks, sizes, per_frame = frame_inputs(frames, crop, patch, max_crops)
    torch.testing.assert_close(pixels, ref["image_pixel_values"], rtol=0, atol=1e-6)
    assert torch.equal(masks, ref["image_attention_mask"].float())
    assert torch.equal(sizes, ref["image_sizes"])
    if crop == 448:  # upstream's token count holds its constants for 448 / 14 (256, 16)
        assert [per_frame] * 2 == list(ref["num_img_tokens"])


def test_audio_count_equals_the_extractor_and_the_encoder():
    a = _adapter()
    wav = (0.1 * np.random.default_rng(1).standard_normal(16_000 * 3 + 77)).astype(np.float32)
    feats, n = audio_inputs(wav)
    with torch.no_grad():
        enc = a.model.model.embed_tokens_extend.audio_embed.encoder(feats, None)
    assert enc.shape[1] == n  # the encoder writes exactly n audio tokens
    with pytest.raises(ValueError, match="window"):
        audio_inputs(np.zeros(100, dtype=np.float32))


def test_explicit_positions_and_all_inputs_reproduce_the_models_own():
    a = _adapter()
    for media in (_media(seed=4), random_media(video=False), random_media(audio=False, size=100, height=60)):
        mi = a.build_inputs(media, QUERY)
        with torch.no_grad():
            own = a.model(**mi.inputs).logits
            explicit = a.model(**a.forward_kwargs(mi)).logits
        assert torch.equal(own, explicit)
    with pytest.raises(ValueError, match="neither"):
        a.build_inputs(Media(frames=None, fps=2.0, waveform=None), QUERY)


def test_attention_install_sets_the_text_model_only_and_restores():
    a = _adapter()
    vision = a.model.model.embed_tokens_extend.image_embed.img_processor.config
    before = (a.config._attn_implementation, vision._attn_implementation)
    with attn.installed(a.model):
        assert a.config._attn_implementation == attn.ATTN_NAME
        assert vision._attn_implementation == before[1]
    assert (a.config._attn_implementation, vision._attn_implementation) == before


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
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=12))
    last_role = int(mi.roles[mi.prompt_len - 1])
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=12)
        assert out.token_ids == ref, out.condition.label()
        np.testing.assert_allclose(out.flow.sum(-1), 1.0, atol=1e-5)
        if isinstance(out.condition, Knockout):
            for role in out.condition.roles:
                blocked = out.flow[:, list(out.condition.layers), int(role)]
                rows = blocked[1:] if int(role) == last_role else blocked
                assert rows.size == 0 or rows.max() == 0.0


def _generate(adapter, mi, condition, n):
    blocked, rule_layers = reference_masks(condition, adapter.n_layers)
    session = attn.ReferenceKnockout(mi.prompt_len, mi.roles, blocked, rule_layers)
    with attn.installed(adapter.model), attn.using(session), torch.no_grad():
        out = adapter.model.generate(**mi.inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True)
    return out.sequences[0, mi.prompt_len:].tolist(), torch.stack(out.logits, 1)[0].float()


@pytest.mark.parametrize("regime", ["long", "short"])
def test_branched_decoding_matches_fresh_generate(regime):
    """HF generate() per condition with the knockout inside its attention, with the prompt
    past LongRoPE's original length (the long factors throughout) and with prompt and caption
    inside it (the short ones throughout)."""
    adapter = _adapter(seed=1, original_max=64 if regime == "long" else 4000)
    mi = adapter.build_inputs(_media(seed=3), QUERY)
    L, n = adapter.n_layers, 12
    conds = [Baseline(), *sweep(Role.VIDEO, L, 2)[::2], Knockout((Role.AUDIO,), (0, 1)),
             Knockout((Role.QUERY,), tuple(range(L))), Knockout((Role.VIDEO, Role.AUDIO), (2, 3))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=n))
    distinct = {tuple(o.token_ids) for o in res.outputs}
    for out in res.outputs:
        assert not set(out.token_ids) & _media_ids(adapter)  # generate re-feeds the media on a media id
        gen, _ = _generate(adapter, mi, out.condition, n)
        assert gen[: len(out.token_ids)] == out.token_ids, out.condition.label()
    assert len(distinct) > 2, "knockouts changed nothing: the comparison would be vacuous"
    with torch.no_grad():
        plain = adapter.model.generate(**mi.inputs, max_new_tokens=n, do_sample=False)
    base = res.output(Baseline()).token_ids
    assert plain[0, mi.prompt_len :].tolist()[: len(base)] == base


def test_rotary_set_is_the_prompts_at_the_boundary():
    """A prompt of original_max + 1 tokens: HF's prefill of the whole prompt takes the long
    factors, a prefill of the prompt minus one would take the short ones. The engine's
    log-probs equal generate's only with the set pinned (prompt_scope); without the pin they
    differ (the check can fail)."""
    probe = _adapter(seed=1)
    P = probe.build_inputs(_media(seed=3), QUERY).prompt_len
    adapter = Phi4MultimodalAdapter.tiny(n_layers=4, seed=1, original_max=P - 1)
    mi = adapter.build_inputs(_media(seed=3), QUERY)
    assert mi.prompt_len == P
    cfg = EngineConfig(max_new_tokens=6, keep_logprobs=True, suppress_eos=True)
    res = run(adapter, mi, [Baseline()], cfg)
    gen, logits = _generate(adapter, mi, Baseline(), 1)
    theirs = torch.log_softmax(logits, -1)
    torch.testing.assert_close(res.logprobs[:1], theirs[:1], rtol=0, atol=1e-5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Phi4MultimodalAdapter, "prompt_scope", lambda self, mi, n_new=0: contextlib.nullcontext())
        unpinned = run(adapter, mi, [Baseline()], cfg)
    assert (unpinned.logprobs[0] - theirs[0]).abs().max() > 1e-3
    # and the model's rotary state is its own again after a run
    rot = adapter.text_model.rotary_emb
    fresh = Phi4MultimodalAdapter.tiny(n_layers=4, seed=1, original_max=P - 1).text_model.rotary_emb
    assert torch.equal(rot.original_inv_freq, fresh.original_inv_freq)


def test_span_rule_knockout_matches_reference():
    adapter = _adapter(seed=2)
    mi = adapter.build_inputs(_media(seed=5), QUERY)
    toks = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=10)).outputs[0].token_ids
    rule = SpanRule("own-words", start_ids=frozenset({toks[0]}), end_ids=frozenset())
    conds = [Baseline(), Knockout((rule,), (0, 1, 2, 3)), Knockout((Role.VIDEO, rule), (1, 3))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=16))
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=16)
        assert out.token_ids == ref, out.condition.label()


def test_recorded_attention_equals_eager_output_attentions():
    """float32, 1e-5: per layer and step the mass per role equals eager attention's."""
    adapter = _adapter()
    mi = adapter.build_inputs(_media(seed=1), QUERY)
    out = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=16, suppress_eos=True)).outputs[0]
    P, T = mi.prompt_len, len(out.token_ids)
    gen = out.token_ids[: T - 1]
    assert not set(gen) & _media_ids(adapter)
    seq = torch.cat([mi.input_ids, torch.tensor([gen])], dim=1)
    media = {k: v for k, v in mi.inputs.items() if k not in ("input_ids", "attention_mask")}
    # An identical model of its own (the same seed) runs eager: transformers' output capture,
    # once asked for attentions, leaves the nested vision tower without its hidden states for
    # every later call. The text model reads the model's own merged embeddings.
    twin = Phi4MultimodalAdapter.tiny(n_layers=4, seed=0)
    assert torch.equal(twin.model.lm_head.weight, adapter.model.lm_head.weight)
    lm = twin.text_model
    twin.model.set_attn_implementation({"": "eager"})
    with torch.no_grad(), twin.prompt_scope(mi):
        emb = lm.embed_tokens_extend(seq, lm.embed_tokens(seq), **media)
        eager = lm(inputs_embeds=emb, position_ids=torch.arange(seq.shape[1])[None], output_attentions=True)
    key_roles = torch.cat([mi.roles, torch.full((len(gen),), int(Role.GENERATED))])
    onehot = attn.role_onehot(key_roles).double()
    assert len(eager.attentions) == adapter.n_layers
    for layer, a in enumerate(eager.attentions):
        rows = a[0].double().mean(0)[P - 1 : P - 1 + T]  # [T, K]
        np.testing.assert_allclose(out.flow[:, layer], (rows @ onehot).numpy(), atol=1e-5)


@pytest.mark.parametrize("path", ["fused", "dense"])
def test_fused_and_dense_prefix_paths_agree(path):
    assert attn._fused_cpu_available()
    adapter, mi = _adapter(), _inputs()
    rule = SpanRule("any-a", token_ids=frozenset({int(t) for t in mi.input_ids[0, -4:]}))
    conds = [Baseline(), Knockout((Role.VIDEO,), (1, 2)), Knockout((Role.AUDIO, rule), (0, 3)),
             Knockout((Role.QUERY,), (0, 1, 2, 3))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=12, prefix_path=path))
    other = run(adapter, mi, conds, EngineConfig(max_new_tokens=12, prefix_path="dense" if path == "fused" else "fused"))
    for a, b in zip(res.outputs, other.outputs, strict=True):
        assert a.token_ids == b.token_ids, a.condition.label()
        np.testing.assert_allclose(a.flow, b.flow, atol=1e-5)
    for role in ("video", "audio"):  # the per-second buckets of the baseline add up to its flow
        cols = [i for i, lbl in enumerate(res.bucket_labels) if lbl.startswith(role + "@")]
        np.testing.assert_allclose(res.bucket_flow[:, :, cols].sum(-1),
                                   res.outputs[0].flow[:, :, int(Role.parse(role))], atol=1e-5)


@pytest.mark.parametrize("use_norm", [True, False])
def test_logit_lens_last_layer_is_the_models_logits(use_norm):
    a, mi = _adapter(), _inputs()
    res = run(a, mi, [Baseline()], EngineConfig(max_new_tokens=2, lens=LensConfig(top_k=3, use_norm=use_norm,
                                                                                    concept_ids=(20, 21))))
    audio_pos = torch.nonzero(mi.roles == int(Role.AUDIO)).flatten()
    assert res.lens.top_ids.shape == (a.n_layers, len(audio_pos), 3)
    with torch.no_grad(), a.prompt_scope(mi):
        logits = a.model(**a.forward_kwargs(mi, upto=mi.prompt_len - 1)).logits[0, audio_pos].float()
    if use_norm:
        np.testing.assert_array_equal(res.lens.top_ids[-1], logits.topk(3, -1).indices.numpy())
        probs = torch.softmax(logits, -1)[:, [20, 21]].numpy()
        np.testing.assert_allclose(res.lens.concept_probs[-1], probs, rtol=1e-4, atol=1e-7)
    else:  # without the norm the last layer is not the model's logits
        assert not np.array_equal(res.lens.top_probs[-1], torch.softmax(logits, -1).topk(3, -1).values.numpy())


def test_load_local_directory_roundtrip_and_the_vision_lora(tmp_path):
    """The registry loads a Phi-4-multimodal checkpoint by its architecture, reads its depth
    from the config alone; a checkpoint that carries the vision LoRA is not probed bare."""
    from avprobe.adapters import load, ref

    a = Phi4MultimodalAdapter.tiny(n_layers=2, seed=3)
    a.model.save_pretrained(tmp_path)
    a.tokenizer.save_pretrained(tmp_path)
    r = ref(str(tmp_path))
    assert (r.architecture, r.n_layers) == ("Phi4MultimodalForCausalLM", 2)
    b = load(str(tmp_path), dtype=torch.float32)
    assert type(b) is Phi4MultimodalAdapter and b.eos_ids == a.eos_ids == {a.special("end"), a.tokenizer.eos_token_id}
    mi = b.build_inputs(_media(), QUERY)
    with torch.no_grad():
        torch.testing.assert_close(b.model(**mi.inputs).logits, a.model(**mi.inputs).logits)
    (tmp_path / "vision-lora").mkdir()
    (tmp_path / "vision-lora" / "adapter_config.json").write_text("{}")
    if importlib.util.find_spec("peft") is None:
        with pytest.raises(ImportError, match="pip install peft"):
            load(str(tmp_path), dtype=torch.float32)
