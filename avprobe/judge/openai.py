"""LLM judge over any OpenAI-compatible chat-completions endpoint (stdlib HTTP only).

Works with vLLM, Ollama, llama.cpp's server and hosted APIs. The defaults follow the paper's
judge (Qwen3-32B on vLLM, temperature 0.7, top_p 0.8, top_k 20, thinking on); `top_k` and
`chat_template_kwargs.enable_thinking` are vLLM extensions: pass `top_k=None, thinking=None`
for a server that rejects unknown fields.

Failures never raise: 429, 5xx, timeouts and connection errors are retried with capped,
jittered exponential backoff, then recorded as unscored with the reason; an unparseable
reply is unscored with the raw text kept.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from avprobe.judge.base import ERROR_PARSE, ERROR_TRANSPORT, Judge, JudgeCache, JudgeItem, Score
from avprobe.judge.prompts import PROMPT_VERSION, build_messages, parse_reply

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen3-32B"  # the paper's judge
URL_ENV = ("AVPROBE_JUDGE_URL", "OPENAI_BASE_URL")
MODEL_ENV = "AVPROBE_JUDGE_MODEL"
KEY_ENV = "OPENAI_API_KEY"
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
# After this many items in a row exhausted their retries on connection errors, the endpoint
# is taken as dead and later items try once (not max_retries times) until one succeeds.
_DEAD_AFTER = 3


@dataclass(frozen=True)
class ChatSettings:
    """Request settings that change judgments (recorded with each Score, part of the cache key)."""

    model: str = DEFAULT_MODEL
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int | None = 20  # vLLM / llama.cpp extension; None leaves it out of the request
    thinking: bool | None = True  # chat_template_kwargs.enable_thinking; None leaves it out
    max_tokens: int = 4096  # room for the reasoning plus the JSON
    seed: int | None = None


@dataclass(frozen=True)
class RetryPolicy:
    """Timeouts and retries. `timeout` bounds each socket operation, in seconds."""

    timeout: float = 120.0
    max_retries: int = 4
    backoff_base: float = 1.0  # first delay; doubles per retry
    backoff_max: float = 30.0  # cap on one delay (also on a server's Retry-After)

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0)."""
        d = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        d *= rng.uniform(0.5, 1.0)  # jitter: concurrent workers do not retry in lockstep
        if retry_after is not None:
            d = max(d, min(retry_after, self.backoff_max))
        return d


@dataclass(frozen=True)
class _Attempt:
    ok: bool
    retryable: bool
    reason: str  # why it failed ("" when ok)
    content: str = ""
    finish_reason: str = ""
    retry_after: float | None = None


def resolve_url(base_url: str | None = None) -> str:
    """Chat-completions URL from `base_url` or $AVPROBE_JUDGE_URL / $OPENAI_BASE_URL.

    A base URL such as http://host:8000/v1 gets /chat/completions appended.
    """
    url = base_url or next((os.environ[k] for k in URL_ENV if os.environ.get(k)), None)
    if not url:
        raise ValueError(
            "no judge endpoint: pass --judge-url http://HOST:PORT/v1 (or base_url=...), "
            "or set AVPROBE_JUDGE_URL or OPENAI_BASE_URL"
        )
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"judge URL {url!r} must look like http://HOST:PORT/v1")
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    value = headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


class OpenAIJudge(Judge):
    """Rubric judge through an OpenAI-compatible `/chat/completions` endpoint."""

    backend = "openai"

    def __init__(
        self,
        model: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.7,
        top_p: float = 0.8,
        top_k: int | None = 20,
        thinking: bool | None = True,
        max_tokens: int = 4096,
        seed: int | None = None,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        extra_body: Mapping[str, Any] | None = None,
        cache: JudgeCache | None = None,
        max_workers: int = 8,
        jitter_seed: int | None = None,
    ) -> None:
        super().__init__(cache=cache, max_workers=max_workers)
        self.url = resolve_url(base_url)
        self.api_key = api_key if api_key is not None else os.environ.get(KEY_ENV)
        self.chat = ChatSettings(
            model=model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL,
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=top_k,
            thinking=thinking,
            max_tokens=int(max_tokens),
            seed=seed,
        )
        if max_retries < 0 or timeout <= 0 or backoff_base < 0 or backoff_max < 0:
            raise ValueError("need max_retries >= 0, timeout > 0 and non-negative backoff")
        self.retry = RetryPolicy(float(timeout), int(max_retries), float(backoff_base), float(backoff_max))
        self.extra_body = dict(extra_body or {})
        self._rng = random.Random(jitter_seed)
        self._lock = threading.Lock()
        self._dead_streak = 0
        self._warned = False
        # Bounds requests in flight across every caller of this judge, not just one batch.
        self._slots = threading.BoundedSemaphore(max_workers)
        host = urllib.parse.urlparse(self.url).hostname or ""
        # Environment proxies must not capture a judge served on this machine.
        handlers = [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def model(self) -> str:
        return self.chat.model

    @property
    def prompt_version(self) -> str:
        return PROMPT_VERSION

    def settings(self) -> dict[str, Any]:
        out = asdict(self.chat)
        out["prompt_version"] = PROMPT_VERSION
        if self.extra_body:
            out["extra_body"] = self.extra_body
        return out

    # -- HTTP -----------------------------------------------------------------------------
    def request_body(self, item: JudgeItem) -> dict[str, Any]:
        """The JSON body sent for one item."""
        body: dict[str, Any] = {
            "model": self.chat.model,
            "messages": build_messages(item.candidate, item.reference, item.modality),
            "temperature": self.chat.temperature,
            "top_p": self.chat.top_p,
            "max_tokens": self.chat.max_tokens,
        }
        if self.chat.top_k is not None:
            body["top_k"] = self.chat.top_k
        if self.chat.thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": self.chat.thinking}
        if self.chat.seed is not None:
            body["seed"] = self.chat.seed
        body.update(self.extra_body)
        return body

    def _attempt(self, data: bytes) -> _Attempt:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.retry.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read()[:300].decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                detail = ""
            retryable = exc.code == 429 or exc.code >= 500
            return _Attempt(False, retryable, f"HTTP {exc.code}: {detail}".strip(), retry_after=_retry_after(exc.headers))
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                return _Attempt(False, True, f"timed out after {self.retry.timeout:g} s")
            if isinstance(reason, ConnectionRefusedError):
                return _Attempt(False, True, "connection refused")
            return _Attempt(False, True, f"connection failed: {reason}")
        except (TimeoutError, socket.timeout):
            return _Attempt(False, True, f"timed out after {self.retry.timeout:g} s")
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            return _Attempt(False, True, f"connection failed: {type(exc).__name__}: {exc}")
        try:
            envelope = json.loads(payload)
            choice = envelope["choices"][0]
            message = choice.get("message") or {}
            content = message.get("content") or ""
            finish = str(choice.get("finish_reason") or "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            # Not a chat-completions reply (a proxy's error page, a truncated body): transient.
            snippet = payload[:200].decode("utf-8", "replace")
            return _Attempt(False, True, f"malformed chat-completions response: {snippet!r}")
        if not isinstance(content, str):
            content = json.dumps(content)
        if not content:
            # Reasoning servers may put the thinking in a separate field; keep it as the raw reply.
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            content = f"<think>{reasoning}" if reasoning else ""
        return _Attempt(True, False, "", content=content, finish_reason=finish)

    # -- judging --------------------------------------------------------------------------
    def _score(self, item: JudgeItem) -> Score:
        data = json.dumps(self.request_body(item)).encode("utf-8")
        with self._lock:
            dead = self._dead_streak >= _DEAD_AFTER
        retries = 0 if dead else self.retry.max_retries
        attempt = _Attempt(False, False, "not attempted")
        n = 0
        for n in range(1, retries + 2):
            with self._slots:
                attempt = self._attempt(data)
            if attempt.ok or not attempt.retryable or n > retries:
                break
            with self._lock:
                wait = self.retry.delay(n - 1, self._rng, attempt.retry_after)
            log.debug("judge request failed (%s); retry %d/%d in %.3f s", attempt.reason, n, retries, wait)
            time.sleep(wait)
        meta = {**self.settings(), "attempts": n}
        if not attempt.ok:
            with self._lock:
                connection = attempt.reason.startswith(("connection", "timed out"))
                self._dead_streak = self._dead_streak + 1 if connection else 0
                first = not self._warned
                self._warned = True
            reason = f"{attempt.reason} ({n} attempt{'s' if n > 1 else ''} to {self.url})"
            (log.warning if first else log.debug)("judge call unscored: %s", reason)
            return Score.unscored(reason, "", self.judge_id, ERROR_TRANSPORT, meta)
        with self._lock:
            self._dead_streak = 0
        meta["finish_reason"] = attempt.finish_reason
        parsed = parse_reply(attempt.content)
        if parsed.value is None:
            problem = parsed.problem
            if attempt.finish_reason == "length":
                problem += f" (reply cut at max_tokens={self.chat.max_tokens})"
            return Score.unscored(problem, attempt.content, self.judge_id, ERROR_PARSE, meta)
        return Score(parsed.value, parsed.reason, attempt.content, self.judge_id, meta=meta)
