"""Attention flow (Fig. 2): where do generated tokens look, layer by layer?

"Audio gets 40-50% attention in layers 0-5, then drops to near-zero. Video climbs to
20-40% in layers 15-30." Shares are the attention mass that generated rows (including the
last prompt row) put on each role, averaged over heads, steps and samples; bands are
fractions of depth.
"""

import pytest

from avprobe.stats import one_sample_test
from avprobe.types import Role


def _share(evidence, claim, role, key):
    """Per clip (its caption orders averaged: they are not independent samples): the role's
    share over the band's attention layers; and the mean share per layer and role. A hybrid
    model's layers without attention have no share (NaN), and are left out of the band."""
    recs = evidence.select(modality="audio-video")
    if not evidence.has_flow:
        claim.skip("no attention-flow results in the stored results (collected without the flow experiment)")
    flow = evidence.flow(recs)  # [N, L, R]
    band = claim.band(evidence.n_layers, key)
    layers = [i for i in band if i in evidence.attention_layers]
    if not layers:
        claim.skip(f"no attention layer in layers {band[0]}-{band[-1]} ({evidence.knockout_scope()})")
    if len(layers) < len(band):
        claim.notes.append(f"{key}: attention layers {', '.join(map(str, layers))} of layers {band[0]}-{band[-1]} "
                           "(the others mix positions without attention)")
    _, per_clip = evidence.clip_means(recs, flow[:, layers, int(role)].mean(1))
    return per_clip, flow.mean(0), layers


@pytest.mark.claim("audio_attention_early")
def test_audio_attention_early(evidence, claim):
    early, per_layer, early_layers = _share(evidence, claim, Role.AUDIO, "early_band")
    late, _, late_layers = _share(evidence, claim, Role.AUDIO, "late_band")
    claim.data = {"per_layer": per_layer.tolist(), "roles": [r.label for r in Role],
                  "early_layers": early_layers, "late_layers": late_layers}
    claim.check({
        "early audio share": one_sample_test(early, claim["min_early_share"], "greater", **claim.stats_kw),
        "later audio share": one_sample_test(late, claim["max_late_share"], "less", **claim.stats_kw),
    })


@pytest.mark.claim("video_attention_late")
def test_video_attention_late(evidence, claim):
    share, per_layer, layers = _share(evidence, claim, Role.VIDEO, "band")
    claim.data = {"per_layer": per_layer.tolist(), "roles": [r.label for r in Role], "band_layers": layers}
    claim.check(one_sample_test(share, claim["min_share"], "greater", **claim.stats_kw))
