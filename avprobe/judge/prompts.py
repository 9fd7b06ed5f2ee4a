"""Rubric prompts of the LLM judges and the parser of their replies.

The texts live in `avprobe/judge/prompts/*.txt` (package data). `PROMPT_VERSION` is a short
hash of all of them: it is part of every cache key, so editing a prompt re-judges.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import deque
from dataclasses import dataclass
from functools import cache
from importlib import resources

from avprobe.judge.base import check_modality

_PROMPT_FILES = ("audio.txt", "video.txt", "user.txt")
_FIELD = re.compile(r"\{(candidate|reference)\}")
_THINK_TAG = re.compile(r"<think>|</think>", re.IGNORECASE)
# Tokens of the bracket scan: a run of one bracket, an escaped character, and inside an
# object a whole string (to its closing quote, or to the end of the text if it has none).
_BRACKETS = re.compile(r"\\.|\{+|\[+|\}+|\]+", re.DOTALL)
_BRACKETS_AND_STRINGS = re.compile(r'\\.|"[^"\\]*(?:\\.[^"\\]*)*"?|\{+|\[+|\}+|\]+', re.DOTALL)
# A JSON object opens with a key and its colon, or closes at once ("{x}" or '{ "a" b' is prose).
_OBJECT_START = re.compile(r'\{\s*(?:"[^"\\]*(?:\\.[^"\\]*)*"\s*:|\})')
MAX_NESTING = 32  # a score object nests 1-2 levels; deeper is not a judge's answer


@cache
def prompt_text(name: str) -> str:
    """Text of one prompt file (audio.txt, video.txt, user.txt)."""
    if name not in _PROMPT_FILES:
        raise ValueError(f"unknown prompt {name!r}; expected one of {_PROMPT_FILES}")
    path = resources.files("avprobe.judge").joinpath("prompts", name)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"judge prompt {path} is missing: reinstall avprobe (the prompts are package data)"
        ) from None


def _version() -> str:
    h = hashlib.sha256()
    for name in _PROMPT_FILES:
        h.update(name.encode())
        h.update(b"\0")
        h.update(prompt_text(name).encode())
        h.update(b"\0")
    return h.hexdigest()[:10]


PROMPT_VERSION = _version()


def build_messages(candidate: str, reference: str, modality: str) -> list[dict[str, str]]:
    """Chat messages asking the judge to grade `candidate` against `reference`."""
    system = prompt_text(f"{check_modality(modality)}.txt")
    values = {"candidate": " ".join(candidate.split()), "reference": " ".join(reference.split())}
    # One pass, so braces inside a caption are never read as template fields.
    user = _FIELD.sub(lambda m: values[m.group(1)], prompt_text("user.txt"))
    return [{"role": "system", "content": system.strip()}, {"role": "user", "content": user.strip()}]


@dataclass(frozen=True)
class ParsedReply:
    """A judge reply read: `value` is None when no valid score was found (`problem` says why)."""

    value: float | None
    reason: str
    problem: str = ""


def strip_reasoning(text: str) -> tuple[str, str]:
    """Drop <think>...</think> reasoning; return (answer, problem). Linear time.

    Reasoning servers often put the opening tag in the prompt, so a reply may hold only the
    closing tag: everything before the last `</think>` is reasoning. An opening tag that is
    never closed means the reply stopped while thinking.
    """
    pieces: list[str] = []
    pos, open_at = 0, -1
    # A block runs from an opening tag to the first closing tag after it (what a lazy
    # "<think>.*?</think>" removes, without its retry from every opening tag); a closing tag
    # with no opening before it stays, and so does an opening tag never closed.
    for m in _THINK_TAG.finditer(text):
        closing = m.group()[1] == "/"
        if open_at < 0:
            if not closing:
                open_at = m.start()
        elif closing:
            pieces.append(text[pos:open_at])
            pos, open_at = m.end(), -1
    pieces.append(text[pos:])
    text = "".join(pieces)
    lower = text.lower()
    close = lower.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>") :]
        lower = text.lower()
    open_ = lower.find("<think>")
    if open_ >= 0:
        return text[:open_], "reply ended inside <think> (reasoning unfinished; raise the token limit)"
    return text, ""


# -- finding the JSON objects of a reply in linear time ----------------------------------------
# Decoding from every "{" (what a plain scan with json.raw_decode does) costs O(position) per
# failure, so a reply of braces takes minutes, and a deep object raises RecursionError. Instead
# one scan pairs the brackets and only the balanced spans are decoded.


def _spans(text: str, strings: bool) -> tuple[list[tuple[int, int]] | None, bool]:
    """(start, end) of each balanced {...} in `text`, or None if one that closes holds more
    than MAX_NESTING levels; and whether a quoted string was skipped on the way.

    With `strings`, brackets between quotes are text, and quotes count only inside a brace
    that opens an object (`{"key":` or `{}`), so that prose quotes after a stray "{" in
    prose do not hide the answer. Without, quotes are ignored (for a stray quote). Only the
    innermost MAX_NESTING open brackets are kept: deeper ones that never close (stray braces
    in prose) are forgotten, and one that closes means the reply nests too deep to read.
    A run of one bracket is one token and a string is skipped in one step, so a reply of
    brackets costs little per character.
    """
    spans: list[tuple[int, int]] = []
    stack: deque[tuple[str, int, bool]] = deque()  # (bracket, position, opens an object)
    objects = 0  # entries of `stack` that open an object
    dropped = quoted = False
    outside = _BRACKETS.search
    inside = _BRACKETS_AND_STRINGS.search if strings else outside
    pos = 0
    while (m := (inside if objects else outside)(text, pos)) is not None:
        start, pos = m.span()
        ch, run = text[start], pos - start
        if ch == '"':
            quoted = True  # a whole string, brackets and all (or the unterminated rest)
            continue
        if ch == "\\":  # outside a string a backslash escapes nothing: \{ is a brace
            ch, run = text[start + 1], 1
        if ch in "{[":
            if ch == "[" and not stack:
                continue  # prose brackets
            if run > 1:  # all but the last are followed by a bracket: they open no object
                stack.extend((ch, i, False) for i in range(max(pos - run, pos - MAX_NESTING - 1), pos - 1))
                dropped = dropped or run > MAX_NESTING
            opens = strings and ch == "{" and _OBJECT_START.match(text, pos - 1) is not None  # for quotes only
            stack.append((ch, pos - 1, opens))
            objects += opens
            while len(stack) > MAX_NESTING:
                objects -= stack.popleft()[2]
                dropped = True
        elif ch == "}":
            for close in range(pos - run + 1, pos + 1):
                while stack and stack[-1][0] == "[":
                    objects -= stack.pop()[2]  # an unclosed "[" inside the object
                if stack:
                    _, begin, opens = stack.pop()
                    objects -= opens
                    spans.append((begin, close))
                elif dropped:
                    return None, quoted
                else:
                    break  # the rest of the run closes nothing
        elif ch == "]":
            for _ in range(run):
                if not stack or stack[-1][0] != "[":
                    break  # a "]" closing nothing, in prose or in an object
                stack.pop()
    return spans, quoted


def _decoded(text: str, spans: list[tuple[int, int]]) -> dict[int, tuple[int, object]]:
    # Outermost first; a span that is not JSON gives way to the spans inside it. Every
    # character lies in at most MAX_NESTING spans, so the decoding is linear too.
    found: dict[int, tuple[int, object]] = {}
    covered = 0
    for start, end in sorted(spans):
        if start < covered or not _OBJECT_START.match(text, start):
            continue  # inside an object already read, or prose such as "{x}"
        try:
            found[start] = (end, json.loads(text[start:end]))
        except (ValueError, RecursionError):
            continue
        covered = end
    return found


def _json_objects(text: str) -> tuple[list[object], bool]:
    """The JSON objects in `text`, in order, and whether the text nests too deep to read.

    The objects are those that decoding from each "{" in turn would find (an object taken
    whole, the search going on after its end), where one of the two bracket scans pairs
    them: the one that tracks quotes, or the one that does not (for a stray quote).
    """
    found: dict[int, tuple[int, object]] = {}
    too_deep = False
    for strings in (True, False):
        spans, quoted = _spans(text, strings)
        if spans is None:
            too_deep = True
        else:
            for start, hit in _decoded(text, spans).items():
                found.setdefault(start, hit)
        if not quoted:
            break  # no quote was tracked: the scan without quotes would pair the same
    objects: list[object] = []
    covered = 0
    for start in sorted(found):
        end, obj = found[start]
        if start >= covered:
            objects.append(obj)
            covered = end
    return objects, too_deep


def score_value(value: object) -> tuple[float | None, str]:
    """A reply's "score" as a float in [0, 1], or (None, why not). A numeric string counts."""
    if isinstance(value, bool) or value is None:
        return None, f"score {value!r} is not a number"
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None, f"score {value!r} is not a number"
    if not isinstance(value, (int, float)):
        return None, f"score {value!r} is not a number"
    v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        return None, f"score {v!r} is outside [0, 1]"
    return v, ""


def parse_reply(text: str | None) -> ParsedReply:
    """Read `{"score": float in [0, 1], "reason": str}` from a judge reply.

    Tolerates reasoning blocks, code fences and prose around the JSON; takes the last JSON
    object with a "score" key. Anything else gives value None with the problem stated: the
    caller records it as unscored, never as 0. Linear time on any input: brackets nested
    deeper than MAX_NESTING levels make the reply unparseable (never a RecursionError) where
    they close, and are stray prose where they never do.
    """
    if not text or not text.strip():
        return ParsedReply(None, "", "empty reply")
    answer, problem = strip_reasoning(text)
    objects, too_deep = _json_objects(answer)
    lowered = [{str(k).lower(): v for k, v in obj.items()} for obj in objects if isinstance(obj, dict)]
    with_score = [obj for obj in lowered if "score" in obj]
    if not with_score:
        if too_deep:
            problem = problem or f"reply nests deeper than {MAX_NESTING} levels: not read"
        return ParsedReply(None, "", problem or "no JSON object with a 'score' key in the reply")
    obj = with_score[-1]
    reason = obj.get("reason", "")
    reason = reason if isinstance(reason, str) else json.dumps(reason)
    value, bad = score_value(obj["score"])
    if value is None:
        return ParsedReply(None, reason, bad)
    return ParsedReply(value, reason)
