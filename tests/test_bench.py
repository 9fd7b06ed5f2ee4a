"""`avprobe bench` and `avprobe report` through the command line (tiny shape, CPU, no timings)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from avprobe import cli
from avprobe.bench import naive
from avprobe.bench.engine import measure_memory
from avprobe.cli import build_parser, main
from avprobe.probes import attention

METHODS = ("engine", "floor", "careful", "naive")


def _bench(out: Path, *extra: str, methods: tuple[str, ...] = METHODS) -> dict:
    argv = ["bench", "--shape", "tiny", "--repeats", "1", "--methods", *methods, "--conditions", "5",
            "--new-tokens", "4", "--out", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def default_report(tmp_path_factory) -> dict:
    return _bench(tmp_path_factory.mktemp("bench") / "bench.json")


def test_bench_reports_every_method_checked_against_the_engine(default_report):
    r = default_report
    assert r["methods"] == list(METHODS) and r["conditions"] == 5 and r["new_tokens"] == 4
    # 5 conditions over a 131-token prompt: few scores, dense products (see PREFIX_PATH)
    assert r["prefix_path"] == "dense"
    (s,) = r["samples"]
    assert set(s["timing"]) == set(METHODS)
    assert all(s["timing"][m]["tokens_equal_engine"] for m in METHODS)
    assert set(s["ratios"]) == {f"{m}/engine" for m in METHODS if m != "engine"} | {"engine/floor"}
    # the methods that record the flow match the engine's (eager output_attentions included)
    for m in ("careful", "naive"):
        assert s["timing"][m]["token_check"]["flow_max_abs_diff"] < 1e-4
    assert len(s["tokens"]) == 5 and all(len(t) == 4 for t in s["tokens"])


def test_bench_token_check_names_the_method_that_disagrees(tmp_path, monkeypatch):
    real = naive.floor_decode

    def wrong(*args, **kwargs):
        res = real(*args, **kwargs)
        res.tokens[-1] = [t + 1 for t in res.tokens[-1]]
        return res

    monkeypatch.setattr(naive, "floor_decode", wrong)
    with pytest.raises(AssertionError, match=r"^floor and the engine disagree on tokens for 1 condition"):
        _bench(tmp_path / "bench.json", methods=("engine", "floor"))


def test_bench_fused_prefix_gives_the_default_tokens(tmp_path, default_report):
    if not attention._fused_cpu_available():
        pytest.skip("this torch has no fused CPU kernel")
    r = _bench(tmp_path / "bench.json", "--prefix-path", "fused", methods=("engine", "floor"))
    assert r["prefix_path"] == "fused"
    assert r["samples"][0]["tokens"] == default_report["samples"][0]["tokens"]


def test_bench_nnsight_peer_gives_the_engine_tokens(tmp_path, default_report):
    pytest.importorskip("nnsight")
    r = _bench(tmp_path / "bench.json", methods=("engine", "nnsight"))
    assert r["skipped"] == {} and r["samples"][0]["timing"]["nnsight"]["tokens_equal_engine"]
    assert r["samples"][0]["tokens"] == default_report["samples"][0]["tokens"]


def _ref(tokens, topk_ids, topk_values, spread=1.0):
    """A RunResult with one row whose kept best logits per step are given."""
    from avprobe.conditions import Baseline
    from avprobe.engine import ConditionOutput, RunResult

    out = ConditionOutput(Baseline(), tokens, "", None, False)
    T = len(tokens)
    return RunResult(prompt_len=2, n_layers=1, roles=np.zeros(2, np.int8), outputs=[out],
                     topk=(torch.tensor([topk_values], dtype=torch.float32), torch.tensor([topk_ids]),
                           torch.full((1, T), spread)))


def test_token_check_allows_only_near_ties_in_reduced_precision():
    from avprobe.bench.engine import check_tokens
    from avprobe.conditions import Baseline

    # step 1: the engine chose 5 (logit 2.00) over 7 (1.99): a near-tie; 9 is far below
    ref = _ref([3, 5, 6], [[3, 1], [5, 7], [6, 2]], [[4.0, 1.0], [2.0, 1.99], [3.0, 0.0]])
    conds = [Baseline()]
    same = check_tokens("m", [[3, 5, 6]], ref, conds, tie_rtol=0.05)
    assert same["identical"] == 1 and same["near_tie_divergences"] == 0
    tie = check_tokens("m", [[3, 7, 1]], ref, conds, tie_rtol=0.05)
    assert tie["near_tie_divergences"] == 1 and tie["max_tie_gap_sd"] == pytest.approx(0.01, abs=1e-5)
    assert tie["tokens_equal_before_divergence"] == pytest.approx(1 / 3)
    with pytest.raises(AssertionError, match=r"m and the engine disagree .*step 1"):
        check_tokens("m", [[3, 7, 1]], ref, conds, tie_rtol=0.0)  # float32: exact
    with pytest.raises(AssertionError, match=r"step 0, gap 3 sd"):
        check_tokens("m", [[1, 5, 6]], ref, conds, tie_rtol=0.05)  # a real disagreement
    with pytest.raises(AssertionError, match=r"step 1\)"):
        check_tokens("m", [[3, 9, 6]], ref, conds, tie_rtol=0.05)  # not among the engine's best


def test_cuda_peak_is_the_blocks_peak_above_its_start(monkeypatch):
    """The GPU memory figure's arithmetic, with the allocator's counters stubbed (no GPU here)."""
    from avprobe.bench.engine import cuda_peak

    state = {"allocated": 3 * 2**20, "peak": 9 * 2**20}
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: state.update(peak=state["allocated"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: state["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    with cuda_peak() as m:
        state["peak"] = 8 * 2**20  # the block's own peak: 5 MB above the 3 it started from
    assert m == {"base_mb": 3.0, "above_mb": 5.0}
    with cuda_peak(enabled=False) as off:
        pass
    assert off == {}


def test_bench_needs_the_engine(tmp_path):
    with pytest.raises(ValueError, match="must include engine"):
        _bench(tmp_path / "bench.json", methods=("floor",))


def test_memory_child_runs_as_a_module_with_the_prefix_setting():
    """measure_memory's child is `python -m avprobe.bench.cli --child ...` (works installed)."""
    args = argparse.Namespace(device="cpu", dtype="float32", threads=1, window=None, prefix_path="fused")
    res = measure_memory(args, "engine", "tiny", 2, 2)
    assert res["method"] == "engine" and res["conditions"] == 2
    assert res["prefix_path"] == ("fused" if attention._fused_cpu_available() else "dense")
    assert res["rss_how"] in ("hwm-reset", "sampled") and res["peak_above_model_mb"] is not None
    assert res["peak_rss_mb"] > 0 and set(res["kv_bytes"]) >= {"prefix", "suffix"}


def test_report_without_a_claims_file_says_how_to_fix_it(tmp_path):
    """`avprobe report` redraws from a run's claims.json (tests/test_report_e2e.py redraws a
    real one); without it: one message naming the fix, no traceback, nothing written."""
    proc = subprocess.run(
        [sys.executable, "-m", "avprobe", "report", "--from", str(tmp_path / "nope.json"),
         "--out", str(tmp_path / "claims.html")],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "COLUMNS": "200"}, timeout=120,
    )
    assert proc.returncode == 2
    assert f"no claims file at {tmp_path / 'nope.json'}" in proc.stderr and "--from FILE" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "claims.html").exists()


def test_a_missing_area_module_is_an_error(monkeypatch):
    monkeypatch.setitem(cli._AREAS, "bench", "avprobe.no_such_module")
    with pytest.raises(ModuleNotFoundError, match="avprobe.no_such_module"):
        cli.build_parser()


# ---- the physical limit and the end-to-end row ------------------------------------------------


def test_physical_limit_counts_the_weights_once_per_step_and_the_keys_per_row():
    from avprobe.bench import limits
    from avprobe.testing import tiny_adapter

    a = tiny_adapter("qwen2_5_omni", n_layers=4)
    cost = limits.ModelCost.of(a)
    text = {id(p): p for p in a.text_model.parameters()}
    embed = a.embed.weight
    want = sum(p.numel() * 4 for k, p in text.items() if k != id(embed)) + a.unembed.weight.numel() * 4
    assert cost.weight_bytes == want  # the unembedding read whole, the embedding table one row a token
    b1, f1 = cost.step(rows=1, prompt_len=100, t=0)
    b9, f9 = cost.step(rows=9, prompt_len=100, t=0)
    kv_row = 2 * 4 * cost.kv_heads * cost.head_dim * 4  # one position's keys and values, all layers
    assert b9 - b1 == 8 * kv_row  # more rows: only their own suffix keys and values
    assert f9 > 8 * f1  # arithmetic grows with the rows
    peaks = limits.Peaks(flops=1e12, bandwidth=1e9, source="test")
    one = limits.sweep_limit(cost, peaks, 100, 9, 4)
    four = limits.sweep_limit(cost, peaks, 100, 9, 4, clips=4)
    assert one["bound"] == "memory" and one["seconds"] == pytest.approx(one["prefill_s"] + one["decode_s"])
    assert one["decode_s"] == pytest.approx(sum(cost.step(9, 100, t)[0] for t in range(4)) / 1e9)
    # four clips share each step's weight reads: less than four times one clip's limit
    assert one["seconds"] < four["seconds"] < 4 * one["seconds"]


def test_device_peaks_datasheet_and_probe():
    from avprobe.bench import limits

    h100 = limits.datasheet_peaks("NVIDIA H100 80GB HBM3", "bfloat16")
    assert h100.bandwidth == 3.35e12 and h100.flops == 989e12 and "datasheet" in h100.source
    assert limits.datasheet_peaks("NVIDIA H100 PCIe", "bfloat16").bandwidth == 2.0e12
    assert limits.datasheet_peaks("NVIDIA H200", "float32").bandwidth == 4.8e12
    assert limits.datasheet_peaks("NVIDIA A10G", "bfloat16") is None
    cpu = limits.device_peaks("cpu", "float32", budget_s=0.1)
    assert cpu.flops > 1e8 and cpu.bandwidth > 1e7 and cpu.source.startswith("measured")


def test_end_to_end_row_batched_equals_one_clip_and_reports_the_limit(tmp_path):
    r = _bench(tmp_path / "e2e.json", "--end-to-end", "3", "--clips-per-batch", "2", "--naive-clips", "1",
               "--peak-probe-s", "0.1", methods=("engine",))
    e = r["end_to_end"]
    assert set(e["methods"]) == {"naive", "engine", "batched"}
    assert e["methods"]["engine"]["clips"] == 3 and e["methods"]["naive"]["clips"] == 1
    assert e["batched_tokens_equal_engine"] is True and e["shift"] is True
    assert all(v["x_limit"] > 1 for v in e["methods"].values())  # nothing beats the physical limit
    assert r["samples"][0]["timing"]["engine"]["x_limit"] > 1 and "source" in r["peaks"]
    assert e["conditions"] > 5 and len(set(e["prompt_lens"])) == 1
