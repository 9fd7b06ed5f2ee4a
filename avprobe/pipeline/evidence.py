"""Evidence: the tidy view of one model's stored records plus judged fidelities.

The claims and the report read only this. Every per-sample array is aligned on
`sample_ids(...)` order; NaN means unscored (never 0).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from avprobe.records import SampleRecord
from avprobe.types import Role

log = logging.getLogger(__name__)

# Function words that never count as a concept (lexicon matching of lens tokens and of
# the caption's sound words).
STOPWORDS = frozenset(
    "i a an the and of to in on is are was it its this that there with as at by for from be "
    "can hear heard hearing see seen sees seeing sound sounds sounding video clip some someone "
    "while which who what you we they he she his her their".split()
)
HEAR_WORDS = frozenset({"hear", "hears", "heard", "hearing", "sound", "sounds", "noise", "noises"})
# A few sound concepts in Chinese, which Qwen's logit lens often decodes to (the paper's
# example: 键盘 = keyboard). The lexicon matching maps them to English before comparing.
TRANSLATIONS = {
    "键盘": "keyboard", "马": "horse", "狗": "dog", "鸟": "bird", "钢琴": "piano", "雨": "rain",
    "婴儿": "baby", "人群": "crowd", "时钟": "clock", "钟": "clock", "引擎": "engine", "发动机": "engine",
    "警笛": "siren", "钻": "drill", "电钻": "drill", "音乐": "music", "水": "water", "车": "car",
}


def normalize_token(tok: str | None) -> str:
    """Byte-level BPE pieces ('Ġdog', '▁dog') -> 'dog'; translations applied. None (an id the
    tokenizer has no token for: real vocabularies are padded past the tokenizer) -> ''."""
    if tok is None:
        return ""
    t = tok.replace("Ġ", " ").replace("▁", " ").strip().lower()
    t = re.sub(r"^[^\w]+|[^\w]+$", "", t)
    return TRANSLATIONS.get(t, t)


def content_words(text: str) -> set[str]:
    words = re.findall(r"[a-z]+", text.lower())
    out = {w for w in words if w not in STOPWORDS and len(w) >= 3}
    # crude singular forms so 'dogs barking' matches 'dog'
    out |= {w[:-1] for w in out if w.endswith("s") and len(w) > 3}
    return out


def _span(layers: Iterable[int]) -> str:
    layers = list(layers)
    return "layers " + ", ".join(map(str, layers)) if layers else "no layers"


@dataclass
class FidelityRow:
    sample_id: str
    kind: str
    query: str
    key: str
    label: str
    audio: float
    video: float


@dataclass(repr=False)
class Evidence:
    """One model's results over one sample set."""

    model: str
    records: list[SampleRecord]
    judge_label: str = ""
    judge_proxy: bool = False
    failed: list[Any] = field(default_factory=list)  # SampleError records
    fidelity: dict[tuple[str, str, str], tuple[float, float]] = field(default_factory=dict)
    unscored: int = 0
    base_model: str | None = None
    # the model's settings that change inputs now, and their source (`AdapterSettings.inputs_view`
    # plus "source"); records carry the ones they were computed with (meta["inputs"])
    settings: dict[str, Any] | None = None

    def __repr__(self) -> str:
        # pytest prints a failing claim's arguments; the full records took minutes to repr
        return (f"Evidence(model={self.model!r}, records={len(self.records)}, failed={len(self.failed)}, "
                f"unscored={self.unscored}, judge={self.judge_label!r}, base_model={self.base_model!r})")

    # ---- structure ------------------------------------------------------------------
    @cached_property
    def n_layers(self) -> int:
        return int(self.records[0].meta["n_layers"]) if self.records else 0

    @cached_property
    def attention_layers(self) -> tuple[int, ...]:
        """Layers that mix positions through attention (records before hybrid models: all)."""
        if not self.records:
            return ()
        return tuple(int(i) for i in self.records[0].meta.get("attention_layers", range(self.n_layers)))

    @cached_property
    def knockout_is_cut(self) -> bool:
        """Whether a knockout in every layer blocks every direct read of the blocked positions
        by the generated rows (False on hybrid models, whose recurrent layers carry them)."""
        return bool(self.records[0].meta.get("knockout_is_cut", True)) if self.records else True

    @cached_property
    def has_flow(self) -> bool:
        """Whether attention flow was stored: records collected without the flow experiment
        hold an all-NaN flow array (the claims skip, the report draws no flow)."""
        recs = self.select(modality="audio-video")
        return bool(recs) and bool(np.isfinite(self.flow(recs)).any())

    def knockout_scope(self) -> str:
        """What a knockout removes on this model, in words (for the claims' notes and skips)."""
        att = self.attention_layers
        if self.knockout_is_cut:
            return "every layer mixes positions by attention: a knockout blocks every direct read"
        kinds = self.records[0].meta.get("layer_kinds", [])
        rec = [i for i, k in enumerate(kinds) if k == "recurrent"]
        return (f"hybrid model: a knockout blocks attention in its attention layers only ({_span(att)} of "
                f"{self.n_layers}); its recurrent layers ({_span(rec)}) still carry the blocked positions to the "
                "generated rows, so a knockout cannot remove a modality")

    @cached_property
    def queries(self) -> list[str]:
        return sorted({r.query for r in self.records})

    def select(self, kind: str | None = None, query: str | None = None, modality: str | None = None
               ) -> list[SampleRecord]:
        """Records of one kind / query; `modality='audio-video'` drops audio-only samples."""
        out = []
        for r in self.records:
            if kind is not None and r.kind != kind:
                continue
            if query is not None and r.query != query:
                continue
            if modality == "audio-video" and r.meta["role_counts"].get("video", 0) == 0:
                continue
            out.append(r)
        return sorted(out, key=lambda r: r.sample_id)

    @staticmethod
    def clip_means(records: Iterable[SampleRecord], values: Iterable[Any]) -> tuple[list[str], np.ndarray]:
        """(clip ids, per-clip mean over its records) for one value per record (the axis
        after the first is kept): the clip, not the query, is the unit of a test, since the
        caption orders of one clip are not independent samples. NaN values are left out of
        a clip's mean; a clip with none is NaN."""
        groups: dict[str, list[Any]] = {}
        for r, v in zip(records, values, strict=True):
            groups.setdefault(r.sample_id, []).append(np.asarray(v, dtype=float))
        ids = sorted(groups)
        out = []
        for i in ids:
            stack = np.stack(groups[i])
            with np.errstate(invalid="ignore"):
                ok = np.isfinite(stack)
                n = ok.sum(0)
                total = np.where(ok, stack, 0.0).sum(0)
                out.append(np.where(n > 0, total / np.maximum(n, 1), np.nan))
        return ids, np.array(out, dtype=float)

    def condition_keys(self) -> list[dict[str, Any]]:
        return self.records[0].conditions if self.records else []

    def find_condition(self, blocked: tuple[str, ...], layers: tuple[int, ...]) -> str | None:
        for c in self.condition_keys():
            if tuple(c["blocked"]) == tuple(blocked) and tuple(c["layers"]) == tuple(layers):
                return c["key"]
        return None

    def sweep_keys(self, role: str) -> list[dict[str, Any]]:
        """The single-role windows of the depth sweep, in depth order (one per centre layer)."""
        n = self.n_layers
        w = int(self.records[0].meta["window"]) if self.records else 0
        out = []
        for c in self.condition_keys():
            if c["blocked"] == [role] and len(c["layers"]) <= w and len(c["layers"]) < n:
                out.append(c)
        return out

    # ---- fidelity ---------------------------------------------------------------------
    def scores(self, records: Iterable[SampleRecord], key: str, modality: str) -> np.ndarray:
        idx = 0 if modality == "audio" else 1
        return np.array(
            [self.fidelity.get((r.sample_id, r.query, key), (np.nan, np.nan))[idx] for r in records], dtype=float
        )

    # ---- attention flow ---------------------------------------------------------------
    def flow(self, records: Iterable[SampleRecord], key: str = "baseline") -> np.ndarray:
        """[N, L, R] attention mass per role of generated rows, mean over steps and heads."""
        out = []
        for r in records:
            keys = [c["key"] for c in r.conditions]
            out.append(r.arrays["flow_mean"][keys.index(key)].astype(np.float64))
        return np.stack(out) if out else np.zeros((0, self.n_layers, len(Role)))

    # ---- logit lens -------------------------------------------------------------------
    def lens_hits(self, rec: SampleRecord, concepts: set[str], layers: Iterable[int]) -> bool:
        """Whether any audio position decodes (top-k) to one of `concepts` in `layers`."""
        ids = rec.arrays.get("lens_top_ids")
        if ids is None or ids.size == 0 or not concepts:
            return False
        vocab = rec.meta["vocab"]
        sel = np.unique(ids[list(layers)])
        return any(normalize_token(vocab.get(str(int(i)), "")) in concepts for i in sel)

    def lens_concept(self, rec: SampleRecord, layers: Iterable[int]) -> str | None:
        """The lens's dominant concept of a record: the content word decoded most often as
        the top-1 token over its audio positions in `layers` (ties: the first in sorted
        order), or None. One concept per clip, fixed before any truth is looked at, so the
        hit rate at chance is about one over the number of concepts (a top-k-anywhere rule
        saturates: 0.73 at chance on the organism)."""
        ids = rec.arrays.get("lens_top_ids")
        if ids is None or ids.size == 0:
            return None
        vals, counts = np.unique(ids[list(layers), :, 0], return_counts=True)
        vocab = rec.meta["vocab"]
        tally: dict[str, int] = {}
        for v, c in zip(vals.tolist(), counts.tolist()):
            w = normalize_token(vocab.get(str(int(v)), ""))
            if w and w not in STOPWORDS and len(w) >= 3:
                tally[w] = tally.get(w, 0) + c
        if not tally:
            return None
        return min(tally, key=lambda w: (-tally[w], w))

    def lens_top_tokens(self, rec: SampleRecord, layer: int, n: int = 8) -> list[tuple[str, int]]:
        """Most frequent top-1 lens tokens over the audio positions at one layer."""
        ids = rec.arrays.get("lens_top_ids")
        if ids is None or ids.size == 0:
            return []
        vals, counts = np.unique(ids[layer, :, 0], return_counts=True)
        order = np.argsort(-counts)[:n]
        vocab = rec.meta["vocab"]
        return [(vocab.get(str(int(vals[i])), "?"), int(counts[i])) for i in order]

    # ---- base shift -------------------------------------------------------------------
    def audio_token_mask(self, rec: SampleRecord, prefix: str = "shift") -> np.ndarray:
        """Caption tokens that describe the audio: content words in the caption's hearing
        clause (after a word of hearing, up to the next full stop), as many as the shift arrays
        of the base `prefix` (`records.SHIFT_BASES`) hold."""
        base = rec.conditions[0]
        vocab = rec.meta["vocab"]
        toks = [normalize_token(vocab.get(str(t), "")) for t in base["token_ids"]]
        mask, open_ = [], False
        for t in toks:
            if t in HEAR_WORDS:
                open_ = True
                mask.append(False)
                continue
            if open_ and t == "":
                open_ = False  # punctuation closes the clause
            mask.append(bool(open_ and t and t not in STOPWORDS))
        n = len(rec.arrays.get(f"{prefix}_kl", []))
        return np.array(mask[:n], dtype=bool)

    def audio_token_names_truth(self, rec: SampleRecord, prefix: str = "shift") -> np.ndarray:
        """Per caption token: does it name the true sound (a content word of the reference)?"""
        truth = set()
        for cap in rec.meta["audio_captions"][:1]:
            truth |= content_words(cap)
        vocab = rec.meta["vocab"]
        n = len(rec.arrays.get(f"{prefix}_kl", []))
        toks = [normalize_token(vocab.get(str(t), "")) for t in rec.conditions[0]["token_ids"]][:n]
        return np.array([t in truth for t in toks], dtype=bool)


def evidence_from(model: str, result: Any, base_model: str | None = None,
                  settings: dict[str, Any] | None = None) -> Evidence:
    """The Evidence of one `gather` result (records, failures and fidelities kept)."""
    judge = result.judge
    return Evidence(
        model=model,
        records=result.records,
        judge_label=getattr(judge, "label", str(judge)) if judge is not None else "",
        judge_proxy=bool(getattr(judge, "proxy", False)),
        failed=list(result.failed),
        fidelity=result.fidelity,
        unscored=result.counts.unscored,
        base_model=base_model,
        settings=settings,
    )
