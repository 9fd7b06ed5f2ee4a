"""LLM judge over any OpenAI-compatible chat-completions endpoint (stdlib HTTP only).

Works with vLLM, Ollama, llama.cpp's server and hosted APIs. The defaults follow the paper's
judge (Qwen3-32B on vLLM, temperature 0.7, top_p 0.8, top_k 20, thinking on); `top_k` and
`chat_template_kwargs.enable_thinking` are vLLM extensions: pass `top_k=None, thinking=None`
for a server that rejects unknown fields.

Failures never raise: 429, 5xx, timeouts and connection errors are retried with capped,
jittered exponential backoff, then recorded as unscored with the reason; an unparseable
reply is unscored with an excerpt of the raw text kept.

The server is not trusted: redirects are never followed (the key stays with the configured
host), `timeout` bounds each whole attempt, replies over 1 MiB are refused, the reply is read
in linear time whatever it holds (`prompts.parse_reply`), and error bodies are redacted before
they reach a log.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import os
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Self

from avprobe.judge.base import ERROR_PARSE, ERROR_TRANSPORT, Judge, JudgeCache, JudgeItem, Score
from avprobe.judge.prompts import PROMPT_VERSION, build_messages, parse_reply

log = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen3-32B"  # the paper's judge
URL_ENV = ("AVPROBE_JUDGE_URL", "OPENAI_BASE_URL")
MODEL_ENV = "AVPROBE_JUDGE_MODEL"
KEY_ENV = "OPENAI_API_KEY"
MAX_REPLY_BYTES = 1 << 20  # a judge reply is a few KB; more is a broken or hostile server
_ERROR_BODY_BYTES = 8192  # read of an error body, before redaction and truncation
_DETAIL_CHARS = 300  # error text kept in a reason (and so in logs)
_RAW_HEAD, _RAW_TAIL = 1000, 3000  # excerpt of a long raw reply kept in the Score (the JSON is at the end)
_REASON_CHARS = 2000
_CHUNK = 65536
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
    """Timeouts and retries. `timeout` bounds each attempt as a whole (connect, send, reply
    headers and body), in seconds; DNS resolution is the one step it cannot cut."""

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


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (hosts a key may reach over plain http)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_warned_plain_http: set[str] = set()
_warned_lock = threading.Lock()


def _warn_plain_http(url: str) -> None:
    # Once per host and process: a run may build several judges for the same endpoint.
    host = urllib.parse.urlparse(url).netloc
    with _warned_lock:
        if host in _warned_plain_http:
            return
        _warned_plain_http.add(host)
    log.warning("the judge API key will be sent unencrypted to %s (plain http to a non-loopback host); use https", host)


_AUTH_FIELD = re.compile(r"""(?i)(authorization["']?\s*[:=]\s*["']?)[^"'\r\n,}]*""")
_BEARER = re.compile(r"""(?i)\bbearer\s+[^\s"',;}]+""")


def redact(text: str, key: str | None, limit: int = _DETAIL_CHARS) -> str:
    """`text` with the API key and any Authorization / Bearer value masked, cut to `limit`."""
    if key:
        text = text.replace(key, "[redacted]")
        # A read cut inside the key leaves a prefix of it at the end: drop that too.
        for n in range(min(len(key) - 1, len(text)), 3, -1):
            if text.endswith(key[:n]):
                text = text[:-n] + "[redacted]"
                break
    text = _BEARER.sub("Bearer [redacted]", _AUTH_FIELD.sub(r"\1[redacted]", text))
    return text if len(text) <= limit else text[:limit] + "..."


def excerpt(text: str, head: int = _RAW_HEAD, tail: int = _RAW_TAIL) -> str:
    """`text` if short, else its start and end (a reply's JSON answer comes last)."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n[... {len(text) - head - tail} characters cut ...]\n{text[-tail:]}"


# -- transport --------------------------------------------------------------------------------


class _Deadline:
    """Cuts one attempt at `seconds`: a timer shuts its sockets down, so that a server sending
    a byte at a time (each within the socket timeout) cannot hold the call open."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.fired = False
        self._done = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> Self:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()

    def expired(self) -> bool:
        return self.fired or time.monotonic() >= self.end

    def attach(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            late = self.fired
        if late:
            _shutdown(sock)
        return sock

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.fired = True
            socks = list(self._socks)
        for sock in socks:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv on this socket
    except OSError:
        pass  # already closed, or its descriptor moved to an SSL wrapper (attached too)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        create = self._create_connection
        # The raw socket is attached as soon as it exists: a proxy tunnel is read on it.
        self._create_connection = lambda *a, **k: deadline.attach(create(*a, **k))
        self._deadline = deadline

    def connect(self) -> None:
        super().connect()
        self._deadline.attach(self.sock)  # for https, the SSL socket that replaced the raw one


class _WatchedHTTPSConnection(_WatchedHTTPConnection, http.client.HTTPSConnection):
    pass


class _JudgeRequest(urllib.request.Request):
    def __init__(self, *args: Any, deadline: _Deadline, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.deadline = deadline


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: _JudgeRequest) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPConnection, req, deadline=req.deadline)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: _JudgeRequest) -> http.client.HTTPResponse:
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context, deadline=req.deadline)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would carry the Authorization header to another host and take its reply as
    # the judge's: every 3xx is an error instead.
    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)


class _TooLarge(Exception):
    pass


def _read_capped(stream: Any, cap: int, deadline: _Deadline, *, cut: bool = False) -> bytes:
    """Read `stream` in chunks, at most `cap` bytes, before the deadline.

    Over the cap: raise _TooLarge, or with `cut` return the first `cap` bytes. Past the
    deadline: raise TimeoutError. A body cut short: raise http.client.IncompleteRead.
    """
    length = getattr(stream, "length", None)  # what Content-Length says is left
    if length is not None and length > cap and not cut:
        raise _TooLarge(f"reply of {length} bytes is over the {cap}-byte limit")
    read = getattr(stream, "read1", None) or stream.read  # read1: one recv, so checks run often
    chunks: list[bytes] = []
    total = 0
    while total <= cap:
        if deadline.expired():
            raise TimeoutError
        chunk = read(min(_CHUNK, cap + 1 - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    if deadline.fired:
        raise TimeoutError  # the watchdog cut the socket: the end seen was not the reply's
    data = b"".join(chunks)
    if total > cap:
        if cut:
            return data[:cap]
        raise _TooLarge(f"reply is over the {cap}-byte limit")
    left = getattr(stream, "length", None)
    if left:
        raise http.client.IncompleteRead(data, left)
    return data


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
        parsed = urllib.parse.urlparse(self.url)
        loopback = is_loopback(parsed.hostname or "")
        if self.api_key and parsed.scheme == "http" and not loopback:
            _warn_plain_http(self.url)
        # Environment proxies must not capture a judge served on this machine.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})] if loopback else []
        handlers += [_NoRedirect(), _HTTPHandler(), _HTTPSHandler()]
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
        timeout = self.retry.timeout
        timed_out = _Attempt(False, True, f"timed out after {timeout:g} s")
        with _Deadline(timeout) as deadline:
            req = _JudgeRequest(self.url, data=data, headers=headers, method="POST", deadline=deadline)
            try:
                with self._opener.open(req, timeout=timeout) as resp:
                    payload = _read_capped(resp, MAX_REPLY_BYTES, deadline)
            except urllib.error.HTTPError as exc:
                with exc:
                    return timed_out if deadline.fired else self._http_error(exc, deadline)
            except _TooLarge as exc:
                return _Attempt(False, False, f"refused: {exc}")
            except urllib.error.URLError as exc:
                reason = exc.reason
                if deadline.fired or isinstance(reason, TimeoutError):
                    return timed_out
                if isinstance(reason, ConnectionRefusedError):
                    return _Attempt(False, True, "connection refused")
                return _Attempt(False, True, self._clean(f"connection failed: {reason}"))
            except TimeoutError:  # socket.timeout is TimeoutError
                return timed_out
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                if deadline.fired:
                    return timed_out
                return _Attempt(False, True, self._clean(f"connection failed: {type(exc).__name__}: {exc}"))
        try:
            envelope = json.loads(payload)
            choice = envelope["choices"][0]
            message = choice.get("message") or {}
            content = message.get("content") or ""
            finish = str(choice.get("finish_reason") or "")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            # Not a chat-completions reply (a proxy's error page, a truncated body): transient.
            snippet = self._clean(payload[:_DETAIL_CHARS].decode("utf-8", "replace"), 200)
            return _Attempt(False, True, f"malformed chat-completions response: {snippet!r}")
        if not isinstance(content, str):
            content = json.dumps(content)
        if not content:
            # Reasoning servers may put the thinking in a separate field; keep it as the raw reply.
            reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
            content = f"<think>{reasoning}" if isinstance(reasoning, str) and reasoning else ""
        return _Attempt(True, False, "", content=content, finish_reason=finish)

    def _http_error(self, exc: urllib.error.HTTPError, deadline: _Deadline) -> _Attempt:
        if 300 <= exc.code < 400:
            where = self._clean(exc.headers.get("Location", "") if exc.headers else "", 200)
            return _Attempt(
                False,
                False,
                f"HTTP {exc.code} redirect to {where!r} not followed (judge calls never follow redirects: "
                "pass the final URL as --judge-url)",
            )
        try:
            body = _read_capped(exc, _ERROR_BODY_BYTES, deadline, cut=True)
        except (TimeoutError, OSError, http.client.HTTPException):
            body = b""
        detail = self._clean(body.decode("utf-8", "replace"))
        retryable = exc.code == 429 or exc.code >= 500
        return _Attempt(False, retryable, f"HTTP {exc.code}: {detail}".strip(), retry_after=_retry_after(exc.headers))

    def _clean(self, text: str, limit: int = _DETAIL_CHARS) -> str:
        """Server-sent text made safe to log: the key and Authorization values masked, cut."""
        return redact(text, self.api_key, limit)

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
            reason = redact(reason, self.api_key, limit=len(reason))  # a key in the URL, too
            (log.warning if first else log.debug)("judge call unscored: %s", reason)
            return Score.unscored(reason, "", self.judge_id, ERROR_TRANSPORT, meta)
        with self._lock:
            self._dead_streak = 0
        meta["finish_reason"] = attempt.finish_reason
        parsed = parse_reply(attempt.content)  # linear time and depth-limited, whatever the server sent
        # The cache keeps what the score needs: the value, its reason and an excerpt of the reply.
        raw = excerpt(attempt.content)
        if raw != attempt.content:
            meta["raw_chars"] = len(attempt.content)
        reason = parsed.reason if len(parsed.reason) <= _REASON_CHARS else parsed.reason[:_REASON_CHARS] + "..."
        if parsed.value is None:
            problem = parsed.problem
            if attempt.finish_reason == "length":
                problem += f" (reply cut at max_tokens={self.chat.max_tokens})"
            return Score.unscored(problem, raw, self.judge_id, ERROR_PARSE, meta)
        return Score(parsed.value, reason, raw, self.judge_id, meta=meta)
