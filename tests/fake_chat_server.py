"""A fault-injecting OpenAI-compatible chat server on loopback, for tests.

    with FakeChatServer(failure_rate=0.3, seed=1) as server:
        judge = OpenAIJudge(base_url=server.url, ...)
        ...
        server.n_requests, server.max_in_flight, server.records

Each POST to /v1/chat/completions is answered, in order of precedence, by:
1. `script[i]` for the i-th request (a `Reply`: content, HTTP status, raw body, delay, hang);
2. a random failure with probability `failure_rate` (HTTP `failure_status`), drawn from a
   generator seeded with `seed`;
3. `reply(body)`: a string (or a callable of the request body returning one) used as the
   message content. The default grades the pair with the concept judge, so a pipeline run
   against this server gets exact, checkable scores.
"""

from __future__ import annotations

import json
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer. `content` None means "use the server's normal reply"."""

    content: str | None = None
    status: int = 200
    body: bytes | None = None  # raw HTTP body, replacing the chat-completions envelope
    delay: float = 0.0  # seconds before answering
    hang: bool = False  # never answer (until the server stops or `hang_s` passes)
    headers: tuple[tuple[str, str], ...] = ()
    finish_reason: str = "stop"


@dataclass(frozen=True)
class RequestRecord:
    index: int
    body: dict[str, Any] | None
    status: int  # what the server answered; 0 for a hang
    candidate: str
    reference: str
    authorization: str = ""  # the Authorization header sent, "" if none


_PAIR = re.compile(r"Reference:\s*(.*)\nCandidate:\s*(.*)", re.DOTALL)


def request_pair(body: dict[str, Any] | None) -> tuple[str, str]:
    """(reference, candidate) from the last user message of a judge request ("", "" if none)."""
    if not body:
        return "", ""
    users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
    match = _PAIR.search(users[-1]) if users else None
    if not match:
        return "", ""
    return match.group(1).strip(), match.group(2).strip()


def concept_reply(body: dict[str, Any]) -> str:
    """Grade the request's pair exactly with the concept judge, as a JSON reply."""
    from avprobe.judge.concept import ConceptJudge

    reference, candidate = request_pair(body)
    system = body["messages"][0]["content"] if body.get("messages") else ""
    modality = "audio" if "SOUND" in system else "video"
    score = ConceptJudge().score(candidate, reference, modality)
    value = score.value if score.scored else 0.5
    return json.dumps({"score": value, "reason": score.reason})


class FakeChatServer:
    """Threaded HTTP server speaking enough of the chat-completions protocol for judges."""

    def __init__(
        self,
        reply: str | Callable[[dict[str, Any]], str] = concept_reply,
        *,
        script: Sequence[Reply] = (),
        failure_rate: float = 0.0,
        failure_status: int = 500,
        seed: int = 0,
        delay: float = 0.0,
        hang_s: float = 30.0,
    ) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in [0, 1], got {failure_rate}")
        self.reply = reply
        self.script = list(script)
        self.failure_rate = failure_rate
        self.failure_status = failure_status
        self.delay = delay
        self.hang_s = hang_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.records: list[RequestRecord] = []
        self._issued = 0  # requests planned so far (records are appended when answered)
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> FakeChatServer:
        handler = type("_Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # releases hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL, as a user would pass it (…/v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def n_requests(self) -> int:
        with self._lock:
            return len(self.records)

    def statuses(self) -> list[int]:
        with self._lock:
            return [r.status for r in self.records]

    # -- answering ------------------------------------------------------------------------
    def _plan(self, body: dict[str, Any] | None) -> tuple[int, Reply]:
        with self._lock:
            index = self._issued
            self._issued += 1
            if index < len(self.script):
                return index, self.script[index]
            if self.failure_rate and self._rng.random() < self.failure_rate:
                return index, Reply(status=self.failure_status)
        return index, Reply(delay=self.delay)

    def _content(self, body: dict[str, Any] | None, planned: Reply) -> str:
        if planned.content is not None:
            return planned.content
        return self.reply(body or {}) if callable(self.reply) else self.reply

    def _record(self, index: int, body: dict[str, Any] | None, status: int, authorization: str = "") -> None:
        reference, candidate = request_pair(body)
        with self._lock:
            self.records.append(RequestRecord(index, body, status, candidate, reference, authorization))


class _Handler(BaseHTTPRequestHandler):
    fake: FakeChatServer  # set on the per-server subclass

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep test output clean

    def _send(self, status: int, payload: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, json.dumps({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]}).encode())
        else:
            self._send(404, b'{"error": "not found"}')

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        fake = self.fake
        with fake._lock:
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            response = self._answer()
        finally:
            # Out of flight before the reply is written: a client that has read its reply and
            # sent the next request must never be counted twice.
            with fake._lock:
                fake.in_flight -= 1
        if response is None:
            return
        try:
            self._send(*response)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer

    def _answer(self) -> tuple[int, bytes, Sequence[tuple[str, str]]] | None:
        """(status, body, headers) for this request, or None to send nothing (a hang)."""
        fake = self.fake
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        index, planned = fake._plan(body)
        auth = self.headers.get("Authorization") or ""
        if not self.path.rstrip("/").endswith("/chat/completions"):
            fake._record(index, body, 404, auth)
            return 404, b'{"error": "not found"}', ()
        if planned.hang:
            fake._record(index, body, 0, auth)
            fake._stop.wait(fake.hang_s)
            return None
        if planned.delay:
            fake._stop.wait(planned.delay)
        fake._record(index, body, planned.status, auth)
        if planned.body is not None:
            return planned.status, planned.body, planned.headers
        if planned.status != 200:
            err = {"error": {"message": f"injected HTTP {planned.status}", "code": planned.status}}
            return planned.status, json.dumps(err).encode(), planned.headers
        envelope = {
            "id": f"chatcmpl-{index}",
            "object": "chat.completion",
            "model": (body or {}).get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": fake._content(body, planned)},
                    "finish_reason": planned.finish_reason,
                }
            ],
        }
        return 200, json.dumps(envelope).encode(), planned.headers


class DictCache:
    """In-memory stand-in for the result store's JSON API (the `JudgeCache` protocol)."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], dict] = {}
        self.gets = 0
        self.puts = 0
        self._lock = threading.Lock()

    @staticmethod
    def _key(namespace: str, parts: Any) -> tuple[str, str]:
        return namespace, json.dumps(parts, sort_keys=True)

    def get_json(self, namespace: str, parts: Any) -> dict | None:
        with self._lock:
            self.gets += 1
            value = self.data.get(self._key(namespace, parts))
            return None if value is None else json.loads(json.dumps(value))

    def put_json(self, namespace: str, parts: Any, value: dict) -> None:
        with self._lock:
            self.puts += 1
            self.data[self._key(namespace, parts)] = json.loads(json.dumps(value))
