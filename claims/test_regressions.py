"""Regression figures: the measured numbers behind the claims, per model.

An engine change or a new model release that moves a fidelity, a per-layer attention share,
a knockout curve or a shift statistic beyond the tolerance fails here, even when every
claim's verdict stays the same. A model seen for the first time gets its expected file
written (and this test fails once, saying so); `--force-regen` rewrites them on purpose.
"""

import numpy as np
import pytest

from avprobe.records import slug
from avprobe.stats import nanmean
from avprobe.types import Role

TOLERANCE = {"atol": 0.02, "rtol": 0.0}


def figures(evidence) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for q in evidence.queries:
        tag = "see_first" if q.split().index("see") < q.split().index("hear") else "hear_first"
        for kind in ("factual", "counterfactual"):
            recs = evidence.select(kind, q, modality="audio-video")
            for modality in ("audio", "video"):
                out[f"{tag}.{kind}.{modality}_fidelity"] = np.array([nanmean(evidence.scores(recs, "baseline", modality))])
                for role in ("video", "audio"):
                    curve = [nanmean(evidence.scores(recs, w["key"], modality)) for w in evidence.sweep_keys(role)]
                    if curve:
                        out[f"{tag}.{kind}.G-/->{role}.{modality}_curve"] = np.array(curve)
    flow = evidence.flow(evidence.select(modality="audio-video")).mean(0)
    for role in (Role.VIDEO, Role.AUDIO, Role.QUERY, Role.GENERATED):
        out[f"attention.{role.label}_by_layer"] = flow[:, int(role)]
    kl = [r.arrays["shift_kl"].astype(float).mean() for r in evidence.records if len(r.arrays.get("shift_kl", []))]
    if kl:
        out["shift.mean_kl"] = np.array([float(np.mean(kl))])
    return out


def test_regression_figures(evidence, num_regression, model_name):
    data = figures(evidence)
    # num_regression wants equal-length columns: one file per figure group keeps them apart
    lengths: dict[int, dict[str, np.ndarray]] = {}
    for k, v in data.items():
        lengths.setdefault(len(v), {})[k] = v
    safe = slug(model_name)
    problems = []
    for n, group in sorted(lengths.items()):
        try:
            num_regression.check(group, basename=f"{safe}_{n}", default_tolerance=TOLERANCE)
        except (pytest.fail.Exception, AssertionError) as exc:  # check every group, then report all
            problems.append(str(exc))
    assert not problems, "\n\n".join(problems)
