"""Numbers for people: p-values with their true floor, layer lists, the verdict labels.

Shared by the HTML report, the terminal table and claims.json, so they say the same thing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from avprobe.stats import format_p as _format_p

# A p-value that underflowed to 0.0 in float64 lies below every representable double; say a
# bound that is true and readable.
ANALYTIC_FLOOR = "1e-300"

# How each verdict reads against its expected one (ClaimOutcome.shown_status): the terminal
# says "xfailed" for an expected failure; a moved verdict is the one to look at.
STATUS_TEXT = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP", "xfailed": "XFAIL", "moved": "MOVED"}
STATUS_TITLE = {
    "passed": "the data support the claim",
    "failed": "the data do not support the claim",
    "skipped": "the claim cannot be tested on these data (the reason is given)",
    "xfailed": "expected failure: not supported, as the committed expected verdict says (pytest: xfailed)",
    "moved": "the verdict differs from the committed expected verdict (pytest: failed)",
}


def p_floor(n_boot: int | None) -> str:
    """The smallest p a test can report: 1 / n_boot for a bootstrap, else the float floor."""
    if n_boot:
        return _format_p(1.0 / n_boot)
    return ANALYTIC_FLOOR


def format_p(p: float | None, n_boot: int | None = None) -> str:
    """A p-value, never "0": a bootstrap's 0 is "< 1/n_boot" ("< 5e-4" at 2,000 resamples),
    an analytic p that underflowed is "< 1e-300"."""
    if p is None or not isinstance(p, (int, float)) or not math.isfinite(p):
        return "—"
    if p <= 0:
        return f"< {p_floor(n_boot)}"
    return _format_p(p)


_P_ZERO = re.compile(r"\bp=0(?![.\de])")


def fix_p_text(text: str, n_boot: int | None = None) -> str:
    """A statistical summary with every "p=0" written as "p<floor" (the summaries come from
    `avprobe.stats`, which prints the raw value)."""
    return _P_ZERO.sub(f"p<{p_floor(n_boot)}", text)


def layer_span(layers: Sequence[int]) -> str:
    """[3, 4, 5, 6] -> "3-6"; [0] -> "0"; gaps are listed: [0, 2, 3] -> "0, 2-3"."""
    xs = sorted(int(x) for x in layers)
    if not xs:
        return "none"
    runs: list[list[int]] = [[xs[0], xs[0]]]
    for x in xs[1:]:
        if x == runs[-1][1] + 1:
            runs[-1][1] = x
        else:
            runs.append([x, x])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def band_text(key: str, info: dict[str, Any]) -> str:
    """One band a claim used, e.g. 'early_band "paper-early" (0-0.167 of depth) = layer 0 of 8'."""
    layers = info.get("layers") or []
    name = info.get("band")
    lo, hi = info.get("fraction", [math.nan, math.nan])
    what = f'"{name}"' if isinstance(name, str) else "band"
    noun = "layer" if len(layers) == 1 else "layers"
    return f"{key} {what} ({lo:.3g}-{hi:.3g} of depth) = {noun} {layer_span(layers)} of {info.get('n_layers', '?')}"


def deciding_part(parts: Iterable[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for p in parts:
        if p.get("name") == name:
            return p
    return None
