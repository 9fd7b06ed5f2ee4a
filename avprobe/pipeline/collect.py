"""Collect: run the engine over a sample set and store one compact record per (sample, query).

What a record holds and how it is keyed: `avprobe.records`. Media come from the sample's
source (`avprobe.media.sources`: files, or a registered renderer such as the organism
world). Fidelity is judged afterwards (`avprobe.pipeline.evidence`); judges cache their own
verdicts.
"""

from __future__ import annotations

import logging
import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from avprobe.adapters.base import ModelAdapter
from avprobe.conditions import Baseline, Condition, SpanRule
from avprobe.media.sources import load_sample_media
from avprobe.probes.knockout import SIGHT_WORDS, sight_rule  # noqa: F401 - re-exported (lab, tests)
from avprobe.probes.logit_lens import LensConfig
from avprobe.records import SHIFT_BASES, Protocol, SampleRecord, namespace, pack_shares, record_parts
from avprobe.store import CacheMiss, Store
from avprobe.types import Media, Role, Sample, SampleError

log = logging.getLogger(__name__)

# How long to wait, at the end of a run, for keys another worker claimed before computing them
# anyway (a hung or remote worker whose claim is not stale yet); and how often to look.
CLAIM_WAIT_S = 300.0
CLAIM_POLL_S = 0.25

def _condition_meta(c: Condition) -> dict[str, Any]:
    if isinstance(c, Baseline):
        return {"key": c.key(), "label": c.label(), "blocked": [], "layers": []}
    return {
        "key": c.key(),
        "label": c.label(),
        "blocked": [b.label if isinstance(b, Role) else b.name for b in c.blocked],
        "layers": list(c.layers),
    }


@dataclass
class _Prepared:
    """One (sample, query)'s engine inputs, before the run."""

    sample: Sample
    media: Media
    query: str
    mi: Any
    conditions: list[Condition]
    config: Any
    do_shift: bool  # the vision-only base's shift
    do_self: bool  # the audio-ablated self's shift


def _prepare(adapter: ModelAdapter, sample: Sample, media: Media, query: str, protocol: Protocol,
             base: ModelAdapter | None, mi: Any = None) -> _Prepared:
    from avprobe.engine import EngineConfig

    mi = adapter.build_inputs(media, query) if mi is None else mi
    L = adapter.n_layers
    own = protocol.own_words and protocol.knockout
    conds = protocol.conditions(L, sight_rule(adapter) if own else None)
    lens = LensConfig(top_k=protocol.lens_top_k, use_norm=protocol.lens_norm) if protocol.lens else None
    do_shift = protocol.shift and base is not None and media.frames is not None
    # the audio-ablated self needs audio to remove and frames to keep
    do_self = protocol.shift and protocol.self_shift and media.frames is not None and media.waveform is not None
    config = EngineConfig(max_new_tokens=protocol.max_new_tokens, lens=lens, keep_logprobs=do_shift or do_self,
                          record_attention=protocol.flow, record_buckets=protocol.flow)
    return _Prepared(sample, media, query, mi, conds, config, do_shift, do_self)


def compute_record(
    adapter: ModelAdapter,
    sample: Sample,
    media: Media,
    query: str,
    protocol: Protocol,
    base: ModelAdapter | None = None,
) -> SampleRecord:
    """Run the engine (and the base-model shift) for one sample and one query."""
    from avprobe.engine import run

    p = _prepare(adapter, sample, media, query, protocol, base)
    res = run(adapter, p.mi, p.conditions, p.config)
    return _record(adapter, p, res, protocol, base)


def compute_records(
    adapter: ModelAdapter,
    items: list[tuple[Sample, Media, str]] | list[tuple[Sample, Media, str, Any]],
    protocol: Protocol,
    base: ModelAdapter | None = None,
) -> list[SampleRecord | Exception]:
    """`compute_record` for several (sample, media, query[, inputs]) at once: one batched decode
    (`engine.run_batch`) of every condition of every clip, the base-model shift batched over
    clips of one length. Returns, per item in order, its record or the exception it raised:
    a clip that fails (its inputs, or the batch's run, which is then retried clip by clip)
    fails alone, its batch-mates are computed all the same. One item is `compute_record`."""
    from avprobe.engine import run, run_batch

    if len(items) == 1 and len(items[0]) == 3:
        try:
            return [compute_record(adapter, *items[0], protocol, base)]  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - the caller turns it into this clip's failure
            return [exc]
    out: list[Any] = []
    for item in items:
        try:
            out.append(_prepare(adapter, item[0], item[1], item[2], protocol, base, item[3] if len(item) > 3 else None))
        except Exception as exc:  # noqa: BLE001
            out.append(exc)
    ready = [i for i, p in enumerate(out) if isinstance(p, _Prepared)]
    if not ready:
        return out
    # One config for the batch: the base row's log-probs are kept if any clip shifts (the
    # others ignore them; keeping them changes nothing else).
    cfg = replace(out[ready[0]].config, keep_logprobs=any(out[i].do_shift or out[i].do_self for i in ready))
    try:
        results: list[Any] = run_batch(adapter, [(out[i].mi, out[i].conditions) for i in ready], cfg)
    except Exception as exc:  # noqa: BLE001 - find the clip that fails: each alone
        log.warning("batch of %d clips failed (%s: %s); running them one by one", len(ready), type(exc).__name__, exc)
        results = []
        for i in ready:
            try:
                results.append(run(adapter, out[i].mi, out[i].conditions, cfg))
            except Exception as one:  # noqa: BLE001
                results.append(one)
    prepared = {i: out[i] for i in ready}
    shifts = _batched_shift(base, [(prepared[i], r) for i, r in zip(ready, results) if not isinstance(r, Exception)])
    for i, res in zip(ready, results):
        if isinstance(res, Exception):
            out[i] = res
            continue
        try:
            out[i] = _record(adapter, prepared[i], res, protocol, base, shifts.get(id(prepared[i])))
        except Exception as exc:  # noqa: BLE001
            out[i] = exc
    return out


def _batched_shift(base: ModelAdapter | None, done: list[tuple[_Prepared, Any]]) -> dict[int, Any]:
    """Base-model log-probs of the clips that shift, one forward per group of clips whose
    teacher-forced sequences have one length (no padding: the values are the one-clip ones).
    Keyed by id(prepared); a clip left out (a group of one, or a failed group) is computed by
    `_record` alone."""
    from avprobe.probes.base_shift import base_logprobs_batch

    todo = [(p, r) for p, r in done if p.do_shift and base is not None]
    if len(todo) < 2:
        return {}
    try:
        got = base_logprobs_batch(base, [(p.media, p.query, r.outputs[0].token_ids) for p, r in todo])
    except Exception as exc:  # noqa: BLE001 - each clip's own shift then runs alone, and fails alone
        log.warning("batched base-model shift failed (%s: %s); shifting clip by clip", type(exc).__name__, exc)
        return {}
    return {id(p): lp for (p, _), lp in zip(todo, got) if lp is not None}


def _record(adapter: ModelAdapter, p: _Prepared, res: Any, protocol: Protocol, base: ModelAdapter | None,
            base_lp: Any = None) -> SampleRecord:
    """The stored record of one (sample, query) from its engine result (and the shift)."""
    from avprobe.probes.base_shift import base_logprobs, shift

    sample, media, query, do_shift, do_self = p.sample, p.media, p.query, p.do_shift, p.do_self
    L = adapter.n_layers
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
        arrays["flow_steps"] = pack_shares(base_out.flow)  # [T, L, R] baseline row
    if res.bucket_flow is not None:
        arrays["bucket_flow"] = pack_shares(res.bucket_flow)  # [T, L, NB]
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
            blp = base_lp if kind == "vision" and base_lp is not None else base_logprobs(model, media, query, caption)
            sr = shift(res.logprobs, blp, caption)
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
        # the settings that built the inputs, and their source: not in the key (records.record_parts),
        # so a record says itself which prompt layout, frames and budget it was computed with
        "inputs": {**adapter.settings.inputs_view(), "source": getattr(adapter, "settings_source", "")},
        "n_layers": L,
        # what the knockouts and the flow cover on this model (hybrid models: attention layers only)
        "layer_kinds": list(adapter.layer_kinds),
        "attention_layers": list(adapter.attention_layers),
        "knockout_is_cut": adapter.knockout_is_cut,
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
    clips_per_batch: int | None = 1,
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

    `clips_per_batch`: how many (sample, query) records are computed in one batched decode
    (`compute_records`); 1 is the one-clip engine (`compute_record`), None chooses by memory
    (`auto_clips_per_batch`, measured on the first record computed alone). Either way a worker
    thread loads the next batch's media (batched: and builds its inputs) while the model runs
    the current one. The records are the same.
    """
    if clips_per_batch is not None and clips_per_batch < 1:
        raise ValueError(f"clips_per_batch must be at least 1 (or None: by memory), got {clips_per_batch}")
    adapter = model if isinstance(model, ModelAdapter) else None
    base = None
    base_loaded = False
    ns = namespace(model.name)
    deferred: list[tuple[Sample, str, dict[str, Any], Any]] = []  # keys another worker is computing
    failed: set[str] = set()

    def compute(sample: Sample, parts: dict[str, Any], query: str, media: Media | None) -> tuple[Any, Media | None]:
        """Compute and store one record under this worker's claim -> (record or SampleError, media)."""
        try:
            ensure_models()
            try:
                if media is None:
                    media = load_media(sample)
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

    def ensure_models() -> None:
        nonlocal adapter, base, base_loaded
        if adapter is None:
            if get_adapter is None:
                raise ValueError("collect needs get_adapter to compute missing records of a ModelRef")
            adapter = get_adapter()
        if not base_loaded:
            base = get_base() if get_base is not None else None
            base_loaded = True

    def load_media(sample: Sample) -> Media:
        assert adapter is not None
        if media_loader is not None:
            return media_loader(sample)
        return load_sample_media(sample, fps=adapter.settings.fps, max_frames=adapter.settings.max_frames,
                                 frame_rule=adapter.settings.frame_rule)

    # The worker thread's own adapter view: build_inputs with its own tokenizer copy (a Rust
    # tokenizer must not be borrowed by two threads at once); the model is shared, unused there.
    worker_adapter: list[Any] = []
    last_media: dict[str, Any] = {}  # the worker's: the last sample's media, for its next query

    def prepare(batch: list[tuple[Sample, str, dict[str, Any]]], build: bool) -> list[tuple[Any, Any]]:
        """In the worker: per item (media or the exception decoding raised, inputs or None)."""
        if build and not worker_adapter:
            worker_adapter.append(copy.copy(adapter))
            worker_adapter[0].tokenizer = copy.deepcopy(adapter.tokenizer)
        # a sample's queries share its media, across batches too (the last sample's is kept)
        media_of: dict[str, Any] = dict(last_media)
        out = []
        for sample, query, _ in batch:
            if sample.id not in media_of:
                try:
                    media_of[sample.id] = load_media(sample)
                except Exception as exc:  # noqa: BLE001 - this sample's decode failure
                    media_of[sample.id] = exc
            media, mi = media_of[sample.id], None
            if build and not isinstance(media, Exception):
                try:
                    mi = worker_adapter[0].build_inputs(media, query)
                except Exception:  # noqa: BLE001 - left to the engine's own call, which reports it
                    mi = None
            out.append((media, mi))
        last_media.clear()
        if batch:
            last_media[batch[-1][0].id] = media_of[batch[-1][0].id]
        return out

    def finish(batch: list[tuple[Sample, str, dict[str, Any]]], prepared: list[tuple[Any, Any]],
               batched: bool) -> Iterator[SampleRecord | SampleError]:
        """Compute, store and yield one prepared batch (claims released whatever happens)."""
        try:
            todo = [(i, sample, query, media, mi) for i, ((sample, query, _), (media, mi)) in
                    enumerate(zip(batch, prepared)) if not isinstance(media, Exception)]
            got: dict[int, Any] = {}
            if batched and todo:
                items = [(s, m, q, mi) if mi is not None else (s, m, q) for _, s, q, m, mi in todo]
                for (i, *_), r in zip(todo, compute_records(adapter, items, protocol, base)):
                    got[i] = r
            for (i, sample, query, media, _) in todo if not batched else ():
                try:
                    got[i] = compute_record(adapter, sample, media, query, protocol, base)
                except Exception as exc:  # noqa: BLE001 - one bad sample must not end the run
                    got[i] = exc
            for i, ((sample, query, parts), (media, _)) in enumerate(zip(batch, prepared)):
                claimed.pop(_key(parts), None)
                if sample.id in failed:  # as ever: a failed sample's other queries are not kept
                    store.release(ns, parts)
                    continue
                r = got.get(i, media)
                try:
                    if isinstance(r, Exception):
                        r = SampleError(sample.id, "decode" if isinstance(media, Exception) else "engine",
                                        sample.video or sample.audio, f"{type(r).__name__}: {r}")
                        log.warning("sample %s failed: %s", sample.id, r.reason)
                        failed.add(sample.id)
                    else:
                        store.put(ns, parts, r.meta, r.arrays)
                finally:
                    store.release(ns, parts)
                if on_progress:
                    on_progress(sample, "failed" if isinstance(r, SampleError) else "computed")
                yield r
        finally:
            for _, _, parts in batch:
                if claimed.pop(_key(parts), None) is not None:
                    store.release(ns, parts)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="avprobe-prefetch")
    claimed: dict[str, dict[str, Any]] = {}
    inflight: tuple[list, Future, bool] | None = None
    n_batch = clips_per_batch

    def advance(batch: list[tuple[Sample, str, dict[str, Any]]]) -> Iterator[SampleRecord | SampleError]:
        """Hand `batch` to the worker, then compute the batch handed over before (so the two
        overlap); an empty batch drains."""
        nonlocal inflight
        nxt = (batch, pool.submit(prepare, batch, (n_batch or 1) > 1), (n_batch or 1) > 1) if batch else None
        if inflight is not None:
            done, fut, batched = inflight
            inflight = None
            yield from finish(done, fut.result(), batched)
        inflight = nxt

    batch: list[tuple[Sample, str, dict[str, Any]]] = []
    try:
        for sample in samples:
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
                claimed[_key(parts)] = parts
                try:
                    ensure_models()
                except BaseException:
                    store.release(ns, parts)
                    claimed.pop(_key(parts), None)
                    raise
                batch.append((sample, query, parts))
                if n_batch is None:  # by memory: the first record alone, measured, sets the size
                    first = batch
                    batch = []
                    yield from advance(first)
                    yield from advance([])
                    kv = first_clip_bytes(store, ns, first[0][2], adapter, protocol)
                    if kv is not None:  # else (it failed) the next record is measured alone
                        n_batch = auto_clips_per_batch(adapter, protocol, kv)
                        log.info("clips per batch (by memory): %d", n_batch)
                elif len(batch) >= n_batch:
                    full, batch = batch, []
                    yield from advance(full)
        yield from advance(batch)
        batch = []
        yield from advance([])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        for parts in claimed.values():  # a run stopped early: give back what it never computed
            store.release(ns, parts)
        claimed.clear()

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


def _key(parts: dict[str, Any]) -> str:
    return repr(sorted(parts.items()))


# The batch size chosen by memory (clips_per_batch=None): the clips of one batch hold, each,
# their prompt keys and values and their rows' suffixes (RunResult.memory, measured on the
# first record), plus activations of the same order; the batch may take AUTO_MEMORY_SHARE of
# the memory available on the model's device, and at most AUTO_MAX_CLIPS clips (beyond that
# the per-step costs a batch shares are already small against the per-clip work).
AUTO_MEMORY_SHARE = 0.25
AUTO_MAX_CLIPS = 8
AUTO_OVERHEAD = 4.0  # activations, scores and recording buffers per byte of K/V (measured ~2-3x)


def first_clip_bytes(store: Store, ns: str, parts: dict[str, Any], adapter: ModelAdapter,
                     protocol: Protocol) -> int | None:
    """The decode's key/value bytes for the record just computed (from its prompt length and
    condition count: `clip_kv_bytes`), or None if it was not stored (it failed)."""
    rec = store.get(ns, parts)
    if rec is None:
        return None
    return clip_kv_bytes(adapter, int(rec.meta["prompt_len"]), len(rec.meta["conditions"]), protocol.max_new_tokens)


def clip_kv_bytes(adapter: ModelAdapter, prompt_len: int, n_conditions: int, max_new_tokens: int) -> int:
    """Keys and values one clip's decode holds (engine.RunResult.memory, prefix + suffix): every
    layer's prompt prefix once, and each row's own max_new_tokens + 1 suffix positions."""
    import torch

    tc = adapter.text_config
    # A heterogeneous config (Gemma 4) refuses the global per-layer attributes: the widest
    # layer bounds the estimate.
    per_layer = getattr(tc, "per_layer_config", None)
    configs = [per_layer[i] for i in range(len(per_layer))] if per_layer is not None else [tc]
    width = max((getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
                * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads) for c in configs)
    elt = torch.empty((), dtype=adapter.dtype).element_size()
    positions = (prompt_len - 1) + n_conditions * (max_new_tokens + 1)
    return 2 * adapter.n_layers * width * elt * positions


def available_memory(device: Any) -> int | None:
    """Bytes free on `device`: the GPU's free memory, or the host's MemAvailable."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def auto_clips_per_batch(adapter: ModelAdapter, protocol: Protocol, clip_bytes: int | None) -> int:
    """Clips per batch by memory: AUTO_MEMORY_SHARE of the free memory over one clip's decode
    state (its K/V bytes x AUTO_OVERHEAD), between 1 and AUTO_MAX_CLIPS. Unknown sizes: 1."""
    free = available_memory(adapter.device)
    if not clip_bytes or not free:
        return 1
    return max(1, min(AUTO_MAX_CLIPS, int(free * AUTO_MEMORY_SHARE // (clip_bytes * AUTO_OVERHEAD))))
