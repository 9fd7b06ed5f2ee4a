"""Engine properties on tiny random models of every supported family."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from avprobe.conditions import Baseline, Knockout, SpanRule, sweep
from avprobe.engine import EngineConfig, reference_decode, run
from avprobe.probes import attention as attn
from avprobe.probes.knockout import reference_masks
from avprobe.testing import random_media, tiny_adapter
from avprobe.types import Role

FAMILIES = ["qwen2_5_omni", "qwen3_omni", "qwen2_5_vl"]
QUERY = "describe what you see and hear"
HYP = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@lru_cache(maxsize=None)
def _adapter(family: str, seed: int = 0):
    a = tiny_adapter(family, n_layers=4, seed=seed)
    if family != "qwen3_omni":  # MoE grouped matmul has no float64 kernel
        a.model.double()
    return a


@lru_cache(maxsize=None)
def _inputs(family: str, media_seed: int = 0):
    return _adapter(family).build_inputs(random_media(seed=media_seed), QUERY)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def _prompt_roles(family: str) -> list[Role]:
    return [Role.VIDEO, Role.QUERY] if family == "qwen2_5_vl" else [Role.VIDEO, Role.AUDIO, Role.QUERY]


def conditions_strategy(family: str):
    roles = _prompt_roles(family)
    knockout = st.builds(
        lambda rs, layers: Knockout(blocked=tuple(rs), layers=tuple(layers)),
        st.lists(st.sampled_from(roles), min_size=1, max_size=2, unique=True),
        st.lists(st.integers(0, 3), min_size=1, max_size=4, unique=True),
    )
    return st.lists(knockout, min_size=1, max_size=4, unique=True).map(lambda ks: [Baseline(), *ks])


@given(data=st.data())
@HYP
def test_role_fractions_sum_to_one(family, data):
    adapter, mi = _adapter(family), _inputs(family)
    conds = data.draw(conditions_strategy(family))
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=6))
    for out in res.outputs:
        assert out.flow.shape[1:] == (adapter.n_layers, len(Role))
        np.testing.assert_allclose(out.flow.sum(-1), 1.0, atol=1e-5)
        assert (out.flow >= 0).all()


@given(data=st.data())
@HYP
def test_knocked_out_keys_get_zero_mass(family, data):
    adapter, mi = _adapter(family), _inputs(family)
    conds = data.draw(conditions_strategy(family))
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=6))
    for out in res.outputs:
        if not isinstance(out.condition, Knockout):
            continue
        last_role = int(mi.roles[mi.prompt_len - 1])
        for role in out.condition.roles:
            blocked = out.flow[:, list(out.condition.layers), int(role)]
            # A row always sees itself: at step 0 the row is the last prompt token, whose
            # own key carries its prompt role.
            if int(role) == last_role:
                blocked = blocked[1:]
            # Exactly zero: blocked scores are -inf before the softmax.
            assert (blocked == 0.0).all(), (out.condition.label(), blocked.max())
    # and the baseline does attend to those roles (so the check above can fail)
    base = res.output(Baseline())
    for role in _prompt_roles(family):
        assert base.flow[:, :, int(role)].max() > 0


def test_empty_knockout_equals_baseline_bit_for_bit(family):
    adapter, mi = _adapter(family), _inputs(family)
    empty = Knockout(blocked=(Role.VIDEO,), layers=())
    res = run(adapter, mi, [Baseline(), empty, Knockout((Role.VIDEO,), (0, 1, 2, 3))], EngineConfig(max_new_tokens=8))
    a, b = res.outputs[0], res.outputs[1]
    assert a.token_ids == b.token_ids
    assert np.array_equal(a.flow, b.flow)
    assert not np.array_equal(a.flow, res.outputs[2].flow)  # a real knockout moves the flow


@given(data=st.data())
@HYP
def test_branched_decoding_matches_reference_per_condition(family, data):
    adapter, mi = _adapter(family), _inputs(family)
    conds = data.draw(conditions_strategy(family))
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=8))
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=8)
        assert out.token_ids == ref, out.condition.label()


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen2_5_vl"])
def test_branched_decoding_matches_fresh_generate(family):
    """HF generate() per condition, with the knockout mask applied inside its attention."""
    adapter = _adapter(family, seed=1)
    mi = adapter.build_inputs(random_media(seed=3), QUERY)
    L = adapter.n_layers
    conds = [Baseline(), *sweep(Role.VIDEO, L, 2), Knockout((Role.QUERY,), tuple(range(L)))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=8))
    distinct = {tuple(o.token_ids) for o in res.outputs}
    for out in res.outputs:
        blocked, rule_layers = reference_masks(out.condition, L)
        session = attn.ReferenceKnockout(mi.prompt_len, mi.roles, blocked, rule_layers)
        with attn.installed(adapter.model), attn.using(session), torch.no_grad():
            gen = adapter.model.generate(**mi.inputs, max_new_tokens=8, do_sample=False)
        ids = gen[0, mi.prompt_len :].tolist()
        n = len(out.token_ids)
        assert ids[:n] == out.token_ids, out.condition.label()
    assert len(distinct) > 1, "knockouts changed nothing: the comparison would be vacuous"


def test_span_rule_knockout_matches_reference():
    adapter = _adapter("qwen2_5_omni", seed=2)
    mi = adapter.build_inputs(random_media(seed=5), QUERY)
    res0 = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=10))
    toks = res0.outputs[0].token_ids
    # A rule that opens on the first generated token: later rows lose sight of that span.
    rule = SpanRule("own-words", start_ids=frozenset({toks[0]}), end_ids=frozenset())
    conds = [Baseline(), Knockout((rule,), (0, 1, 2, 3)), Knockout((Role.VIDEO, rule), (1, 2))]
    res = run(adapter, mi, conds, EngineConfig(max_new_tokens=10))
    for out in res.outputs:
        ref, _ = reference_decode(adapter, mi, out.condition, max_new_tokens=10)
        assert out.token_ids == ref, out.condition.label()


def test_recorded_attention_equals_eager_output_attentions():
    adapter = _adapter("qwen2_5_omni")
    mi = _inputs("qwen2_5_omni")
    res = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=6))
    out = res.outputs[0]
    P, T = mi.prompt_len, len(out.token_ids)
    gen = out.token_ids[: T - 1]
    seq = torch.cat([mi.input_ids, torch.tensor([gen])], dim=1)
    kw = dict(mi.inputs)
    kw["input_ids"], kw["attention_mask"] = seq, torch.ones_like(seq)
    adapter.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            eager = adapter.model(**kw, output_attentions=True)
    finally:
        adapter.model.set_attn_implementation({"text_config": attn.ATTN_NAME})
    key_roles = torch.cat([mi.roles, torch.full((len(gen),), int(Role.GENERATED))])
    onehot = attn.role_onehot(key_roles).double()
    for layer, a in enumerate(eager.attentions):
        rows = a[0].mean(0)[P - 1 : P - 1 + T].double()  # [T, K]
        expected = (rows @ onehot).numpy()
        np.testing.assert_allclose(out.flow[:, layer], expected, atol=1e-5)


def test_reference_recording_zero_on_blocked():
    adapter, mi = _adapter("qwen2_5_omni"), _inputs("qwen2_5_omni")
    cond = Knockout((Role.AUDIO,), (1, 2))
    _, session = reference_decode(adapter, mi, cond, max_new_tokens=4, record=True)
    for layer in (1, 2):
        assert all((f[:, int(Role.AUDIO)] == 0).all() for f in session.flow[layer])
    assert any((f[:, int(Role.AUDIO)] > 0).any() for f in session.flow[0])


def test_time_buckets_cover_video_and_audio():
    adapter, mi = _adapter("qwen2_5_omni"), _inputs("qwen2_5_omni")
    res = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=4))
    assert any(lbl.startswith("video@") for lbl in res.bucket_labels)
    assert "audio@3s" in res.bucket_labels  # a 4 s clip has audio in seconds 0..3
    # per-second buckets of the baseline row add up to its per-role flow (video and audio
    # keys all lie in the shared prefix)
    flow = res.outputs[0].flow
    assert res.bucket_flow.shape[:2] == flow.shape[:2]
    for role in ("video", "audio"):
        cols = [i for i, lbl in enumerate(res.bucket_labels) if lbl.startswith(role + "@")]
        np.testing.assert_allclose(
            res.bucket_flow[:, :, cols].sum(-1), flow[:, :, int(Role.parse(role))], atol=1e-6
        )


def test_rejects_out_of_range_layers():
    adapter, mi = _adapter("qwen2_5_omni"), _inputs("qwen2_5_omni")
    with pytest.raises(ValueError, match="out of range"):
        run(adapter, mi, [Knockout((Role.VIDEO,), (7,))])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_prefix_attention_equals_dense_path(dtype):
    """The CPU fused kernel per role segment, merged by log-sum-exp, is the dense softmax."""
    assert attn._fused_cpu_available(), "this torch has no fused CPU kernel: the comparison would be vacuous"
    adapter = tiny_adapter("qwen2_5_omni", n_layers=4, seed=4)
    adapter.model.to(dtype)
    mi = adapter.build_inputs(random_media(seed=5), QUERY)
    rule = SpanRule("any-a", token_ids=frozenset({int(t) for t in mi.input_ids[0, :4]}))
    conds = [Baseline(), Knockout((Role.VIDEO,), (1, 2)), Knockout((Role.AUDIO, rule), (0, 3)),
             Knockout((Role.QUERY,), (0, 1, 2, 3))]
    results = {}
    for path in ("fused", "dense"):
        results[path] = run(adapter, mi, conds, EngineConfig(max_new_tokens=6, prefix_path=path))
        assert results[path].prefix_path == path
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    for a, b in zip(results["fused"].outputs, results["dense"].outputs, strict=True):
        assert a.token_ids == b.token_ids, a.condition.label()
        np.testing.assert_allclose(a.flow, b.flow, atol=tol)
    np.testing.assert_allclose(results["fused"].bucket_flow, results["dense"].bucket_flow, atol=tol)


def test_auto_prefix_path_is_dense_for_few_scores_and_fused_for_many():
    cpu = torch.device("cpu")
    assert attn.choose_prefix_path(cpu, attn.DENSE_MAX_SCORES) == "dense"
    assert attn.choose_prefix_path(cpu, attn.DENSE_MAX_SCORES + 1) == (
        "fused" if attn._fused_cpu_available() else "dense")
    assert attn.choose_prefix_path(torch.device("meta"), 10**9) == "dense"  # not a CPU: products
    with pytest.raises(ValueError, match="prefix_path must be"):
        attn.choose_prefix_path(cpu, 1, "fast")
    with pytest.raises(ValueError, match="prefix_path must be"):
        EngineConfig(prefix_path="fast")


def test_run_restores_the_models_attention_implementation():
    adapter, mi = _adapter("qwen2_5_omni"), _inputs("qwen2_5_omni")
    text_cfg = adapter.model.config.get_text_config()
    adapter.model.set_attn_implementation({"text_config": "eager"})
    run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=2))
    assert text_cfg._attn_implementation == "eager"
    with attn.installed(adapter.model):
        assert text_cfg._attn_implementation == attn.ATTN_NAME
        run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=2))  # nested: still installed after
        assert text_cfg._attn_implementation == attn.ATTN_NAME
    assert text_cfg._attn_implementation == "eager"
    adapter.model.set_attn_implementation({"text_config": "sdpa"})


def test_prefix_memory_is_independent_of_condition_count():
    adapter, mi = _adapter("qwen2_5_omni"), _inputs("qwen2_5_omni")
    few = run(adapter, mi, [Baseline()], EngineConfig(max_new_tokens=4, suppress_eos=True))
    many = run(adapter, mi, [Baseline(), *sweep(Role.VIDEO, 4, 2), *sweep(Role.AUDIO, 4, 2)],
               EngineConfig(max_new_tokens=4, suppress_eos=True))
    assert few.memory["prefix"] == many.memory["prefix"] > 0
    assert many.memory["suffix"] == 9 * few.memory["suffix"] > 0  # the rows' own suffixes grow
