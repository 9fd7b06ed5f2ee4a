"""Base-model shift (Sec. 4.4): the AVLLM barely moves away from its vision-only base.

"The distributions are remarkably similar, KL divergence of just 0.4. Of tokens describing
audio events, 66% are unshifted (identical top prediction as the vision-only model), and 85%
fall within the vision-only model's top 3 predictions. [...] when the model does correctly
identify audio content, those tokens do shift away from the base LVLM distribution."
The AV model's caption is teacher-forced through the base (video and query, no audio). Two
bases: the model's vision-only sibling (the paper's; `--base-model M`) and the audio-ablated
self (the same model on the same prompt with the audio removed; `--base-model self-ablated`),
which every model has. Each claim runs on each base the records hold (both: `M,self-ablated`).
"""

import numpy as np
import pytest

from avprobe.records import SHIFT_BASES
from avprobe.stats import cluster_proportion_test, one_sample_test, paired_test

BASES = tuple(SHIFT_BASES)  # vision, self-ablated


def _with_shift(evidence, claim, shift_base, kind=None):
    """-> (records holding this base's shift, the prefix of its arrays)."""
    prefix = SHIFT_BASES[shift_base]
    every = [r for r in evidence.select(kind, modality="audio-video") if r.meta.get(prefix)]
    recs = [r for r in every if f"{prefix}_kl" in r.arrays]
    if len(recs) < len(every):  # the base could not teacher-force these captions (the reason is stored)
        claim.notes.append(f"{len(every) - len(recs)} of {len(every)} records without this shift: "
                           f"{next(r.meta[prefix]['error'] for r in every if f'{prefix}_kl' not in r.arrays)}")
    if not recs:
        claim.skip("no vision-only base shift results: give --base-model M (or base_model in the model's avprobe.json)"
                   if shift_base == "vision" else
                   "no audio-ablated self shift results: give --base-model self-ablated (or M,self-ablated), "
                   "which needs clips with both video and audio")
    meta = recs[0].meta[prefix]
    name, ablation = meta["base_model"], meta.get("ablation")
    # the engine already names the self base "M (audio removed)": the ablation is shown once
    claim.notes.append(f"base model: {name}" + (f" ({ablation})" if ablation and ablation not in name else ""))
    return recs, prefix


@pytest.mark.claim("base_shift_small")
@pytest.mark.parametrize("shift_base", BASES)
def test_base_shift_small(evidence, claim, shift_base):
    recs, p = _with_shift(evidence, claim, shift_base)
    recs = [r for r in recs if len(r.arrays[f"{p}_kl"])]
    # Per clip: mean KL over its caption tokens and caption orders (one value per clip).
    _, per_clip = evidence.clip_means(recs, [r.arrays[f"{p}_kl"].astype(float).mean() for r in recs])
    # KL is right-skewed: the studentized bootstrap holds its size where a t-test does not.
    claim.check(one_sample_test(per_clip, claim["max_mean_kl"], "less", test="bootstrap-t", **claim.stats_kw))


def _per_clip_tokens(evidence, recs, prefix, *arrays):
    """clip id -> per array, the audio-event token values of all the clip's records."""
    out: dict[str, list[list[float]]] = {}
    for r in recs:
        m = evidence.audio_token_mask(r, prefix)
        row = out.setdefault(r.sample_id, [[] for _ in arrays])
        for acc, name in zip(row, arrays):
            acc.extend(r.arrays[name][: len(m)][m].astype(float).tolist())
    return out


@pytest.mark.claim("audio_tokens_unshifted")
@pytest.mark.parametrize("shift_base", BASES)
def test_audio_tokens_unshifted(evidence, claim, shift_base):
    recs, p = _with_shift(evidence, claim, shift_base)
    clips = _per_clip_tokens(evidence, recs, p, f"{p}_top1_same", f"{p}_in_top3")
    n = np.array([len(v[0]) for v in clips.values()], dtype=float)
    if not n.sum():
        claim.skip("no audio-event tokens found in the captions (no hearing clause)")
    k1 = np.array([sum(v[0]) for v in clips.values()], dtype=float)
    k3 = np.array([sum(v[1]) for v in clips.values()], dtype=float)
    claim.data = {"top1_same": float(k1.sum() / n.sum()), "in_top3": float(k3.sum() / n.sum()),
                  "n_tokens": int(n.sum()), "n_clips": int((n > 0).sum())}
    # Tokens of one clip are not independent: clips are resampled (cluster bootstrap).
    kw = claim.stats_kw
    claim.check({
        "same top-1": cluster_proportion_test(k1, n, claim["min_top1_same"], "greater", **kw),
        "within top-3": cluster_proportion_test(k3, n, claim["min_in_top3"], "greater", **kw),
    })


@pytest.mark.claim("correct_audio_tokens_shift")
@pytest.mark.parametrize("shift_base", BASES)
def test_correct_audio_tokens_shift(evidence, claim, shift_base):
    recs, p = _with_shift(evidence, claim, shift_base, kind="counterfactual")
    right: dict[str, list[float]] = {}
    wrong: dict[str, list[float]] = {}
    for r in recs:
        m = evidence.audio_token_mask(r, p)
        ok = evidence.audio_token_names_truth(r, p)[: len(m)]
        kl = r.arrays[f"{p}_kl"][: len(m)].astype(float)
        right.setdefault(r.sample_id, []).extend(kl[m & ok].tolist())
        wrong.setdefault(r.sample_id, []).extend(kl[m & ~ok].tolist())
    # Per clip, the clips that have both kinds of audio token: mean KL of each (paired).
    both = sorted(c for c in right if right[c] and wrong[c])
    a = np.array([np.mean(wrong[c]) for c in both])
    b = np.array([np.mean(right[c]) for c in both])
    claim.data = {"kl_correct": float(b.mean()) if both else None, "kl_other": float(a.mean()) if both else None,
                  "n_clips": len(both)}
    claim.check(paired_test(a, b, "greater", **claim.stats_kw))
