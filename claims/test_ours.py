"""Two claims of ours, beyond the paper.

visual_prior_via_own_words: a visual prior can reach the sound words through the model's
own sight words ("i see a dog . i hear a [dog]"), not only through the video tokens. On
counterfactuals, cutting generated->video *and* generated->the caption's own sight words
should recover more audio than cutting generated->video alone. Only where the caption names
the sight first; where the sound comes first there is no such route.

attention_is_not_use: attention share is not evidence of use. The audio share of a model
that ignores its audio is indistinguishable from that of one that uses it, while the
knockout effect separates them (compare organism and organism-control).
"""

from dataclasses import replace

import numpy as np
import pytest

from avprobe.stats import holm_union, paired_test, tost_paired
from avprobe.types import Role


@pytest.mark.claim("visual_prior_via_own_words")
def test_visual_prior_via_own_words(evidence, claim, query):
    words = query.lower().split()
    if "see" in words and "hear" in words and words.index("hear") < words.index("see"):
        claim.skip("this query asks for the sound first: the caption's sight words come after the sound words")
    if not evidence.knockout_is_cut:
        claim.skip("the extra recovery is read as the route through the caption's own words once video is cut "
                   f"off, which needs a knockout that cuts; {evidence.knockout_scope()}")
    recs = evidence.select("counterfactual", query, modality="audio-video")
    L = evidence.n_layers
    results = {}
    for name, layers in claim.bands(L).items():
        alone = evidence.find_condition(("video",), layers)
        both = evidence.find_condition(("video", "own-sight-words"), layers)
        if alone is None or both is None:
            continue
        results[f"{name} L{layers[0]}-{layers[-1]}"] = paired_test(
            evidence.scores(recs, alone, "audio"), evidence.scores(recs, both, "audio"), "greater",
            threshold=claim["min_gain"], **claim.stats_kw)
    if not results:
        claim.skip("no own-sight-word knockouts in the stored results")
    # The best of the bands is chosen: Holm over the bands of each band's union p (no effect,
    # and the gain beyond min_gain), so a null at the threshold cannot pass by selection.
    adj = holm_union(list(results.values()))
    claim.notes.append("Holm-adjusted p over bands: " + ", ".join(f"{k}: {p:.2g}" for k, p in zip(results, adj)))
    judged = {k: replace(r, passed=bool(pa < claim.alpha), details={**r.details, "p_holm": float(pa)})
              for (k, r), pa in zip(results.items(), adj)}
    claim.check(judged, require="any")


@pytest.mark.claim("attention_is_not_use")
def test_attention_is_not_use(model_pair, claim, evidence_of):
    if model_pair is None:
        claim.skip("needs two models, e.g. --model organism --model organism-control")
    a, b = (evidence_of(m) for m in model_pair)
    claim.model = f"{model_pair[0]} vs {model_pair[1]}"  # before any skip: the verdict is the pair's
    for ev in (a, b):
        if not ev.knockout_is_cut:
            claim.skip(f"{ev.model}: the G-/->V gain is read as the use of audio once video is cut off, which needs "
                       f"a knockout that cuts; {ev.knockout_scope()}")
        if not ev.has_flow:
            claim.skip(f"{ev.model}: no attention-flow results in the stored results (collected without the flow "
                       "experiment)")
    ra = {r.sample_id + r.query: r for r in a.select("counterfactual", modality="audio-video")}
    rb = {r.sample_id + r.query: r for r in b.select("counterfactual", modality="audio-video")}
    common = sorted(set(ra) & set(rb))
    if len(common) < claim.min_n:
        claim.skip(f"the two models share only {len(common)} counterfactual samples")
    L = min(a.n_layers, b.n_layers)

    def per_clip(ev, recs):
        """Per clip (caption orders averaged): audio share, and the G-/->V (all layers) audio gain."""
        share = ev.flow(recs)[:, :, int(Role.AUDIO)].mean(1)
        key = ev.find_condition(("video",), tuple(range(ev.n_layers)))
        gain = ev.scores(recs, key, "audio") - ev.scores(recs, "baseline", "audio")
        return ev.clip_means(recs, share)[1], ev.clip_means(recs, gain)[1]

    share_a, ga = per_clip(a, [ra[k] for k in common])
    share_b, gb = per_clip(b, [rb[k] for k in common])
    claim.data = {"audio_share": [float(share_a.mean()), float(share_b.mean())],
                  "gv_audio_gain": [float(np.nanmean(ga)), float(np.nanmean(gb))], "layers": L}
    claim.check({
        "audio attention share equivalent": tost_paired(share_a, share_b, claim["attention_margin"],
                                                        alpha=claim.alpha, n_boot=claim.n_boot, seed=claim.seed,
                                                        min_n=claim.min_n),
        "G-/->V audio gain differs": paired_test(gb, ga, "two-sided", threshold=claim["min_effect_difference"],
                                                 **claim.stats_kw),
    })
