"""The claims' calibration, small: every null scenario of avprobe.calibration at n = 50 clips
per kind, 200 replicates, must pass at most alpha + 3 Monte-Carlo standard errors of the
time (0.096: a claim whose false-positive rate is 3x alpha fails here with probability
about 0.98). The full run (1,000 replicates per null, n = 250 and 50) is
calibration/claims.json, rerun with `avprobe calibrate` (see the README)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from avprobe import calibration as C
from avprobe import stats as S

REPS, N, N_BOOT, ALPHA = 200, 50, 300, 0.05
LIMIT = ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / REPS)
NULLS = [sc for sc in C.scenarios() if sc.effect == "null"]


def test_every_calibrated_claim_has_a_null_and_a_power_scenario():
    by = {}
    for sc in C.scenarios():
        by.setdefault(sc.claim, set()).add(sc.effect)
    assert set(by) == set(C.TESTS)
    assert all(v == {"null", "paper"} for v in by.values()), by


@pytest.mark.parametrize("sc", NULLS, ids=[f"{s.claim}-{s.scope or 'all'}-{s.name}" for s in NULLS])
def test_null_scenario_holds_alpha(sc):
    rows = C.calibrate([sc.claim], reps=REPS, ns=(N,), n_boot=N_BOOT, scenario=(sc.name, sc.scope))
    assert len(rows) == 1
    assert rows[0].pass_rate <= LIMIT, f"{sc.claim} [{sc.scope}] {sc.name}: {rows[0].to_json()}"


def test_the_calibration_catches_an_uncorrected_sweep(monkeypatch):
    """Without Holm over the windows the sweep's null at the threshold passes far more than
    alpha: the calibration must see it (so it can see the real thing)."""
    sc = ("every window at the threshold", "sweep")
    monkeypatch.setattr(S, "holm_union", lambda results: np.array([S.union_p(r) for r in results]))
    rows = C.calibrate(["knockout_video_block_recovers_audio"], reps=REPS, ns=(N,), n_boot=N_BOOT, scenario=sc)
    assert rows[0].pass_rate > LIMIT, rows[0].to_json()


def test_the_synthetic_nulls_sit_exactly_at_the_threshold():
    """Population means are solved in closed form: a condition moved by d differs from the
    baseline's mean score by d on the judge's grid (checked on 400,000 draws)."""
    rng = np.random.default_rng(0)
    base, d = 0.231, 0.05
    m0 = C.latent_for_mean(base)
    lat = m0 + C.SD_CLIP * rng.normal(size=400_000) + rng.normal(0, C.SD_QUERY, 400_000)
    moved = C.grid(lat + C.latent_shift(base, d) + rng.normal(0, C.SD_PAIR, lat.size))
    assert C.grid(lat).mean() == pytest.approx(base, abs=2e-3)
    assert (moved - C.grid(lat)).mean() == pytest.approx(d, abs=2e-3)


def test_calibrate_refuses_unknown_claims():
    with pytest.raises(ValueError, match="unknown claim"):
        C.calibrate(["no_such_claim"], reps=1)


def test_resume_keeps_the_rows_already_computed_and_adds_the_missing(tmp_path):
    """`avprobe calibrate --resume` computes only the rows its file lacks (a run stopped
    part-way, or a claim added later), and refuses a file made with another seed."""
    import json

    from avprobe.cli import main

    out = tmp_path / "cal.json"
    base = ["calibrate", "--reps", "4", "--n", "20", "--n-boot", "50", "--out", str(out)]
    main([*base, "--claims", "visual_bias"])
    first = json.loads(out.read_text())
    assert {r["claim"] for r in first["rows"]} == {"visual_bias"} and first["complete"]
    main([*base, "--claims", "visual_bias,video_attention_late", "--resume"])
    second = json.loads(out.read_text())
    kept = [r for r in second["rows"] if r["claim"] == "visual_bias"]
    assert kept == first["rows"]
    assert {r["claim"] for r in second["rows"]} == {"visual_bias", "video_attention_late"}
    assert second["complete"] and len(second["commands"]) == 2
    assert main([*base, "--claims", "visual_bias", "--resume", "--seed", "3"]) == 2
    # more replicates for one claim: its rows are replaced, the other claim's stay
    main([*base[:1], "--reps", "6", *base[3:], "--claims", "visual_bias", "--resume"])
    third = json.loads(out.read_text())
    assert {r["reps"] for r in third["rows"] if r["claim"] == "visual_bias" and r["effect"] == "null"} == {6}
    assert [r for r in third["rows"] if r["claim"] == "video_attention_late"] == [
        r for r in second["rows"] if r["claim"] == "video_attention_late"]
