"""Claim machinery used by `claims/`: the claims table, outcomes, and the evidence loader.

Kept out of the pytest plugin so that the CLI, the report and the tests can use it too.
"""

from __future__ import annotations

import json
import logging
import tomllib
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

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
    return {
        "name": name,
        "summary": result.summary(),
        "passed": bool(result.passed),
        "estimate": _f(result.estimate),
        "ci": [_f(result.ci_low), _f(result.ci_high)],
        "p": _f(result.p_value),
        "n": int(result.n),
        "effect": f"{result.effect_name}={_f(result.effect_size):.3g}" if result.effect_name else "",
    }


def _f(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")
