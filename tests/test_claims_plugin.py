"""The pytest plugin and the claims suite, driven through `pytester`.

The power tests run the committed organism results (offline, from fixtures/): the bias
claims must pass on `organism` and fail on `organism-control`; that the suite can fail is
the point of the control.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from avprobe.testing import tiny_adapter, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "claims"
FIXTURES = ROOT / "fixtures"

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-omni")
    a = tiny_adapter("qwen2_5_omni", n_layers=4)
    a.model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    (d / "avprobe.json").write_text(json.dumps({
        "use_audio_in_video": True, "min_pixels": 3136, "max_pixels": 12544, "judge": "concept",
    }))
    return d


def _run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", *args)


def test_plugin_runs_a_model_end_to_end(pytester, tiny_model_dir, tmp_path):
    store, report = tmp_path / "store", tmp_path / "claims.html"
    res = _run(pytester, str(CLAIMS / "test_visual_bias.py"), str(CLAIMS / "test_judge_validity.py"),
               "--model", str(tiny_model_dir), "--limit", "4", "--store", str(store), "--report", str(report))
    out = res.stdout.str()
    assert "avprobe: models=" in out and "judge=" in out  # the report header
    assert "avprobe claims" in out  # the terminal verdict table
    # judge_validity cannot run without ratings: skipped with the reason, never passed
    res.stdout.fnmatch_lines(["*SKIPPED*no human ratings file*"])
    assert report.is_file() and "visual_bias" in report.read_text()
    assert any(store.rglob("*.npz")), "results were stored"
    # a second, offline run reads everything from the store
    res2 = _run(pytester, str(CLAIMS / "test_visual_bias.py"), "--model", str(tiny_model_dir), "--limit", "4",
                "--store", str(store), "--offline")
    assert res2.ret in (0, 1)  # a verdict, not an error
    assert "error" not in res2.stdout.lines[-1].lower()


def test_offline_cache_miss_names_what_is_missing(pytester, tiny_model_dir, tmp_path):
    res = _run(pytester, str(CLAIMS / "test_visual_bias.py"), "--model", str(tiny_model_dir), "--limit", "2",
               "--store", str(tmp_path / "empty"), "--offline")
    out = res.stdout.str()
    assert res.ret != 0
    # one message per test: how many results are missing and the command that computes them
    assert "2 of 2 results missing in the read-only store" in out and "avprobe collect --model" in out
    assert "--limit 2" in out and "Traceback" not in out


def test_unknown_model_fails_clearly(pytester, tmp_path):
    res = _run(pytester, str(CLAIMS / "test_visual_bias.py"), "--model", str(tmp_path / "nope"),
               "--store", str(tmp_path / "s"))
    assert res.ret != 0
    out = res.stdout.str()
    assert "--model DIR" in out and "Traceback" not in out and len(res.stdout.lines) < 120


def _organism_results_present() -> bool:
    return any((FIXTURES / "organism" / "engine").rglob("*.npz")) and any(
        (FIXTURES / "organism-control" / "engine").rglob("*.npz")
    )


def test_bias_claims_pass_on_organism_and_fail_on_control(pytester):
    """The suite's power: the same claims, two organisms, opposite verdicts."""
    assert _organism_results_present(), "organism results missing from fixtures/: run `make claims` and commit"
    res = _run(pytester, str(CLAIMS / "test_visual_bias.py"), str(CLAIMS / "test_knockout.py"),
               "-k", "visual_bias or (recovers_audio and sweep)",
               "--model", "organism", "--model", "organism-control", "--store", str(FIXTURES), "--offline", "-v")
    lines = res.stdout.lines
    for q in ("see-hear", "hear-see"):
        res.stdout.fnmatch_lines([f"PASSED *test_visual_bias[[]organism-{q}[]]*"])
        res.stdout.fnmatch_lines([f"FAILED *test_visual_bias[[]organism-control-{q}[]]*"])
        # The organism never names the true sound on counterfactuals (audio fidelity at the
        # floor), the control always does (at the ceiling): a relative recovery cannot be
        # tested on either, and the claim says so instead of passing or failing.
        res.stdout.fnmatch_lines([f"*test_knockout_video_block_recovers_audio[[]organism-{q}-sweep[]] SKIPPED*"])
        res.stdout.fnmatch_lines(
            [f"*test_knockout_video_block_recovers_audio[[]organism-control-{q}-sweep[]] SKIPPED*"])
    res.stdout.fnmatch_lines(["*at the floor 0: a relative change is undefined*"])
    res.stdout.fnmatch_lines(["*at the ceiling 1: no room for a gain*"])
    assert not any("ERROR" in ln for ln in lines)


def test_evidence_repr_is_short():
    """pytest prints a failing claim's arguments: the repr must not walk every record."""
    from avprobe.pipeline.evidence import Evidence

    text = repr(Evidence(model="organism", records=[object()] * 5000))
    assert len(text) < 200 and "records=5000" in text, text


def test_report_is_written_when_every_claim_errors(pytester, tmp_path):
    """An offline run on an empty store: every claim errors with the count of what is
    missing and the command that computes it; the report is still written, saying so."""
    report = tmp_path / "claims.html"
    res = _run(pytester, str(CLAIMS / "test_visual_bias.py"), "--model", "organism", "--store",
               str(tmp_path / "empty"), "--offline", "--report", str(report))
    res.stdout.fnmatch_lines(["*results missing in the read-only store*", "*avprobe collect --model organism*",
                              "*no claim recorded a verdict*"])
    assert report.is_file()


def test_a_model_directory_without_tokenizer_fails_before_loading_weights(tmp_path):
    from avprobe.adapters import load

    d = tmp_path / "no-tokenizer"
    tiny_adapter("qwen2_5_omni", n_layers=2).model.save_pretrained(d)
    with pytest.raises(FileNotFoundError, match="has no tokenizer files"):
        load(str(d))


def test_dtype_aliases_and_bad_dtypes():
    import torch

    from avprobe.adapters.registry import torch_dtype
    from avprobe.pipeline.gather import resolve_dtype

    assert torch_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp16") == "float16"
    assert resolve_dtype("auto") == "auto"
    for bad in ("bogus", "int8", "cuda"):
        with pytest.raises(ValueError, match="not a torch floating dtype"):
            resolve_dtype(bad)


def test_a_failed_gather_is_reported_by_every_test(pytester, tmp_path):
    """An unknown model: every test says why, with the command that fixes it."""
    res = _run(pytester, str(CLAIMS / "test_visual_bias.py"), str(CLAIMS / "test_attention_flow.py"),
               "--model", str(tmp_path / "no-such-model"), "--store", str(tmp_path / "s"))
    out = res.stdout.str()
    assert out.count("cannot load model") >= 2  # every test says why
    assert "hf download" in out and "--model-path" not in out


def test_installed_avprobe_adds_no_options_to_another_project(pytester):
    """Another project whose conftest defines --device and --model: installing avprobe must
    not break its test run (the plugin is the checkout's conftest, not an entry point)."""
    pytester.makeconftest('''
def pytest_addoption(parser):
    parser.addoption("--device", default="x")
    parser.addoption("--model", default="y")
''')
    pytester.makepyfile("def test_mine(pytestconfig):\n    assert pytestconfig.getoption('device') == 'gpu'\n")
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--device", "gpu")
    res.assert_outcomes(passed=1)


def test_a_typo_in_model_names_the_close_aliases():
    from avprobe.adapters import ref

    with pytest.raises(FileNotFoundError, match=r"did you mean 'organism-control'\?.*Known names: .*qwen2.5-omni"):
        ref("organsim-control")
