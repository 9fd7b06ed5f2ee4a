"""Agreement of a judge with human ratings: Spearman rho with a bootstrap CI, per modality.

The paper reports Spearman 0.816 (audio) and 0.732 (video) between its judge and people.
`calibrate` re-measures that for any judge on a ratings file (CSV columns: id, modality,
candidate, reference, human_score; human scores on any ordinal scale). Items the judge
leaves unscored are excluded from rho and counted.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from avprobe.judge.base import MODALITIES, Judge, JudgeItem, Score

RATING_COLUMNS = ("id", "modality", "candidate", "reference", "human_score")


@dataclass(frozen=True)
class RatingRow:
    """One human rating of a candidate caption against a reference, for one modality."""

    id: str
    modality: str
    candidate: str
    reference: str
    human_score: float

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"rating {self.id!r}: modality must be audio or video, got {self.modality!r}")
        if not math.isfinite(self.human_score):
            raise ValueError(f"rating {self.id!r}: human_score must be a finite number, got {self.human_score!r}")

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any], where: str = "ratings") -> RatingRow:
        missing = [c for c in RATING_COLUMNS if c not in row or row[c] is None]
        if missing:
            raise ValueError(f"{where}: missing column(s) {missing}; a ratings file needs columns {list(RATING_COLUMNS)}")
        try:
            human = float(str(row["human_score"]).strip())
        except ValueError:
            raise ValueError(f"{where}: human_score {row['human_score']!r} is not a number") from None
        try:
            return cls(
                str(row["id"]).strip(),
                str(row["modality"]).strip().lower(),
                str(row["candidate"]),
                str(row["reference"]),
                human,
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None


def read_ratings(path: str | Path) -> list[RatingRow]:
    """Read a ratings CSV (columns id, modality, candidate, reference, human_score)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ratings file {path} not found")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in RATING_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} in header {header}; expected {list(RATING_COLUMNS)}")
        rows = [RatingRow.from_mapping(r, where=f"{path}, line {reader.line_num}") for r in reader]
    if not rows:
        raise ValueError(f"{path}: no ratings")
    return rows


@dataclass(frozen=True)
class CalibrationResult:
    """Spearman rho between judge and human scores for one modality."""

    modality: str
    rho: float  # NaN when fewer than 3 scored pairs or a constant column
    ci_low: float
    ci_high: float
    p_value: float  # two-sided, H0: rho = 0
    n: int  # pairs used (scored by the judge)
    n_unscored: int  # pairs excluded because the judge left them unscored
    n_boot: int
    confidence: float
    judge: str  # the judge's label (says "weaker proxy" for proxies)
    proxy: bool

    def describe(self) -> str:
        ci = f"[{self.ci_low:.3f}, {self.ci_high:.3f}]"
        return (
            f"{self.modality}: Spearman rho {self.rho:.3f} ({self.confidence:.0%} CI {ci}, p={self.p_value:.3g}) "
            f"over n={self.n} ({self.n_unscored} unscored, excluded); judge {self.judge}"
        )


def spearman_bootstrap(
    x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float, float]:
    """(rho, ci_low, ci_high, p) for paired samples; percentile bootstrap over pairs.

    Resamples in which either side is constant have no rho and are left out of the CI.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    nan = math.nan
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan, nan, nan, nan
    res = stats.spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    rx = stats.rankdata(x[idx], axis=1)  # [n_boot, n]
    ry = stats.rankdata(y[idx], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denom = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = (rx * ry).sum(axis=1) / denom
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return rho, nan, nan, p
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return rho, float(lo), float(hi), p


def calibrate(
    ratings_rows: Iterable[RatingRow | Mapping[str, Any]],
    judge: Judge,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
    scores: Sequence[Score] | None = None,
) -> dict[str, CalibrationResult]:
    """Judge every rated pair and correlate with the human scores, per modality.

    `scores` may pass judgments already made (same order as the rows) to skip judging.
    """
    rows = [r if isinstance(r, RatingRow) else RatingRow.from_mapping(r, where=f"ratings row {i + 1}") for i, r in enumerate(ratings_rows)]
    seen: set[tuple[str, str]] = set()
    for r in rows:
        if (r.id, r.modality) in seen:
            raise ValueError(f"ratings: item {r.id!r} is rated twice for {r.modality}; give each (id, modality) one row")
        seen.add((r.id, r.modality))
    if scores is None:
        scores = judge.score_batch([JudgeItem(r.candidate, r.reference, r.modality) for r in rows])
    if len(scores) != len(rows):
        raise ValueError(f"got {len(scores)} scores for {len(rows)} ratings")
    out: dict[str, CalibrationResult] = {}
    for modality in MODALITIES:
        pairs = [(s, r) for s, r in zip(scores, rows, strict=True) if r.modality == modality]
        if not pairs:
            continue
        used = [(s.value, r.human_score) for s, r in pairs if s.scored]
        x = np.array([u[0] for u in used])
        y = np.array([u[1] for u in used])
        rho, lo, hi, p = spearman_bootstrap(x, y, n_boot=n_boot, seed=seed, confidence=confidence)
        out[modality] = CalibrationResult(
            modality, rho, lo, hi, p, len(used), len(pairs) - len(used), n_boot, confidence, judge.label, judge.proxy
        )
    return out
