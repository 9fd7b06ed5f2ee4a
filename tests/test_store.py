"""Tests of the content-addressed result store: keys, round-trips, corruption, concurrency."""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

import avprobe
from avprobe.store import CacheMiss, ReadOnlyStoreError, Record, Store, StoreWriteError, canonical_json

NS = "organism/engine"


def parts(i: int = 0, **extra) -> dict:
    return {
        "model": "organism",
        "revision": "r1",
        "sample": f"sha-{i}",
        "condition": "baseline",
        "engine": avprobe.ENGINE_VERSION,
        **extra,
    }


# ---- keys and layout -------------------------------------------------------------------


def test_key_is_canonical_and_sensitive(tmp_path: Path) -> None:
    s = Store(tmp_path)
    a = {"b": 1, "a": "x", "c": [1, 2]}
    b = {"c": (1, 2), "a": "x", "b": np.int64(1)}  # other order, tuple, numpy scalar
    assert s.key(NS, a) == s.key(NS, b)
    assert len(s.key(NS, a)) == 64
    assert s.key(NS, a) != s.key(NS, {**a, "b": 2})
    assert s.key(NS, a) != s.key("organism/judge", a)
    assert s.key(NS, {"x": True}) != s.key(NS, {"x": 1})  # JSON tells true from 1
    # The key is the sha256 of canonical JSON, so other tools can recompute it.
    import hashlib

    doc = canonical_json({"namespace": NS, "parts": a})
    assert s.key(NS, a) == hashlib.sha256(doc.encode()).hexdigest()


def test_path_layout(tmp_path: Path) -> None:
    s = Store(tmp_path)
    k = s.key(NS, parts())
    assert s.path(NS, parts()) == tmp_path / "organism" / "engine" / k[:2] / f"{k}.json"
    assert s.path(NS, parts(), arrays=True) == tmp_path / "organism" / "engine" / k[:2] / f"{k}.npz"


@pytest.mark.parametrize("ns", ["", "/abs", "a//b", "a/../b", "a/./b", "trailing/", "sp ace", "x/ab"])
def test_bad_namespaces_rejected(tmp_path: Path, ns: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        Store(tmp_path).key(ns, parts())


def test_unjsonable_parts_and_values_rejected(tmp_path: Path) -> None:
    s = Store(tmp_path)
    with pytest.raises(TypeError, match=r"parts\['p'\].*Path"):
        s.put_json(NS, {"p": Path("x")}, {})
    with pytest.raises(TypeError, match="dict key 1"):
        s.put_json(NS, parts(), {1: "a"})
    with pytest.raises(TypeError, match="object"):
        s.put(NS, parts(), {}, {"o": np.array([{}, 1], dtype=object)})
    with pytest.raises(ValueError, match="array name"):
        s.put(NS, parts(), {}, {"a/b": np.zeros(1)})
    assert not s.contains(NS, parts())


# ---- round trips -----------------------------------------------------------------------


def test_json_round_trip_keeps_nan_and_converts_numpy(tmp_path: Path) -> None:
    s = Store(tmp_path)
    value = {
        "score": float("nan"),
        "inf": float("-inf"),
        "f32": np.float32(0.25),
        "i": np.int16(-3),
        "b": np.bool_(True),
        "t": (1, "two", None),
        "arr": np.array([[1.5, float("nan")]]),
        "nested": {"ü": [{"x": 1}]},
    }
    s.put_json(NS, parts(), value)
    got = s.get_json(NS, parts())
    assert got is not None
    assert math.isnan(got["score"]) and got["inf"] == float("-inf")
    assert got["f32"] == 0.25 and got["i"] == -3 and got["b"] is True
    assert got["t"] == [1, "two", None]
    assert got["arr"][0][0] == 1.5 and math.isnan(got["arr"][0][1])
    assert got["nested"] == {"ü": [{"x": 1}]}
    assert s.stats.hits == 1 and s.stats.writes == 1
    # pretty, sorted, with its parts and checksum
    text = s.path(NS, parts()).read_text()
    doc = json.loads(text)
    assert doc["parts"] == parts() and len(doc["checksum"]) == 64
    assert text.index('"checksum"') < text.index('"value"') and "\n" in text


def test_record_round_trip(tmp_path: Path) -> None:
    s = Store(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {
        "attn": rng.random((4, 3, 5), dtype=np.float32),
        "half": rng.random(7).astype(np.float16),
        "ids": np.arange(11, dtype=np.int64),
        "mask": rng.random(5) > 0.5,
        "words": np.array(["dog", "siren"]),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 4)),
        "fortran": np.asfortranarray(rng.random((3, 2))),
    }
    s.put(NS, parts(), {"caption": "i see a dog", "nan": float("nan")}, arrays)
    rec = s.get(NS, parts())
    assert isinstance(rec, Record)
    assert rec.meta["caption"] == "i see a dog" and math.isnan(rec.meta["nan"])
    assert set(rec.arrays) == set(arrays)
    for name, a in arrays.items():
        assert rec.arrays[name].dtype == a.dtype and rec.arrays[name].shape == a.shape
        np.testing.assert_array_equal(rec.arrays[name], a)
    # a plain numpy npz, no pickle needed
    with np.load(s.path(NS, parts(), arrays=True), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["ids"], arrays["ids"])
    # meta-only record; json and record entries of one key are separate
    s.put(NS, parts(1), {"k": 1})
    assert s.get(NS, parts(1)) == Record(meta={"k": 1}, arrays={})
    assert s.get_json(NS, parts(1)) is None
    assert s.contains(NS, parts(1)) and not s.contains(NS, parts(2))


def test_same_content_gives_same_bytes(tmp_path: Path) -> None:
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    for st in (a, b):
        st.put(NS, parts(), {"m": 1}, {"x": np.arange(6.0)})
    assert a.path(NS, parts(), arrays=True).read_bytes() == b.path(NS, parts(), arrays=True).read_bytes()


def test_miss_and_stats(tmp_path: Path) -> None:
    s = Store(tmp_path)
    assert s.get_json(NS, parts()) is None and s.get(NS, parts()) is None
    assert s.stats.misses == 2 and s.stats.hits == 0
    with pytest.raises(CacheMiss) as e:
        s.require_json(NS, parts())
    assert "sha-0" in str(e.value) and NS in str(e.value)
    s.put_json(NS, parts(), {"a": 1})
    assert s.require_json(NS, parts()) == {"a": 1}


def test_iter_entries_lists_parts_only_of_that_namespace(tmp_path: Path) -> None:
    s = Store(tmp_path)
    for i in range(5):
        s.put_json(NS, parts(i), {"i": i})
    s.put(NS, parts(9), {"i": 9}, {"x": np.zeros(2)})
    s.put_json("organism", parts(100), {})  # parent namespace: not listed
    s.put_json(NS + "/judge", parts(101), {})  # child namespace: not listed
    # stray files: a temp file from a killed writer, a quarantined entry, a README
    shard = s.path(NS, parts(0)).parent
    (shard / ".x.json.123.tmp").write_text("{")
    (shard / (s.key(NS, parts(0)) + ".json.corrupt")).write_text("{")
    (tmp_path / "organism" / "engine" / "README").write_text("hi")
    listed = list(s.iter_entries(NS))
    assert sorted(p["sample"] for p, _ in listed) == [f"sha-{i}" for i in (0, 1, 2, 3, 4, 9)]
    assert {path.suffix for _, path in listed} == {".json", ".npz"}
    assert list(s.iter_entries("nothing/here")) == []
    assert s.stats.corrupt == 0


# ---- corruption ------------------------------------------------------------------------


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    elif how == "empty":
        data = bytearray()
    elif how == "flip":
        data[len(data) // 2] ^= 0x5A
    elif how == "garbage":
        data = bytearray(b"\x00\xff not an entry")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "empty", "flip", "garbage"])
@pytest.mark.parametrize("kind", ["json", "npz"])
def test_corrupt_entry_is_a_logged_miss_and_moved_aside(tmp_path: Path, caplog, how: str, kind: str) -> None:
    s = Store(tmp_path)
    arrays = {"x": np.arange(200.0)}
    if kind == "json":
        s.put_json(NS, parts(), {"v": list(range(50))})
        path = s.path(NS, parts())
    else:
        s.put(NS, parts(), {"v": 1}, arrays)
        path = s.path(NS, parts(), arrays=True)
    _damage(path, how)
    getter = s.get_json if kind == "json" else s.get
    with caplog.at_level(logging.WARNING, logger="avprobe.store"):
        assert getter(NS, parts()) is None
    assert str(path) in caplog.text and "corrupt" in caplog.text
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists()
    assert s.stats.corrupt == 1 and s.stats.misses == 1 and s.stats.hits == 0
    # recompute and store again: works
    if kind == "json":
        s.put_json(NS, parts(), {"v": 2})
        assert s.get_json(NS, parts()) == {"v": 2}
    else:
        s.put(NS, parts(), {"v": 2}, arrays)
        assert s.get(NS, parts()).meta == {"v": 2}


def test_valid_json_with_edited_value_fails_checksum(tmp_path: Path, caplog) -> None:
    s = Store(tmp_path)
    s.put_json(NS, parts(), {"score": 0.25})
    path = s.path(NS, parts())
    path.write_text(path.read_text().replace("0.25", "0.75"))
    json.loads(path.read_text())  # still valid JSON
    with caplog.at_level(logging.WARNING):
        assert s.get_json(NS, parts()) is None
    assert "checksum" in caplog.text


def test_entry_copied_under_another_key_is_rejected(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.put_json(NS, parts(1), {"v": 1})
    dst = s.path(NS, parts(2))
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(s.path(NS, parts(1)).read_bytes())
    assert s.get_json(NS, parts(2)) is None
    assert s.stats.corrupt == 1


@pytest.mark.parametrize("kind", ["json", "npz"])
def test_every_single_byte_flip_is_detected_or_harmless(tmp_path: Path, kind: str) -> None:
    """Flip each byte of an entry in turn: a read gives the original content or a miss, never other data."""
    s = Store(tmp_path)
    arr = np.linspace(0, 1, 12).reshape(3, 4)
    if kind == "json":
        s.put_json(NS, parts(), {"v": [1.5, 2.5], "c": "dog"})
        path = s.path(NS, parts())
    else:
        s.put(NS, parts(), {"c": "dog"}, {"a": arr})
        path = s.path(NS, parts(), arrays=True)
    good = path.read_bytes()
    logging.getLogger("avprobe.store").disabled = True  # thousands of warnings otherwise
    try:
        misses = 0
        for i in range(len(good)):
            bad = bytearray(good)
            bad[i] ^= 0x01
            path.write_bytes(bytes(bad))
            if kind == "json":
                got = s.get_json(NS, parts())
                ok = got is None or got == {"v": [1.5, 2.5], "c": "dog"}
            else:
                got = s.get(NS, parts())
                ok = got is None or (got.meta == {"c": "dog"} and np.array_equal(got.arrays["a"], arr))
            assert ok, f"byte {i} flipped gave wrong data: {got}"
            misses += got is None
            for p in path.parent.iterdir():
                if p.name.endswith(".corrupt"):
                    p.unlink()
    finally:
        logging.getLogger("avprobe.store").disabled = False
    assert misses > len(good) // 2  # most flips must be caught (the rest hit zip header slack)


def test_readonly_store_leaves_corrupt_entry_and_never_writes(tmp_path: Path, caplog) -> None:
    Store(tmp_path).put_json(NS, parts(), {"v": 1})
    ro = Store(tmp_path, readonly=True)
    assert ro.require_json(NS, parts()) == {"v": 1}
    path = ro.path(NS, parts())
    _damage(path, "truncate")
    with caplog.at_level(logging.WARNING):
        assert ro.get_json(NS, parts()) is None
    assert "read-only" in caplog.text and path.exists()
    with pytest.raises(CacheMiss, match="read-only"):
        ro.require_json(NS, parts())
    with pytest.raises(CacheMiss, match="sha-5"):
        ro.require(NS, parts(5))
    with pytest.raises(ReadOnlyStoreError):
        ro.put_json(NS, parts(), {"v": 2})
    with pytest.raises(ReadOnlyStoreError):
        ro.put(NS, parts(), {})


def test_failed_write_leaves_old_entry_and_no_temp(tmp_path: Path, monkeypatch) -> None:
    s = Store(tmp_path)
    s.put_json(NS, parts(), {"v": 1})

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(StoreWriteError, match="disk full") as e:  # still an OSError, for callers catching those
        s.put_json(NS, parts(), {"v": 2})
    assert isinstance(e.value, OSError) and str(tmp_path) in str(e.value)
    monkeypatch.undo()
    assert s.get_json(NS, parts()) == {"v": 1}
    assert [p.name for p in s.path(NS, parts()).parent.iterdir()] == [s.path(NS, parts()).name]


def test_quarantine_spares_an_entry_rewritten_meanwhile(tmp_path: Path) -> None:
    """A reader that saw a corrupt file must not move aside the good one a writer renamed over it."""
    s = Store(tmp_path)
    s.put_json(NS, parts(), {"v": 1})
    path = s.path(NS, parts())
    _damage(path, "truncate")
    seen = os.stat(path)
    s.put_json(NS, parts(), {"v": 2})  # writer wins the race
    s._quarantine(path, seen, "test")
    assert s.get_json(NS, parts()) == {"v": 2}


# ---- concurrency -----------------------------------------------------------------------


def _payload(i: int, writer: int) -> tuple[dict, dict]:
    rng = np.random.default_rng(1000 * writer + i)
    x = rng.random((50, 40))
    return {"i": i, "writer": writer, "sum": float(x.sum())}, {"x": x}


def _consistent(rec: Record | None, i: int) -> bool:
    return rec is None or (rec.meta["i"] == i and math.isclose(float(rec.arrays["x"].sum()), rec.meta["sum"]))


def _hammer(root: str, writer: int, n_iter: int, n_keys: int) -> tuple[int, int]:
    """Write and read overlapping keys; return (bad reads, corrupt count)."""
    s = Store(root)
    bad = 0
    for it in range(n_iter):
        i = (it + writer) % n_keys
        meta, arrays = _payload(i, writer)
        s.put("stress/np", parts(i), meta, arrays)
        s.put_json("stress/js", parts(i), meta)
        j = (it * 7 + writer) % n_keys
        bad += not _consistent(s.get("stress/np", parts(j)), j)
        got = s.get_json("stress/js", parts(j))
        bad += got is not None and got["i"] != j
    return bad, s.stats.corrupt


def test_concurrent_processes_never_corrupt(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch threads may exist
    n_proc, n_iter, n_keys = 3, 40, 4
    with ctx.Pool(n_proc) as pool:
        results = pool.starmap(_hammer, [(str(tmp_path), w, n_iter, n_keys) for w in range(n_proc)])
    assert results == [(0, 0)] * n_proc
    s = Store(tmp_path)
    for i in range(n_keys):
        rec = s.get("stress/np", parts(i))
        assert rec is not None and _consistent(rec, i) and rec.meta["writer"] in range(n_proc)
        assert s.get_json("stress/js", parts(i))["i"] == i
    assert len(list(s.iter_entries("stress/np"))) == n_keys
    assert s.stats.corrupt == 0
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix not in (".json", ".npz")]
    assert leftovers == []


def test_concurrent_threads_share_one_store(tmp_path: Path) -> None:
    s = Store(tmp_path)
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for it in range(25):
                i = it % 3
                meta, arrays = _payload(i, w)
                s.put(NS, parts(i), meta, arrays)
                assert _consistent(s.get(NS, parts(i)), i)
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    st = s.stats
    assert st.writes == 100 and st.hits == 100 and st.corrupt == 0


def test_npz_meta_member_is_first(tmp_path: Path) -> None:
    s = Store(tmp_path)
    s.put(NS, parts(), {"m": 1}, {"b": np.zeros(3), "a": np.ones(2)})
    with zipfile.ZipFile(s.path(NS, parts(), arrays=True)) as zf:
        assert zf.namelist() == ["meta.json", "a.npy", "b.npy"]
