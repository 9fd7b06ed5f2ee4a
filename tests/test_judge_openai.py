"""The OpenAI-compatible judge against a real loopback HTTP server that injects faults."""

from __future__ import annotations

import json
import math
import random
import socket
import threading
from collections import defaultdict

import pytest
from fake_chat_server import DictCache, FakeChatServer, Reply

from avprobe.judge import ERROR_PARSE, ERROR_TRANSPORT, PROMPT_VERSION, JudgeItem, make_judge, parse_reply
from avprobe.judge.openai import OpenAIJudge, RetryPolicy, resolve_url

# Tiny backoff keeps the file at a few seconds; timeouts stay generous (a loaded CI box must
# not time out) except in the tests about timeouts.
FAST = {"timeout": 5.0, "backoff_base": 0.001, "backoff_max": 0.005, "jitter_seed": 0}


def judge_for(server: FakeChatServer, **options) -> OpenAIJudge:
    return OpenAIJudge(base_url=server.url, **{**FAST, **options})


def items(n: int, modality: str = "audio") -> list[JudgeItem]:
    # Candidate k names s{k}; the reference names s{k} for even k only: values 1, 0, 1, 0, ...
    verb = "hear" if modality == "audio" else "see"
    return [JudgeItem(f"i {verb} a s{k} .", f"i {verb} a s{k - k % 2} .", modality) for k in range(n)]


def expected(its: list[JudgeItem]) -> list[float]:
    return [1.0 if int(it.candidate.split()[3][1:]) % 2 == 0 else 0.0 for it in its]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- retries ---------------------------------------------------------------------------------


def test_retries_on_500_429_503_then_succeed() -> None:
    with FakeChatServer(script=[Reply(status=500), Reply(status=429), Reply(status=503)]) as server:
        score = judge_for(server, max_retries=4).score("i hear a siren .", "i hear a siren .", "audio")
        assert server.statuses() == [500, 429, 503, 200]
    assert score.value == 1.0
    assert score.meta["attempts"] == 4


def test_retries_stop_after_max_retries() -> None:
    with FakeChatServer(failure_rate=1.0) as server:
        score = judge_for(server, max_retries=3).score("i hear a siren .", "i hear a siren .", "audio")
        assert server.n_requests == 4  # one try + three retries, then it gives up
    assert math.isnan(score.value) and score.error == ERROR_TRANSPORT
    assert "HTTP 500" in score.reason and "4 attempts" in score.reason


def test_client_errors_are_not_retried() -> None:
    with FakeChatServer(script=[Reply(status=400, body=b'{"error": "unknown field top_k"}')]) as server:
        score = judge_for(server, max_retries=4).score("i hear a siren .", "i hear a siren .", "audio")
        assert server.n_requests == 1
    assert score.error == ERROR_TRANSPORT and "HTTP 400" in score.reason and "top_k" in score.reason


def test_hanging_reply_times_out_and_is_retried() -> None:
    with FakeChatServer(script=[Reply(hang=True)]) as server:
        score = judge_for(server, timeout=0.3).score("i hear a siren .", "i hear a siren .", "audio")
        statuses = server.statuses()
    assert statuses[0] == 0 and statuses[-1] == 200  # hung, timed out, retried
    assert score.value == 1.0 and score.meta["attempts"] == len(statuses) >= 2


def test_hang_every_time_gives_unscored_timeout() -> None:
    with FakeChatServer(script=[Reply(hang=True)] * 3) as server:
        score = judge_for(server, timeout=0.1, max_retries=2).score("i hear a siren .", "i hear a siren .", "audio")
        assert server.n_requests == 3
    assert score.error == ERROR_TRANSPORT and "timed out" in score.reason


def test_slow_reply_within_timeout_is_not_retried() -> None:
    with FakeChatServer(delay=0.15) as server:
        score = judge_for(server, timeout=5.0).score("i hear a dog .", "i hear a siren .", "audio")
        assert server.n_requests == 1
    assert score.value == 0.0 and score.scored


def test_garbage_http_body_is_retried_then_unscored() -> None:
    garbage = Reply(body=b"<html>502 bad gateway</html>")
    with FakeChatServer(script=[garbage] * 3) as server:
        score = judge_for(server, max_retries=2).score("i hear a siren .", "i hear a siren .", "audio")
        assert server.n_requests == 3
    assert score.error == ERROR_TRANSPORT and "malformed" in score.reason


def test_dead_endpoint_gives_unscored_records_not_an_exception() -> None:
    judge = OpenAIJudge(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=2, max_workers=2, **FAST)
    scores = judge.score_batch(items(8))
    assert len(scores) == 8
    assert all(s.error == ERROR_TRANSPORT and "connection refused" in s.reason for s in scores)
    assert judge.summarize(scores).n_unscored == 8
    # once the endpoint looks dead, later items try once instead of max_retries + 1 times
    assert min(s.meta["attempts"] for s in scores) == 1
    assert max(s.meta["attempts"] for s in scores) == 3


def test_retry_delays_grow_are_capped_and_jittered() -> None:
    policy = RetryPolicy(timeout=1, max_retries=10, backoff_base=1.0, backoff_max=8.0)
    rng = random.Random(0)
    delays = [policy.delay(a, rng) for a in range(8)]
    assert all(0.5 * min(8.0, 2**a) <= d <= min(8.0, 2**a) for a, d in enumerate(delays))
    assert len(set(delays)) == len(delays)  # jittered
    assert policy.delay(0, rng, retry_after=5.0) == 5.0  # the server's Retry-After wins
    assert policy.delay(0, rng, retry_after=100.0) == 8.0  # but is capped


# -- replies ---------------------------------------------------------------------------------

PARSE_CASES = [
    ('{"score": 0.8, "reason": "close"}', 0.8),
    ('```json\n{"score": 0.25, "reason": "fenced"}\n```', 0.25),
    ('Here is my grade:\n```\n{"score": 1, "reason": "plain fence"}\n```\nThanks.', 1.0),
    ('<think>The reference has a siren; maybe {"score": 0.1}?</think>\n{"score": 0.9, "reason": "after think"}', 0.9),
    ('Let me reason about it.\n</think>\n\n{"score": 0.6, "reason": "opening tag was in the prompt"}', 0.6),
    ('Sure! The grade is {"score": 0.3, "reason": "prose around"} as requested.', 0.3),
    ('{"Score": "0.7", "Reason": "string number, capitalised keys"}', 0.7),
    ('{"score": 0, "reason": "zero is a real score"}', 0.0),
    ("I think it deserves a 7/10.", None),
    ('{"score": 1.5, "reason": "out of range"}', None),
    ('{"score": -0.1, "reason": "negative"}', None),
    ('{"score": 80, "reason": "percent scale"}', None),
    ('{"score": true, "reason": "bool"}', None),
    ('{"score": null}', None),
    ('{"reason": "no score key"}', None),
    ('<think>still thinking, {"score": 0.9} maybe', None),
    ("", None),
    ("@@##$$ garbage", None),
]


@pytest.mark.parametrize(("reply", "value"), PARSE_CASES)
def test_parse_reply(reply: str, value: float | None) -> None:
    parsed = parse_reply(reply)
    assert parsed.value == value
    if value is None:
        assert parsed.problem  # says why


def test_replies_through_the_server_are_parsed_or_unscored_with_raw_kept() -> None:
    script = [Reply(content=reply) for reply, _ in PARSE_CASES]
    with FakeChatServer(script=script) as server:
        judge = judge_for(server, max_workers=1, max_retries=0)
        its = [JudgeItem(f"i hear a s{k} .", "i hear a siren .", "audio") for k in range(len(PARSE_CASES))]
        scores = judge.score_batch(its)
        assert server.n_requests == len(PARSE_CASES)  # parse failures are not retried
    for score, (reply, value) in zip(scores, PARSE_CASES, strict=True):
        assert score.raw == reply  # the raw reply is always kept
        if value is None:
            assert math.isnan(score.value) and score.error == ERROR_PARSE, reply
        else:
            assert score.value == value and score.scored, reply
    out_of_range = scores[[r for r, _ in PARSE_CASES].index('{"score": 1.5, "reason": "out of range"}')]
    assert "outside [0, 1]" in out_of_range.reason


def test_truncated_reply_says_so() -> None:
    with FakeChatServer(script=[Reply(content="<think>long reasoning", finish_reason="length")]) as server:
        score = judge_for(server, max_tokens=16).score("i hear a siren .", "i hear a siren .", "audio")
    assert score.error == ERROR_PARSE and "max_tokens=16" in score.reason


# -- requests, settings, cache, concurrency ---------------------------------------------------


def test_request_carries_paper_sampling_settings_and_they_are_recorded() -> None:
    with FakeChatServer() as server:
        score = judge_for(server, model="judge-x", api_key="sk-test").score("i see a dog .", "i see a dog .", "video")
        body = server.records[0].body
        auth = server.records[0].authorization
    assert body["model"] == "judge-x"
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.7, 0.8, 20)
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert "VISUAL" in body["messages"][0]["content"]  # the video rubric
    assert "Candidate: i see a dog ." in body["messages"][-1]["content"]
    assert auth == "Bearer sk-test"
    assert score.judge_id == "openai:judge-x"
    for key, value in {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "thinking": True, "prompt_version": PROMPT_VERSION}.items():
        assert score.meta[key] == value


def test_vllm_extensions_can_be_left_out() -> None:
    with FakeChatServer() as server:
        judge_for(server, top_k=None, thinking=None).score("i see a dog .", "i see a dog .", "video")
        body = server.records[0].body
    assert "top_k" not in body and "chat_template_kwargs" not in body


def test_cached_items_make_no_request_and_transport_failures_are_not_cached() -> None:
    cache = DictCache()
    its = items(6)
    with FakeChatServer() as server:
        first = judge_for(server, cache=cache).score_batch(its)
        assert server.n_requests == 6
        again = judge_for(server, cache=cache).score_batch(its)
        assert server.n_requests == 6  # all from the cache
        # a different prompt setting is a different key
        judge_for(server, cache=cache, temperature=0.0).score_batch(its[:1])
        assert server.n_requests == 7
    assert [s.value for s in first] == [s.value for s in again] == expected(its)
    assert [s.raw for s in first] == [s.raw for s in again]

    with FakeChatServer(failure_rate=1.0) as server:
        new = JudgeItem("i hear a horse .", "i hear a horse .", "audio")
        judge = judge_for(server, cache=cache, max_retries=0)
        assert judge.score_batch([new])[0].error == ERROR_TRANSPORT
        judge.score_batch([new])
        assert server.n_requests == 2  # the failure was not cached: asked again

    with FakeChatServer("not json at all") as server:
        new = JudgeItem("i hear a cow .", "i hear a cow .", "audio")
        judge = judge_for(server, cache=cache)
        assert judge.score_batch([new])[0].error == ERROR_PARSE
        judge.score_batch([new])
        assert server.n_requests == 1  # the judge's own unparseable answer is cached


def test_duplicate_items_are_judged_once() -> None:
    its = items(3) * 4
    with FakeChatServer() as server:
        scores = judge_for(server).score_batch(its)
        assert server.n_requests == 3
    assert [s.value for s in scores] == expected(its)


@pytest.mark.parametrize("bound", [1, 3])
def test_concurrency_never_exceeds_its_bound(bound: int) -> None:
    its = items(18)
    with FakeChatServer(delay=0.03) as server:
        scores = judge_for(server, max_workers=bound).score_batch(its)
        assert server.max_in_flight == bound  # reached, never exceeded
    assert [s.value for s in scores] == expected(its)


def test_concurrency_bound_holds_across_callers() -> None:
    with FakeChatServer(delay=0.03) as server:
        judge = judge_for(server, max_workers=2)
        threads = [threading.Thread(target=judge.score_batch, args=(items(8, m),)) for m in ("audio", "video")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.n_requests == 16
        assert server.max_in_flight == 2


def test_thirty_percent_failures_complete_with_the_right_unscored_count() -> None:
    its = items(60)
    with FakeChatServer(failure_rate=0.3, seed=7) as server:
        scores = judge_for(server, max_workers=4, max_retries=0).score_batch(its)
        statuses = server.statuses()
    failed = statuses.count(500)
    assert 8 <= failed <= 30  # the fault injection really fired
    assert sum(not s.scored for s in scores) == failed
    assert len(scores) == 60
    for s, want in zip(scores, expected(its), strict=True):
        assert (not s.scored and s.error == ERROR_TRANSPORT) or s.value == want


def test_thirty_percent_failures_with_retries_unscored_only_where_every_attempt_failed() -> None:
    its = items(60)
    with FakeChatServer(failure_rate=0.3, seed=3) as server:
        scores = judge_for(server, max_workers=4, max_retries=1).score_batch(its)
        records = list(server.records)
    by_candidate: dict[str, list[int]] = defaultdict(list)
    for r in records:
        by_candidate[r.candidate].append(r.status)
    hopeless = {c for c, st in by_candidate.items() if 200 not in st}
    assert all(len(st) <= 2 for st in by_candidate.values())
    assert any(len(st) == 2 for st in by_candidate.values())  # some retries happened
    assert {it.candidate for it, s in zip(its, scores, strict=True) if not s.scored} == hopeless
    assert judge_for(server).summarize(scores).n_unscored == len(hopeless)


# -- configuration ---------------------------------------------------------------------------


def test_url_and_model_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AVPROBE_JUDGE_URL", "OPENAI_BASE_URL", "AVPROBE_JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="--judge-url"):
        resolve_url(None)
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        resolve_url("localhost:8000")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://b:1/v1/")
    assert resolve_url(None) == "http://b:1/v1/chat/completions"
    monkeypatch.setenv("AVPROBE_JUDGE_URL", "http://a:1/v1")
    assert resolve_url(None) == "http://a:1/v1/chat/completions"
    assert resolve_url("http://c:1/v1/chat/completions") == "http://c:1/v1/chat/completions"
    monkeypatch.setenv("AVPROBE_JUDGE_MODEL", "env-model")
    assert make_judge("openai").model == "env-model"
    assert make_judge("openai:qwen3:32b").model == "qwen3:32b"  # ollama tags keep their colon
    with pytest.raises(TypeError, match="batch_size"):
        make_judge("openai", batch_size=3)


def test_score_cli_against_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    from avprobe.cli import main

    with FakeChatServer() as server:
        argv = ["judge", "score", "--judge", "openai:fake", "--judge-url", server.url, "--judge-retries", "0"]
        rc = main([*argv, "--candidate", "i hear a dog .", "--reference", "i hear a dog .", "--modality", "audio"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["value"] == 1.0 and out["judge_id"] == "openai:fake"
