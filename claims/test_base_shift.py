"""Base-model shift (Sec. 4.4): the AVLLM barely moves away from its vision-only base.

"The distributions are remarkably similar, KL divergence of just 0.4. Of tokens describing
audio events, 66% are unshifted (identical top prediction as the vision-only model), and 85%
fall within the vision-only model's top 3 predictions. [...] when the model does correctly
identify audio content, those tokens do shift away from the base LVLM distribution."
The AV model's caption is teacher-forced through the base (video and query, no audio).
"""

import numpy as np
import pytest

from avprobe.stats import independent_test, one_sample_test, proportion_test


def _with_shift(evidence, claim, kind=None):
    recs = [r for r in evidence.select(kind, modality="audio-video") if "shift_kl" in r.arrays]
    if not recs:
        claim.skip("no base-model shift results: give --base-model (or set base_model in the model's avprobe.json)")
    claim.notes.append(f"base model: {recs[0].meta['shift']['base_model']}")
    return recs


@pytest.mark.claim("base_shift_small")
def test_base_shift_small(evidence, claim):
    recs = _with_shift(evidence, claim)
    per_sample = np.array([r.arrays["shift_kl"].astype(float).mean() for r in recs if len(r.arrays["shift_kl"])])
    claim.check(one_sample_test(per_sample, claim["max_mean_kl"], "less", **claim.stats_kw))


@pytest.mark.claim("audio_tokens_unshifted")
def test_audio_tokens_unshifted(evidence, claim):
    recs = _with_shift(evidence, claim)
    top1, top3 = [], []
    for r in recs:
        m = evidence.audio_token_mask(r)
        top1.extend(r.arrays["shift_top1_same"][: len(m)][m].tolist())
        top3.extend(r.arrays["shift_in_top3"][: len(m)][m].tolist())
    if not top1:
        claim.skip("no audio-event tokens found in the captions (no hearing clause)")
    n = len(top1)
    claim.data = {"top1_same": float(np.mean(top1)), "in_top3": float(np.mean(top3)), "n_tokens": n}
    claim.check({
        "same top-1": proportion_test(int(np.sum(top1)), n, claim["min_top1_same"], "greater", alpha=claim.alpha),
        "within top-3": proportion_test(int(np.sum(top3)), n, claim["min_in_top3"], "greater", alpha=claim.alpha),
    })


@pytest.mark.claim("correct_audio_tokens_shift")
def test_correct_audio_tokens_shift(evidence, claim):
    recs = _with_shift(evidence, claim, kind="counterfactual")
    right, wrong = [], []
    for r in recs:
        m = evidence.audio_token_mask(r)
        ok = evidence.audio_token_names_truth(r)[: len(m)]
        kl = r.arrays["shift_kl"][: len(m)].astype(float)
        right.extend(kl[m & ok].tolist())
        wrong.extend(kl[m & ~ok].tolist())
    if len(right) < 3 or len(wrong) < 3:
        claim.skip(f"too few audio tokens to compare: {len(right)} name the true sound, {len(wrong)} do not")
    claim.data = {"kl_correct": float(np.mean(right)), "kl_other": float(np.mean(wrong)),
                  "n_correct": len(right), "n_other": len(wrong)}
    claim.check(independent_test(np.array(right), np.array(wrong), "greater", **claim.stats_kw))
