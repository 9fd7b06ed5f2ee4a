"""The statistical tests the claims use: small pure functions over numpy arrays.

Every test returns a frozen `TestResult` holding the point estimate with its confidence
interval, a p-value, the sample size, an effect size, the threshold it was judged against
and the verdict; `TestResult.summary()` is the one-line statistical summary a claim prints.

Conventions shared by all tests:

- NaN means *unscored* (e.g. a judge reply that could not be parsed): NaN values (or pairs
  with a NaN on either side) are excluded and counted in ``details["n_nan"]``; never 0.
- Confidence intervals are percentile bootstrap intervals at level ``1 - alpha`` (two-sided),
  deterministic given `seed` (TOST uses ``1 - 2 alpha``, the interval equivalence maps to;
  proportions use Wilson / Clopper-Pearson).
- The p-value tests "no effect" (difference 0, or the stated fixed value for one-sample and
  proportion tests). A directional result *passes* when the p-value is below `alpha` **and**
  the CI lies beyond the threshold on the side of the alternative (for "greater": the CI's
  lower bound is above the threshold). Using the two-sided ``1 - alpha`` CI for a one-sided
  claim is deliberately conservative: the bound is at level alpha / 2.
- For differences a two-sided alternative with threshold t asks for ``|effect| > t``.
- Data that cannot test the claim give an *untestable* result, never a pass and never an
  error: fewer than `min_n` scored values (default `MIN_N`), constant values where a test
  needs variation (TOST on identical differences, a one-sample test on identical values),
  or a baseline at the floor or ceiling of `bounds` that leaves no room for the effect.
  ``details["untestable"]`` holds the reason and `passed` is False; the claim layer turns it
  into a skip with that reason (`avprobe.claim.ClaimCheck`).
- Thresholds are tested as null hypotheses where a family is corrected (`sweep_test`):
  ``H0: effect <= threshold`` (for "greater"), not ``effect = 0``, so that choosing the best
  window cannot make a null at the threshold pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats as sps

if TYPE_CHECKING:
    import torch

ALTERNATIVES = ("two-sided", "greater", "less")
# Fewest scored values (clips) a test runs on; fewer give an untestable result.
MIN_N = 10
# Bootstrap draws are made in chunks of at most this many indices, so big samples (e.g. all
# caption tokens) do not need an n_boot x n index matrix at once.
_CHUNK = 2_000_000


@dataclass(frozen=True)
class TestResult:
    """Outcome of one statistical test; `summary()` gives the one-line human summary.

    `estimate` is described by `estimate_name` (e.g. "mean diff"), with a CI
    [`ci_low`, `ci_high`] at level `confidence`. `passed` is None for pure estimates
    (`bootstrap_ci`), else the verdict under the rule in the module docstring. `details`
    holds test-specific numbers (method used, NaN count, baseline mean, relative change...).
    """

    __test__ = False  # not a pytest test class despite the name

    name: str
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    effect_size: float
    effect_name: str
    threshold: float | None
    alternative: str
    passed: bool | None
    details: dict[str, Any] = field(default_factory=dict, hash=False)
    estimate_name: str = "estimate"
    confidence: float = 0.95

    @property
    def untestable(self) -> str:
        """Why the data cannot test the claim ("" when they can)."""
        return str(self.details.get("untestable", ""))

    def summary(self) -> str:
        """E.g. "mean diff 0.31 [0.22, 0.40] 95% CI, p=3e-12 (Wilcoxon signed-rank, one-sided
        greater), n=250, effect rank-biserial r=0.78; threshold 0.1: PASS"."""
        d = self.details
        if d.get("untestable"):
            return f"untestable ({self.name}, n={d.get('n_text', self.n)}): {d['untestable']}"
        alt = {"two-sided": "two-sided", "greater": "one-sided greater", "less": "one-sided less"}.get(
            self.alternative, self.alternative
        )
        if self.alternative == "equivalence":
            alt = f"equivalence within ±{_fmt(self.threshold)}"
        s = f"{self.estimate_name} {_fmt(self.estimate)} [{_fmt(self.ci_low)}, {_fmt(self.ci_high)}] {self.confidence:.0%} CI"
        if not math.isnan(self.p_value):
            s += f", p={format_p(self.p_value)}"
        s += f" ({self.name}, {alt}), n={d.get('n_text', self.n)}"
        if d.get("n_nan"):
            s += f" ({d['n_nan']} unscored NaN excluded)"
        if not math.isnan(self.effect_size):
            s += f", effect {self.effect_name}={_fmt(self.effect_size)}"
        if "relative_change" in d:
            lo, hi = d["relative_ci"]
            s += (
                f"; relative change {_pct(d['relative_change'])} [{_pct(lo)}, {_pct(hi)}]"
                f" vs baseline mean {_fmt(d['baseline_mean'])}"
            )
        if "relative_drop" in d:
            lo, hi = d["relative_drop_ci"]
            s += (
                f"; relative drop {_pct(d['relative_drop'], sign=False)} [{_pct(lo, sign=False)}, {_pct(hi, sign=False)}]"
                f" from {_fmt(d['mean_x'])} to {_fmt(d['mean_y'])}"
            )
        if self.passed is not None:
            crit = []
            if self.alternative == "equivalence":
                crit.append(f"margin ±{_fmt(self.threshold)}")
            elif self.threshold is not None:
                crit.append(f"threshold {_fmt(self.threshold)}")
            for key in ("threshold_relative", "threshold_relative_drop"):
                if d.get(key) is not None:
                    crit.append(f"relative threshold {_pct(d[key], sign=key == 'threshold_relative')}")
            if "p_holm" in d:
                crit.append(f"Holm p={format_p(d['p_holm'])}")
            s += f"; {', '.join(crit) or 'alpha ' + _fmt(d.get('alpha', 0.05))}: {'PASS' if self.passed else 'FAIL'}"
        return s


@dataclass(frozen=True)
class SweepResult:
    """Per-window paired tests with Holm-corrected p-values (see `sweep_test`).

    `results[i]` is window i's `TestResult` with ``details["p_holm"]`` and `passed` judged on
    the Holm-adjusted p-value; `significant[i]` is ``p_adjusted[i] < alpha``.
    """

    labels: tuple[str, ...]
    results: tuple[TestResult, ...]
    p_adjusted: tuple[float, ...]
    significant: tuple[bool, ...]
    alpha: float
    alternative: str

    @property
    def passed(self) -> tuple[bool, ...]:
        """Per window: Holm-significant and the CI clears the threshold."""
        return tuple(bool(r.passed) for r in self.results)

    @property
    def any_passed(self) -> bool:
        return any(self.passed)

    @property
    def untestable(self) -> str:
        """Why no window could be tested ("" when some could)."""
        reasons = [r.untestable for r in self.results]
        return "" if not all(reasons) else f"no window can be tested: {reasons[0]}"

    def union_result(self) -> TestResult:
        """The sweep as one result: the strongest window's, passing when any window passes
        after the correction (the union), untestable when no window can be tested."""
        r = self.results[self.best]
        if self.untestable:
            return replace(r, details={**r.details, "untestable": self.untestable})
        return replace(r, passed=self.any_passed, details={**r.details, "windows_passed": list(self.where)})

    @property
    def where(self) -> tuple[str, ...]:
        """Labels of the windows that pass: where the effect sits."""
        return tuple(lab for lab, ok in zip(self.labels, self.passed) if ok)

    @property
    def best(self) -> int:
        """Index of the window with the largest estimate in the alternative's direction."""
        est = np.array([math.nan if r.untestable else r.estimate for r in self.results], dtype=float)
        if self.alternative == "less":
            est = -est
        elif self.alternative == "two-sided":
            est = np.abs(est)
        return int(np.nanargmax(est)) if np.isfinite(est).any() else 0

    def summary(self) -> str:
        """One line: how many windows pass, which, and the strongest window's summary."""
        b = self.best
        where = ", ".join(self.where) or "none"
        return (
            f"{sum(self.passed)}/{len(self.results)} windows pass after Holm correction (alpha {_fmt(self.alpha)}):"
            f" {where}; strongest {self.labels[b]}: {self.results[b].summary()}"
        )


# ---- formatting --------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "none"
    x = float(x)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        return f"{x:.2e}"
    return f"{x:.3g}"


def nanmean(x: Any) -> float:
    """Mean over the finite values; NaN (not a warning) when there are none."""
    x = np.asarray(x, dtype=float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else math.nan


def format_p(p: float | None) -> str:
    """A p-value for people: two significant digits, "—" when there is none."""
    if p is None or not math.isfinite(p):
        return "—"
    if p >= 1e-3 or p == 0:
        return f"{p:.2g}"
    mant, exp = f"{p:.0e}".split("e")
    return f"{mant}e{int(exp)}"


def _pct(x: float, sign: bool = True) -> str:
    if x is None or math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:+.0%}" if sign else f"{x:.0%}"


# ---- input handling ----------------------------------------------------------------------


def _check_alternative(alternative: str) -> str:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}")
    return alternative


def _as_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _clean(x: Any, name: str = "x", min_n: int = 1) -> tuple[np.ndarray, int]:
    """Drop NaN (unscored) values; return (values, number dropped)."""
    arr = _as_1d(x, name)
    keep = ~np.isnan(arr)
    n_nan = int(arr.size - keep.sum())
    if keep.sum() < min_n:
        raise ValueError(f"{name}: {int(keep.sum())} scored values ({n_nan} NaN of {arr.size}); need at least {min_n}")
    return arr[keep], n_nan


def _clean_pairs(a: Any, b: Any, min_n: int = 1) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop pairs where either side is NaN; return (a, b, number of pairs dropped)."""
    a, b = _as_1d(a, "a"), _as_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples must have equal length, got {a.size} and {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    n_nan = int(a.size - keep.sum())
    if keep.sum() < min_n:
        raise ValueError(
            f"{int(keep.sum())} complete pairs ({n_nan} with a NaN of {a.size}); need at least {min_n}"
        )
    return a[keep], b[keep], n_nan


def _check_alpha(alpha: float) -> None:
    if not 0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")


def _untestable(name: str, reason: str, n: int, alternative: str, threshold: float | None, alpha: float,
                estimate: float = math.nan, **details: Any) -> TestResult:
    """A result that says the data cannot test the claim (never a pass, never an error)."""
    return TestResult(
        name=name, estimate=float(estimate), ci_low=math.nan, ci_high=math.nan, p_value=math.nan, n=int(n),
        effect_size=math.nan, effect_name="", threshold=threshold, alternative=alternative, passed=False,
        details={"untestable": reason, "alpha": alpha, **details}, confidence=1 - alpha,
    )


def _too_few(name: str, n: int, min_n: int, n_nan: int, alternative: str, threshold: float | None,
             alpha: float) -> TestResult | None:
    if n >= min_n:
        return None
    return _untestable(name, f"{n} scored values ({n_nan} unscored), fewer than the {min_n} this test needs",
                       n, alternative, threshold, alpha, n_nan=n_nan)


def _boot_p(boot: np.ndarray, bound: float, side: str, estimate: float | None = None) -> float:
    """p-value of H0 "the statistic is on the wrong side of `bound`" from its bootstrap
    distribution: the estimate's distance to the bound in bootstrap standard errors, normal
    tail, doubled, so that p < alpha matches the two-sided 1 - alpha CI clearing the bound
    (the convention of every CI check here). Smooth: a count of resamples beyond the bound
    could not go below 2 / (n_boot + 1), which Holm over 36 windows would hit."""
    ok = boot[~np.isnan(boot)]
    if ok.size < 2:
        return math.nan
    est = float(np.mean(ok)) if estimate is None else float(estimate)
    se = float(ok.std(ddof=1))
    if se == 0:
        beyond = est > bound if side == "greater" else est < bound
        return 0.0 if beyond else 1.0
    z = (est - bound) / se if side == "greater" else (bound - est) / se
    return float(min(1.0, 2 * sps.norm.sf(z)))


def _threshold_p(boot: np.ndarray, threshold: float, alternative: str) -> float:
    """`_boot_p` of the threshold for an alternative ("two-sided": |effect| > |threshold|)."""
    if alternative == "two-sided":
        t = abs(threshold)
        return min(_boot_p(boot, t, "greater"), _boot_p(boot, -t, "less"))
    return _boot_p(boot, threshold, alternative)


def _room(base_mean: float, threshold: float, relative: float | None, alternative: str,
          bounds: tuple[float, float] | None) -> str:
    """Why a baseline leaves no room for the effect ("" when it does): scores bounded by
    `bounds` cannot rise above the ceiling or fall below the floor, and a relative change of
    a baseline at the floor is undefined."""
    if bounds is None:
        return ""
    lo, hi = bounds
    span = hi - lo
    floor_eps = 0.02 * span  # a baseline within 2% of the floor: nothing to be relative to
    if relative is not None and base_mean - lo <= floor_eps:
        return f"baseline mean {base_mean:.3g} at the floor {lo:g}: a relative change is undefined"
    need = abs(threshold)
    if relative is not None:
        need = max(need, abs(relative) * (base_mean - lo))
    if alternative == "greater" and hi - base_mean <= need:
        return f"baseline mean {base_mean:.3g} at the ceiling {hi:g}: no room for a gain of {need:.3g}"
    if alternative == "less" and base_mean - lo <= need:
        return f"baseline mean {base_mean:.3g} at the floor {lo:g}: no room for a drop of {need:.3g}"
    return ""


# ---- bootstrap machinery -----------------------------------------------------------------


def _bootstrap(
    rng: np.random.Generator, n_boot: int, sizes: Sequence[int], fn: Callable[..., np.ndarray]
) -> np.ndarray:
    """Evaluate `fn(*index_matrices)` over `n_boot` resamples drawn in chunks.

    Each index matrix has one row per resample (indices into a sample of the given size).
    `fn` returns one value per row, shape (m,), or several, shape (k, m); the result is
    (n_boot,) or (k, n_boot).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    chunk = max(1, _CHUNK // max(1, sum(sizes)))
    parts = []
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        idx = [rng.integers(0, n, size=(m, n)) for n in sizes]
        with np.errstate(divide="ignore", invalid="ignore"):
            parts.append(np.asarray(fn(*idx), dtype=float))
    return np.concatenate(parts, axis=-1)


def _percentile_ci(boot: np.ndarray, confidence: float) -> tuple[float, float, int]:
    """Percentile interval; NaN replicates (e.g. a ratio over a zero mean) are ignored and counted."""
    ok = ~np.isnan(boot)
    n_bad = int(boot.size - ok.sum())
    if not ok.any():
        return math.nan, math.nan, n_bad
    q = (1 - confidence) / 2
    lo, hi = np.quantile(boot[ok], [q, 1 - q])
    return float(lo), float(hi), n_bad


def _beyond(lo: float, hi: float, threshold: float, alternative: str, symmetric: bool) -> bool:
    """Whether the CI lies beyond `threshold` on the alternative's side."""
    if math.isnan(lo) or math.isnan(hi):
        return False
    if alternative == "greater":
        return lo > threshold
    if alternative == "less":
        return hi < threshold
    if symmetric:
        t = abs(threshold)
        return lo > t or hi < -t
    return lo > threshold or hi < threshold


_FAST_STATS: dict[Any, Callable[[np.ndarray], np.ndarray]] = {
    np.mean: lambda m: m.mean(axis=1),
    np.median: lambda m: np.median(m, axis=1),
    np.std: lambda m: m.std(axis=1),
}


def bootstrap_ci(
    x: Any,
    stat: Callable[..., float] = np.mean,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    paired_with: Any | None = None,
    method: str = "percentile",
    stat_name: str | None = None,
) -> TestResult:
    """Bootstrap CI of ``stat(x)`` (or ``stat(x, y)`` over resampled pairs if `paired_with`).

    NaN values (pairs with a NaN on either side) are excluded and counted in
    ``details["n_nan"]``. `method` is "percentile" or "bca" (bias-corrected and accelerated,
    which corrects a skewed or biased bootstrap distribution; uses a jackknife, n extra
    evaluations of `stat`). `stat_name` labels the estimate in the summary (default: the
    function's name). `passed` is None: this is an estimate, not a test.
    """
    _check_alpha(alpha)
    if method not in ("percentile", "bca"):
        raise ValueError(f"method must be 'percentile' or 'bca', got {method!r}")
    rng = np.random.default_rng(seed)
    if paired_with is None:
        xs, n_nan = _clean(x)
        ys = None
        est = float(stat(xs))
        fast = _FAST_STATS.get(stat)
        if fast is not None:
            boot = _bootstrap(rng, n_boot, [xs.size], lambda i: fast(xs[i]))
        else:
            boot = _bootstrap(rng, n_boot, [xs.size], lambda i: np.array([stat(xs[r]) for r in i]))
    else:
        xs, ys, n_nan = _clean_pairs(x, paired_with)
        est = float(stat(xs, ys))
        boot = _bootstrap(rng, n_boot, [xs.size], lambda i: np.array([stat(xs[r], ys[r]) for r in i]))
    confidence = 1 - alpha
    if method == "bca":
        lo, hi, n_bad = _bca_ci(boot, est, xs, ys, stat, confidence)
    else:
        lo, hi, n_bad = _percentile_ci(boot, confidence)
    name = stat_name or getattr(stat, "__name__", "stat")
    return TestResult(
        name=f"bootstrap {'BCa' if method == 'bca' else 'percentile'}",
        estimate=est,
        ci_low=lo,
        ci_high=hi,
        p_value=math.nan,
        n=int(xs.size),
        effect_size=math.nan,
        effect_name="",
        threshold=None,
        alternative="two-sided",
        passed=None,
        details={"n_nan": n_nan, "n_boot": n_boot, "seed": seed, "method": method, "n_boot_nan": n_bad},
        estimate_name=name,
        confidence=confidence,
    )


def _bca_ci(
    boot: np.ndarray,
    est: float,
    xs: np.ndarray,
    ys: np.ndarray | None,
    stat: Callable[..., float],
    confidence: float,
) -> tuple[float, float, int]:
    ok = boot[~np.isnan(boot)]
    n_bad = int(boot.size - ok.size)
    n = xs.size
    if ok.size == 0 or n < 3 or np.all(ok == ok[0]):
        lo, hi, _ = _percentile_ci(boot, confidence)  # degenerate: nothing to correct
        return lo, hi, n_bad
    # bias correction: where the estimate sits in the bootstrap distribution
    frac = (np.sum(ok < est) + 0.5 * np.sum(ok == est)) / ok.size
    z0 = sps.norm.ppf(np.clip(frac, 1 / (2 * ok.size), 1 - 1 / (2 * ok.size)))
    # acceleration from the jackknife (skewness of the influence values)
    mask = np.ones(n, dtype=bool)
    jack = np.empty(n)
    for i in range(n):
        mask[i] = False
        jack[i] = stat(xs[mask]) if ys is None else stat(xs[mask], ys[mask])
        mask[i] = True
    dev = jack.mean() - jack
    denom = 6.0 * (np.sum(dev**2) ** 1.5)
    a = float(np.sum(dev**3) / denom) if denom > 0 else 0.0
    q = (1 - confidence) / 2
    zs = sps.norm.ppf([q, 1 - q])
    adj = sps.norm.cdf(z0 + (z0 + zs) / (1 - a * (z0 + zs)))
    lo, hi = np.quantile(ok, np.clip(adj, 0, 1))
    return float(lo), float(hi), n_bad


# ---- effect sizes ------------------------------------------------------------------------


def _rank_biserial_paired(d: np.ndarray) -> float:
    """Matched-pairs rank-biserial r = (R+ - R-) / (n (n + 1) / 2), zeros ranked (Pratt).

    Zero differences take the lowest ranks and count in the denominator, so many unchanged
    pairs shrink r instead of being dropped (dropping them would report r = 1 for five
    tiny gains among 245 ties).
    """
    if d.size == 0:
        return math.nan
    ranks = sps.rankdata(np.abs(d))
    total = d.size * (d.size + 1) / 2
    return float((ranks[d > 0].sum() - ranks[d < 0].sum()) / total)


def _cohen_dz(d: np.ndarray, center: float = 0.0) -> float:
    if d.size < 2:
        return math.nan
    sd = d.std(ddof=1)
    m = d.mean() - center
    if sd == 0:
        return 0.0 if m == 0 else math.copysign(math.inf, m)
    return float(m / sd)


def _is_binary(*arrays: np.ndarray) -> bool:
    return all(np.isin(a, (0.0, 1.0)).all() for a in arrays)


# ---- paired tests ------------------------------------------------------------------------


def _paired_p(d: np.ndarray, alternative: str, method: str) -> tuple[float, dict[str, Any]]:
    info: dict[str, Any] = {}
    if np.all(d == 0):
        info["degenerate"] = "all differences are zero"
        return 1.0, info
    if method == "mcnemar":
        gains, losses = int((d > 0).sum()), int((d < 0).sum())
        info.update(gains=gains, losses=losses)
        return float(sps.binomtest(gains, gains + losses, 0.5, alternative=alternative).pvalue), info
    if method == "wilcoxon":
        info["zero_method"] = "pratt"
        res = sps.wilcoxon(d, zero_method="pratt", alternative=alternative)
        return float(res.pvalue), info
    if method == "t":
        if d.size < 2 or np.allclose(d, d[0], rtol=1e-12, atol=0):
            # constant nonzero difference: a t-test is undefined; the sign decides
            info["degenerate"] = "constant difference"
            m = d.mean()
            sure = {"greater": m > 0, "less": m < 0, "two-sided": m != 0}[alternative]
            return (0.0 if sure else 1.0), info
        return float(sps.ttest_1samp(d, 0.0, alternative=alternative).pvalue), info
    raise ValueError(f"method must be 'auto', 'wilcoxon', 'mcnemar' or 't', got {method!r}")


_PAIRED_NAMES = {
    "wilcoxon": "Wilcoxon signed-rank",
    "mcnemar": "exact McNemar",
    "t": "paired t",
}


def paired_test(
    a: Any,
    b: Any,
    alternative: str = "two-sided",
    threshold: float = 0.0,
    *,
    threshold_relative: float | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    method: str = "auto",
    min_n: int = MIN_N,
    bounds: tuple[float, float] | None = None,
) -> TestResult:
    """Paired test of `b` (e.g. knockout) against `a` (baseline) on the same samples.

    Estimate: mean of ``d = b - a`` with a bootstrap CI. p-value: exact McNemar (sign test
    on the discordant pairs) when both arrays are 0/1, else Wilcoxon signed-rank (Pratt's
    zero handling); ``method`` forces "wilcoxon", "mcnemar" or "t". Effect: matched-pairs
    rank-biserial r (Cohen's dz in details). ``details["relative_change"]`` is
    ``mean(b - a) / mean(a)`` with its bootstrap CI, reported beside ``baseline_mean``: a
    gain is always shown with its baseline. "greater" means b > a. Passes when p < alpha and
    the bootstrap p-values of the thresholds are below alpha: ``details["p_threshold"]`` for
    H0 ``mean(d) <= threshold`` (the CI clears it) and, with `threshold_relative` r,
    ``details["p_relative"]`` for H0 ``mean(b - (1 + r) a) <= 0``, the relative threshold in
    linear form (no ratio of resampled means, which is undefined where they are 0).
    `bounds` (e.g. (0, 1) for fidelity) makes a baseline at the floor or ceiling, which
    leaves no room for the effect, untestable.
    """
    _check_alternative(alternative)
    _check_alpha(alpha)
    a, b, n_nan = _clean_pairs(a, b, min_n=0)
    name = _PAIRED_NAMES.get(method, "paired test")
    short = _too_few(name, a.size, min_n, n_nan, alternative, threshold, alpha)
    if short is not None:
        return short
    room = _room(float(a.mean()), threshold, threshold_relative, alternative, bounds)
    if room:
        return _untestable(name, room, a.size, alternative, threshold, alpha, estimate=float((b - a).mean()),
                           n_nan=n_nan, baseline_mean=float(a.mean()))
    d = b - a
    if method == "auto":
        method = "mcnemar" if _is_binary(a, b) else "wilcoxon"
    p, info = _paired_p(d, alternative, method)
    return _paired_result(
        a, b, d, p, info, method, alternative, threshold, threshold_relative, alpha, n_boot, seed, n_nan
    )


def _paired_result(
    a: np.ndarray,
    b: np.ndarray,
    d: np.ndarray,
    p: float,
    info: dict[str, Any],
    method: str,
    alternative: str,
    threshold: float,
    threshold_relative: float | None,
    alpha: float,
    n_boot: int,
    seed: int,
    n_nan: int,
) -> TestResult:
    rng = np.random.default_rng(seed)
    rel = 0.0 if threshold_relative is None else float(threshold_relative)
    if alternative == "two-sided":
        lin = (b - (1 + abs(rel)) * a, b - (1 - abs(rel)) * a)
    else:
        lin = (b - (1 + rel) * a, b - (1 + rel) * a)
    diff_means, base_means, lin_hi, lin_lo = _bootstrap(
        rng, n_boot, [d.size],
        lambda i: (d[i].mean(axis=1), a[i].mean(axis=1), lin[0][i].mean(axis=1), lin[1][i].mean(axis=1)))
    p_thr = _threshold_p(diff_means, threshold, alternative)
    p_rel = math.nan
    if threshold_relative is not None:
        if alternative == "two-sided":
            p_rel = min(_boot_p(lin_hi, 0.0, "greater"), _boot_p(lin_lo, 0.0, "less"))
        else:
            p_rel = _boot_p(lin_hi, 0.0, alternative)
    confidence = 1 - alpha
    lo, hi, _ = _percentile_ci(diff_means, confidence)
    est = float(d.mean())
    base = float(a.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = est / base if base != 0 else math.nan
        rel_boot = np.where(base_means != 0, diff_means / np.where(base_means != 0, base_means, 1.0), np.nan)
    rel_lo, rel_hi, rel_bad = _percentile_ci(rel_boot, confidence)
    passed = bool(p < alpha and p_thr < alpha)
    if threshold_relative is not None:
        passed = passed and bool(p_rel < alpha)
    details = {
        "p_threshold": p_thr,
        "p_relative": p_rel,
        "method": method,
        "n_nan": n_nan,
        "baseline_mean": base,
        "treatment_mean": float(b.mean()),
        "relative_change": rel,
        "relative_ci": (rel_lo, rel_hi),
        "cohen_dz": _cohen_dz(d),
        "n_zero": int((d == 0).sum()),
        "threshold_relative": threshold_relative,
        "alpha": alpha,
        "n_boot": n_boot,
        "seed": seed,
        **info,
    }
    if base == 0:
        details["relative_note"] = "baseline mean is 0: relative change undefined"
    elif rel_bad:
        details["relative_boot_nan"] = rel_bad
    return TestResult(
        name=_PAIRED_NAMES[method],
        estimate=est,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        n=int(d.size),
        effect_size=_rank_biserial_paired(d),
        effect_name="rank-biserial r",
        threshold=threshold,
        alternative=alternative,
        passed=passed,
        details=details,
        estimate_name="mean diff",
        confidence=confidence,
    )


# ---- independent samples -----------------------------------------------------------------


def independent_test(
    x: Any,
    y: Any,
    alternative: str = "two-sided",
    threshold: float = 0.0,
    *,
    threshold_relative_drop: float | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    min_n: int = MIN_N,
) -> TestResult:
    """Rank test of independent samples `x` (e.g. factual) against `y` (e.g. counterfactual).

    Estimate: ``mean(x) - mean(y)`` with a bootstrap CI (x and y resampled independently).
    p-value: Mann-Whitney U ("greater" means x tends to exceed y). Effect: rank-biserial
    ``r = 2 U / (n_x n_y) - 1`` (positive when x > y). ``details["relative_drop"]`` is
    ``(mean(x) - mean(y)) / mean(x)`` with its bootstrap CI, beside both means. Passes when
    p < alpha, the difference's CI clears `threshold` and, if given, the relative drop r
    holds in linear form: H0 ``(1 - r) mean(x) - mean(y) <= 0`` rejected by the bootstrap
    (``details["p_relative"]``; no ratio of resampled means). Fewer than `min_n` values in
    either sample, or mean(x) at 0 with a relative threshold, are untestable.
    """
    _check_alternative(alternative)
    _check_alpha(alpha)
    xs, nan_x = _clean(x, "x", min_n=0)
    ys, nan_y = _clean(y, "y", min_n=0)
    if min(xs.size, ys.size) < min_n:
        return _untestable("Mann-Whitney U", f"{xs.size} and {ys.size} scored values, fewer than the {min_n} "
                           "per sample this test needs", xs.size + ys.size, alternative, threshold, alpha,
                           n_nan=nan_x + nan_y, n_text=f"{xs.size}+{ys.size}")
    if threshold_relative_drop is not None and xs.mean() <= 0:
        return _untestable("Mann-Whitney U", f"mean(x) = {xs.mean():.3g}: a relative drop is undefined",
                           xs.size + ys.size, alternative, threshold, alpha, n_text=f"{xs.size}+{ys.size}")
    res = sps.mannwhitneyu(xs, ys, alternative=alternative)
    u = float(res.statistic)
    r = 2 * u / (xs.size * ys.size) - 1
    rng = np.random.default_rng(seed)
    mx_b, my_b = _bootstrap(rng, n_boot, [xs.size, ys.size], lambda i, j: (xs[i].mean(axis=1), ys[j].mean(axis=1)))
    diff_b = mx_b - my_b
    confidence = 1 - alpha
    lo, hi, _ = _percentile_ci(diff_b, confidence)
    mx, my = float(xs.mean()), float(ys.mean())
    drop = (mx - my) / mx if mx != 0 else math.nan
    drop_b = np.where(mx_b != 0, diff_b / np.where(mx_b != 0, mx_b, 1.0), np.nan)
    d_lo, d_hi, d_bad = _percentile_ci(drop_b, confidence)
    p_thr = _threshold_p(diff_b, threshold, alternative)
    passed = bool(res.pvalue < alpha and p_thr < alpha)
    p_rel = math.nan
    if threshold_relative_drop is not None:
        rd = float(threshold_relative_drop)
        if alternative == "two-sided":
            p_rel = min(_boot_p((1 - abs(rd)) * mx_b - my_b, 0.0, "greater"),
                        _boot_p((1 + abs(rd)) * mx_b - my_b, 0.0, "less"))
        else:
            p_rel = _boot_p((1 - rd) * mx_b - my_b, 0.0, alternative)
        passed = passed and bool(p_rel < alpha)
    details = {
        "p_threshold": p_thr,
        "p_relative": p_rel,
        "method": "mannwhitneyu",
        "u": u,
        "n_x": int(xs.size),
        "n_y": int(ys.size),
        "n_text": f"{xs.size}+{ys.size}",
        "n_nan": nan_x + nan_y,
        "n_nan_x": nan_x,
        "n_nan_y": nan_y,
        "mean_x": mx,
        "mean_y": my,
        "relative_drop": drop,
        "relative_drop_ci": (d_lo, d_hi),
        "threshold_relative_drop": threshold_relative_drop,
        "alpha": alpha,
        "n_boot": n_boot,
        "seed": seed,
    }
    if mx == 0:
        details["relative_note"] = "mean(x) is 0: relative drop undefined"
    elif d_bad:
        details["relative_boot_nan"] = d_bad
    return TestResult(
        name="Mann-Whitney U",
        estimate=mx - my,
        ci_low=lo,
        ci_high=hi,
        p_value=float(res.pvalue),
        n=int(xs.size + ys.size),
        effect_size=float(r),
        effect_name="rank-biserial r",
        threshold=threshold,
        alternative=alternative,
        passed=passed,
        details=details,
        estimate_name="mean diff",
        confidence=confidence,
    )


# ---- equivalence -------------------------------------------------------------------------


# Below this many changed pairs the bootstrap-t of a bounded difference is too discrete to hold
# its size (rare one-way changes, scores 1 -> 0 in a tenth of pairs: 0.14 at n = 30, 0.10 at
# n = 50 with ~3-5 changed pairs); with bounds the exact count test decides there instead.
SPARSE_CHANGES = 20


def _tost_counts(d: np.ndarray, margin: float, alpha: float, width: float, a: np.ndarray, b: np.ndarray,
                 n_nan: int) -> TestResult:
    """TOST from the counts of pairs that went down and up (see `tost_paired`): exact, and
    conservative where changes are smaller than `width` or cancel."""
    if not width > 0:
        raise ValueError(f"bounds must have a positive width, got {width}")
    n = d.size
    down, up = int(np.sum(d < 0)), int(np.sum(d > 0))
    q = min(1.0, margin / width)
    # H0 mean <= -margin needs P(d < 0) >= margin / width: few pairs went down rejects it
    p_lower, p_upper = float(sps.binom.cdf(down, n, q)), float(sps.binom.cdf(up, n, q))
    p = max(p_lower, p_upper)

    def upper(k: int) -> float:  # one-sided Clopper-Pearson at 1 - alpha (TOST's 1 - 2 alpha interval)
        return 1.0 if k >= n else float(sps.beta.ppf(1 - alpha, k + 1, n - k))

    lo, hi = -width * upper(down), width * upper(up)
    inside = bool(-margin < lo and hi < margin)
    return TestResult(
        name="TOST exact (no pair changed)" if down + up == 0 else "TOST exact (changed-pair counts)",
        estimate=float(d.mean()), ci_low=lo, ci_high=hi, p_value=p, n=int(n),
        effect_size=_cohen_dz(d) if down + up else 0.0, effect_name="Cohen's dz", threshold=float(margin),
        alternative="equivalence", passed=bool(p < alpha and inside),
        details={"changed_pairs": down + up, "down": down, "up": up, "p_lower": p_lower, "p_upper": p_upper,
                 "width": width, "bootstrap_ci_inside_margin": inside, "baseline_mean": float(a.mean()),
                 "treatment_mean": float(b.mean()), "n_nan": n_nan, "alpha": alpha},
        confidence=1 - 2 * alpha,
    )


def tost_paired(
    a: Any, b: Any, margin: float, alpha: float = 0.05, *, n_boot: int = 2000, seed: int = 0, min_n: int = MIN_N,
    bounds: tuple[float, float] | None = None,
) -> TestResult:
    """Equivalence of paired samples: is the mean of ``b - a`` within ``±margin``?

    Two one-sided tests of the mean difference (H0: mean <= -margin; H0: mean >= +margin) by
    studentized bootstrap; the p-value is the larger of the two, and the bootstrap-t interval
    at level ``1 - 2 alpha`` (the interval TOST corresponds to) must lie inside the margin.
    Passes when both hold (the paired t-test's p-values are kept in ``details["t_p"]``).
    Used for "barely moves" claims.

    Where the values are known to lie in ``bounds`` (fidelity scores: (0, 1)) and fewer than
    `SPARSE_CHANGES` pairs changed, an exact test decides instead (the bootstrap of a few
    changes is too discrete to hold its size; with none it has no variation at all): with
    |d| <= width, H0 mean <= -margin needs a share >= margin / width of pairs that went down,
    so the p-value of that side is P(Binomial(n, margin / width) <= pairs that went down), and
    the same upwards (n unchanged pairs: (1 - margin / width) ** n). The interval is +-width
    times the one-sided Clopper-Pearson bounds on those shares. Exact, and conservative where
    changes are smaller than the width or cancel. With no pair changed it says the score did
    not move, not why (a model that ignores the blocked input moves nothing either: the
    attention claims tell which). Without ``bounds``, identical differences (every pair moved
    by the same amount, or none) are untestable.
    """
    _check_alpha(alpha)
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    a, b, n_nan = _clean_pairs(a, b, min_n=0)
    short = _too_few("TOST bootstrap-t", a.size, max(min_n, 2), n_nan, "equivalence", float(margin), alpha)
    if short is not None:
        return short
    d = b - a
    d = np.where(np.abs(d) <= 1e-12, 0.0, d)  # unchanged up to rounding
    if bounds is not None and np.count_nonzero(d) < SPARSE_CHANGES:
        return _tost_counts(d, margin, alpha, float(bounds[1] - bounds[0]), a, b, n_nan)
    if np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # identical up to rounding
        return _untestable("TOST bootstrap-t", f"all {d.size} differences equal {d[0]:.3g}: no variation to test "
                           "equivalence with", d.size, "equivalence", float(margin), alpha, estimate=float(d[0]))
    n = d.size
    m = float(d.mean())
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    df = n - 1
    t_p_lower = float(sps.t.sf((m + margin) / se, df))
    t_p_upper = float(sps.t.cdf((m - margin) / se, df))
    tq = sps.t.ppf(1 - alpha, df)
    t_lo, t_hi = m - tq * se, m + tq * se
    # The two one-sided tests by studentized bootstrap: differences of judge scores are
    # bounded and skewed near the floor and ceiling, where the t-test's one-sided size drifts
    # above alpha at n = 50 (calibration: 0.073 at the margin); the bootstrap-t holds it.
    rng = np.random.default_rng(seed)
    means, sds = _bootstrap(rng, n_boot, [n], lambda i: (d[i].mean(axis=1), d[i].std(axis=1, ddof=1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        tstar = (means - m) / (sds / math.sqrt(n))
    tstar = tstar[np.isfinite(tstar)]
    p_lower = float((np.sum(tstar >= (m + margin) / se) + 1) / (tstar.size + 1))  # H0: mean <= -margin
    p_upper = float((np.sum(tstar <= (m - margin) / se) + 1) / (tstar.size + 1))  # H0: mean >= +margin
    p = max(p_lower, p_upper)
    confidence = 1 - 2 * alpha
    b_lo, b_hi = np.quantile(tstar, [alpha, 1 - alpha])
    lo, hi = m - b_hi * se, m - b_lo * se  # the bootstrap-t interval TOST corresponds to
    inside = bool(-margin < lo and hi < margin)
    return TestResult(
        name="TOST bootstrap-t",
        estimate=m,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        n=int(n),
        effect_size=_cohen_dz(d),
        effect_name="Cohen's dz",
        threshold=float(margin),
        alternative="equivalence",
        passed=bool(p < alpha and inside),
        details={
            "p_lower": p_lower,
            "p_upper": p_upper,
            "t_p": (t_p_lower, t_p_upper),
            "t_ci": (float(t_lo), float(t_hi)),
            "bootstrap_ci_inside_margin": inside,
            "baseline_mean": float(a.mean()),
            "treatment_mean": float(b.mean()),
            "n_nan": n_nan,
            "alpha": alpha,
            "n_boot": n_boot,
            "seed": seed,
        },
        estimate_name="mean diff",
        confidence=confidence,
    )


# ---- multiple comparisons ----------------------------------------------------------------


def holm(p_values: Any) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, in the input order.

    ``adj_(i) = max_{j <= i} min(1, (m - j) p_(j))`` over the ascending order. NaN p-values
    stay NaN and do not count in m (a window that could not be tested is no comparison).
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"p_values must be 1-D, got shape {p.shape}")
    if np.any((p < 0) | (p > 1)):
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


def union_p(result: TestResult) -> float:
    """A result's p-value as a member of a family tested for "some member has the effect
    beyond its threshold": the largest of its p against no effect, against the threshold and
    against the relative threshold (each must reject); NaN when it is untestable."""
    if result.untestable:
        return math.nan
    d = result.details
    ps = [result.p_value, d.get("p_threshold", 0.0)]
    if d.get("threshold_relative") is not None or d.get("threshold_relative_drop") is not None:
        ps.append(d.get("p_relative", math.nan))
    return float(max(ps))


def holm_union(results: Sequence[TestResult]) -> np.ndarray:
    """Holm-adjusted `union_p` of each result: a member passes the family at level alpha when
    its adjusted value is below alpha (untestable members are left out of the family)."""
    return holm([union_p(r) for r in results])


def sweep_test(
    baseline: Any,
    per_window: Sequence[Any],
    alternative: str = "two-sided",
    alpha: float = 0.05,
    threshold: float = 0.0,
    *,
    threshold_relative: float | None = None,
    labels: Sequence[str] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    method: str = "auto",
    min_n: int = MIN_N,
    bounds: tuple[float, float] | None = None,
) -> SweepResult:
    """Paired test of each window's scores against `baseline`, corrected for choosing among
    the windows.

    Each window gets `paired_test` (same seed). Its p-value for the sweep is the largest of
    its p against no effect, against the threshold (H0 ``effect <= threshold``) and against
    the relative threshold: a window passes only when all three reject, so the union over
    windows (some window has the effect beyond the threshold) is tested with Holm over
    ``max(p)`` at level alpha; ``details["p_holm"]`` holds the adjusted value (the raw p
    against zero stays in `p_value`). A window that cannot be tested (no scored pair, too
    few, no room) is left out of the family. The result says which windows pass: where in
    depth the effect sits.
    """
    if len(per_window) == 0:
        raise ValueError("per_window is empty: nothing to sweep")
    if labels is None:
        labels = [f"window {i}" for i in range(len(per_window))]
    if len(labels) != len(per_window):
        raise ValueError(f"{len(labels)} labels for {len(per_window)} windows")
    raw = [
        paired_test(
            baseline, w, alternative, threshold, threshold_relative=threshold_relative, alpha=alpha,
            n_boot=n_boot, seed=seed, method=method, min_n=min_n, bounds=bounds,
        )
        for w in per_window
    ]
    adj = holm_union(raw)
    results = []
    for r, pa, lab in zip(raw, adj, labels):
        ok = bool(not r.untestable and pa < alpha)
        results.append(replace(r, passed=ok, details={**r.details, "p_holm": float(pa), "window": str(lab)}))
    return SweepResult(
        labels=tuple(str(x) for x in labels),
        results=tuple(results),
        p_adjusted=tuple(float(x) for x in adj),
        significant=tuple(bool(x < alpha) for x in adj),
        alpha=alpha,
        alternative=alternative,
    )


# ---- one sample, proportions, correlation ------------------------------------------------


def one_sample_test(
    x: Any,
    threshold: float,
    alternative: str = "two-sided",
    *,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    test: str = "t",
    min_n: int = MIN_N,
) -> TestResult:
    """Is the mean of `x` above / below / different from the fixed value `threshold`?

    Estimate: mean with a bootstrap CI. p-value: one-sample t-test of the mean (default:
    the claim is about the mean, and with many values the t-test is robust), or
    ``test="wilcoxon"`` (signed-rank on ``x - threshold``: about the pseudo-median), or
    ``test="bootstrap-t"`` (studentized bootstrap of the mean: holds its size on skewed data
    such as per-clip KL, where the t-test does not). Effect: Cohen's d of ``x - threshold``.
    Passes when p < alpha and the CI clears `threshold`. Fewer than `min_n` values, or
    identical values, are untestable.
    """
    _check_alternative(alternative)
    _check_alpha(alpha)
    xs, n_nan = _clean(x, "x", min_n=0)
    label = {"t": "one-sample t", "wilcoxon": "Wilcoxon signed-rank", "bootstrap-t": "bootstrap-t"}.get(test, test)
    short = _too_few(label, xs.size, max(min_n, 2), n_nan, alternative, float(threshold), alpha)
    if short is not None:
        return short
    if np.ptp(xs) <= 1e-12 * max(1.0, float(np.abs(xs).max())):  # identical up to rounding
        return _untestable(label, f"all {xs.size} values equal {xs[0]:.3g}: no variation to test with", xs.size,
                           alternative, float(threshold), alpha, estimate=float(xs[0]), n_nan=n_nan)
    dev = xs - threshold
    if test == "bootstrap-t":
        return _bootstrap_t(xs, threshold, alternative, alpha, n_boot, seed, n_nan)
    if test == "t":
        p, info = _paired_p(dev, alternative, "t")
        name = "one-sample t"
    elif test == "wilcoxon":
        p, info = _paired_p(dev, alternative, "wilcoxon")
        name = "Wilcoxon signed-rank"
    else:
        raise ValueError(f"test must be 't', 'wilcoxon' or 'bootstrap-t', got {test!r}")
    rng = np.random.default_rng(seed)
    boot = _bootstrap(rng, n_boot, [xs.size], lambda i: xs[i].mean(axis=1))
    confidence = 1 - alpha
    lo, hi, _ = _percentile_ci(boot, confidence)
    return TestResult(
        name=name,
        estimate=float(xs.mean()),
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        n=int(xs.size),
        effect_size=_cohen_dz(dev),
        effect_name="Cohen's d",
        threshold=float(threshold),
        alternative=alternative,
        passed=bool(p < alpha and _beyond(lo, hi, threshold, alternative, symmetric=False)),
        details={"n_nan": n_nan, "alpha": alpha, "n_boot": n_boot, "seed": seed, **info},
        estimate_name="mean",
        confidence=confidence,
    )


def _bootstrap_t(xs: np.ndarray, threshold: float, alternative: str, alpha: float, n_boot: int, seed: int,
                 n_nan: int) -> TestResult:
    """Studentized bootstrap test of the mean against `threshold` (see `one_sample_test`)."""
    n = xs.size
    m, se = float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(n))
    rng = np.random.default_rng(seed)
    means, sds = _bootstrap(rng, n_boot, [n], lambda i: (xs[i].mean(axis=1), xs[i].std(axis=1, ddof=1)))
    with np.errstate(divide="ignore", invalid="ignore"):
        tstar = (means - m) / (sds / math.sqrt(n))
    tstar = tstar[np.isfinite(tstar)]
    t_obs = (m - threshold) / se
    # the bootstrap distribution of the studentized mean stands in for its null distribution
    p_gt = (np.sum(tstar >= t_obs) + 1) / (tstar.size + 1)
    p_lt = (np.sum(tstar <= t_obs) + 1) / (tstar.size + 1)
    p = {"greater": p_gt, "less": p_lt, "two-sided": min(1.0, 2 * min(p_gt, p_lt))}[alternative]
    q = alpha / 2
    t_lo, t_hi = np.quantile(tstar, [q, 1 - q])
    lo, hi = m - t_hi * se, m - t_lo * se  # the bootstrap-t interval
    return TestResult(
        name="bootstrap-t", estimate=m, ci_low=float(lo), ci_high=float(hi), p_value=float(p), n=int(n),
        effect_size=_cohen_dz(xs - threshold), effect_name="Cohen's d", threshold=float(threshold),
        alternative=alternative,
        passed=bool(p < alpha and _beyond(float(lo), float(hi), threshold, alternative, symmetric=False)),
        details={"n_nan": n_nan, "alpha": alpha, "n_boot": n_boot, "seed": seed},
        estimate_name="mean", confidence=1 - alpha,
    )


def cluster_proportion_test(
    k: Any, n: Any, p0: float, alternative: str = "greater", *, alpha: float = 0.05, n_boot: int = 2000,
    seed: int = 0, min_n: int = MIN_N,
) -> TestResult:
    """A proportion over items grouped in clusters (tokens within clips): `k[i]` of `n[i]`
    items of cluster i. Estimate ``sum(k) / sum(n)``; CI and p-value from resampling whole
    clusters (items of one clip are not independent). Passes when the bootstrap p of
    H0 "proportion on the wrong side of p0" is below alpha (the CI clears p0). Fewer than
    `min_n` clusters with items are untestable."""
    _check_alternative(alternative)
    _check_alpha(alpha)
    k, n = _as_1d(k, "k"), _as_1d(n, "n")
    if k.shape != n.shape or np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= k[i] <= n[i] per cluster")
    keep = n > 0
    k, n = k[keep], n[keep]
    if k.size < min_n:
        return _untestable("cluster bootstrap", f"{k.size} clips with items, fewer than the {min_n} this test needs",
                           int(k.size), alternative, float(p0), alpha)
    est = float(k.sum() / n.sum())
    rng = np.random.default_rng(seed)
    boot = _bootstrap(rng, n_boot, [k.size], lambda i: k[i].sum(axis=1) / n[i].sum(axis=1))
    lo, hi, _ = _percentile_ci(boot, 1 - alpha)
    p = _threshold_p(boot, p0, alternative) if alternative != "two-sided" else min(
        _boot_p(boot, p0, "greater"), _boot_p(boot, p0, "less"))
    h = 2 * math.asin(math.sqrt(est)) - 2 * math.asin(math.sqrt(p0))
    return TestResult(
        name="cluster bootstrap", estimate=est, ci_low=lo, ci_high=hi, p_value=float(p), n=int(k.size),
        effect_size=h, effect_name="Cohen's h", threshold=float(p0), alternative=alternative,
        passed=bool(p < alpha), details={"items": int(n.sum()), "n_text": f"{k.size} clips, {int(n.sum())} items",
                                         "alpha": alpha, "n_boot": n_boot, "seed": seed},
        estimate_name="proportion", confidence=1 - alpha,
    )


def proportion_test(
    k: int, n: int, p0: float, alternative: str = "two-sided", *, alpha: float = 0.05, ci_method: str = "wilson",
    min_n: int = 1,
) -> TestResult:
    """Exact binomial test of a proportion ``k / n`` against `p0`.

    CI at level ``1 - alpha``: Wilson score (default) or Clopper-Pearson
    (``ci_method="clopper-pearson"``, alias "exact"). Effect: Cohen's h. Passes when
    p < alpha and the CI clears `p0` on the alternative's side.
    """
    _check_alternative(alternative)
    _check_alpha(alpha)
    if int(k) != k or int(n) != n or not 0 <= k <= n or n < 1:
        raise ValueError(f"need integers 0 <= k <= n and n >= 1, got k={k}, n={n}")
    if not 0 < p0 < 1:
        raise ValueError(f"p0 must be in (0, 1), got {p0}")
    methods = {"wilson": "wilson", "clopper-pearson": "exact", "exact": "exact"}
    if ci_method not in methods:
        raise ValueError(f"ci_method must be one of {sorted(methods)}, got {ci_method!r}")
    k, n = int(k), int(n)
    if n < min_n:
        return _untestable("exact binomial", f"{n} items, fewer than the {min_n} this test needs", n, alternative,
                           float(p0), alpha)
    res = sps.binomtest(k, n, p0, alternative=alternative)
    # two-sided CI whatever the alternative (scipy's follows the alternative), as everywhere here
    two = res if alternative == "two-sided" else sps.binomtest(k, n, p0)
    ci = two.proportion_ci(confidence_level=1 - alpha, method=methods[ci_method])
    phat = k / n
    h = 2 * math.asin(math.sqrt(phat)) - 2 * math.asin(math.sqrt(p0))
    lo, hi = float(ci.low), float(ci.high)
    return TestResult(
        name="exact binomial",
        estimate=phat,
        ci_low=lo,
        ci_high=hi,
        p_value=float(res.pvalue),
        n=n,
        effect_size=h,
        effect_name="Cohen's h",
        threshold=float(p0),
        alternative=alternative,
        passed=bool(res.pvalue < alpha and _beyond(lo, hi, p0, alternative, symmetric=False)),
        details={"k": k, "ci_method": "clopper-pearson" if methods[ci_method] == "exact" else "wilson", "alpha": alpha},
        estimate_name="proportion",
        confidence=1 - alpha,
    )


def spearman_ci(
    x: Any,
    y: Any,
    n_boot: int = 2000,
    seed: int = 0,
    *,
    alpha: float = 0.05,
    alternative: str = "two-sided",
    threshold: float = 0.0,
) -> TestResult:
    """Spearman's rho of paired `x`, `y` with a bootstrap CI (pairs resampled) and its p-value.

    Pairs with a NaN are dropped and counted. Resamples where one side is constant (rho
    undefined) are ignored and counted in ``details["n_boot_nan"]``. Passes when p < alpha
    and the CI clears `threshold` (e.g. 0.7 for "the judge agrees with humans").
    """
    _check_alternative(alternative)
    _check_alpha(alpha)
    xs, ys, n_nan = _clean_pairs(x, y, min_n=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: rho is NaN, reported as such
        res = sps.spearmanr(xs, ys, alternative=alternative)
    rho, p = float(res.statistic), float(res.pvalue)

    def rhos(i: np.ndarray) -> np.ndarray:
        rx = sps.rankdata(xs[i], axis=1)
        ry = sps.rankdata(ys[i], axis=1)
        rx -= rx.mean(axis=1, keepdims=True)
        ry -= ry.mean(axis=1, keepdims=True)
        den = np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))
        return np.where(den > 0, (rx * ry).sum(axis=1) / np.where(den > 0, den, 1.0), np.nan)

    rng = np.random.default_rng(seed)
    boot = _bootstrap(rng, n_boot, [xs.size], rhos)
    confidence = 1 - alpha
    lo, hi, n_bad = _percentile_ci(boot, confidence)
    passed = None if math.isnan(p) else bool(p < alpha and _beyond(lo, hi, threshold, alternative, symmetric=False))
    return TestResult(
        name="Spearman",
        estimate=rho,
        ci_low=lo,
        ci_high=hi,
        p_value=p,
        n=int(xs.size),
        effect_size=rho,
        effect_name="rho",
        threshold=float(threshold),
        alternative=alternative,
        passed=passed,
        details={"n_nan": n_nan, "n_boot_nan": n_bad, "alpha": alpha, "n_boot": n_boot, "seed": seed},
        estimate_name="rho",
        confidence=confidence,
    )


# ---- distributions (torch) ---------------------------------------------------------------


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(p || q) along `dim` from log-probabilities, e.g. KL(AV model || base model) per token.

    Both inputs are renormalised with ``log_softmax`` (a no-op for log-probs; makes raw logits
    safe too) in at least float32. Terms where p = 0 contribute 0; q = 0 where p > 0 gives
    inf, as it should. Returns the input shape with `dim` reduced.
    """
    import torch  # lazily: the statistics above do not need torch

    dtype = torch.promote_types(torch.promote_types(logp.dtype, logq.dtype), torch.float32)
    lp = torch.log_softmax(logp.to(dtype), dim=dim)
    lq = torch.log_softmax(logq.to(dtype), dim=dim)
    p = lp.exp()
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=dtype, device=lp.device))
    out = terms.sum(dim=dim)
    # a distribution with no finite log-probability is no distribution: NaN, not 0
    dead = ~torch.isfinite(logp.to(dtype)).any(dim=dim) | ~torch.isfinite(logq.to(dtype)).any(dim=dim)
    return torch.where(dead, torch.full_like(out, math.nan), out)
