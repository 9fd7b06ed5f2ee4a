"""The paper's numbers that code reads, in one table: the protocol, the claims and the report.

Depth bands are fractions of depth ``[lo, hi)`` so models of any depth compare (see
`avprobe.conditions.band`): the paper's "layers 15-30 of 36" is ``(15/36, 30/36)``, which
is layers 15-29 on the 36-layer Qwen2.5-Omni-3B (end exclusive, as in the paper's released
knockout rules) and layers 3-6 on an 8-layer organism. claims/claims.toml names bands by
the keys of `BANDS`; its thresholds and the paper's quoted values stay there, beside each claim.
"""

from __future__ import annotations

PAPER_MODEL = "Qwen2.5-Omni-3B"  # the paper's main model (thinker; 36 decoder layers)
PAPER_DEPTH = 36

BANDS: dict[str, tuple[float, float]] = {
    "paper": (15 / 36, 30 / 36),  # mid-deep layers 15-30 of 36 (Fig. 2 video, Fig. 5 knockout)
    "paper-early": (0.0, 6 / 36),  # layers 0-5 of 36 (Fig. 2 audio)
    "paper-after-early": (6 / 36, 1.0),  # the rest, where audio attention is "near zero"
    "early": (0.0, 0.5),  # ours: the first half, where the organisms' knockout effect sat
    "all": (0.0, 1.0),
}

# Fig. 2's statements, drawn as shaded boxes in the report: (role, band, share range, label).
FIG2 = (
    ("audio", "paper-early", (0.40, 0.50), "paper: audio 40-50% in layers 0-5 of 36"),
    ("video", "paper", (0.20, 0.40), "paper: video 20-40% in layers 15-30 of 36"),
)


def band_fractions(spec: str | list[float] | tuple[float, float]) -> tuple[float, float]:
    """A band given by name (a key of BANDS) or as a [lo, hi) pair of depth fractions."""
    if isinstance(spec, str):
        try:
            return BANDS[spec]
        except KeyError:
            raise ValueError(f"unknown depth band {spec!r}; known: {', '.join(BANDS)}") from None
    lo, hi = (float(x) for x in spec)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"depth band {spec!r} must satisfy 0 <= lo < hi <= 1")
    return lo, hi
