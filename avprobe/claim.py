"""Claim machinery used by `claims/`: the claims table, the `claim` object a claim test
checks its results with, and the outcomes the report reads.

Kept out of the pytest plugin (it imports no pytest) so that the CLI, the report, the
calibration and the tests can use it too: the plugin injects how a skip is raised.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from avprobe.paper import band_fractions
from avprobe.stats import TestResult

log = logging.getLogger(__name__)

CLAIMS_TOML = Path(__file__).resolve().parent.parent / "claims" / "claims.toml"
PROPERTY = "avprobe_claim"


@lru_cache(maxsize=4)
def claims_table(path: str | None = None) -> dict[str, dict[str, Any]]:
    p = Path(path) if path else CLAIMS_TOML
    if not p.is_file():
        raise FileNotFoundError(f"claims table {p} not found (expected claims/claims.toml in the project)")
    with p.open("rb") as f:
        table = tomllib.load(f)
    defaults = table.pop("defaults", {})
    return {cid: {**defaults, **cfg, "id": cid} for cid, cfg in table.items()}


@dataclass
class ClaimOutcome:
    """The verdict of one claim on one model (and scope: query, depth band ...)."""

    claim_id: str
    model: str
    scope: str
    status: str  # passed | failed | skipped
    statement: str
    figure: str
    paper_value: str
    summary: str = ""  # the statistical summary (the assertion message)
    estimate: float | None = None
    ci: tuple[float, float] | None = None
    p_value: float | None = None
    effect: str = ""
    n: int | None = None
    skip_reason: str = ""
    parts: list[dict[str, Any]] = field(default_factory=list)  # sub-tests (name, summary, passed)
    notes: list[str] = field(default_factory=list)  # where the effect sits, judge proxy, ...
    data: dict[str, Any] = field(default_factory=dict)  # small series for figures
    deciding: str = ""  # the part whose result decided the verdict (its numbers are the headline)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # band key -> its concrete layers
    thresholds: dict[str, Any] = field(default_factory=dict)  # the claim's numbers from claims.toml
    expected: str | None = None  # the expected verdict (--verdicts), set by the plugin

    @property
    def shown_status(self) -> str:
        """The verdict as the terminal shows it against the expected one: passed | failed |
        skipped | xfailed (an expected failure, unchanged) | moved (differs from the expected)."""
        if self.expected is None or self.status == "skipped":
            return self.status
        if self.status == self.expected:
            return "xfailed" if self.status == "failed" else self.status
        return "moved"

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=_default, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> ClaimOutcome:
        d = json.loads(text)
        if d.get("ci") is not None:
            d["ci"] = tuple(d["ci"])
        return cls(**d)


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def part(name: str, result: TestResult) -> dict[str, Any]:
    d = result.details
    return {
        "name": name,
        "summary": result.summary(),
        "passed": bool(result.passed),
        "estimate": _f(result.estimate),
        "ci": [_f(result.ci_low), _f(result.ci_high)],
        "p": _f(result.p_value),
        "n": int(result.n),
        "effect": f"{result.effect_name}={_f(result.effect_size):.3g}" if result.effect_name else "",
        "test": result.name,
        "alternative": result.alternative,
        "threshold": None if result.threshold is None else _f(result.threshold),
        # a bootstrap p-value has a floor of about 1 / n_boot: the report prints "p < floor", not 0
        "n_boot": int(d["n_boot"]) if isinstance(d.get("n_boot"), (int, float)) else None,
        "untestable": result.untestable,
    }


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


class ClaimSkipped(Exception):
    """Raised by `ClaimCheck.skip` when no skip handler is injected (outside pytest)."""


def _raise_skip(reason: str) -> None:
    raise ClaimSkipped(reason)


class ClaimCheck:
    """The `claim` fixture: its row of claims.toml plus `band` / `check` / `skip`.

    `record` receives each outcome as JSON (the plugin stores it in the test's user
    properties, where the report reads it); `on_skip` ends the test (pytest.skip under
    the plugin; `ClaimSkipped` elsewhere, e.g. in the calibration).
    """

    def __init__(self, cfg: dict[str, Any], model: str = "", scope: str = "all samples",
                 record: Callable[[str], None] | None = None,
                 on_skip: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.id = cfg["id"]
        self.model = model
        self.scope = scope
        self._record_fn = record
        self._on_skip = on_skip or _raise_skip
        self.alpha = float(cfg.get("alpha", 0.05))
        self.n_boot = int(cfg.get("n_boot", 2000))
        self.seed = int(cfg.get("seed", 0))
        self.min_n = int(cfg.get("min_n", 10))
        self.notes: list[str] = []
        self.data: dict[str, Any] = {}
        self.layers: dict[str, dict[str, Any]] = {}  # every band asked for, as this model's layers
        self.outcome: ClaimOutcome | None = None  # the last recorded one

    def __getitem__(self, key: str) -> Any:
        try:
            return self.cfg[key]
        except KeyError:
            raise KeyError(f"claims.toml [{self.id}] has no {key!r}") from None

    def get(self, key: str, default: Any = None) -> Any:
        return self.cfg.get(key, default)

    @property
    def stats_kw(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "n_boot": self.n_boot, "seed": self.seed, "min_n": self.min_n}

    def band(self, n_layers: int, key: str = "band") -> tuple[int, ...]:
        """The layers of the depth band this claim names under `key` in claims.toml (a name of
        `avprobe.paper.BANDS` or a [lo, hi) pair of depth fractions), on a model of n_layers."""
        from avprobe.conditions import band

        try:
            spec = self.cfg[key]
        except KeyError:
            raise KeyError(f"claims.toml [{self.id}] names no depth band {key!r}") from None
        return self._note_layers(key, spec, band(*band_fractions(spec), n_layers), n_layers)

    def bands(self, n_layers: int, key: str = "bands") -> dict[str, tuple[int, ...]]:
        """The layers of each band of a table of named bands in claims.toml (label -> band)."""
        from avprobe.conditions import band

        return {label: self._note_layers(f"{key}.{label}", spec, band(*band_fractions(spec), n_layers), n_layers)
                for label, spec in self[key].items()}

    def _note_layers(self, key: str, spec: Any, layers: tuple[int, ...], n_layers: int) -> tuple[int, ...]:
        """Keep which layers a band became on this model: the report and claims.json say so
        (on 8 layers the paper's early band, layers 0-5 of 36, is layer 0 alone)."""
        lo, hi = band_fractions(spec)
        self.layers[key] = {"band": spec if isinstance(spec, str) else [lo, hi], "fraction": [lo, hi],
                            "n_layers": int(n_layers), "layers": [int(x) for x in layers]}
        return layers

    def _outcome(self, status: str, **kw: Any) -> ClaimOutcome:
        return ClaimOutcome(
            claim_id=self.id,
            model=self.model,
            scope=self.scope,
            status=status,
            statement=self.cfg.get("statement", ""),
            figure=self.cfg.get("figure", ""),
            paper_value=self.cfg.get("paper_value", ""),
            notes=list(self.notes),
            data=dict(self.data),
            layers=dict(self.layers),
            thresholds={k: v for k, v in self.cfg.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
            **kw,
        )

    def _record(self, outcome: ClaimOutcome) -> None:
        self.outcome = outcome
        if self._record_fn is not None:
            self._record_fn(outcome.to_json())

    def skip(self, reason: str) -> None:
        """Skip with the reason, recorded in the report (a claim that cannot run never passes)."""
        self._record(self._outcome("skipped", skip_reason=reason))
        self._on_skip(reason)

    def verdict(self, results: dict[str, TestResult] | TestResult, require: str = "all") -> ClaimOutcome:
        """Record the verdict of `results` (sub-test name -> result) without asserting;
        `require` is "all" (every sub-test must pass) or "any"."""
        if isinstance(results, TestResult):
            results = {self.id: results}
        if require not in ("all", "any"):
            raise ValueError(f"require must be 'all' or 'any', got {require!r}")
        if not results:
            raise ValueError(f"claim {self.id}: no results to check")
        # Data that cannot test a part (too few clips, no variation, no room) skip the claim
        # where that part decides it: it never passes without its test, and it is not an
        # error. A part that is tested and fails decides "all" anyway; one that passes, "any".
        blocked = {name: r.untestable for name, r in results.items() if r.untestable}
        tested = [bool(r.passed) for r in results.values() if not r.untestable]
        decided = (require == "all" and not all(tested)) or (require == "any" and any(tested))
        if blocked and not decided:
            name, why = next(iter(blocked.items()))
            self.skip(f"untestable: {name}: {why}")
            raise ClaimSkipped(why)  # on_skip returned (it should not): never record a verdict
        parts = [part(name, r) for name, r in results.items()]
        flags = [bool(r.passed) for r in results.values()]
        passed = all(flags) if require == "all" else any(flags)
        # The headline is the part that decided the verdict: the first failing part of a failed
        # "all" (not a passing first part), the first passing part of a passed "any".
        names = list(results)
        if require == "all" and not passed:
            deciding = next(n for n in names if not results[n].passed and not results[n].untestable)
        elif require == "any" and passed:
            deciding = next(n for n in names if results[n].passed)
        else:
            deciding = names[0]
        main = results[deciding]
        summary = " | ".join(f"{name}: {r.summary()}" for name, r in results.items())
        if self.notes:
            summary += " | " + "; ".join(self.notes)
        outcome = self._outcome(
            "passed" if passed else "failed",
            summary=summary,
            estimate=_num(main.estimate),
            ci=(_num(main.ci_low), _num(main.ci_high)),
            p_value=_num(main.p_value),
            effect=f"{main.effect_name}={main.effect_size:.3g}" if main.effect_name and not math.isnan(main.effect_size) else "",
            n=int(main.n),
            parts=parts,
            deciding=deciding,
        )
        self._record(outcome)
        return outcome

    def check(self, results: dict[str, TestResult] | TestResult, require: str = "all") -> None:
        """Record the verdict and assert it, with the statistical summary as the message."""
        outcome = self.verdict(results, require)
        assert outcome.status == "passed", (
            f"claim {self.id} not supported on {self.model} [{self.scope}]: {outcome.summary}")


def _num(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f
