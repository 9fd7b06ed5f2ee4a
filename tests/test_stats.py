"""Tests of avprobe.stats: reference values from scipy, planted effects, properties."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from avprobe import stats as S
from avprobe.stats import TestResult

FAST = settings(max_examples=40, deadline=None)
finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


# ---- TestResult --------------------------------------------------------------------------


def test_summary_is_one_line_with_everything() -> None:
    rng = np.random.default_rng(0)
    a = rng.random(250)
    b = a + 0.3 + rng.normal(0, 0.2, 250)
    b[:4] = np.nan
    r = S.paired_test(a, b, "greater", threshold=0.1)
    s = r.summary()
    assert "\n" not in s
    pattern = (
        r"^mean diff 0\.\d+ \[0\.\d+, 0\.\d+\] 95% CI, p=\de-\d+ \(Wilcoxon signed-rank, one-sided greater\), "
        r"n=246 \(4 unscored NaN excluded\), effect rank-biserial r=0\.\d+; relative change \+\d+% \[\+\d+%, \+\d+%\] "
        r"vs baseline mean 0\.\d+; threshold 0\.1: PASS$"
    )
    assert re.match(pattern, s), s
    failing = S.paired_test(a, b, "less")
    assert failing.summary().endswith("FAIL") and failing.passed is False


def test_result_is_frozen_and_not_collected() -> None:
    r = S.bootstrap_ci([1.0, 2.0, 3.0], n_boot=50)
    with pytest.raises(AttributeError):
        r.estimate = 0.0  # type: ignore[misc]
    assert TestResult.__test__ is False


# ---- bootstrap ---------------------------------------------------------------------------


def test_bootstrap_excludes_and_counts_nan() -> None:
    x = np.array([0.2, np.nan, 0.4, 0.6, np.nan, 0.8])
    r = S.bootstrap_ci(x, n_boot=500)
    assert r.details["n_nan"] == 2 and r.n == 4
    assert r.estimate == pytest.approx(0.5)  # NaN is not 0: the mean of 4 values, not 6
    assert r.passed is None and math.isnan(r.p_value)
    with pytest.raises(ValueError, match="NaN"):
        S.bootstrap_ci([np.nan, np.nan])


def test_bootstrap_deterministic_and_fast_path_matches_generic() -> None:
    x = np.random.default_rng(3).normal(size=80)
    a = S.bootstrap_ci(x, seed=7)
    b = S.bootstrap_ci(x, seed=7)
    generic = S.bootstrap_ci(x, stat=lambda v: float(np.mean(v)), seed=7)
    other = S.bootstrap_ci(x, seed=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) == pytest.approx((generic.ci_low, generic.ci_high), rel=1e-12)
    assert (a.ci_low, a.ci_high) != (other.ci_low, other.ci_high)
    med = S.bootstrap_ci(x, stat=np.median, seed=7)
    med_generic = S.bootstrap_ci(x, stat=lambda v: float(np.median(v)), seed=7)
    assert (med.ci_low, med.ci_high) == pytest.approx((med_generic.ci_low, med_generic.ci_high))


def test_bootstrap_paired_with() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.random(60), rng.random(60)
    y[3] = np.nan
    r = S.bootstrap_ci(x, stat=lambda u, v: float(np.mean(v - u)), paired_with=y, seed=2)
    keep = ~np.isnan(y)
    ref = S.bootstrap_ci((y - x)[keep], stat=lambda d: float(np.mean(d)), seed=2)
    assert r.details["n_nan"] == 1 and r.n == 59 and r.estimate_name == "<lambda>"
    named = S.bootstrap_ci(x, stat=lambda u, v: float(np.mean(v - u)), paired_with=y, stat_name="gain", n_boot=10)
    assert named.summary().startswith("gain ")
    assert (r.estimate, r.ci_low, r.ci_high) == pytest.approx((ref.estimate, ref.ci_low, ref.ci_high))


def test_bootstrap_coverage_near_nominal() -> None:
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(120):
        r = S.bootstrap_ci(rng.normal(1.0, 1.0, 60), n_boot=1000, seed=int(rng.integers(1 << 30)))
        hits += r.ci_low <= 1.0 <= r.ci_high
    assert 104 <= hits <= 120  # 95% nominal; percentile intervals undercover a little at n=60


def test_bca_corrects_skew() -> None:
    rng = np.random.default_rng(5)
    x = rng.exponential(1.0, 40)
    pct = S.bootstrap_ci(x, n_boot=4000)
    bca = S.bootstrap_ci(x, n_boot=4000, method="bca")
    # right-skewed statistic: BCa moves the interval up relative to the percentile one
    assert bca.ci_high > pct.ci_high and bca.ci_low > pct.ci_low
    assert bca.ci_low < bca.estimate < bca.ci_high
    sym = rng.normal(0, 1, 200)
    a, b = S.bootstrap_ci(sym), S.bootstrap_ci(sym, method="bca")
    assert (a.ci_low, a.ci_high) == pytest.approx((b.ci_low, b.ci_high), abs=0.03)


@FAST
@given(st.lists(finite, min_size=2, max_size=40), st.integers(0, 1000))
def test_ci_contains_estimate(xs: list[float], seed: int) -> None:
    r = S.bootstrap_ci(np.array(xs), n_boot=200, seed=seed)
    tol = 1e-9 * (1 + max(abs(v) for v in xs))
    assert r.ci_low - tol <= r.estimate <= r.ci_high + tol


# ---- paired ------------------------------------------------------------------------------


@FAST
@given(st.lists(st.floats(0, 1), min_size=1, max_size=60), st.sampled_from(S.ALTERNATIVES))
def test_paired_identical_arrays_show_no_effect(xs: list[float], alt: str) -> None:
    a = np.array(xs)
    r = S.paired_test(a, a.copy(), alt, n_boot=100, min_n=1)
    assert r.estimate == 0 and r.ci_low == 0 and r.ci_high == 0
    assert r.p_value == 1.0 and r.effect_size == 0 and r.passed is False


def test_planted_effect_detected_and_null_rarely() -> None:
    detected = false_pos = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        a = rng.normal(0.5, 0.2, 100)
        noise = rng.normal(0, 0.2, 100)
        detected += S.paired_test(a, a + 0.1 + noise, "greater", n_boot=500, seed=seed).passed
        false_pos += S.paired_test(a, a + noise, "greater", n_boot=500, seed=seed).passed
    assert detected >= 18
    assert false_pos <= 3


def test_paired_wilcoxon_p_matches_scipy_and_effect_sign() -> None:
    rng = np.random.default_rng(2)
    a = rng.random(40)
    b = a + rng.normal(-0.1, 0.1, 40)
    b[:5] = a[:5]  # some ties at zero
    r = S.paired_test(a, b, "less", n_boot=200)
    assert r.details["method"] == "wilcoxon" and r.name == "Wilcoxon signed-rank"
    ref = sps.wilcoxon(b - a, zero_method="pratt", alternative="less").pvalue
    assert r.p_value == pytest.approx(ref)
    assert r.effect_size < 0 and r.estimate < 0 and r.passed
    assert r.details["n_zero"] == 5
    dz = np.mean(b - a) / np.std(b - a, ddof=1)
    assert r.details["cohen_dz"] == pytest.approx(dz)


def test_paired_binary_uses_exact_mcnemar() -> None:
    a = np.array([0] * 30 + [1] * 20, dtype=float)
    b = a.copy()
    b[:12] = 1  # 12 gains
    b[30:33] = 0  # 3 losses
    r = S.paired_test(a, b, "greater", n_boot=300)
    assert r.details["method"] == "mcnemar" and r.name == "exact McNemar"
    assert (r.details["gains"], r.details["losses"]) == (12, 3)
    assert r.p_value == pytest.approx(sps.binomtest(12, 15, 0.5, alternative="greater").pvalue)
    assert r.estimate == pytest.approx(9 / 50)
    forced = S.paired_test(a, b, "greater", method="wilcoxon", n_boot=300)
    assert forced.details["method"] == "wilcoxon" and forced.p_value != r.p_value


def test_relative_change_beside_baseline() -> None:
    rng = np.random.default_rng(4)
    a = rng.uniform(0.1, 0.4, 120)
    b = 1.5 * a
    r = S.paired_test(a, b, "greater", threshold_relative=0.3, n_boot=500)
    assert r.details["relative_change"] == pytest.approx(0.5)
    assert r.details["baseline_mean"] == pytest.approx(a.mean())
    lo, hi = r.details["relative_ci"]
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)  # exactly proportional
    assert r.passed and "vs baseline mean" in r.summary() and "relative threshold +30%" in r.summary()
    # the same absolute gain does not clear a 60% relative threshold
    assert S.paired_test(a, b, "greater", threshold_relative=0.6, n_boot=500).passed is False
    zero = S.paired_test(np.zeros(10), np.linspace(0.1, 1, 10), "greater", n_boot=100)
    assert math.isnan(zero.details["relative_change"]) and "undefined" in zero.details["relative_note"]


def test_paired_threshold_and_nan_pairs() -> None:
    rng = np.random.default_rng(6)
    a = rng.random(200)
    b = a + 0.3 + rng.normal(0, 0.05, 200)
    assert S.paired_test(a, b, "greater", threshold=0.2, n_boot=300).passed
    big = S.paired_test(a, b, "greater", threshold=0.5, n_boot=300)
    assert big.p_value < 1e-10 and big.passed is False  # significant but below the threshold
    # a NaN pair is dropped, never scored 0
    a2, b2 = a.copy(), b.copy()
    a2[0], b2[1] = np.nan, np.nan
    r = S.paired_test(a2, b2, "greater", n_boot=300)
    ref = S.paired_test(a[2:], b[2:], "greater", n_boot=300)
    assert r.details["n_nan"] == 2 and r.n == 198
    assert (r.estimate, r.p_value, r.ci_low) == (ref.estimate, ref.p_value, ref.ci_low)
    with pytest.raises(ValueError, match="equal length"):
        S.paired_test(a, b[:-1])
    with pytest.raises(ValueError, match="alternative"):
        S.paired_test(a, b, "bigger")


def test_paired_t_method() -> None:
    rng = np.random.default_rng(9)
    a = rng.random(30)
    b = a + rng.normal(0.05, 0.1, 30)
    r = S.paired_test(a, b, "two-sided", method="t", n_boot=100)
    assert r.p_value == pytest.approx(sps.ttest_rel(b, a).pvalue)
    const = S.paired_test(a, a + 0.2, "greater", method="t", n_boot=100)
    assert const.p_value == 0.0 and const.details["degenerate"] == "constant difference"
    with pytest.raises(ValueError, match="method"):
        S.paired_test(a, b, method="sign")


# ---- independent -------------------------------------------------------------------------


def test_independent_matches_definitions() -> None:
    rng = np.random.default_rng(8)
    x = rng.random(40) * 0.8 + 0.2
    y = rng.random(35) * 0.5
    y[0] = np.nan
    r = S.independent_test(x, y, "greater", threshold_relative_drop=0.3, n_boot=500)
    yy = y[1:]
    gt = (x[:, None] > yy[None, :]).sum() + 0.5 * (x[:, None] == yy[None, :]).sum()
    assert r.effect_size == pytest.approx(2 * gt / (x.size * yy.size) - 1)
    assert r.p_value == pytest.approx(sps.mannwhitneyu(x, yy, alternative="greater").pvalue)
    assert r.estimate == pytest.approx(x.mean() - yy.mean())
    assert r.details["relative_drop"] == pytest.approx((x.mean() - yy.mean()) / x.mean())
    assert r.details["n_nan_y"] == 1 and r.n == 74 and "n=40+34" in r.summary()
    lo, hi = r.details["relative_drop_ci"]
    assert lo < r.details["relative_drop"] < hi
    assert r.passed and "relative drop" in r.summary()
    # a 90% relative drop is not supported by these data
    assert S.independent_test(x, y, "greater", threshold_relative_drop=0.9, n_boot=500).passed is False


def test_independent_null_rarely_passes() -> None:
    passed = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        passed += S.independent_test(rng.random(80), rng.random(80), "greater", n_boot=300, seed=seed).passed
    assert passed <= 3


# ---- TOST --------------------------------------------------------------------------------


def test_tost() -> None:
    rng = np.random.default_rng(12)
    a = rng.random(250)
    same = a + rng.normal(0, 0.05, 250)
    r = S.tost_paired(a, same, margin=0.05)
    d = same - a
    p_ref = max(
        sps.ttest_1samp(d, -0.05, alternative="greater").pvalue, sps.ttest_1samp(d, 0.05, alternative="less").pvalue
    )
    assert max(r.details["t_p"]) == pytest.approx(p_ref)  # the t-test's, kept beside
    assert r.p_value < 0.05 and p_ref < 1e-6  # the bootstrap-t's: its floor is 1 / (n_boot + 1)
    assert r.passed and r.confidence == pytest.approx(0.9) and "equivalence within ±0.05" in r.summary()
    assert r.summary().endswith("margin ±0.05: PASS")
    shifted = S.tost_paired(a, same + 0.1, margin=0.05)
    assert shifted.passed is False
    noisy_small = S.tost_paired(a[:8], a[:8] + rng.normal(0, 0.3, 8), margin=0.05)
    assert noisy_small.passed is False  # no evidence of equivalence is not equivalence
    exact = S.tost_paired(a, a + 0.01, margin=0.05)
    assert exact.passed is False and "no variation" in exact.untestable  # constant: indifference, not equivalence
    with pytest.raises(ValueError, match="margin"):
        S.tost_paired(a, a, margin=0)


# ---- Holm and sweeps ---------------------------------------------------------------------


@FAST
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_holm_properties(ps: list[float]) -> None:
    p = np.array(ps)
    adj = S.holm(p)
    assert np.all(adj >= p - 1e-15) and np.all(adj <= 1)
    order = np.argsort(p, kind="stable")
    assert np.all(np.diff(adj[order]) >= -1e-15)  # monotone in the raw order
    m = p.size  # brute-force definition
    sp = p[order]
    ref = [min(1.0, max((m - j) * sp[j] for j in range(i + 1))) for i in range(m)]
    np.testing.assert_allclose(adj[order], ref)


def test_holm_nan_and_reference() -> None:
    adj = S.holm([0.01, 0.04, 0.03, np.nan, 0.5])
    np.testing.assert_allclose(adj, [0.04, 0.09, 0.09, np.nan, 0.5])
    pingouin = pytest.importorskip("pingouin")
    p = np.random.default_rng(0).random(12) ** 3
    np.testing.assert_allclose(S.holm(p), pingouin.multicomp(p, method="holm")[1])
    with pytest.raises(ValueError):
        S.holm([1.5])


def test_sweep_locates_effect_and_corrects() -> None:
    effects = [0, 0, 0, 0.15, 0.15, 0, 0, 0]
    labels = [f"L{i}-{i + 4}" for i in range(8)]
    false_pos = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        base = rng.random(150)
        windows = [base + e + rng.normal(0, 0.1, 150) for e in effects]
        sw = S.sweep_test(base, windows, "greater", labels=labels, n_boot=300)
        assert {"L3-7", "L4-8"} <= set(sw.where) and sw.best in (3, 4)
        assert sw.significant[3] and sw.significant[4]
        assert all(r.details["p_holm"] >= r.p_value for r in sw.results)
        false_pos += len(sw.where) - 2
    assert false_pos <= 1  # Holm keeps the family-wise error near alpha per sweep
    assert "windows pass after Holm" in sw.summary() and "strongest L" in sw.summary()


def test_sweep_holm_can_overturn_raw_significance() -> None:
    rng = np.random.default_rng(3)
    base = rng.random(60)
    # one weak effect among many nulls: raw p a bit below 0.05, not after correcting for 10
    for shift in np.linspace(0.02, 0.06, 30):
        win = base + shift + rng.normal(0, 0.1, 60)
        raw = S.paired_test(base, win, "greater", n_boot=200)
        if 0.005 < raw.p_value < 0.05 and raw.passed:
            break
    else:
        pytest.fail("no weakly significant window found")
    windows = [win] + [base + rng.normal(0, 0.1, 60) for _ in range(9)]
    sw = S.sweep_test(base, windows, "greater", n_boot=200)
    assert sw.results[0].p_value == pytest.approx(raw.p_value)
    assert sw.results[0].passed is False and sw.p_adjusted[0] > raw.p_value
    with pytest.raises(ValueError, match="labels"):
        S.sweep_test(base, windows, labels=["a"])


# ---- one sample, proportion, correlation -------------------------------------------------


def test_one_sample() -> None:
    rng = np.random.default_rng(13)
    kl = rng.exponential(0.3, 500)
    r = S.one_sample_test(kl, 0.5, "less", n_boot=500)
    assert r.p_value == pytest.approx(sps.ttest_1samp(kl, 0.5, alternative="less").pvalue)
    assert r.passed and r.ci_high < 0.5 and r.estimate_name == "mean"
    assert S.one_sample_test(kl, 0.25, "less", n_boot=500).passed is False
    w = S.one_sample_test(kl, 0.5, "less", test="wilcoxon", n_boot=500)
    assert w.p_value == pytest.approx(sps.wilcoxon(kl - 0.5, zero_method="pratt", alternative="less").pvalue)
    with pytest.raises(ValueError, match="test"):
        S.one_sample_test(kl, 0.5, test="z")


def test_proportion() -> None:
    r = S.proportion_test(66, 100, 0.5, "greater")
    assert r.p_value == pytest.approx(sps.binomtest(66, 100, 0.5, alternative="greater").pvalue)
    assert r.estimate == 0.66 and r.ci_low < 0.66 < r.ci_high < 1  # two-sided CI
    assert r.passed
    cp = S.proportion_test(66, 100, 0.5, ci_method="clopper-pearson")
    ref = sps.binomtest(66, 100).proportion_ci(0.95, method="exact")
    assert (cp.ci_low, cp.ci_high) == pytest.approx((ref.low, ref.high))
    assert cp.ci_high - cp.ci_low > r.ci_high - r.ci_low  # Clopper-Pearson is wider than Wilson
    assert S.proportion_test(55, 100, 0.5, "greater").passed is False
    assert S.proportion_test(66, 100, 0.7, "greater").passed is False
    with pytest.raises(ValueError):
        S.proportion_test(5, 3, 0.5)


def test_spearman() -> None:
    rng = np.random.default_rng(14)
    x = rng.random(80)
    y = x + rng.normal(0, 0.2, 80)
    r = S.spearman_ci(x, y, n_boot=800, seed=1)
    ref = sps.spearmanr(x, y)
    assert r.estimate == pytest.approx(ref.statistic) and r.p_value == pytest.approx(ref.pvalue)
    assert r.ci_low < r.estimate < r.ci_high
    assert S.spearman_ci(x, y, n_boot=800, threshold=0.6, alternative="greater").passed
    assert S.spearman_ci(x, y, n_boot=800, threshold=0.95, alternative="greater").passed is False
    perfect = S.spearman_ci(x, x**3, n_boot=200)
    assert perfect.estimate == pytest.approx(1.0) and perfect.ci_low == pytest.approx(1.0)
    const = S.spearman_ci(np.ones(10), np.arange(10.0), n_boot=100)
    assert math.isnan(const.estimate) and const.passed is None


def test_spearman_bootstrap_matches_scipy_per_resample() -> None:
    """The vectorised bootstrap rho equals scipy's rho on the same resample."""
    rng = np.random.default_rng(15)
    x = np.round(rng.random(30), 1)  # ties
    y = np.round(x + rng.normal(0, 0.3, 30), 1)
    r = S.spearman_ci(x, y, n_boot=300, seed=4)
    idx = np.random.default_rng(4).integers(0, 30, size=(300, 30))
    boot = [sps.spearmanr(x[i], y[i]).statistic for i in idx]
    lo, hi = np.nanquantile(boot, [0.025, 0.975])
    assert (r.ci_low, r.ci_high) == pytest.approx((lo, hi))


# ---- KL ----------------------------------------------------------------------------------


def test_kl_divergence() -> None:
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(4, 7, 50, generator=g), torch.randn(4, 7, 50, generator=g)
    lp, lq = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    kl = S.kl_divergence(lp, lq)
    assert kl.shape == (4, 7)
    ref = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(kl, ref)
    assert torch.all(kl >= 0)
    torch.testing.assert_close(S.kl_divergence(logits_p, logits_q), kl)  # raw logits are normalised
    torch.testing.assert_close(S.kl_divergence(lp, lp), torch.zeros(4, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(S.kl_divergence(lp.transpose(1, 2), lq.transpose(1, 2), dim=1), kl)
    # zero-probability events of p contribute 0; q = 0 where p > 0 is infinite
    p = torch.log(torch.tensor([0.5, 0.5, 0.0]))
    q = torch.log(torch.tensor([0.25, 0.25, 0.5]))
    assert S.kl_divergence(p, q).item() == pytest.approx(math.log(2))
    assert math.isinf(S.kl_divergence(q, p).item())
    assert S.kl_divergence(lp.half(), lq.half()).dtype == torch.float32


# ---- size under the null, degenerate data (issue: verdicts you can trust) ----------------


def test_degenerate_data_are_untestable_not_passed() -> None:
    r = S.one_sample_test([0.9, 0.9], 0.5, "greater")
    assert r.passed is False and "fewer than the 10" in r.untestable
    r = S.one_sample_test([0.9] * 30, 0.5, "greater")
    assert r.passed is False and "no variation" in r.untestable
    assert S.paired_test([0.1], [0.9], "greater").untestable
    assert "no variation" in S.tost_paired(np.zeros(50), np.zeros(50), 0.1).untestable
    assert "no variation" in S.tost_paired(np.full(50, 0.3), np.full(50, 0.35), 0.1).untestable
    assert "untestable" in S.tost_paired(np.zeros(50), np.zeros(50), 0.1).summary()


def test_a_baseline_at_the_floor_or_ceiling_leaves_no_room() -> None:
    rng = np.random.default_rng(0)
    floor = np.zeros(100)
    floor[:2] = 0.1
    up = np.clip(floor + rng.random(100) * 0.5, 0, 1)
    r = S.paired_test(floor, up, "greater", threshold_relative=0.25, bounds=(0, 1))
    assert r.passed is False and "a relative change is undefined" in r.untestable  # not "+5300%"
    r = S.paired_test(floor, floor * 0, "less", threshold=-0.05, bounds=(0, 1))
    assert "no room for a drop" in r.untestable
    top = np.ones(100)
    assert "at the ceiling" in S.paired_test(top, top, "greater", threshold=0.1, bounds=(0, 1)).untestable
    # mid-range: testable, and the relative threshold is judged in linear form
    base = rng.random(200) * 0.5 + 0.2
    r = S.paired_test(base, base * 1.5 + rng.normal(0, 0.05, 200), "greater", threshold_relative=0.25, bounds=(0, 1))
    assert not r.untestable and r.passed and r.details["p_relative"] < 0.05


def _old_sweep_passes(base, windows, threshold):
    """The rule before the fix: Holm on the p against 0, then each window's CI against the
    threshold at the uncorrected level; the sweep passes if any window does."""
    raw = [S.paired_test(base, w, "greater", threshold, n_boot=300, min_n=1) for w in windows]
    adj = S.holm([r.p_value for r in raw])
    return any(pa < 0.05 and r.ci_low > threshold for r, pa in zip(raw, adj))


def test_sweep_holds_its_size_with_every_window_at_the_threshold() -> None:
    """8 windows, each with its mean gain exactly at the threshold: selecting the best
    window must not pass more than alpha (+ Monte-Carlo error) of the time."""
    reps, t = 120, 0.05
    new = old = 0
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        base = rng.random(100)
        windows = [base + t + rng.normal(0, 0.15, 100) for _ in range(8)]
        new += S.sweep_test(base, windows, "greater", threshold=t, n_boot=300, seed=seed).union_result().passed
        old += _old_sweep_passes(base, windows, t)
    assert new / reps <= 0.05 + 2 * (0.05 * 0.95 / reps) ** 0.5, new
    assert old / reps > 0.10, old  # the old rule: inflated (the bug this guards against)


def test_sweep_leaves_an_unscored_window_out() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(80)
    windows = [base + 0.3 + rng.normal(0, 0.05, 80), np.full(80, np.nan), base + rng.normal(0, 0.05, 80)]
    sw = S.sweep_test(base, windows, "greater", labels=["a", "b", "c"], n_boot=200)
    assert sw.where == ("a",) and sw.results[1].untestable and np.isnan(sw.p_adjusted[1])
    assert sw.union_result().passed and not sw.untestable


def test_bootstrap_t_holds_its_size_on_skewed_kl() -> None:
    """Per-clip KL is right-skewed: at the threshold the studentized bootstrap stays near
    alpha where the one-sample t-test does not."""
    reps, n, thr, sigma = 300, 50, 0.5, 1.2
    mu = np.log(thr) - sigma**2 / 2  # lognormal with mean exactly thr
    boot = t_test = 0
    for seed in range(reps):
        x = np.random.default_rng(seed).lognormal(mu, sigma, n)
        boot += S.one_sample_test(x, thr, "less", test="bootstrap-t", n_boot=400, seed=seed).passed
        t_test += S.one_sample_test(x, thr, "less", n_boot=50).passed
    assert boot / reps <= 0.05 + 2 * (0.05 * 0.95 / reps) ** 0.5, boot
    assert t_test > boot


def test_cluster_proportion_resamples_clips() -> None:
    rng = np.random.default_rng(2)
    p = rng.beta(2, 2, 60)  # each clip its own rate: tokens of a clip are not independent
    n = np.full(60, 20)
    k = rng.binomial(n, p)
    c = S.cluster_proportion_test(k, n, 0.4, "greater", n_boot=500)
    b = S.proportion_test(int(k.sum()), int(n.sum()), 0.4, "greater")
    assert c.estimate == pytest.approx(b.estimate)
    assert (c.ci_high - c.ci_low) > 1.5 * (b.ci_high - b.ci_low)
    assert "fewer than the 10" in S.cluster_proportion_test(k[:5], n[:5], 0.4).untestable


def test_kl_divergence_of_no_distribution_is_nan() -> None:
    import torch

    x = torch.full((2, 5), -torch.inf)
    assert torch.isnan(S.kl_divergence(x, torch.zeros(2, 5))).all()
    assert S.kl_divergence(torch.zeros(5), torch.zeros(5)).item() == pytest.approx(0.0)


def test_an_untestable_part_skips_the_claim() -> None:
    from avprobe.claim import ClaimCheck, ClaimSkipped

    recorded: list[str] = []
    claim = ClaimCheck({"id": "x", "statement": "s"}, model="m", record=recorded.append)
    with pytest.raises(ClaimSkipped):
        claim.check({"a": S.one_sample_test(np.full(20, 0.7), 0.5, "greater"),
                     "b": S.one_sample_test(np.linspace(0.6, 0.9, 20), 0.5, "greater")})
    assert claim.outcome.status == "skipped" and "no variation" in claim.outcome.skip_reason


def test_a_tested_failing_part_decides_over_an_untestable_one() -> None:
    from avprobe.claim import ClaimCheck

    claim = ClaimCheck({"id": "x", "statement": "s"}, model="m")
    fails = S.one_sample_test(np.linspace(0.1, 0.3, 20), 0.5, "greater")
    flat = S.one_sample_test(np.full(20, 0.7), 0.5, "greater")
    assert claim.verdict({"a": flat, "b": fails}).status == "failed"
    passes = S.one_sample_test(np.linspace(0.6, 0.9, 20), 0.5, "greater")
    assert claim.verdict({"a": flat, "b": passes}, require="any").status == "passed"


def test_tost_no_pair_changed_is_decided_exactly_when_the_scores_are_bounded() -> None:
    """With known bounds, n unchanged pairs are evidence of equivalence once
    (1 - margin / width) ** n < alpha (n >= 29 at margin 0.1, width 1); fewer are not."""
    a = np.r_[np.ones(20), np.zeros(30)]
    r = S.tost_paired(a, a, 0.1, bounds=(0.0, 1.0))
    assert r.passed and r.name == "TOST exact (no pair changed)"
    assert r.p_value == pytest.approx(0.9**50) and r.ci_high == pytest.approx(1 - 0.05 ** (1 / 50))
    assert -0.1 < r.ci_low < 0 < r.ci_high < 0.1
    small = S.tost_paired(a[:25], a[:25], 0.1, bounds=(0.0, 1.0))
    assert not small.passed and small.p_value == pytest.approx(0.9**25) and not small.untestable
    # every pair moved by the same nonzero amount: still no variation to test with
    assert "no variation" in S.tost_paired(a, a - 1, 0.1, bounds=(0.0, 1.0)).untestable


@pytest.mark.parametrize("n", [30, 50])
def test_tost_with_bounds_holds_its_size_when_rare_changes_go_one_way(n) -> None:
    """Scores 1 that drop to 0 in a share `margin` of pairs (mean difference at the margin, the
    null's edge): the bootstrap-t alone passed 0.14 of such sets at n = 30 and 0.10 at n = 50
    (a few changed pairs are too discrete to bootstrap); with bounds, fewer than
    SPARSE_CHANGES changed pairs go to the exact count test, and the size holds within alpha +
    2 Monte-Carlo SE."""
    rng = np.random.default_rng(5)
    reps, margin = 400, 0.1
    a = np.ones(n)
    results = [S.tost_paired(a, (rng.random(n) >= margin).astype(float), margin, bounds=(0.0, 1.0),
                             n_boot=200, seed=0) for _ in range(reps)]
    assert "TOST exact (changed-pair counts)" in {r.name for r in results}
    assert sum(r.passed for r in results) / reps <= 0.05 + 2 * np.sqrt(0.05 * 0.95 / reps)


def test_tost_counts_branch_is_the_binomial_tail_of_each_direction() -> None:
    """3 pairs down, 1 up of 100 (bounds (0, 1), margin 0.1): p = P(Bin(100, 0.1) <= 3), the
    interval is -+ the one-sided Clopper-Pearson bounds of 3 and 1 in 100; without bounds the
    bootstrap decides."""
    from scipy import stats as sps

    a = np.r_[np.ones(50), np.zeros(50)]
    b = a.copy()
    b[:3], b[50] = 0.0, 1.0
    r = S.tost_paired(a, b, 0.1, bounds=(0.0, 1.0))
    assert r.name == "TOST exact (changed-pair counts)" and r.passed
    assert r.details["down"] == 3 and r.details["up"] == 1
    assert r.p_value == pytest.approx(sps.binom.cdf(3, 100, 0.1))
    assert r.ci_low == pytest.approx(-sps.beta.ppf(0.95, 4, 97)) and r.ci_high == pytest.approx(sps.beta.ppf(0.95, 2, 99))
    assert r.estimate == pytest.approx(-0.02) and r.ci_low <= r.estimate <= r.ci_high
    assert S.tost_paired(a, b, 0.1).name == "TOST bootstrap-t"
    # 12 pairs down of 100 is not within 0.1 (P(Bin(100, 0.1) <= 12) = 0.80)
    b[:12] = 0.0
    assert not S.tost_paired(a, b, 0.1, bounds=(0.0, 1.0)).passed