"""Collect: run the engine over a sample set and store one compact record per (sample, query).

A record holds everything the claims and the report need for one sample and one query:
each condition's caption, the baseline row's attention flow (per step, layer and role; per
second of video and audio), every condition's mean flow, logit-lens top-k tokens at the
audio positions, and the base-model shift of the caption. Records are keyed by the model
and its revision, the sample's content, the query, the protocol and the engine version, so
a rerun or a shard recomputes only what is missing. Fidelity is judged afterwards
(`judged_rows`): judges cache their own verdicts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from avprobe import ENGINE_VERSION
from avprobe.adapters.base import ModelAdapter
from avprobe.conditions import Baseline, Condition, Knockout, SpanRule, band, sweep
from avprobe.probes.logit_lens import LensConfig
from avprobe.store import Store
from avprobe.types import Media, Role, Sample, SampleError

log = logging.getLogger(__name__)

DEFAULT_QUERY = "describe what you see and hear"
NAMESPACE = "engine"


@dataclass(frozen=True)
class Protocol:
    """What runs for every sample. Part of every record's key."""

    queries: tuple[str, ...] = (DEFAULT_QUERY,)
    max_new_tokens: int = 32
    window: float = 0.25  # knockout window as a fraction of depth (Geva et al.: 9-10 of ~40)
    sweep_roles: tuple[str, ...] = ("video", "audio")
    paper_band: tuple[float, float] = (15 / 36, 30 / 36)  # the paper's mid-deep layers 15-30 of 36
    early_band: tuple[float, float] = (0.0, 0.5)  # where the organisms' effect was seen
    own_words: bool = True  # knockouts that also block the caption's own sight words
    lens_top_k: int = 3
    lens_norm: bool = True
    shift: bool = True
    # Experiments that can be left out (`avprobe collect --experiments`). Fields from here on
    # enter key() only when they differ from their default, so stored results stay addressed.
    knockout: bool = True  # the depth sweep and band knockouts (else the baseline row only)
    flow: bool = True  # attention flow per role and per second
    lens: bool = True  # logit lens at the audio positions

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

    def conditions(self, n_layers: int, sight_rule: SpanRule | None) -> list[Condition]:
        k = self.window_size(n_layers)
        conds: list[Condition] = [Baseline()]
        if not self.knockout:
            return conds
        for r in self.sweep_roles:
            conds += sweep(Role.parse(r), n_layers, k)
        everything = tuple(range(n_layers))
        for layers in (band(*self.paper_band, n_layers), band(*self.early_band, n_layers), everything):
            for r in self.sweep_roles:
                conds.append(Knockout((Role.parse(r),), layers))
            if self.own_words and sight_rule is not None:
                conds.append(Knockout((Role.VIDEO, sight_rule), layers))
        seen: set[Condition] = set()
        return [c for c in conds if not (c in seen or seen.add(c))]


_KEY_OPTIONAL = frozenset({"knockout", "flow", "lens"})


SIGHT_WORDS = ("see", "sees", "seen", "seeing", "shows", "showing", "visible", "watch")


def sight_rule(adapter: ModelAdapter) -> SpanRule:
    """Generated positions in the caption's own sight clause: after a word of seeing, up to the
    next full stop. Exact for the organisms' grammar ("i see a dog ."); a heuristic for free
    captions ("I see a man playing guitar."), which the report says."""
    start, end = set(), set()
    for tok, tid in adapter.tokenizer.get_vocab().items():
        word = adapter.tokenizer.convert_tokens_to_string([tok]).strip().lower()
        if word in SIGHT_WORDS:
            start.add(int(tid))
        elif word and word.endswith(".") and len(word) <= 2:
            end.add(int(tid))
    return SpanRule("own-sight-words", frozenset(start), frozenset(end))


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


def _condition_meta(c: Condition) -> dict[str, Any]:
    if isinstance(c, Baseline):
        return {"key": c.key(), "label": c.label(), "blocked": [], "layers": []}
    return {
        "key": c.key(),
        "label": c.label(),
        "blocked": [b.label if isinstance(b, Role) else b.name for b in c.blocked],
        "layers": list(c.layers),
    }


def compute_record(
    adapter: ModelAdapter,
    sample: Sample,
    media: Media,
    query: str,
    protocol: Protocol,
    base: ModelAdapter | None = None,
) -> SampleRecord:
    """Run the engine (and the base-model shift) for one sample and one query."""
    from avprobe.engine import EngineConfig, run
    from avprobe.probes.base_shift import base_logprobs, shift

    mi = adapter.build_inputs(media, query)
    L = adapter.n_layers
    own = protocol.own_words and protocol.knockout
    conds = protocol.conditions(L, sight_rule(adapter) if own else None)
    lens = LensConfig(top_k=protocol.lens_top_k, use_norm=protocol.lens_norm) if protocol.lens else None
    do_shift = protocol.shift and base is not None and media.frames is not None
    res = run(
        adapter, mi, conds,
        EngineConfig(max_new_tokens=protocol.max_new_tokens, lens=lens, keep_logprobs=do_shift,
                     record_attention=protocol.flow, record_buckets=protocol.flow),
    )
    arrays: dict[str, np.ndarray] = {}
    cmeta = []
    mean_flows = []
    for out in res.outputs:
        m = _condition_meta(out.condition)
        m.update(text=out.text, token_ids=out.token_ids, finished=out.finished)
        cmeta.append(m)
        mean_flows.append(out.flow.mean(0) if out.flow is not None and len(out.flow) else np.full((L, len(Role)), np.nan))
    arrays["flow_mean"] = np.stack(mean_flows).astype(np.float16)  # [C, L, R]
    base_out = res.outputs[0]
    if base_out.flow is not None:
        arrays["flow_steps"] = base_out.flow.astype(np.float16)  # [T, L, R] baseline row
    if res.bucket_flow is not None:
        arrays["bucket_flow"] = res.bucket_flow.astype(np.float16)  # [T, L, NB]
    vocab_ids: set[int] = set(base_out.token_ids)
    lens_meta = None
    if res.lens is not None:
        # Smallest integer type that holds the vocabulary: records of the organisms are committed.
        ids = res.lens.top_ids
        arrays["lens_top_ids"] = ids.astype(np.min_scalar_type(int(ids.max()))) if ids.size else ids  # [L, A, k]
        lens_meta = {"use_norm": res.lens.use_norm, "top_k": protocol.lens_top_k}
        vocab_ids.update(np.unique(res.lens.top_ids).tolist())
    shift_meta = None
    if do_shift:
        caption = base_out.token_ids
        blp = base_logprobs(base, media, query, caption)
        sr = shift(res.logprobs, blp, caption)
        arrays["shift_kl"] = sr.kl.astype(np.float32)
        arrays["shift_top1_same"] = sr.top1_same
        arrays["shift_in_top3"] = sr.in_base_top3
        arrays["shift_base_top1"] = sr.base_top1.astype(np.int32)
        vocab_ids.update(sr.base_top1.tolist())
        shift_meta = {"base_model": base.name, "base_revision": base.revision, **sr.summary()}
    vocab = {str(i): adapter.tokenizer.convert_ids_to_tokens(int(i)) for i in sorted(vocab_ids)}
    meta = {
        "sample_id": sample.id,
        "kind": sample.kind,
        "labels": list(sample.labels),
        "video_labels": list(sample.video_labels),
        "audio_captions": list(sample.audio_captions),
        "video_captions": list(sample.video_captions),
        "query": query,
        "model": adapter.name,
        "revision": adapter.revision,
        "n_layers": L,
        "prompt_len": res.prompt_len,
        "role_counts": {r.label: int((res.roles == int(r)).sum()) for r in Role},
        "window": protocol.window_size(L),
        "conditions": cmeta,
        "bucket_labels": res.bucket_labels,
        "lens": lens_meta,
        "shift": shift_meta,
        "vocab": vocab,
    }
    return SampleRecord(meta, arrays)


@dataclass
class CollectSummary:
    computed: int = 0
    cached: int = 0
    failed: list[SampleError] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.computed} computed, {self.cached} from cache, {len(self.failed)} failed"


MediaLoader = Callable[[Sample], Media]


def default_media_loader(adapter: ModelAdapter) -> MediaLoader:
    """Organism samples are rendered in memory; everything else is decoded from files."""

    def load(sample: Sample) -> Media:
        if dict(sample.meta).get("world", "").startswith("organism"):
            from avprobe.organism.world import render

            return render(sample)
        from avprobe.media.decode import load_media

        s = adapter.settings
        return load_media(sample, fps=s.fps, max_frames=s.max_frames)

    return load


def collect(
    model: Any,
    samples: Iterable[Sample],
    store: Store,
    protocol: Protocol = Protocol(),
    get_adapter: Callable[[], ModelAdapter] | None = None,
    get_base: Callable[[], ModelAdapter | None] | None = None,
    media_loader: MediaLoader | None = None,
    refresh: bool = False,
    on_progress: Callable[[Sample, str], None] | None = None,
) -> Iterator[SampleRecord | SampleError]:
    """Yield one record per (sample, query), from the store or computed and stored.

    `model` is a ModelAdapter, or a ModelRef plus `get_adapter` to load it on the first cache
    miss (a fully cached run never loads weights). In a read-only store a miss raises
    `CacheMiss` naming what is missing. A sample whose media cannot be decoded or whose run
    fails yields a `SampleError` (the caller counts and reports it) and the run goes on.
    Records are yielded, not kept, so memory stays bounded over any number of samples.
    """
    adapter = model if isinstance(model, ModelAdapter) else None
    base = None
    base_loaded = False
    ns = f"{_slug(model.name)}/{NAMESPACE}"
    for sample in samples:
        media = None
        for query in _queries_for(sample, protocol):
            parts = record_parts(model, sample, query, protocol)
            if not refresh:
                rec = store.require(ns, parts) if store.readonly else store.get(ns, parts)
                if rec is not None:
                    if on_progress:
                        on_progress(sample, "cached")
                    yield SampleRecord(rec.meta, dict(rec.arrays))
                    continue
            if adapter is None:
                if get_adapter is None:
                    raise ValueError("collect needs get_adapter to compute missing records of a ModelRef")
                adapter = get_adapter()
            if not base_loaded:
                base = get_base() if get_base is not None else None
                base_loaded = True
            loader = media_loader or default_media_loader(adapter)
            try:
                if media is None:
                    media = loader(sample)
                record = compute_record(adapter, sample, media, query, protocol, base)
            except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run
                err = SampleError(sample.id, "engine" if media is not None else "decode",
                                  sample.video or sample.audio, f"{type(exc).__name__}: {exc}")
                log.warning("sample %s failed: %s", sample.id, err.reason)
                if on_progress:
                    on_progress(sample, "failed")
                yield err
                break
            store.put(ns, parts, record.meta, record.arrays)
            if on_progress:
                on_progress(sample, "computed")
            yield record


def _queries_for(sample: Sample, protocol: Protocol) -> tuple[str, ...]:
    return protocol.queries


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.split("/")[-1]).strip("_") or "model"


def load_records(adapter_name: str, store: Store) -> list[SampleRecord]:
    """Every stored record of a model (any protocol), for reports over cached results."""
    ns = f"{_slug(adapter_name)}/{NAMESPACE}"
    out = []
    for parts, _path in store.iter_entries(ns):
        rec = store.get(ns, parts)
        if rec is not None:
            out.append(SampleRecord(rec.meta, dict(rec.arrays)))
    return out
