"""`avprobe collect` under faults, for real: a run killed with SIGKILL and resumed, a corrupted
store entry, broken media plus a failing judge endpoint, and a 2-process sharded run.

One tiny 4-layer Qwen2.5-Omni thinker saved as a local model directory; tens of samples; six
new tokens per caption. The uninterrupted single-process run (`reference`) is what every
other run must reproduce, entry by entry and byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_chat_server import FakeChatServer, Reply, request_pair
from media_factory import corrupt, make_empty, make_video, truncate

from avprobe.store import Store, canonical_json

ROOT = Path(__file__).resolve().parents[1]
N = 20  # organism samples of the resume / corruption / sharding runs
TOKENS = "6"
MODEL_NAME = "tiny4"  # the model directory's name: the store namespace is tiny4/engine
NS = f"{MODEL_NAME}/engine"
FAIL_RATE = 0.3


def make_model_dir(path: Path) -> Path:
    """A loadable local model directory: tiny random weights, word-level tokenizer, settings."""
    from avprobe.testing import tiny_adapter, tiny_tokenizer

    a = tiny_adapter("qwen2_5_omni", n_layers=4)
    a.model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    settings = {"use_audio_in_video": True, "min_pixels": 3136, "max_pixels": 12544, "judge": "concept"}
    (path / "avprobe.json").write_text(json.dumps(settings))
    return path


def collect_args(model: Path, store: Path, *extra: str, samples: str = f"organism:{N}") -> list[str]:
    return ["collect", "--model", str(model), "--samples", samples, "--store", str(store),
            "--max-new-tokens", TOKENS, "--no-progress", *extra]


def run_inprocess(argv: list[str], summary: Path) -> dict:
    """Run the CLI in this process (one torch thread, as the subprocesses) -> its JSON summary."""
    import torch

    from avprobe.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main([*argv, "--summary-json", str(summary)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, f"avprobe {' '.join(argv)} exited {rc}"
    return json.loads(summary.read_text())


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entries(store: Path) -> list[Path]:
    """Complete record files (not temporary files, not quarantined ones)."""
    return sorted(store.joinpath(*NS.split("/")).glob("*/*.npz"))


def assert_same_records(got: Path, want: Path) -> None:
    """Same entries, same captions and token ids, same arrays, same bytes."""
    sg, sw = Store(got, readonly=True), Store(want, readonly=True)
    kg = {canonical_json(p): p for p, _ in sg.iter_entries(NS)}
    kw = {canonical_json(p): p for p, _ in sw.iter_entries(NS)}
    assert kg.keys() == kw.keys(), f"{len(kg.keys() - kw.keys())} extra and {len(kw.keys() - kg.keys())} missing entries"
    for key, parts in kw.items():
        rg, rw = sg.get(NS, parts), sw.get(NS, parts)
        assert rg is not None and rw is not None
        sid = rw.meta["sample_id"]
        for cg, cw in zip(rg.meta["conditions"], rw.meta["conditions"], strict=True):
            assert (cg["key"], cg["text"], cg["token_ids"]) == (cw["key"], cw["text"], cw["token_ids"]), sid
        assert canonical_json(rg.meta) == canonical_json(rw.meta), sid
        assert rg.arrays.keys() == rw.arrays.keys(), sid
        for name in rw.arrays:
            np.testing.assert_array_equal(rg.arrays[name], rw.arrays[name], err_msg=f"{sid} {name}")
    # Stored bytes are deterministic (fixed zip timestamps), so equal content means equal files.
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in entries(got)}
    assert digest == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in entries(want)}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / MODEL_NAME)


@pytest.fixture(scope="module")
def reference(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted single-process run of every experiment (judge: the model's concept judge)."""
    d = tmp_path_factory.mktemp("reference")
    summary = run_inprocess(collect_args(model_dir, d / "store"), d / "summary.json")
    c = summary["counts"]
    assert (c["computed"], c["cached"], c["failed"]) == (N, 0, 0), c
    assert len(entries(d / "store")) == N
    return d / "store"


def test_killed_run_resumes_without_recomputing(model_dir: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "avprobe", *collect_args(model_dir, store)], cwd=ROOT,
                            env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    try:
        while len(entries(store)) < 3:
            assert proc.poll() is None, f"collect ended (rc {proc.returncode}) before it could be killed: " \
                                        f"{(tmp_path / 'killed.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no store entries after 180 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    before = len(entries(store))
    assert 0 < before < N, f"the kill came too late to test resuming ({before} of {N} entries)"

    c = run_inprocess(collect_args(model_dir, store), tmp_path / "rerun.json")["counts"]
    assert c["computed"] == N - before, f"rerun computed {c['computed']}, expected {N} - {before} present before"
    assert (c["cached"], c["failed"]) == (before, 0), c
    assert_same_records(store, reference)


def test_corrupted_entry_is_detected_and_recomputed(model_dir: Path, reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    victim = entries(store)[N // 2]
    corrupt(victim, seed=3)  # same length, garbage in the middle: only the checksums can tell
    c = run_inprocess(collect_args(model_dir, store), tmp_path / "s.json")["counts"]
    assert (c["computed"], c["cached"], c["failed"]) == (1, N - 1, 0), c
    assert victim.with_name(victim.name + ".corrupt").is_file(), "the corrupt entry was not moved aside"
    assert_same_records(store, reference)


def _fails(candidate: str, reference: str, modality: str) -> bool:
    """Whether the faulty judge endpoint answers HTTP 500 to this item: decided by the item's
    content (not by arrival order, which concurrency shuffles), so the test knows exactly which
    items cannot be scored."""
    text = "\0".join((modality, " ".join(reference.split()), " ".join(candidate.split())))
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32 < FAIL_RATE


class ContentFaultServer(FakeChatServer):
    """The fake chat server failing about `FAIL_RATE` of the calls (`_fails`)."""

    def _plan(self, body):  # noqa: ANN001, ANN202 - FakeChatServer's signature
        with self._lock:
            index = self._issued
            self._issued += 1
        reference, candidate = request_pair(body)
        system = body["messages"][0]["content"] if body and body.get("messages") else ""
        modality = "audio" if "SOUND" in system else "video"
        return index, Reply(status=500) if _fails(candidate, reference, modality) else Reply()


def test_broken_media_and_failing_judge_counted_exactly(model_dir: Path, tmp_path: Path, capsys) -> None:
    from avprobe.media.manifest import write_manifest
    from avprobe.types import Sample

    clips = tmp_path / "clips"
    samples = []
    for i in range(30):  # 3 of 30 broken (10%): cut short, garbled, and a clip without frames
        path = make_video(clips / f"clip{i:02d}.mp4", seconds=1.0, audio_freqs=(220.0 + 20 * i,))
        if i == 3:
            truncate(path, 0.3)
        elif i == 14:
            corrupt(path, seed=1)
        elif i == 25:
            make_empty(path)
        # Distinct references: every judge call is a distinct item.
        samples.append(Sample(id=f"clip{i:02d}", video=str(path), audio_captions=(f"i hear a tone {i} .",),
                              video_captions=(f"i see a grey square {i} .",)))
    manifest = write_manifest(samples, tmp_path / "clips.jsonl")
    store = tmp_path / "store"
    with ContentFaultServer() as server:
        summary = run_inprocess(
            collect_args(model_dir, store, "--experiments", "caption,judge", "--judge", "openai:fake-judge",
                         "--judge-url", server.url, "--judge-retries", "0", "--judge-concurrency", "4",
                         "--errors-out", str(tmp_path / "errors.jsonl"), samples=str(manifest)),
            tmp_path / "summary.json",
        )
        statuses = server.statuses()
    c = summary["counts"]
    out = " ".join(capsys.readouterr().out.split())

    assert (c["samples"], c["failed"], c["computed"], c["cached"]) == (30, 3, 27, 0), c
    # grouped by cause: three different decode failures are three groups
    assert len(c["failures"]) == 3 and all(g.startswith("decode: MediaError") for g in c["failures"]), c["failures"]
    assert {e["sample_id"] for g in c["failures"].values() for e in g["examples"]} == {"clip03", "clip14", "clip25"}
    assert "3 samples failed" in out
    errors = [json.loads(line) for line in (tmp_path / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["sample_id"] for e in errors) == ["clip03", "clip14", "clip25"]  # every cause, not 3 per group
    assert all(e["stage"] == "decode" and e["reason"] for e in errors)

    # The exact expectation, from what was stored: one item per caption and reference modality.
    st = Store(store, readonly=True)
    items = []
    for parts, _ in st.iter_entries(NS):
        rec = st.get(NS, parts)
        for cond in rec.meta["conditions"]:
            items += [(cond["text"], rec.meta["audio_captions"][0], "audio"),
                      (cond["text"], rec.meta["video_captions"][0], "video")]
    expected = sum(_fails(*it) for it in items)
    assert len(items) == 27 * 2
    assert 0.1 < statuses.count(500) / len(statuses) < 0.5, f"{statuses.count(500)} of {len(statuses)} calls failed"
    j = c["judge"]
    assert (j["items"], j["unscored"], j["scored"]) == (len(items), expected, len(items) - expected), j
    assert j["unscored_by_error"] == {"transport": expected}, j
    assert j["unscored"] == statuses.count(500)  # every item was its own call
    assert f"{expected} unscored" in out


def test_two_process_accelerate_run_equals_one_process(model_dir: Path, reference: Path, tmp_path: Path) -> None:
    """`accelerate launch --num_processes 2` on CPU (`--multi_gpu` makes accelerate start the
    processes through torchrun, which sets RANK / WORLD_SIZE; no process group is needed)."""
    store, summary = tmp_path / "store", tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "avprobe", *collect_args(model_dir, store), "--summary-json", str(summary)]
    res = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rank in (0, 1):
        part = json.loads((tmp_path / f"summary.rank{rank}-of-2.json").read_text())
        assert part["run"]["shard"] == {"rank": rank, "world": 2}
        assert part["counts"]["computed"] == N // 2, part["counts"]
    merged = json.loads(summary.read_text())
    assert merged["run"]["missing_shards"] == []
    c = merged["counts"]
    assert (c["samples"], c["computed"], c["cached"], c["failed"]) == (N, N, 0, 0), c
    # the merged peak is the larger shard's, not a sum
    assert c["peak_rss_mb"] == max(json.loads((tmp_path / f"summary.rank{r}-of-2.json").read_text())["counts"]
                                   ["peak_rss_mb"] for r in (0, 1)) > 0
    assert re.search(r"collect, 2 of 2 shards", " ".join(res.stdout.split()))
    assert_same_records(store, reference)
