"""Regression figures: the measured numbers behind the claims, per model.

An engine change or a new model release that moves a fidelity, a per-layer attention share,
a knockout curve or a shift statistic beyond the tolerance fails here, even when every
claim's verdict stays the same. A model seen for the first time gets its expected file
recorded only on purpose: without expected figures the test is skipped with the command
that records them (`--force-regen`), and nothing is written into the checkout.
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


def test_regression_figures(num_regression, model_name, original_datadir, request):
    safe = slug(model_name)
    if not request.config.getoption("force_regen") and not list(original_datadir.glob(f"{safe}_*.csv")):
        pytest.skip(f"no expected figures for {model_name} in {original_datadir}: record them with "
                    f"`pytest claims/test_regressions.py --model {model_name} --force-regen`")
    data = figures(request.getfixturevalue("evidence"))  # after the check: a skip computes nothing
    # num_regression wants equal-length columns: one file per figure group keeps them apart
    lengths: dict[int, dict[str, np.ndarray]] = {}
    for k, v in data.items():
        lengths.setdefault(len(v), {})[k] = v
    problems = []
    for n, group in sorted(lengths.items()):
        try:
            num_regression.check(group, basename=f"{safe}_{n}", default_tolerance=TOLERANCE)
        except (pytest.fail.Exception, AssertionError) as exc:  # check every group, then report all
            problems.append(str(exc))
    assert not problems, "\n\n".join(problems)
