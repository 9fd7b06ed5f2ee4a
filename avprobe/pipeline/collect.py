"""Collect: run the engine over a sample set and store one compact record per (sample, query).

What a record holds and how it is keyed: `avprobe.records`. Media come from the sample's
source (`avprobe.media.sources`: files, or a registered renderer such as the organism
world). Fidelity is judged afterwards (`avprobe.pipeline.evidence`); judges cache their own
verdicts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from avprobe.adapters.base import ModelAdapter
from avprobe.conditions import Baseline, Condition, SpanRule
from avprobe.media.sources import load_sample_media
from avprobe.probes.logit_lens import LensConfig
from avprobe.records import SHIFT_BASES, Protocol, SampleRecord, namespace, record_parts
from avprobe.store import CacheMiss, Store
from avprobe.types import Media, Role, Sample, SampleError

log = logging.getLogger(__name__)

# How long to wait, at the end of a run, for keys another worker claimed before computing them
# anyway (a hung or remote worker whose claim is not stale yet); and how often to look.
CLAIM_WAIT_S = 300.0
CLAIM_POLL_S = 0.25

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
    # the audio-ablated self needs audio to remove and frames to keep
    do_self = protocol.shift and protocol.self_shift and media.frames is not None and media.waveform is not None
    res = run(
        adapter, mi, conds,
        EngineConfig(max_new_tokens=protocol.max_new_tokens, lens=lens, keep_logprobs=do_shift or do_self,
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
    shift_meta: dict[str, Any] = {}
    caption = base_out.token_ids
    # base_logprobs drops the audio: through the vision-only sibling, or through the model itself
    for kind, model, label in (("vision", base if do_shift else None, None),
                               ("self-ablated", adapter if do_self else None, f"{adapter.name} (audio removed)")):
        if model is None:
            continue
        prefix = SHIFT_BASES[kind]
        name = label or model.name
        try:
            sr = shift(res.logprobs, base_logprobs(model, media, query, caption), caption)
        except ValueError as exc:  # this base only: the record keeps everything else, saying why
            log.warning("sample %s: no %s shift: %s", sample.id, kind, exc)
            shift_meta[prefix] = {"base_model": name, "base_revision": model.revision, "error": str(exc)}
            continue
        arrays[f"{prefix}_kl"] = sr.kl.astype(np.float32)
        arrays[f"{prefix}_top1_same"] = sr.top1_same
        arrays[f"{prefix}_in_top3"] = sr.in_base_top3
        arrays[f"{prefix}_base_top1"] = sr.base_top1.astype(np.int32)
        vocab_ids.update(sr.base_top1.tolist())
        shift_meta[prefix] = {"base_model": name, "base_revision": model.revision,
                              **({"ablation": "audio removed"} if kind == "self-ablated" else {}), **sr.summary()}
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
        "shift": shift_meta.get("shift"),
        **({"self_shift": shift_meta["self_shift"]} if "self_shift" in shift_meta else {}),
        "vocab": vocab,
    }
    return SampleRecord(meta, arrays)


def collect(
    model: Any,
    samples: Iterable[Sample],
    store: Store,
    protocol: Protocol = Protocol(),
    get_adapter: Callable[[], ModelAdapter] | None = None,
    get_base: Callable[[], ModelAdapter | None] | None = None,
    media_loader: Callable[[Sample], Media] | None = None,
    refresh: bool = False,
    on_progress: Callable[[Sample, str], None] | None = None,
) -> Iterator[SampleRecord | SampleError | CacheMiss]:
    """Yield one record per (sample, query), from the store or computed and stored.

    `model` is a ModelAdapter, or a ModelRef plus `get_adapter` to load it on the first cache
    miss (a fully cached run never loads weights). In a read-only store a miss yields a
    `CacheMiss` naming what is missing (the caller counts them). A sample whose media cannot be decoded or whose run
    fails yields a `SampleError` (the caller counts and reports it) and the run goes on.
    Records are yielded, not kept, so memory stays bounded over any number of samples.
    Each computed key is claimed first (`Store.claim`): a key another live worker is computing
    is skipped and taken from the store at the end (or computed, if that worker dropped it or
    still holds it after `CLAIM_WAIT_S`), so concurrent runs on one store compute each key once.
    """
    adapter = model if isinstance(model, ModelAdapter) else None
    base = None
    base_loaded = False
    ns = namespace(model.name)
    deferred: list[tuple[Sample, str, dict[str, Any], Any]] = []  # keys another worker is computing
    failed: set[str] = set()

    def compute(sample: Sample, parts: dict[str, Any], query: str, media: Media | None) -> tuple[Any, Media | None]:
        """Compute and store one record under this worker's claim -> (record or SampleError, media)."""
        nonlocal adapter, base, base_loaded
        try:
            if adapter is None:
                if get_adapter is None:
                    raise ValueError("collect needs get_adapter to compute missing records of a ModelRef")
                adapter = get_adapter()
            if not base_loaded:
                base = get_base() if get_base is not None else None
                base_loaded = True
            try:
                if media is None:
                    media = (media_loader(sample) if media_loader is not None else
                             load_sample_media(sample, fps=adapter.settings.fps,
                                               max_frames=adapter.settings.max_frames,
                                               frame_rule=adapter.settings.frame_rule))
                record = compute_record(adapter, sample, media, query, protocol, base)
            except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run
                err = SampleError(sample.id, "engine" if media is not None else "decode",
                                  sample.video or sample.audio, f"{type(exc).__name__}: {exc}")
                log.warning("sample %s failed: %s", sample.id, err.reason)
                return err, media
            store.put(ns, parts, record.meta, record.arrays)
            return record, media
        finally:
            store.release(ns, parts)

    def written(parts: dict[str, Any], seen: Any) -> SampleRecord | None:
        """The entry another worker wrote since `seen` (the entry's identity when we last looked)."""
        if _entry_id(store, ns, parts) == seen:
            return None
        rec = store.get(ns, parts)
        return SampleRecord(rec.meta, dict(rec.arrays)) if rec is not None else None

    for sample in samples:
        media = None
        for query in protocol.queries:
            parts = record_parts(model, sample, query, protocol)
            if not refresh:
                rec = store.get(ns, parts)
                if rec is not None:
                    if on_progress:
                        on_progress(sample, "cached")
                    yield SampleRecord(rec.meta, dict(rec.arrays))
                    continue
            if store.readonly:
                # Counted by the caller, so one message can say how many are missing.
                if on_progress:
                    on_progress(sample, "missing")
                yield CacheMiss(ns, parts, store.path(ns, parts, arrays=True), readonly=True)
                continue
            seen = _entry_id(store, ns, parts) if refresh else None  # a miss was just seen otherwise
            if not store.claim(ns, parts):
                deferred.append((sample, query, parts, seen))  # another worker computes it: later
                continue
            got = written(parts, seen)  # the holder before us may have finished just now
            if got is not None:
                store.release(ns, parts)
                if on_progress:
                    on_progress(sample, "cached")
                yield got
                continue
            item, media = compute(sample, parts, query, media)
            if on_progress:
                on_progress(sample, "failed" if isinstance(item, SampleError) else "computed")
            yield item
            if isinstance(item, SampleError):
                failed.add(sample.id)
                break

    # Keys other workers held: take each from the store once written; compute it if its claim
    # was dropped without an entry (the worker failed) or is still held after CLAIM_WAIT_S.
    deadline = time.monotonic() + CLAIM_WAIT_S
    while deferred:
        waiting = []
        for sample, query, parts, seen in deferred:
            got = written(parts, seen)
            if got is None and sample.id in failed:
                continue  # as in the loop above: a failed sample's other queries are not computed
            if got is None:
                if not store.claim(ns, parts) and time.monotonic() < deadline:
                    waiting.append((sample, query, parts, seen))
                    continue
                got = written(parts, seen)
                if got is not None:
                    store.release(ns, parts)
            if got is not None:
                if on_progress:
                    on_progress(sample, "cached")
                yield got
                continue
            item, _ = compute(sample, parts, query, None)
            if on_progress:
                on_progress(sample, "failed" if isinstance(item, SampleError) else "computed")
            if isinstance(item, SampleError):
                failed.add(sample.id)
            yield item
        deferred = waiting
        if deferred:
            time.sleep(CLAIM_POLL_S)


def _entry_id(store: Store, ns: str, parts: dict[str, Any]) -> tuple[int, int] | None:
    """Identity of the stored record file (inode, mtime): a new write renames a new file in."""
    try:
        st = store.path(ns, parts, arrays=True).stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns
