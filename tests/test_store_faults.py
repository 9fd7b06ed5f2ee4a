"""The store under faults: a full disk, a read-only directory, a store path that is a file,
temporary files of killed writers, and two workers computing into one store (claims)."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import avprobe.store as store_mod
from avprobe.store import (
    ReadOnlyStoreError,
    Store,
    StoreError,
    StorePathError,
    StoreWriteError,
)

ROOT = Path(__file__).resolve().parents[1]
NS = "organism/engine"


def parts(i: int = 0) -> dict:
    return {"model": "organism", "revision": "r1", "sample": f"sha-{i}", "engine": "e1"}


def files_in(shard: Path) -> list[str]:
    return sorted(p.name for p in shard.iterdir())


def raiser(err: int, real=None, only=None):
    """A stand-in for an os function that raises OSError(err); with `only`, just for the calls it
    accepts (the others go to `real`)."""

    def fail(*args, **kwargs):
        if only is not None and not only(*args):
            return real(*args, **kwargs)
        raise OSError(err, os.strerror(err))

    return fail


# ---- 1. full disk, read-only directory ---------------------------------------------------


@pytest.mark.parametrize("step", ["mkstemp", "fsync", "replace"])
@pytest.mark.parametrize("kind", ["json", "npz"])
def test_full_disk_is_one_clear_error_and_leaves_the_old_entry(tmp_path: Path, monkeypatch, step: str, kind: str):
    s = Store(tmp_path)
    put = (lambda v: s.put_json(NS, parts(), {"v": v})) if kind == "json" else \
          (lambda v: s.put(NS, parts(), {"v": v}, {"x": np.arange(100.0) * v}))
    put(1)
    path = s.path(NS, parts(), arrays=kind == "npz")
    old = path.read_bytes()
    fail = raiser(errno.ENOSPC)
    target = {"mkstemp": (store_mod.tempfile, "mkstemp"), "fsync": (os, "fsync"), "replace": (os, "replace")}[step]
    monkeypatch.setattr(*target, fail)
    with pytest.raises(StoreWriteError) as e:
        put(2)
    monkeypatch.undo()
    msg = str(e.value)
    assert str(tmp_path) in msg and "free space" in msg and "--store" in msg, msg
    assert isinstance(e.value, StoreError) and isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert path.read_bytes() == old  # the old complete entry, nothing partial
    assert files_in(path.parent) == [path.name]
    assert s.stats.writes == 1


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
def test_read_only_directory_is_one_clear_error(tmp_path: Path, monkeypatch, err: int):
    s = Store(tmp_path / "store")
    monkeypatch.setattr(Path, "mkdir", raiser(err))  # a fresh namespace: its directories cannot be made
    with pytest.raises(StoreWriteError, match=r"pass a writable --store") as e:
        s.put(NS, parts(), {"v": 1})
    assert str(tmp_path / "store") in str(e.value) and e.value.errno == err
    monkeypatch.undo()
    assert not (tmp_path / "store").exists()


def test_collect_on_a_full_disk_exits_2_with_one_message(tmp_path: Path, monkeypatch, caplog):
    """End to end: `avprobe collect` whose store fills up ends with the store's message, no traceback."""
    from avprobe.cli import main

    monkeypatch.setattr(os, "fsync", raiser(errno.ENOSPC))
    with caplog.at_level(logging.ERROR):
        rc = main(["collect", "--model", "organism", "--samples", "organism:2", "--store", str(tmp_path / "s"),
                   "--experiments", "caption", "--max-new-tokens", "1", "--no-progress"])
    assert rc == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("free space" in m and str(tmp_path / "s") in m for m in errors), errors
    assert not list((tmp_path / "s").rglob("*.npz")) and not list((tmp_path / "s").rglob("*.tmp"))


# ---- 2. corrupt entries that cannot be moved aside ---------------------------------------


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES])
@pytest.mark.parametrize("kind", ["json", "npz"])
def test_corrupt_entry_in_unwritable_directory_is_a_miss_left_in_place(tmp_path: Path, monkeypatch, caplog,
                                                                       err: int, kind: str):
    s = Store(tmp_path)
    if kind == "json":
        s.put_json(NS, parts(), {"v": 1})
    else:
        s.put(NS, parts(), {"v": 1}, {"x": np.zeros(3)})
    path = s.path(NS, parts(), arrays=kind == "npz")
    path.write_bytes(path.read_bytes()[:20])
    monkeypatch.setattr(os, "replace", raiser(err))  # e.g. a read-only mount opened without readonly=True
    getter = s.get_json if kind == "json" else s.get
    with caplog.at_level(logging.WARNING, logger="avprobe.store"):
        assert getter(NS, parts()) is None
        assert list(s.iter_entries(NS)) == []
    assert str(path) in caplog.text and "left in place" in caplog.text
    assert path.exists() and not path.with_name(path.name + ".corrupt").exists()
    assert s.stats.corrupt == 2 and s.stats.misses == 1


def test_readonly_store_never_touches_the_disk_on_corrupt_entries(tmp_path: Path, monkeypatch, caplog):
    Store(tmp_path).put(NS, parts(), {"v": 1}, {"x": np.zeros(3)})
    path = Store(tmp_path).path(NS, parts(), arrays=True)
    path.write_bytes(b"garbage")
    ro = Store(tmp_path, readonly=True)
    for name in ("replace", "rename", "unlink", "link", "mkdir"):
        monkeypatch.setattr(os, name, raiser(errno.EROFS))
    with caplog.at_level(logging.WARNING, logger="avprobe.store"):
        assert ro.get(NS, parts()) is None
        assert list(ro.iter_entries(NS)) == []
    assert str(path) in caplog.text and "read-only" in caplog.text and path.exists()


# ---- 3. a store path that is a file ------------------------------------------------------


@pytest.mark.parametrize("readonly", [False, True])
def test_store_path_that_is_a_file_fails_at_construction(tmp_path: Path, readonly: bool):
    f = tmp_path / "results.json"
    f.write_text("{}")
    with pytest.raises(StorePathError, match=rf"--store {f} is a file, not a directory") as e:
        Store(f, readonly=readonly)
    assert isinstance(e.value, StoreError)
    assert f.read_text() == "{}"


def test_cli_store_that_is_a_file_exits_2(tmp_path: Path, caplog):
    from avprobe.cli import main

    f = tmp_path / "store.txt"
    f.write_text("x")
    with caplog.at_level(logging.ERROR):
        rc = main(["collect", "--model", "organism", "--samples", "organism:2", "--store", str(f),
                   "--experiments", "caption", "--max-new-tokens", "1", "--no-progress"])
    assert rc == 2 and "is a file, not a directory" in caplog.text


# ---- 4. temporary files of killed writers ------------------------------------------------


def _kill_mid_write(root: Path, i: int) -> None:
    """A real writer killed between writing its temporary file and renaming it (os._exit in fsync)."""
    code = ("import os, sys; from avprobe.store import Store; s = Store(sys.argv[1]); "
            "os.fsync = lambda fd: os._exit(9); s.put('organism/engine', "
            "{'model': 'organism', 'revision': 'r1', 'sample': f'sha-{sys.argv[2]}', 'engine': 'e1'}, {'v': 1})")
    rc = subprocess.run([sys.executable, "-c", code, str(root), str(i)], cwd=ROOT, check=False).returncode
    assert rc == 9


def test_stale_temp_files_are_removed_on_open_and_fresh_ones_kept(tmp_path: Path):
    _kill_mid_write(tmp_path, 1)
    _kill_mid_write(tmp_path, 2)
    s = Store(tmp_path)
    s.put(NS, parts(3), {"v": 3})
    temps = sorted(tmp_path.rglob(".*.tmp"))
    assert len(temps) == 2  # what killed writers leave behind
    old = time.time() - store_mod.STALE_TEMP_S - 60
    os.utime(temps[0], (old, old))  # one interrupted long ago, one just now (a live writer's, maybe)
    shard = temps[0].parent
    strangers = [shard / ".x.npz.abc.tmp", shard / "notes.tmp", shard / f".{'0' * 64}.npz.tmp"]
    for p in strangers:
        p.write_text("not ours")
        os.utime(p, (old, old))
    Store(tmp_path, readonly=True)  # read-only: removes nothing
    assert temps[0].exists()
    Store(tmp_path)
    assert not temps[0].exists() and temps[1].exists()
    assert all(p.exists() for p in strangers)  # only this store's own naming pattern is touched
    assert Store(tmp_path).get(NS, parts(3)).meta == {"v": 3}


def test_stale_temp_cleanup_tolerates_an_unwritable_store(tmp_path: Path, monkeypatch):
    _kill_mid_write(tmp_path, 1)
    tmp = next(tmp_path.rglob(".*.tmp"))
    old = time.time() - store_mod.STALE_TEMP_S - 60
    os.utime(tmp, (old, old))
    monkeypatch.setattr(os, "unlink", raiser(errno.EROFS))
    Store(tmp_path)  # no error: it only could not tidy up
    monkeypatch.undo()
    assert tmp.exists()


# ---- 5. claims ---------------------------------------------------------------------------


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_claim(s: Store, i: int, pid: int, host: str | None = None, age: float = 0.0) -> Path:
    path = s._claim_path(NS, s.key(NS, parts(i)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "time": time.time() - age,
                                "token": "theirs"}))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_claim_is_exclusive_and_released(tmp_path: Path):
    a, b = Store(tmp_path), Store(tmp_path)
    assert a.claim(NS, parts()) is True
    path = a._claim_path(NS, a.key(NS, parts()))
    info = json.loads(path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and abs(info["time"] - time.time()) < 60
    assert b.claim(NS, parts()) is False and a.claim(NS, parts()) is False  # also not twice by one holder
    assert a.claim(NS, parts(1)) is True  # other keys are free
    b.release(NS, parts())  # not b's: a no-op
    assert path.exists()
    a.put(NS, parts(), {"v": 1})
    assert list(a.iter_entries(NS)) == [(parts(), a.path(NS, parts(), arrays=True))]  # claims are not entries
    a.release(NS, parts())
    assert not path.exists() and b.claim(NS, parts()) is True
    with pytest.raises(ReadOnlyStoreError):
        Store(tmp_path, readonly=True).claim(NS, parts(2))


def test_claim_of_a_dead_process_or_too_old_is_taken_over(tmp_path: Path, caplog):
    s = Store(tmp_path)
    write_claim(s, 0, dead_pid())
    write_claim(s, 1, os.getpid(), host="elsewhere", age=store_mod.CLAIM_STALE_S + 60)
    write_claim(s, 2, os.getpid(), host="elsewhere")  # alive for all we know
    write_claim(s, 3, os.getpid())  # this very process, through another Store: alive
    with caplog.at_level(logging.INFO, logger="avprobe.store"):
        assert s.claim(NS, parts(0)) and s.claim(NS, parts(1))
    assert "stale claim" in caplog.text
    assert not s.claim(NS, parts(2)) and not s.claim(NS, parts(3))
    s.release(NS, parts(0))
    assert not s._claim_path(NS, s.key(NS, parts(0))).exists()


def test_stale_claims_are_removed_on_open(tmp_path: Path):
    s = Store(tmp_path)
    dead = write_claim(s, 0, dead_pid())
    live = write_claim(s, 1, os.getpid())
    Store(tmp_path, readonly=True)
    assert dead.exists()
    Store(tmp_path)
    assert not dead.exists() and live.exists()
    assert not list(tmp_path.rglob("*.tmp"))


def test_claim_on_a_full_disk_is_a_store_write_error(tmp_path: Path, monkeypatch):
    s = Store(tmp_path)
    monkeypatch.setattr(os, "open", raiser(errno.ENOSPC, os.open, only=lambda path, *a: str(path).endswith(".claim")))
    with pytest.raises(StoreWriteError, match="free space"):
        s.claim(NS, parts())


def test_racing_claims_have_one_winner(tmp_path: Path):
    n = 8
    stores = [Store(tmp_path) for _ in range(n)]

    def go(w: int, i: int, barrier: threading.Barrier, wins: list[int]) -> None:
        barrier.wait()
        if stores[w].claim(NS, parts(i)):
            wins.append(w)

    for round_ in range(20):
        barrier, wins = threading.Barrier(n), []
        threads = [threading.Thread(target=go, args=(w, round_, barrier, wins)) for w in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, (round_, wins)


# ---- 5. two workers collecting into one store ----------------------------------------------


class FakeEngine:
    """compute_record stand-in: deterministic records, slow enough for workers to overlap."""

    def __init__(self, delay: float = 0.02):
        self.delay = delay
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, adapter, sample, media, query, protocol, base=None):
        from avprobe.records import SampleRecord

        with self._lock:
            self.calls.append((sample.id, query))
        time.sleep(self.delay)
        seed = int(sample.id[1:]) * 7 + len(query)
        arr = np.random.default_rng(seed).random((3, 4)).astype(np.float16)
        return SampleRecord({"sample_id": sample.id, "query": query, "conditions": []}, {"flow_mean": arr})


def fake_run(root: Path, n: int, start: threading.Barrier | None = None, out: list | None = None) -> list:
    """`collect` of n samples x 2 queries of a fake model into `root` (compute_record patched by the caller)."""
    from avprobe.pipeline import collect as collect_mod
    from avprobe.records import Protocol
    from avprobe.types import Sample

    samples = [Sample(id=f"s{i}", media_key=f"m{i}") for i in range(n)]
    model = SimpleNamespace(name="fake", revision="r1")
    store = Store(root)
    if start is not None:
        start.wait()
    got = list(collect_mod.collect(model, samples, store, Protocol(queries=("q1", "q22"), max_new_tokens=1),
                                   get_adapter=lambda: object(), media_loader=lambda s: object()))
    if out is not None:
        out.append(got)
    return got


def stored_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "fake" / "engine").glob("*/*.npz"))}


def test_two_threads_collecting_one_store_compute_each_key_once(tmp_path: Path, monkeypatch):
    from avprobe.pipeline import collect as collect_mod

    n = 12
    ref_engine = FakeEngine(0.0)
    monkeypatch.setattr(collect_mod, "compute_record", ref_engine)
    reference = fake_run(tmp_path / "ref", n)
    assert len(ref_engine.calls) == 2 * n

    engine = FakeEngine()
    monkeypatch.setattr(collect_mod, "compute_record", engine)
    start, outs = threading.Barrier(2), []
    threads = [threading.Thread(target=fake_run, args=(tmp_path / "shared", n, start, outs))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(engine.calls) == sorted(ref_engine.calls)  # every key computed once, by one of the two
    want = sorted((r.meta["sample_id"], r.meta["query"]) for r in reference)
    for got in outs:  # each worker still yields every record (its own, or the other's as cached)
        assert sorted((r.meta["sample_id"], r.meta["query"]) for r in got) == want
    assert stored_bytes(tmp_path / "shared") == stored_bytes(tmp_path / "ref")
    assert not [p for p in (tmp_path / "shared").rglob("*") if p.is_file() and p.suffix != ".npz"]


def test_key_claimed_by_a_live_worker_is_taken_when_written_or_computed_after_the_wait(tmp_path: Path, monkeypatch):
    from avprobe.pipeline import collect as collect_mod
    from avprobe.records import Protocol, record_parts
    from avprobe.types import Sample

    monkeypatch.setattr(collect_mod, "CLAIM_POLL_S", 0.02)
    model = SimpleNamespace(name="fake", revision="r1")
    proto = Protocol(queries=("q1", "q22"), max_new_tokens=1)
    other = Store(tmp_path)

    def key(i: int, q: str) -> dict:
        return record_parts(model, Sample(id=f"s{i}", media_key=f"m{i}"), q, proto)

    # While we run, the other worker holding s0/q1 writes it; the one holding s1/q1 drops its
    # claim without an entry (it failed); the one holding s2/q1 hangs.
    for i in range(3):
        assert other.claim("fake/engine", key(i, "q1"))
    monkeypatch.setattr(collect_mod, "CLAIM_WAIT_S", 1.0)

    def others() -> None:
        time.sleep(0.3)
        other.put("fake/engine", key(0, "q1"), {"sample_id": "s0", "query": "q1", "conditions": [], "by": "other"})
        other.release("fake/engine", key(0, "q1"))
        other.release("fake/engine", key(1, "q1"))

    t = threading.Thread(target=others)
    t.start()
    engine = FakeEngine(0.0)
    monkeypatch.setattr(collect_mod, "compute_record", engine)
    t0 = time.monotonic()
    got = fake_run(tmp_path, 3)
    waited = time.monotonic() - t0
    t.join()
    assert ("s0", "q1") not in engine.calls  # taken from the store: the other worker's
    assert [r.meta.get("by") for r in got if (r.meta["sample_id"], r.meta["query"]) == ("s0", "q1")] == ["other"]
    assert ("s1", "q1") in engine.calls and ("s2", "q1") in engine.calls
    assert len(engine.calls) == 5 and len(got) == 6
    assert 0.9 < waited < 10
    # the hung worker's claim is still its own; ours are all released
    assert other._claim_path("fake/engine", other.key("fake/engine", key(2, "q1"))).exists()
    assert len(list(tmp_path.rglob(".*.claim"))) == 1


def test_two_avprobe_collect_processes_compute_each_record_once(tmp_path: Path):
    """The real thing: two `avprobe collect` processes started together on one store."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)

    def cmd(store: Path, summary: Path) -> list[str]:
        return [sys.executable, "-m", "avprobe", "collect", "--model", "organism", "--samples", "organism:6",
                "--experiments", "caption", "--max-new-tokens", "2", "--store", str(store), "--no-progress",
                "--summary-json", str(summary)]

    ref = subprocess.run(cmd(tmp_path / "ref", tmp_path / "ref.json"), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert ref.returncode == 0, ref.stderr[-3000:]
    n = json.loads((tmp_path / "ref.json").read_text())["counts"]["records"]
    procs = [subprocess.Popen(cmd(tmp_path / "shared", tmp_path / f"w{w}.json"), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    counts = [json.loads((tmp_path / f"w{w}.json").read_text())["counts"] for w in range(2)]
    assert sum(c["computed"] for c in counts) == n, counts
    assert all(c["computed"] + c["cached"] == n and c["failed"] == 0 for c in counts), counts

    def entries(root: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(root.rglob("*.npz"))}

    assert entries(tmp_path / "shared") == entries(tmp_path / "ref") and len(entries(tmp_path / "ref")) == n
    assert not list((tmp_path / "shared").rglob(".*.claim"))
