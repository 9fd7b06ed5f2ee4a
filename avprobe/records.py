"""What is stored: the protocol every sample runs, and one record per (sample, query).

No torch here: the claims, the report and the calibration read stored records through this
module (and `avprobe.pipeline.evidence`) without loading the engine.

A record holds everything the claims and the report need for one sample and one query:
each condition's caption, the baseline row's attention flow (per step, layer and role; per
second of video and audio), every condition's mean flow, logit-lens top-k tokens at the
audio positions, and the base-model shift of the caption. Records are keyed by the model
and its revision, the sample's content, the query, the protocol and the engine version
(`record_parts`), so a rerun or a shard recomputes only what is missing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from avprobe import ENGINE_VERSION
from avprobe.conditions import Baseline, Condition, Knockout, SpanRule, band, sweep
from avprobe.paper import BANDS
from avprobe.types import Role, Sample

DEFAULT_QUERY = "describe what you see and hear"
NAMESPACE = "engine"


@dataclass(frozen=True)
class Protocol:
    """What runs for every sample. Part of every record's key."""

    queries: tuple[str, ...] = (DEFAULT_QUERY,)
    max_new_tokens: int = 32
    window: float = 0.25  # knockout window as a fraction of depth (Geva et al.: 9-10 of ~40)
    sweep_roles: tuple[str, ...] = ("video", "audio")
    paper_band: tuple[float, float] = BANDS["paper"]  # the paper's mid-deep layers 15-30 of 36
    early_band: tuple[float, float] = BANDS["early"]  # where the organisms' effect was seen
    own_words: bool = True  # knockouts that also block the caption's own sight words
    lens_top_k: int = 3
    lens_norm: bool = True
    shift: bool = True
    # Experiments that can be left out (`avprobe collect --experiments`). Fields from here on
    # enter key() only when they differ from their default, so stored results stay addressed.
    knockout: bool = True  # the depth sweep and band knockouts (else the baseline row only)
    flow: bool = True  # attention flow per role and per second
    lens: bool = True  # logit lens at the audio positions
    # The audio-ablated self as a second shift base: the same model, the same prompt with the
    # audio removed, teacher-forced on the caption (arrays `self_shift_*`, meta `self_shift`).
    self_shift: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}: an empty caption scores nothing")
        if not self.queries:
            raise ValueError("a protocol needs at least one query")

    def key(self) -> str:
        """Short hash of the protocol: part of every record's key."""
        shown = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _KEY_OPTIONAL and value == f.default:
                continue
            shown.append(f"{f.name}={value!r}")
        # The dataclass repr of the fields before the optional ones: the keys of stored results.
        return hashlib.sha256(f"Protocol({', '.join(shown)})".encode()).hexdigest()[:12]

    def window_size(self, n_layers: int) -> int:
        return max(1, round(self.window * n_layers))

    def bands(self, n_layers: int) -> dict[str, tuple[int, ...]]:
        """The named depth bands knocked out as a whole, as layers of a model of `n_layers`."""
        return {"paper band": band(*self.paper_band, n_layers), "early band": band(*self.early_band, n_layers),
                "all layers": tuple(range(n_layers))}

    def conditions(self, n_layers: int, sight_rule: SpanRule | None) -> list[Condition]:
        k = self.window_size(n_layers)
        conds: list[Condition] = [Baseline()]
        if not self.knockout:
            return conds
        for r in self.sweep_roles:
            conds += sweep(Role.parse(r), n_layers, k)
        for layers in self.bands(n_layers).values():
            for r in self.sweep_roles:
                conds.append(Knockout((Role.parse(r),), layers))
            if self.own_words and sight_rule is not None:
                conds.append(Knockout((Role.VIDEO, sight_rule), layers))
        seen: set[Condition] = set()
        return [c for c in conds if not (c in seen or seen.add(c))]


_KEY_OPTIONAL = frozenset({"knockout", "flow", "lens", "self_shift"})

# Shift bases a record can hold -> the prefix of its arrays (`<prefix>_kl`, ...) and its meta key.
# "vision": the model's vision-only sibling (`--base-model M`); "self-ablated": the model itself
# with the audio removed (`--base-model self-ablated`).
SHIFT_BASES = {"vision": "shift", "self-ablated": "self_shift"}
SELF_ABLATED = "self-ablated"


def shift_bases(spec: str | None) -> tuple[str | None, bool]:
    """`--base-model` -> (the vision-only base model or None, whether the audio-ablated self is a
    base too): "M", "self-ablated" or "M,self-ablated"."""
    names = [n.strip() for n in (spec or "").split(",") if n.strip()]
    others = [n for n in names if n != SELF_ABLATED]
    if len(others) > 1:
        raise ValueError(f"--base-model names at most one vision-only base (plus {SELF_ABLATED}); got {spec!r}")
    return (others[0] if others else None), SELF_ABLATED in names


# The baseline row's per-token attention shares (`flow_steps`, `bucket_flow`) are read by the
# report's figures only, to a percent; as float16 they took a third of a committed record.
# They are stored as uint8 steps of 1/254, 255 where there is no value (a layer without
# attention). Records written before hold float16, which `unpack_shares` passes through.
SHARE_STEPS = 254
SHARE_MISSING = 255


def pack_shares(shares: np.ndarray) -> np.ndarray:
    """Attention shares in [0, 1] (NaN: none) -> uint8 steps of 1/254 (255: none)."""
    a = np.asarray(shares, dtype=np.float64)
    out = np.full(a.shape, SHARE_MISSING, dtype=np.uint8)
    ok = np.isfinite(a)
    out[ok] = np.rint(np.clip(a[ok], 0.0, 1.0) * SHARE_STEPS).astype(np.uint8)
    return out


def unpack_shares(stored: np.ndarray) -> np.ndarray:
    """A stored share array (packed uint8, or the float16 of older records) -> float64, NaN where none."""
    if stored.dtype != np.uint8:
        return stored.astype(np.float64)
    out = stored.astype(np.float64) / SHARE_STEPS
    out[stored == SHARE_MISSING] = np.nan
    return out


@dataclass
class SampleRecord:
    """One stored record (see module docstring), read back from the store."""

    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def sample_id(self) -> str:
        return self.meta["sample_id"]

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def query(self) -> str:
        return self.meta["query"]

    @property
    def conditions(self) -> list[dict[str, Any]]:
        return self.meta["conditions"]

    def caption(self, key: str = "baseline") -> str:
        for c in self.conditions:
            if c["key"] == key:
                return c["text"]
        raise KeyError(key)


def record_parts(model: Any, sample: Sample, query: str, protocol: Protocol) -> dict[str, Any]:
    """Store key parts; `model` is a ModelAdapter or a ModelRef (both have name, revision)."""
    return {
        "model": model.name,
        "revision": model.revision,
        "sample": sample.content_hash(),
        "query": query,
        "protocol": protocol.key(),
        "engine": ENGINE_VERSION,
    }


def slug(name: str) -> str:
    """A file-name-safe form of a name (model alias, HF id, path)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("_") or "model"


def verdict_file(directory: str | Path, model: str) -> Path:
    """Where a model's expected verdicts live: `<directory>/<slug(model)>.json`. The one naming
    rule, read by the plugin (--verdicts) and written by `avprobe release-check`, so a local
    path such as /models/Omni-v2 names the same file in both (/ becomes _)."""
    return Path(directory) / f"{slug(model)}.json"


def namespace(model_name: str) -> str:
    """The store namespace of a model's engine records (its name's last path component)."""
    return f"{slug(model_name.split('/')[-1])}/{NAMESPACE}"
