"""The pipeline's one orchestration (`gather`), the records module and the claim object,
as the CLI and the plugin use them: on the committed organism fixtures (no compute)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from avprobe.adapters import ref
from avprobe.claim import ClaimCheck, ClaimSkipped, claims_table
from avprobe.judge import make_judge
from avprobe.pipeline.evidence import evidence_from
from avprobe.pipeline.gather import GatherError, gather, limit_balanced, load_samples
from avprobe.records import DEFAULT_QUERY, Protocol, shift_bases
from avprobe.stats import one_sample_test
from avprobe.store import Store

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MODEL = "organism-deep-lens"  # an organism whose results are committed in fixtures/


def _protocol(model: str) -> Protocol:
    # as the plugin builds it: the model's queries, and the audio-ablated self where its base names it
    _, self_ablated = shift_bases(ref(model).settings.base_model)
    return Protocol(queries=ref(model).settings.queries or (DEFAULT_QUERY,), self_shift=self_ablated)


def test_reading_records_and_claims_imports_neither_torch_nor_pytest():
    code = ("import sys, avprobe.records, avprobe.claim, avprobe.paper, avprobe.pipeline.evidence; "
            "print('torch' in sys.modules, 'pytest' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_gather_reads_the_committed_fixtures_without_loading_weights():
    samples, bad = load_samples("organism", limit=10)
    assert bad == [] and len(samples) == 10
    assert sum(s.kind == "factual" for s in samples) == 5
    mref = ref(MODEL)
    store = Store(FIXTURES, readonly=True)
    base, _ = shift_bases(mref.settings.base_model)
    result = gather(mref, samples, store, _protocol(MODEL), judge=make_judge("concept", cache=store),
                    base_model=base, progress=False)
    c = result.counts
    assert (c.cached, c.computed, c.failed, c.missing) == (10 * c.queries, 0, 0, 0)
    assert len(result.records) == 10 * c.queries
    # every condition's caption judged, in both modalities
    n_cond = sum(len(r.conditions) for r in result.records)
    assert len(result.fidelity) == n_cond and c.judged == 2 * n_cond
    ev = evidence_from(MODEL, result, base_model="organism-deep-base")
    assert ev.n_layers == mref.n_layers and ev.judge_label.startswith("concept")


def test_gather_on_a_read_only_store_counts_every_miss_in_one_error(tmp_path):
    samples, _ = load_samples("organism", limit=4)
    store = Store(tmp_path / "empty", readonly=True)
    protocol = _protocol("organism")
    with pytest.raises(GatherError) as e:
        gather(ref("organism"), samples, store, protocol, progress=False,
               collect_command="avprobe collect --model organism --limit 4")
    n = 4 * len(protocol.queries)
    assert f"{n} of {n} results missing" in str(e.value)
    assert "avprobe collect --model organism --limit 4" in str(e.value)


def test_bad_sample_specs_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="positive"):
        limit_balanced(load_samples("organism", limit=4)[0], 0)
    with pytest.raises(ValueError, match="organism:N"):
        load_samples("organism:many")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match="no usable sample"):
        load_samples(str(bad))
    samples, _ = load_samples("organism", limit=2)
    with pytest.raises(ValueError, match="no CUDA GPU|not a torch device"):
        gather(ref("organism"), samples, Store(tmp_path / "s"), _protocol("organism"), device="cuda:7",
               progress=False)


def test_claim_object_outside_pytest_resolves_bands_records_and_skips():
    table = claims_table()
    recorded: list[str] = []
    claim = ClaimCheck(table["video_attention_late"], model="m", record=recorded.append)
    assert claim.band(36) == tuple(range(15, 30))  # the paper's layers 15-30 of 36
    assert claim.band(8) == (3, 4, 5, 6)
    outcome = claim.verdict(one_sample_test([0.5, 0.6, 0.7, 0.55, 0.65] * 4, 0.2, "greater", n_boot=200))
    assert outcome.status == "passed" and len(recorded) == 1
    with pytest.raises(AssertionError, match="not supported on m"):
        claim.check(one_sample_test([0.1, 0.15, 0.12, 0.11] * 5, 0.2, "greater", n_boot=200))
    with pytest.raises(ClaimSkipped, match="no data"):
        claim.skip("no data")
    assert claim.outcome.status == "skipped" and len(recorded) == 3
    bad = ClaimCheck({**table["video_attention_late"], "band": "paper-middle"})
    with pytest.raises(ValueError, match="unknown depth band 'paper-middle'"):
        bad.band(36)


def test_bad_dtype_is_refused_before_any_work(tmp_path):
    samples, _ = load_samples("organism", limit=2)
    with pytest.raises(ValueError, match="not a torch floating dtype"):
        gather(ref("organism"), samples, Store(tmp_path / "s"), _protocol("organism"), dtype="bogus",
               progress=False)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Protocol(max_new_tokens=0)


def test_a_stale_shard_summary_of_another_run_is_not_merged(tmp_path):
    import json

    from avprobe.pipeline.cli import Shard, _merge_parts, _part_path
    from avprobe.pipeline.gather import CollectCounts

    out = tmp_path / "summary.json"
    for rank, run, computed in ((0, "new", 3), (1, "old", 99)):
        c = CollectCounts(samples=3, computed=computed)
        _part_path(out, Shard(rank, 2)).write_text(json.dumps({"run": {"run_id": run}, "counts": c.to_json()}))
    total, missing = _merge_parts(out, 2, since=0.0, timeout=0.6, run_id="new")
    assert missing == [1] and total.computed == 3



def test_version(capsys):
    from avprobe import __version__
    from avprobe.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"avprobe {__version__}"
