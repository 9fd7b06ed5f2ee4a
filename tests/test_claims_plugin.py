"""The pytest plugin and the claims suite, driven through `pytester`.

The power tests run the committed organism results (offline, from fixtures/): the bias
claims must pass on `organism-deep-lens` and fail on `organism-deep-control`; that the suite
can fail is the point of the control.
"""

from __future__ import annotations

import json
import zipfile
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
    return any((FIXTURES / "organism-deep-lens" / "engine").rglob("*.npz")) and any(
        (FIXTURES / "organism-deep-control" / "engine").rglob("*.npz")
    )


def test_bias_claims_pass_on_organism_and_fail_on_control(pytester):
    """The suite's power: the same claims, two organisms, opposite verdicts."""
    assert _organism_results_present(), "organism results missing from fixtures/: run `make claims` and commit"
    res = _run(pytester, str(CLAIMS / "test_visual_bias.py"), str(CLAIMS / "test_knockout.py"),
               "-k", "visual_bias or (recovers_audio and sweep)",
               "--model", "organism-deep-lens", "--model", "organism-deep-control", "--store", str(FIXTURES),
               "--offline", "-v")
    lines = res.stdout.lines
    for q in ("see-hear", "hear-see"):
        res.stdout.fnmatch_lines([f"PASSED *test_visual_bias[[]organism-deep-lens-{q}[]]*"])
        res.stdout.fnmatch_lines([f"FAILED *test_visual_bias[[]organism-deep-control-{q}[]]*"])
        # Blocking video recovers the lens organism's audio; the control always names the true
        # sound (at the ceiling): a gain cannot be tested there, and the claim says so instead
        # of passing or failing.
        res.stdout.fnmatch_lines([f"PASSED *test_knockout_video_block_recovers_audio[[]organism-deep-lens-{q}-sweep[]]*"])
        res.stdout.fnmatch_lines(
            [f"*test_knockout_video_block_recovers_audio[[]organism-deep-control-{q}-sweep[]] SKIPPED*"])
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

    with pytest.raises(FileNotFoundError,
                       match=r"did you mean 'organism-control' or 'organism-deep-control'\?.*Known names: .*qwen2.5-omni"):
        ref("organsim-control")


@pytest.fixture(scope="module")
def tiny_family_dirs(tmp_path_factory) -> list[Path]:
    """A tiny model directory of each family the README lists (Qwen2.5-Omni, Gemma 4,
    Phi-4-multimodal), as `--model DIR` reads it: weights, tokenizer, avprobe.json (the concept
    judge, the audio-ablated self as the shift base, a few frames)."""
    dirs = []
    for family in ("qwen2_5_omni", "gemma4", "phi4_multimodal"):
        d = tmp_path_factory.mktemp(f"tiny-{family}")
        a = tiny_adapter(family, n_layers=4)
        a.model.save_pretrained(d)
        a.tokenizer.save_pretrained(d)
        settings = {"judge": "concept", "base_model": "self-ablated", "fps": 1.0, "max_frames": 2,
                    "use_audio_in_video": family == "qwen2_5_omni"}
        if family == "qwen2_5_omni":
            settings.update(min_pixels=3136, max_pixels=12544)
        (d / "avprobe.json").write_text(json.dumps(settings))
        dirs.append(d)
    return dirs


def test_the_whole_claims_suite_runs_on_every_family(pytester, tiny_family_dirs, tmp_path):
    """`pytest claims/` end to end on a tiny model of each family (one session, a handful of
    samples, short captions): no error anywhere; every claim a verdict, or a skip with its
    reason; the audio-ablated self's shift computed for each family."""
    args = [str(CLAIMS), "-v", "--limit", "2", "--max-new-tokens", "3", "--store", str(tmp_path / "store")]
    for d in tiny_family_dirs:
        args += ["--model", str(d)]
    res = _run(pytester, *args)
    out = res.stdout.str()
    assert res.ret in (0, 1), out[-3000:]  # verdicts (some claims fail on random models), no usage error
    assert not [ln for ln in res.stdout.lines if ln.startswith("ERROR")], out[-3000:]
    assert "Traceback" not in out and "error" not in res.stdout.lines[-1].lower()
    lines = res.stdout.lines
    for d in tiny_family_dirs:
        for claim in ("test_visual_bias", "test_audio_attention_early", "test_latent_audio",
                      "test_knockout_late_integration", "test_base_shift_small", "test_audio_tokens_unshifted"):
            # -v lists each test with its outcome: "claims/x.py::test_x[<model dir>-...] SKIPPED (...)"
            assert any(f"::{claim}[" in ln and str(d) in ln for ln in lines), f"{claim} did not run on {d.name}"
    for ln in lines:  # every skip says why (the -rA summary: "SKIPPED [n] file:line: reason")
        if ln.startswith("SKIPPED"):
            assert ln.split(": ", 1)[-1].strip(), ln
    # the audio-ablated self was a base for every family: each stored record holds its shift
    # (or, for a caption that holds a media id, the reason it could not be teacher-forced)
    for d in tiny_family_dirs:
        recs = list((tmp_path / "store").glob(f"{d.name}/engine/*/*.npz"))
        assert recs, f"no records of {d.name}"
        for f in recs:
            meta = json.loads(zipfile.ZipFile(f).read("meta.json"))["meta"]
            assert meta["self_shift"]["ablation"] == "audio removed" or "error" in meta["self_shift"], f
    assert "no vision-only base shift results" in out  # none was given: skipped, saying so
