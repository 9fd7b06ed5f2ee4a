"""Cross-clip batching (`engine.run_batch`): several prompts of different lengths and layouts,
each with its own prefix, decoded as one batch, give each clip the one-clip engine's result.

Exactness: the batched decode runs the model's projections over all clips' rows at once, so
its results equal the one-clip engine's bit for bit wherever the CPU kernels are batch-invariant.
On this torch (MKL sgemm, AVX-512) they are for the Qwen2.5 families with the protocol's row
counts (>= 16 conditions per clip): those are compared exactly. Two things break invariance
and are compared to float32 rounding instead (the tokens still exactly): a mixture of experts
(Qwen3-Omni) multiplies each expert's own token group, whose size depends on the batch; and an
elementwise kernel computes a tensor's last few elements with its scalar code, so a width that
is not a multiple of the vector length (the tiny Gemma 4's 8-wide per-layer inputs) rounds the
last row differently once other clips' rows follow it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from avprobe.conditions import Baseline, Knockout, SpanRule, sweep
from avprobe.engine import EngineConfig, run, run_batch
from avprobe.probes import attention as attn
from avprobe.probes.logit_lens import LensConfig
from avprobe.testing import random_media, tiny_adapter
from avprobe.types import Role

FAMILIES = ["qwen2_5_omni", "qwen2_5_vl", "qwen3_omni", "gemma4"]
EXACT = {"qwen2_5_omni", "qwen2_5_vl"}  # batch-invariant kernels here (see the docstring)
QUERIES = ["describe what you see and hear", "what do you hear", "describe"]


@lru_cache(maxsize=None)
def _adapter(family: str):
    return tiny_adapter(family, n_layers=4, seed=0)


@lru_cache(maxsize=None)
def _clips(family: str):
    """Three prompts of different lengths (2, 3, 4 s of media) and queries."""
    a = _adapter(family)
    return tuple(a.build_inputs(random_media(seconds=s, fps=1.0, seed=i), q)
                 for i, (s, q) in enumerate(zip((2.0, 3.0, 4.0), QUERIES)))


def _conditions(family: str, n_layers: int = 4) -> list:
    """The protocol's kind of sweep: >= 16 rows, knockouts of every prompt role in windows."""
    roles = [Role.VIDEO, Role.QUERY] if family == "qwen2_5_vl" else [Role.VIDEO, Role.AUDIO]
    conds = [Baseline(), *[c for r in roles for w in (1, 2, 3) for c in sweep(r, n_layers, w)]]
    return list(dict.fromkeys(conds))


def assert_same_result(a, b, exact: bool) -> None:
    """Two RunResults of one clip: tokens always equal; arrays equal (exact) or to 1e-5."""
    def same(x, y, what):
        if x is None or y is None:
            assert x is None and y is None, what
            return
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if exact:
            assert np.array_equal(x, y), f"{what}: largest difference {np.abs(x - y).max():.3g}"
        else:
            np.testing.assert_allclose(x, y, atol=1e-5, err_msg=what)

    assert a.prompt_len == b.prompt_len and a.bucket_labels == b.bucket_labels
    assert np.array_equal(a.roles, b.roles)
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert x.condition == y.condition
        assert x.token_ids == y.token_ids, x.condition.label()
        assert x.text == y.text and x.finished == y.finished
        same(x.flow, y.flow, f"flow of {x.condition.label()}")
    same(a.bucket_flow, b.bucket_flow, "bucket flow")
    same(None if a.logprobs is None else a.logprobs.numpy(), None if b.logprobs is None else b.logprobs.numpy(),
         "logprobs")
    if a.lens is not None or b.lens is not None:
        assert np.array_equal(a.lens.top_ids, b.lens.top_ids)
        same(a.lens.top_probs, b.lens.top_probs, "lens probabilities")
    if a.topk is not None or b.topk is not None:
        for x, y in zip(a.topk, b.topk, strict=True):
            same(x.numpy(), y.numpy(), "top-k logits")
    assert a.memory == b.memory and a.prefix_path == b.prefix_path


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_one_clip_engine(family):
    adapter, mis = _adapter(family), _clips(family)
    assert len({mi.prompt_len for mi in mis}) == 3, "the clips must differ in length"
    conds = _conditions(family)
    cfg = EngineConfig(max_new_tokens=6, lens=LensConfig(), keep_logprobs=True, keep_topk=3)
    singles = [run(adapter, mi, conds, cfg) for mi in mis]
    batched = run_batch(adapter, [(mi, conds) for mi in mis], cfg)
    assert len(batched) == 3
    for s, b in zip(singles, batched):
        assert_same_result(s, b, exact=family in EXACT)
    # the clips really differ (a batch that mixed them up could not pass the check above)
    assert singles[0].outputs[0].token_ids != singles[1].outputs[0].token_ids or \
        not np.array_equal(singles[0].outputs[0].flow, singles[1].outputs[0].flow)


def test_batch_with_different_conditions_rules_and_the_fused_path():
    """Clips with their own condition lists (a caption-word rule in one), on the fused CPU
    prefix kernel: each clip as the one-clip engine gives it."""
    adapter, mis = _adapter("qwen2_5_omni"), _clips("qwen2_5_omni")
    base = _conditions("qwen2_5_omni")
    first = run(adapter, mis[1], [Baseline()], EngineConfig(max_new_tokens=6)).outputs[0].token_ids
    rule = SpanRule("own-words", start_ids=frozenset({first[0]}), end_ids=frozenset())
    lists = [base, [*base[:12], Knockout((rule,), (0, 1, 2, 3)), Knockout((Role.VIDEO, rule), (1, 2)),
                    *base[12:]], list(reversed(base))]
    for path in ("fused", "dense"):
        cfg = EngineConfig(max_new_tokens=6, prefix_path=path)
        singles = [run(adapter, mi, c, cfg) for mi, c in zip(mis, lists)]
        batched = run_batch(adapter, list(zip(mis, lists)), cfg)
        for s, b in zip(singles, batched):
            assert b.prefix_path == path
            # the fused kernel's own blocking differs from the dense products: exact per path
            assert_same_result(s, b, exact=True)


def test_batch_with_eos_at_different_steps(monkeypatch):
    """Clips whose rows end at different steps: a finished clip leaves the batch, the others
    go on, and every clip's tokens, flows and step counts are the one-clip engine's."""
    adapter, mis = _adapter("qwen2_5_omni"), _clips("qwen2_5_omni")
    conds = _conditions("qwen2_5_omni")
    free = [run(adapter, mi, conds, EngineConfig(max_new_tokens=10)) for mi in mis]
    # End-of-sequence := a token the first clip's baseline emits at step 2 (the others may
    # emit it elsewhere or never): rows now end at different steps in different clips.
    stop = free[0].outputs[0].token_ids[2]
    monkeypatch.setattr(type(adapter), "eos_ids", property(lambda self: {stop}))
    cfg = EngineConfig(max_new_tokens=10, keep_logprobs=True)
    singles = [run(adapter, mi, conds, cfg) for mi in mis]
    lengths = {len(o.token_ids) for s in singles for o in s.outputs}
    assert len(lengths) > 1 and min(lengths) <= 3, f"rows must end at different steps: {lengths}"
    assert any(o.finished for s in singles for o in s.outputs)
    batched = run_batch(adapter, [(mi, conds) for mi in mis], cfg)
    for s, b in zip(singles, batched):
        assert_same_result(s, b, exact=True)


@lru_cache(maxsize=None)
def _same_layout_clips(family: str = "qwen2_5_omni"):
    """Four prompts of one length and role layout (2 s of media, one query), different media."""
    a = _adapter(family)
    return tuple(a.build_inputs(random_media(seconds=2.0, fps=1.0, seed=10 + i), QUERIES[1]) for i in range(4))


def stack_sizes(monkeypatch) -> list[int]:
    """Records the clip count of every attention call of a decode step (1: a clip alone)."""
    seen: list[int] = []
    step = attn.SharedPrefixDecode._attend

    def counting(self, st, *args):
        seen.append(st.C)
        return step(self, st, *args)

    monkeypatch.setattr(attn.SharedPrefixDecode, "_attend", counting)
    return seen


@pytest.mark.parametrize("family,path", [("qwen2_5_omni", "dense"), ("qwen2_5_omni", "fused"), ("gemma4", "dense"),
                                         ("gemma4", "fused")])
def test_clips_of_one_layout_attend_as_one_stack(monkeypatch, family, path):
    """Four clips of one length and layout and a fifth of its own, placed between them: the
    four attend as one stack (one call per layer and step for all four), the fifth alone, and
    every clip's tokens, flows, bucket flow, lens and logits are the one-clip engine's, bit
    for bit (Gemma 4, whose sliding windows cut the stacked prefixes: its tokens exactly, its
    numbers to float32 rounding, as its batch is not bit-invariant; see the docstring)."""
    adapter, same = _adapter(family), _same_layout_clips(family)
    mis = [same[0], _clips(family)[2], *same[1:]]
    assert len({mi.prompt_len for mi in same}) == 1 and mis[1].prompt_len != same[0].prompt_len
    conds = _conditions(family)
    cfg = EngineConfig(max_new_tokens=6, prefix_path=path, lens=LensConfig(), keep_logprobs=True, keep_topk=3,
                       suppress_eos=True)
    singles = [run(adapter, mi, conds, cfg) for mi in mis]
    seen = stack_sizes(monkeypatch)
    batched = run_batch(adapter, [(mi, conds) for mi in mis], cfg)
    calls = 6 * sum(k == "attention" for k in adapter.layer_kinds)  # steps x layers
    assert seen.count(4) == calls and seen.count(1) == calls and len(seen) == 2 * calls
    for s, b in zip(singles, batched, strict=True):
        assert b.prefix_path == path
        assert_same_result(s, b, exact=family in EXACT)
    # the stacked clips really differ (a stack that mixed up its clips could not pass above)
    flows = [r.outputs[0].flow for r in singles[2:]]
    assert not all(np.array_equal(flows[0], f) for f in flows[1:])


def test_mixed_layouts_stack_what_matches_and_equal_the_one_clip_engine(monkeypatch):
    """Clips of one prompt layout but not one condition list (reversed: other knockout
    patterns per row) do not stack; those that match do, wherever they stand in the batch."""
    adapter, same = _adapter("qwen2_5_omni"), _same_layout_clips()
    conds = _conditions("qwen2_5_omni")
    items = [(same[0], conds), (same[1], list(reversed(conds))), (_clips("qwen2_5_omni")[0], conds),
             (same[2], conds), (same[3], list(reversed(conds)))]
    cfg = EngineConfig(max_new_tokens=4, suppress_eos=True)
    singles = [run(adapter, mi, c, cfg) for mi, c in items]
    seen = stack_sizes(monkeypatch)
    batched = run_batch(adapter, items, cfg)
    calls = 4 * adapter.n_layers
    assert seen.count(2) == 2 * calls and seen.count(1) == calls and len(seen) == 3 * calls
    for s, b in zip(singles, batched, strict=True):
        assert_same_result(s, b, exact=True)


def test_stacked_organism_clips_ending_at_different_steps(monkeypatch):
    """Four organism clips of one layout, two of which end early (the end token := the word
    each of them names): the two leave the stack of four and the other two (not neighbours in
    it) restack and go on; every clip's tokens, flows and log-probs are the one-clip engine's."""
    from avprobe.adapters import ref
    from avprobe.media.sources import load_sample_media
    from avprobe.pipeline.gather import load_samples

    mref = ref("organism")
    adapter = mref.load(device="cpu")
    samples, _ = load_samples("organism", limit=4)
    st = adapter.settings
    mis = [adapter.build_inputs(load_sample_media(s, fps=st.fps, max_frames=st.max_frames, frame_rule=st.frame_rule),
                                mref.settings.queries[0]) for s in samples]
    assert len({mi.prompt_len for mi in mis}) == 1
    L = adapter.n_layers
    conds = list(dict.fromkeys([Baseline(), *[c for r in (Role.VIDEO, Role.AUDIO) for w in (1, 2) for c in sweep(r, L, w)]]))
    free = [run(adapter, mi, conds, EngineConfig(max_new_tokens=10)) for mi in mis]
    stop = {free[0].outputs[0].token_ids[3], free[2].outputs[0].token_ids[3]}
    monkeypatch.setattr(type(adapter), "eos_ids", property(lambda self: stop))
    cfg = EngineConfig(max_new_tokens=10, keep_logprobs=True)
    singles = [run(adapter, mi, conds, cfg) for mi in mis]
    ends = [max(len(o.token_ids) for o in s.outputs) for s in singles]
    assert ends[0] < ends[1] and ends[2] < ends[3], f"clips 0 and 2 must end first: {ends}"
    seen = stack_sizes(monkeypatch)
    batched = run_batch(adapter, [(mi, conds) for mi in mis], cfg)
    assert seen[0] == 4 and 2 in seen  # a stack of four, then of the two that go on
    for s, b in zip(singles, batched, strict=True):
        assert_same_result(s, b, exact=True)


def _held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("rows", [2, 20])
def test_a_stack_holds_each_clips_prefix_once(rows):
    """The storage really held for the prefix keys and values, whatever views point at it:
    once per clip (its sessions' own copies are replaced by views of the stack's tensor), the
    same for 2 rows or 20, and after a clip leaves and the rest restack, the remaining clips'
    only (the finished clip lets its views go)."""
    P, kvh, d, L = 12, 2, 4, 3
    roles = torch.tensor([0] * 4 + [1] * 8)

    def session(seed, p=P, r=roles):
        g = torch.Generator().manual_seed(seed)
        k = {layer: torch.randn(1, kvh, p, d, generator=g) for layer in range(L)}
        v = {layer: torch.randn(1, kvh, p, d, generator=g) for layer in range(L)}
        return attn.SharedPrefixDecode(k, v, rows, 3, [None] * L, [None] * L, [None] * L, r, 2)

    per_clip = 2 * L * kvh * P * d * 4
    sessions = [session(i) for i in range(3)] + [session(9, 20, torch.zeros(20, dtype=torch.long))]
    grouped = attn.GroupedPrefixDecode(sessions)
    assert [type(p).__name__ for p, _, _ in grouped.parts] == ["StackedPrefixDecode", "SharedPrefixDecode"]

    def prefix_tensors(ss):  # sessions and stacks alike
        return [t for s in ss for dd in (s.k_sorted, s.v_sorted) for t in dd.values()]

    stack = grouped.parts[0][0]
    assert _held_bytes(prefix_tensors([stack, *sessions[:3]])) == 3 * per_clip
    assert [s.memory_bytes()["prefix"] for s in sessions[:3]] == [per_clip] * 3
    assert stack.memory_bytes()["prefix"] == 3 * per_clip
    sessions[0].release()
    assert not sessions[0].k_sorted and sessions[0].memory_bytes()["prefix"] == per_clip
    restacked = attn.GroupedPrefixDecode(sessions[1:]).parts[0][0]
    assert restacked.C == 2
    assert _held_bytes(prefix_tensors([restacked, *sessions[1:3]])) == 2 * per_clip


def test_prefix_memory_is_per_clip_not_per_condition():
    """The batch holds each clip's prompt keys and values once: a clip's prefix bytes are the
    same alone or beside others, whatever the condition count, and the batch's prefix memory
    is the sum over its clips (linear in clips, constant in conditions)."""
    adapter, mis = _adapter("qwen2_5_omni"), _clips("qwen2_5_omni")
    cfg = EngineConfig(max_new_tokens=4, suppress_eos=True)
    few = [Baseline()]
    many = _conditions("qwen2_5_omni")
    alone = [run(adapter, mi, few, cfg).memory["prefix"] for mi in mis]
    assert len(set(alone)) == 3 and min(alone) > 0  # the clips' prefixes differ in length
    for conds in (few, many):
        one = run_batch(adapter, [(mis[0], conds)], cfg)
        three = run_batch(adapter, [(mi, conds) for mi in mis], cfg)
        assert one[0].memory["prefix"] == alone[0]
        assert [r.memory["prefix"] for r in three] == alone
        assert sum(r.memory["prefix"] for r in three) == sum(alone)
        assert [r.memory["suffix"] for r in three] == [len(conds) * run(adapter, mis[0], few, cfg).memory["suffix"]] * 3


def test_grouped_session_memory_sums_its_clips():
    from avprobe.probes import attention as attn

    k = {0: torch.zeros(1, 2, 10, 4)}
    s1 = attn.SharedPrefixDecode(k, k, 3, 2, [None], [None], [None], torch.zeros(10, dtype=torch.long), 0)
    k2 = {0: torch.zeros(1, 2, 30, 4)}
    s2 = attn.SharedPrefixDecode(k2, k2, 5, 2, [None], [None], [None], torch.zeros(30, dtype=torch.long), 0)
    g = attn.GroupedPrefixDecode([s1, s2])
    assert g.B == 8 and g.spans == [(0, 3), (3, 8)]
    assert g.memory_bytes()["prefix"] == s1.memory_bytes()["prefix"] + s2.memory_bytes()["prefix"] == 2 * 2 * 40 * 4 * 4
    with pytest.raises(ValueError, match="no sessions"):
        attn.GroupedPrefixDecode([])


def test_run_batch_rejects_bad_input():
    adapter, mis = _adapter("qwen2_5_omni"), _clips("qwen2_5_omni")
    with pytest.raises(ValueError, match="no clips"):
        run_batch(adapter, [])
    with pytest.raises(ValueError, match="no conditions"):
        run_batch(adapter, [(mis[0], [Baseline()]), (mis[1], [])])
    with pytest.raises(ValueError, match="distinct"):
        run_batch(adapter, [(mis[0], [Baseline(), Baseline()])])
