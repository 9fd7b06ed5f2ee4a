"""The HTML report, claims.json, the terminal table, `avprobe report`, `avprobe release-check`'s
comparison rule, and the CLI's help: fast tests on synthetic outcomes (no browser, no store).
The end-to-end run on the organisms is tests/test_report_e2e.py."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from avprobe.claim import ClaimCheck, ClaimOutcome, ClaimSkipped
from avprobe.records import slug, verdict_file
from avprobe.report import svg
from avprobe.report.html import render_report
from avprobe.report.numbers import band_text, fix_p_text, format_p
from avprobe.stats import one_sample_test

ROOT = Path(__file__).resolve().parent.parent


def _outcome(**kw) -> ClaimOutcome:
    base = dict(claim_id="visual_bias", model="m", scope="see-hear", status="passed", statement="s", figure="f",
                paper_value="p", estimate=0.5, ci=(0.4, 0.6), p_value=0.01, n=10)
    base.update(kw)
    return ClaimOutcome(**base)


def _row(html: str, claim_id: str) -> str:
    m = re.search(rf'<tr class="row-[a-z]+" data-claim="{claim_id}">.*?</tr>', html, re.S)
    assert m, f"no row for {claim_id}"
    return m.group(0)


def test_a_failed_multi_part_claim_headlines_its_failing_part():
    rng = np.random.default_rng(0)
    ok = one_sample_test(rng.normal(0.9, 0.05, 40), 0.5, "greater", n_boot=200)
    bad = one_sample_test(rng.normal(0.1, 0.05, 40), 0.5, "greater", n_boot=200)
    check = ClaimCheck({"id": "knockout_late_integration"}, model="m", scope="s")
    o = check.verdict({"G-/->video lowers video": ok, "G-/->audio lowers audio": bad})
    assert o.status == "failed"
    assert o.deciding == "G-/->audio lowers audio"
    assert o.estimate == pytest.approx(bad.estimate) and o.p_value == pytest.approx(bad.p_value)
    html = render_report([o], {})
    assert "headline: <b>G-/-&gt;audio lowers audio</b> (the part that failed)" in html
    # a passed "any" claim headlines its passing part
    o2 = ClaimCheck({"id": "x"}).verdict({"a": bad, "b": ok}, require="any")
    assert o2.status == "passed" and o2.deciding == "b"


def test_expected_and_moved_verdicts_read_as_the_terminal_says():
    xfail = _outcome(claim_id="visual_bias", status="failed", expected="failed")
    moved = _outcome(claim_id="latent_audio", status="failed", expected="passed")
    plain = _outcome(claim_id="base_shift_small", status="failed")
    assert (xfail.shown_status, moved.shown_status, plain.shown_status) == ("xfailed", "moved", "failed")
    html = render_report([xfail, moved, plain], {})
    assert 'class="verdict v-xfailed"' in _row(html, "visual_bias") and "v-failed" not in _row(html, "visual_bias")
    assert "verdict moved: expected passed, now failed" in _row(html, "latent_audio")
    assert 'class="verdict v-failed"' in _row(html, "base_shift_small")
    from avprobe.report.terminal import summary_table

    text = summary_table([xfail, moved])
    assert "XFAILED" in text and "MOVED" in text


def test_a_skip_reason_wraps_across_the_number_columns():
    reason = "untestable: " + "knockout_video_block_recovers_audio: baseline mean 1 at the ceiling " * 3
    html = render_report([_outcome(status="skipped", skip_reason=reason, estimate=None, ci=None, p_value=None)], {})
    row = _row(html, "visual_bias")
    assert '<td colspan="4" class="skip-reason">' in row
    assert 'class="num"><span class="skip-reason"' not in row  # the no-wrap number cell that overflowed
    css = (ROOT / "avprobe/report/style.css").read_text()
    assert re.search(r"td\.skip-reason \{[^}]*white-space: normal", css)


def test_p_values_are_never_printed_as_zero():
    assert format_p(0.0, 2000) == "< 5e-4" and format_p(0.0) == "< 1e-300" and format_p(3e-31) == "3e-31"
    assert fix_p_text("mean 1 [1, 1] 95% CI, p=0 (cluster bootstrap), Holm p=0; p=0.04", 2000) == (
        "mean 1 [1, 1] 95% CI, p<5e-4 (cluster bootstrap), Holm p<5e-4; p=0.04")
    part = {"name": "same top-1", "summary": "proportion 0.98, p=0 (cluster bootstrap)", "passed": True, "n_boot": 2000,
            "estimate": 0.98, "ci": [0.97, 0.99], "p": 0.0}
    html = render_report([_outcome(p_value=0.0, parts=[part], deciding="same top-1")], {})
    row = _row(html, "visual_bias")
    assert '<td class="num">&lt; 5e-4</td>' in row and "p=0 " not in row and "p&lt;5e-4" in row
    assert "0.0e+00" not in html


def test_the_layers_each_band_became_are_kept_and_shown():
    check = ClaimCheck({"id": "audio_attention_early", "early_band": "paper-early", "min_early_share": 0.4})
    assert check.band(8, "early_band") == (0,)
    rng = np.random.default_rng(1)
    o = check.verdict(one_sample_test(rng.normal(0.6, 0.05, 30), 0.4, "greater", n_boot=200))
    assert o.layers["early_band"]["layers"] == [0] and o.layers["early_band"]["band"] == "paper-early"
    assert o.thresholds["min_early_share"] == 0.4
    text = band_text("early_band", o.layers["early_band"])
    assert text.endswith("= layer 0 of 8"), text
    assert "= layer 0 of 8" in render_report([o], {})


def test_the_bands_table_warns_where_a_band_shrank_to_one_layer():
    from types import SimpleNamespace

    from avprobe.report.html import _bands_table

    def table(n_layers: int) -> str:
        rec = SimpleNamespace(meta={"n_layers": n_layers, "window": 2})
        return _bands_table(SimpleNamespace(n_layers=n_layers, records=[rec]))

    eight, sixteen = table(8), table(16)
    # the paper's early band (layers 0-5 of 36) is layer 0 alone on 8 layers, 0-2 on 16
    assert re.search(r"<code>paper-early</code>.*?<b>0</b> of 8 \(one layer only\)", eight)
    assert re.search(r"<code>paper-early</code>.*?<b>0-2</b> of 16</td>", sixteen)
    assert "one layer only" not in sixteen


def test_no_text_under_11_px_and_heatmaps_carry_a_colour_scale():
    css = (ROOT / "avprobe/report/style.css").read_text()
    sizes = [float(x) for x in re.findall(r"font-size:\s*([\d.]+)px", css)]
    assert sizes and min(sizes) >= 11, sorted(sizes)[:5]
    out = svg.heatmap([[0.2, 0.5]], ["0: a"], ["V", "A"], col_colors=["#e6550d", "#3182bd"], col_vmax=[1.0, 1.0],
                      scales=[svg.ColorScale("share per role", "#6b7280", 1.0), svg.ColorScale("per second", "#000", 0.24)])
    assert "share per role" in out and ">100%<" in out and ">24%<" in out and ">0%<" in out
    assert "font-size" not in out  # sizes come from the stylesheet only


def test_fig5_is_a_two_by_two_grid():
    css = (ROOT / "avprobe/report/style.css").read_text()
    assert re.search(r"\.grid2 \{[^}]*grid-template-columns: repeat\(2,", css)


def test_every_cli_option_has_help():
    from avprobe.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        parser.format_help()  # a bare "%" in a help text fails here, as `--help` would
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sub in a.choices.items():
                    walk(sub, f"{where} {name}")
            elif not isinstance(a, argparse._HelpAction) and not a.help:  # SUPPRESS: a hidden internal option
                missing.append(f"{where} {'/'.join(a.option_strings) or a.dest}")

    walk(build_parser(), "avprobe")
    assert not missing, missing


def test_avprobe_report_without_a_claims_file_says_what_to_run(tmp_path, capsys):
    from avprobe.cli import main

    assert main(["report", "--from", str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err
    assert "no claims file" in err and "make claims" in err and "Traceback" not in err


# ---- release-check: the comparison rule -------------------------------------------------------


def _part(name, est, lo, hi, passed=True):
    return {"name": name, "estimate": est, "ci": [lo, hi], "passed": passed, "summary": ""}


def test_release_comparison_is_statistical_not_a_tolerance():
    from avprobe.report.release import compare

    prev = [_outcome(claim_id="a", parts=[_part("x", 0.50, 0.45, 0.55)]),
            _outcome(claim_id="b", parts=[_part("x", 0.50, 0.49, 0.51)]),
            _outcome(claim_id="c", status="failed"),
            _outcome(claim_id="d", status="skipped", ci=None, estimate=None)]
    new = [_outcome(claim_id="a", parts=[_part("x", 0.54, 0.50, 0.58)]),  # moved 0.04, inside the old CI
           _outcome(claim_id="b", parts=[_part("x", 0.515, 0.51, 0.52)]),  # moved 0.015, outside the old CI
           _outcome(claim_id="c", status="passed"),
           _outcome(claim_id="d", status="passed")]
    found = {(f.claim_id, f.what) for f in compare(prev, new)}
    assert found == {("b", "outside previous CI"), ("c", "verdict moved"), ("d", "verdict moved")}
    assert compare(prev, prev) == []
    assert {f.what for f in compare(prev, new[:1])} >= {"missing"}


def test_the_verdict_file_naming_rule_is_one():
    """A local path names the same expected-verdict file for the plugin and release-check."""
    from avprobe.pytest_plugin import Session

    class Config:
        def getoption(self, name, default=None):
            return "/v" if name == "verdicts" else default

    s = object.__new__(Session)
    s.config = Config()
    for model in ("/models/Omni-3B v2", "my-org/Omni-3B-v2", "organism"):
        assert s._verdict_file(model) == verdict_file("/v", model) == Path("/v") / f"{slug(model)}.json"


def test_the_workflow_runs_exactly_the_release_check():
    import yaml

    from avprobe.cli import build_parser

    wf = yaml.safe_load((ROOT / "examples/avprobe-release-check.yml").read_text())
    runs = [s["run"] for job in wf["jobs"].values() for s in job["steps"] if "run" in s]
    calls = [r for r in runs if "avprobe release-check" in r]
    assert len(calls) == 1, runs
    text = " ".join(calls[0].replace("\\\n", " ").split())
    assert "cp " not in " ".join(runs) and "sed " not in " ".join(runs)  # no second naming rule in the workflow
    argv = shlex.split(re.sub(r"\$\{\{[^}]*\}\}", "X", text).replace("$JUDGE_URL", "http://judge"))
    argv = argv[argv.index("release-check"):]
    args = build_parser("release-check").parse_args(argv)
    assert args.new == "X" and args.previous == "X" and "--judge-url" in args.pytest_args
    assert "JUDGE_URL" in (ROOT / "examples/avprobe-release-check.yml").read_text().split("release-check --new")[0]


def test_claim_skip_outside_pytest_still_raises():
    with pytest.raises(ClaimSkipped):
        ClaimCheck({"id": "x"}).skip("no data")
