"""Base-model shift (Sec. 4.4): the AVLLM barely moves away from its vision-only base.

"The distributions are remarkably similar, KL divergence of just 0.4. Of tokens describing
audio events, 66% are unshifted (identical top prediction as the vision-only model), and 85%
fall within the vision-only model's top 3 predictions. [...] when the model does correctly
identify audio content, those tokens do shift away from the base LVLM distribution."
The AV model's caption is teacher-forced through the base (video and query, no audio).
"""

import numpy as np
import pytest

from avprobe.stats import cluster_proportion_test, one_sample_test, paired_test


def _with_shift(evidence, claim, kind=None):
    recs = [r for r in evidence.select(kind, modality="audio-video") if "shift_kl" in r.arrays]
    if not recs:
        claim.skip("no base-model shift results: give --base-model (or set base_model in the model's avprobe.json)")
    claim.notes.append(f"base model: {recs[0].meta['shift']['base_model']}")
    return recs


@pytest.mark.claim("base_shift_small")
def test_base_shift_small(evidence, claim):
    recs = [r for r in _with_shift(evidence, claim) if len(r.arrays["shift_kl"])]
    # Per clip: mean KL over its caption tokens and caption orders (one value per clip).
    _, per_clip = evidence.clip_means(recs, [r.arrays["shift_kl"].astype(float).mean() for r in recs])
    # KL is right-skewed: the studentized bootstrap holds its size where a t-test does not.
    claim.check(one_sample_test(per_clip, claim["max_mean_kl"], "less", test="bootstrap-t", **claim.stats_kw))


def _per_clip_tokens(evidence, recs, *arrays):
    """clip id -> per array, the audio-event token values of all the clip's records."""
    out: dict[str, list[list[float]]] = {}
    for r in recs:
        m = evidence.audio_token_mask(r)
        row = out.setdefault(r.sample_id, [[] for _ in arrays])
        for acc, name in zip(row, arrays):
            acc.extend(r.arrays[name][: len(m)][m].astype(float).tolist())
    return out


@pytest.mark.claim("audio_tokens_unshifted")
def test_audio_tokens_unshifted(evidence, claim):
    recs = _with_shift(evidence, claim)
    clips = _per_clip_tokens(evidence, recs, "shift_top1_same", "shift_in_top3")
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
def test_correct_audio_tokens_shift(evidence, claim):
    recs = _with_shift(evidence, claim, kind="counterfactual")
    right: dict[str, list[float]] = {}
    wrong: dict[str, list[float]] = {}
    for r in recs:
        m = evidence.audio_token_mask(r)
        ok = evidence.audio_token_names_truth(r)[: len(m)]
        kl = r.arrays["shift_kl"][: len(m)].astype(float)
        right.setdefault(r.sample_id, []).extend(kl[m & ok].tolist())
        wrong.setdefault(r.sample_id, []).extend(kl[m & ~ok].tolist())
    # Per clip, the clips that have both kinds of audio token: mean KL of each (paired).
    both = sorted(c for c in right if right[c] and wrong[c])
    a = np.array([np.mean(wrong[c]) for c in both])
    b = np.array([np.mean(right[c]) for c in both])
    claim.data = {"kl_correct": float(b.mean()) if both else None, "kl_other": float(a.mean()) if both else None,
                  "n_clips": len(both)}
    claim.check(paired_test(a, b, "greater", **claim.stats_kw))
