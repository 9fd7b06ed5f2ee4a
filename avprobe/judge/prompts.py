"""Rubric prompts of the LLM judges and the parser of their replies.

The texts live in `avprobe/judge/prompts/*.txt` (package data). `PROMPT_VERSION` is a short
hash of all of them: it is part of every cache key, so editing a prompt re-judges.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources

from avprobe.judge.base import check_modality

_PROMPT_FILES = ("audio.txt", "video.txt", "user.txt")
_FIELD = re.compile(r"\{(candidate|reference)\}")
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.DOTALL)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


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
    """Drop <think>...</think> reasoning; return (answer, problem).

    Reasoning servers often put the opening tag in the prompt, so a reply may hold only the
    closing tag: everything before the last `</think>` is reasoning. An opening tag that is
    never closed means the reply stopped while thinking.
    """
    text = _THINK_BLOCK.sub("", text)
    lower = text.lower()
    close = lower.rfind("</think>")
    if close >= 0:
        text = text[close + len("</think>") :]
        lower = text.lower()
    open_ = lower.find("<think>")
    if open_ >= 0:
        return text[:open_], "reply ended inside <think> (reasoning unfinished; raise the token limit)"
    return text, ""


def _json_objects(text: str) -> list[object]:
    decoder = json.JSONDecoder()
    found: list[object] = []
    for block in _FENCE.findall(text) + [text]:
        i = block.find("{")
        while i >= 0:
            try:
                obj, end = decoder.raw_decode(block, i)
            except json.JSONDecodeError:
                i = block.find("{", i + 1)
                continue
            found.append(obj)
            i = block.find("{", end)
    return found


def _as_score(value: object) -> tuple[float | None, str]:
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
    caller records it as unscored, never as 0.
    """
    if not text or not text.strip():
        return ParsedReply(None, "", "empty reply")
    answer, problem = strip_reasoning(text)
    candidates = [
        {str(k).lower(): v for k, v in obj.items()}
        for obj in _json_objects(answer)
        if isinstance(obj, dict)
    ]
    with_score = [obj for obj in candidates if "score" in obj]
    if not with_score:
        return ParsedReply(None, "", problem or "no JSON object with a 'score' key in the reply")
    obj = with_score[-1]
    reason = obj.get("reason", "")
    reason = reason if isinstance(reason, str) else json.dumps(reason)
    value, bad = _as_score(obj["score"])
    if value is None:
        return ParsedReply(None, reason, bad)
    return ParsedReply(value, reason)
