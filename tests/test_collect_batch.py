"""`clips_per_batch` in collect / gather: the batched engine writes the one-clip engine's
records (same keys, same bytes), a bad clip fails alone, and the batch size by memory."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from avprobe.adapters import ref
from avprobe.pipeline import collect as collect_mod
from avprobe.pipeline.gather import clips_per_batch, gather, load_samples
from avprobe.probes import attention as attn
from avprobe.records import Protocol
from avprobe.store import Store
from avprobe.types import SampleError


def _stored(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def organism():
    mref = ref("organism")
    samples, _ = load_samples("organism", limit=2)
    proto = Protocol(queries=mref.settings.queries)
    adapter = mref.load(device="cpu")
    base = ref(mref.settings.base_model).load(device="cpu")
    return mref, samples, proto, adapter, base


@pytest.fixture(scope="module")
def one_clip(organism, tmp_path_factory):
    """The one-clip engine's store for the two samples (the reference)."""
    mref, samples, proto, adapter, base = organism
    root = tmp_path_factory.mktemp("one")
    got = list(collect_mod.collect(adapter, samples, Store(root), proto, get_base=lambda: base, clips_per_batch=1))
    assert len(got) == 2 * len(samples) and not [g for g in got if isinstance(g, SampleError)]
    return root


@pytest.mark.parametrize("n", [3, None])
def test_batched_records_equal_the_one_clip_engines_bit_for_bit(organism, one_clip, tmp_path, n, monkeypatch):
    """3 clips per batch (a sample's two queries split across batches) and the size by memory:
    every stored file, flows, lens, captions and the base-model shift, byte for byte. The
    organism's clips share one prompt layout: their attention ran as stacks of clips."""
    mref, samples, proto, adapter, base = organism
    root = tmp_path / "batched"
    seen: list[int] = []  # the clip count of every attention call of a decode step
    step = attn.SharedPrefixDecode._attend
    monkeypatch.setattr(attn.SharedPrefixDecode, "_attend", lambda self, st, *a: seen.append(st.C) or step(self, st, *a))
    got = list(collect_mod.collect(adapter, samples, Store(root), proto, get_base=lambda: base, clips_per_batch=n))
    assert len(got) == 4 and not [g for g in got if isinstance(g, SampleError)]
    want = _stored(one_clip)
    assert len(want) >= 4
    assert _stored(root) == want
    assert all(g.meta["shift"] is not None for g in got)  # the shift ran (batched) and matched
    assert max(seen) > 1  # clips of one layout attended as stacks


def test_a_bad_clip_fails_alone_and_its_batch_mates_are_computed(organism, one_clip, tmp_path, monkeypatch):
    """One sample whose media cannot be decoded, one whose inputs cannot be built and one on
    which the batched run itself raises: each is its own failure record; the others' records
    are the one-clip engine's."""
    from avprobe import engine
    from avprobe.media.sources import load_sample_media

    mref, samples, proto, adapter, base = organism
    bad_decode = dataclasses.replace(samples[0], id="bad-decode")
    bad_inputs = dataclasses.replace(samples[0], id="bad-inputs")
    bad_run = dataclasses.replace(samples[0], id="bad-run")
    batch = [samples[0], bad_decode, bad_inputs, samples[1], bad_run]

    def loader(sample):
        if sample.id == "bad-decode":
            raise OSError("truncated file")
        media = load_sample_media(sample, fps=adapter.settings.fps, max_frames=adapter.settings.max_frames,
                                  frame_rule=adapter.settings.frame_rule)
        if sample.id == "bad-inputs":
            return dataclasses.replace(media, frames=None, waveform=None)  # nothing to build a prompt from
        return media

    real_run, real_batch = engine.run, engine.run_batch

    def poisoned(mi) -> bool:  # the bad-run clip's inputs (marked by prepare below)
        return bool(getattr(mi, "_poison", False))

    def run(adapter_, mi, conds, config=engine.EngineConfig()):
        if poisoned(mi):
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_run(adapter_, mi, conds, config)

    def run_batch(adapter_, clips, config=engine.EngineConfig()):
        if any(poisoned(mi) for mi, _ in clips):
            raise RuntimeError("CUDA error: an illegal memory access")
        return real_batch(adapter_, clips, config)

    real_prepare = collect_mod._prepare

    def prepare(adapter_, sample, media, query, protocol, base_, mi=None):
        p = real_prepare(adapter_, sample, media, query, protocol, base_, mi)
        if sample.id == "bad-run":
            p.mi._poison = True
        return p

    monkeypatch.setattr(engine, "run", run)
    monkeypatch.setattr(engine, "run_batch", run_batch)
    monkeypatch.setattr(collect_mod, "_prepare", prepare)
    root = tmp_path / "faulty"
    got = list(collect_mod.collect(adapter, batch, Store(root), proto, get_base=lambda: base, media_loader=loader,
                                   clips_per_batch=4))
    errors = {g.sample_id: g for g in got if isinstance(g, SampleError)}
    assert set(errors) == {"bad-decode", "bad-inputs", "bad-run"}  # one failure per bad sample
    assert errors["bad-decode"].stage == "decode" and "truncated file" in errors["bad-decode"].reason
    assert errors["bad-inputs"].stage == "engine" and errors["bad-run"].stage == "engine"
    assert "illegal memory access" in errors["bad-run"].reason
    records = [g for g in got if not isinstance(g, SampleError)]
    assert sorted((r.sample_id, r.query) for r in records) == sorted((s.id, q) for s in samples for q in proto.queries)
    assert _stored(root) == _stored(one_clip)  # the good ones, byte for byte; nothing for the bad
    assert not list(root.rglob(".*.claim"))  # every claim given back


def test_clips_per_batch_values():
    assert clips_per_batch("auto") is None and clips_per_batch("AUTO") is None
    assert clips_per_batch("4") == 4 and clips_per_batch(1) == 1 and clips_per_batch(None) is None
    for bad in ("0", "-2", "many", 0):
        with pytest.raises(ValueError, match="clips-per-batch"):
            clips_per_batch(bad)
    with pytest.raises(ValueError, match="at least 1"):
        next(collect_mod.collect(ref("organism"), [], Store(Path("/nonexistent")), clips_per_batch=0))


def test_the_batch_size_by_memory(organism, monkeypatch):
    """clip_kv_bytes is the engine's own measure (RunResult.memory); the size is a quarter of the
    free memory over 4x that, between 1 and AUTO_MAX_CLIPS."""
    from avprobe.engine import run

    mref, samples, proto, adapter, base = organism
    from avprobe.media.sources import load_sample_media

    media = load_sample_media(samples[0], fps=adapter.settings.fps, max_frames=adapter.settings.max_frames,
                              frame_rule=adapter.settings.frame_rule)
    p = collect_mod._prepare(adapter, samples[0], media, proto.queries[0], proto, None)
    res = run(adapter, p.mi, p.conditions, p.config)  # suffix buffers are allocated for every step
    kv = collect_mod.clip_kv_bytes(adapter, p.mi.prompt_len, len(p.conditions), proto.max_new_tokens)
    assert kv == res.memory["prefix"] + res.memory["suffix"] > 0
    monkeypatch.setattr(collect_mod, "available_memory", lambda device: 100 * kv)
    assert collect_mod.auto_clips_per_batch(adapter, proto, kv) == min(collect_mod.AUTO_MAX_CLIPS, 6)
    monkeypatch.setattr(collect_mod, "available_memory", lambda device: kv)
    assert collect_mod.auto_clips_per_batch(adapter, proto, kv) == 1
    monkeypatch.setattr(collect_mod, "available_memory", lambda device: 10**15)
    assert collect_mod.auto_clips_per_batch(adapter, proto, kv) == collect_mod.AUTO_MAX_CLIPS
    assert collect_mod.auto_clips_per_batch(adapter, proto, None) == 1
    assert collect_mod.available_memory("cpu") > 0


def test_gather_passes_the_batch_size_through(organism, one_clip, tmp_path):
    mref, samples, proto, adapter, base = organism
    r = gather(mref, samples, Store(tmp_path / "g"), proto, base_model=mref.settings.base_model, device="cpu",
               progress=False, keep=True, clips_per_batch=4)
    assert r.counts.computed == 4 and not r.failed
    want = {k: v for k, v in _stored(one_clip).items() if any(k == g for g in _stored(tmp_path / "g"))}
    assert want and _stored(tmp_path / "g") == want


# ---- the worker thread, without a model ---------------------------------------------------------


def _fake_record(sample, query):
    import numpy as np

    from avprobe.records import SampleRecord

    return SampleRecord({"sample_id": sample.id, "query": query, "conditions": [], "prompt_len": 10},
                        {"flow_mean": np.zeros((1, 2), np.float16)})


# (clips per batch, the compute call that waits, the sample the next batch loads meanwhile): one
# clip a batch: batch 2 is s0's second query (its media kept), so batch 2 waits for s1's load;
# three: batch 1 (s0 q1, s0 q22, s1 q1) waits for s2's load by batch 2 (s1 q22, s2 q1, s2 q22)
@pytest.mark.parametrize("n,waiting_call,next_sample", [(1, 2, "s1"), (3, 1, "s2")])
def test_media_load_once_per_sample_in_the_worker_overlapping_the_model(tmp_path, monkeypatch, n, waiting_call,
                                                                       next_sample):
    """The next batch's media are loaded in the worker thread while the current batch computes
    (a compute call waits until the loader has been called for the next batch's new sample:
    without the overlap it would time out), once per sample for all its queries."""
    import threading
    from types import SimpleNamespace

    from avprobe.types import Sample

    samples = [Sample(id=f"s{i}", media_key=f"m{i}") for i in range(4)]
    proto = Protocol(queries=("q1", "q22"), max_new_tokens=1)
    loads: list[tuple[str, str]] = []
    second_batch_loading = threading.Event()
    calls: list[list[tuple[str, str]]] = []

    def loader(sample):
        loads.append((sample.id, threading.current_thread().name))
        if sample.id == next_sample:
            second_batch_loading.set()
        return SimpleNamespace(frames=None)

    def engine(items):
        calls.append([(s.id, q) for s, _, q, *_ in items])
        if len(calls) == waiting_call:
            assert second_batch_loading.wait(20), "the next batch was not being loaded while this one computed"
        return [_fake_record(s, q) for s, _, q, *_ in items]

    monkeypatch.setattr(collect_mod, "compute_record",
                        lambda adapter, sample, media, query, protocol, base=None: engine([(sample, media, query)])[0])
    monkeypatch.setattr(collect_mod, "compute_records", lambda adapter, items, protocol, base=None: engine(items))
    adapter = SimpleNamespace(tokenizer=object(), build_inputs=lambda media, query: ("inputs", query))
    model = SimpleNamespace(name="fake", revision="r1")
    got = list(collect_mod.collect(model, samples, Store(tmp_path), proto, get_adapter=lambda: adapter,
                                   media_loader=loader, clips_per_batch=n))
    assert sorted((r.sample_id, r.query) for r in got) == sorted((s.id, q) for s in samples for q in proto.queries)
    assert [len(c) for c in calls] == ([1] * 8 if n == 1 else [3, 3, 2])
    assert sorted(s for s, _ in loads) == [s.id for s in samples]  # once per sample, not per query
    assert {t for _, t in loads} == {"avprobe-prefetch_0"}  # in the worker, never on the model's thread


def test_report_only_token_shares_are_packed_and_read_back_to_a_254th(organism, one_clip):
    """flow_steps and bucket_flow (the report's per-token figures) are stored as uint8 steps
    of 1/254: read back, they agree with the float16 mean flow of the same row to within
    a step, and NaN (no attention) survives; float16 arrays of older records pass through."""
    import numpy as np

    from avprobe.records import SHARE_MISSING, pack_shares, unpack_shares

    shares = np.array([0.0, 1.0, 0.5, 1 / 3, np.nan, 1.0000001, 0.0039])
    packed = pack_shares(shares)
    assert packed.dtype == np.uint8 and packed[4] == SHARE_MISSING and packed[5] == 254
    back = unpack_shares(packed)
    assert np.isnan(back[4]) and np.nanmax(np.abs(back - np.clip(shares, 0, 1))) <= 0.5 / 254 + 1e-12
    old = np.array([0.25, np.nan], dtype=np.float16)
    assert unpack_shares(old).dtype == np.float64 and np.isnan(unpack_shares(old)[1])

    mref, samples, proto, adapter, base = organism
    recs = list(collect_mod.collect(adapter, samples, Store(one_clip), proto, get_base=lambda: base))  # all stored
    assert len(recs) == 4 and not [r for r in recs if isinstance(r, SampleError)]
    for r in recs:
        assert r.arrays["flow_steps"].dtype == np.uint8 and r.arrays["bucket_flow"].dtype == np.uint8
        steps = unpack_shares(r.arrays["flow_steps"])  # [T, L, R]
        mean = r.arrays["flow_mean"][0].astype(np.float64)  # the baseline row, over steps
        assert np.allclose(steps.mean(0), mean, atol=1 / 254, equal_nan=True)
        assert np.nanmax(np.abs(np.nansum(steps, -1) - 1)) <= steps.shape[-1] / 254
    # the report's token boxes read them: attention tooltips and the heatmap, as from float16
    from avprobe.pipeline.evidence import Evidence
    from avprobe.report.html import ReportOptions, _token_box

    ev = Evidence(model=mref.name, records=recs)
    old_rec = dataclasses.replace(recs[0], arrays={**recs[0].arrays, **{
        k: unpack_shares(recs[0].arrays[k]).astype(np.float16) for k in ("flow_steps", "bucket_flow")}})
    for box in (_token_box(ev, recs[0], ReportOptions()), _token_box(ev, old_rec, ReportOptions())):
        assert "attention video" in box or "attention audio" in box
        assert "most-attended second" in box and "nan" not in box.lower()
