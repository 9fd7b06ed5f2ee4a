"""Exact judge for the organisms' closed caption grammar.

Organism captions and references are lowercase word sequences of clauses "i hear a X ." and
"i see a X ." in either order, any clause possibly missing, sources possibly multi-word
("car engine"). Audio fidelity compares the set of heard sources with the reference's,
video fidelity the set of seen sources:

    score = |named & ref| / max(|named|, |ref|)

so naming an extra, invented source costs as much as missing one. A caption that names
nothing for the modality scores 0.0 (a parsed answer: it did not say); only a reference
that names nothing for the modality is unscored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from avprobe.judge.base import ERROR_REFERENCE, Judge, JudgeItem, Score

_CLAUSE_SPLIT = re.compile(r"[.!?\n;]+")
_VERBS = {"hear": "audio", "see": "video"}
_ARTICLES = frozenset({"a", "an", "the"})


@dataclass(frozen=True)
class ParsedCaption:
    """Sources named by a caption: heard (audio), seen (video), and clauses that fit neither."""

    heard: frozenset[str]
    seen: frozenset[str]
    other: tuple[str, ...]

    def named(self, modality: str) -> frozenset[str]:
        return self.heard if modality == "audio" else self.seen


def parse_caption(text: str) -> ParsedCaption:
    """Split a caption into "i hear a/an X" and "i see a/an X" clauses.

    Case and extra whitespace are ignored; the article is optional; a clause that does not
    fit the grammar (or names no source) goes to `other`.
    """
    heard: set[str] = set()
    seen: set[str] = set()
    other: list[str] = []
    for clause in _CLAUSE_SPLIT.split(text.lower()):
        words = clause.split()
        if not words:
            continue
        modality = _VERBS.get(words[1]) if len(words) >= 2 and words[0] == "i" else None
        rest = words[2:]
        if rest and rest[0] in _ARTICLES:
            rest = rest[1:]
        if modality is None or not rest:
            other.append(" ".join(words))
            continue
        (heard if modality == "audio" else seen).add(" ".join(rest))
    return ParsedCaption(frozenset(heard), frozenset(seen), tuple(other))


def concept_fidelity(named: frozenset[str], reference: frozenset[str]) -> float:
    """|named & reference| / max(|named|, |reference|); 0.0 when nothing is named."""
    if not reference:
        raise ValueError("reference names no source")
    return len(named & reference) / max(len(named), len(reference))


def _fmt(names: frozenset[str]) -> str:
    return "{" + ", ".join(sorted(names)) + "}"


class ConceptJudge(Judge):
    """Exact set-overlap judge for the organism caption grammar (the organisms' default)."""

    backend = "concept"
    # Parsing a caption takes microseconds; a store lookup costs more than judging again.
    use_cache = False

    def __init__(self, *, cache=None, max_workers: int = 1) -> None:
        super().__init__(cache=cache, max_workers=max_workers)

    def _score(self, item: JudgeItem) -> Score:
        verb = "hear" if item.modality == "audio" else "see"
        ref = parse_caption(item.reference).named(item.modality)
        if not ref:
            return Score.unscored(
                f"reference {item.reference!r} has no 'i {verb} a ...' clause",
                item.candidate,
                self.judge_id,
                ERROR_REFERENCE,
            )
        named = parse_caption(item.candidate).named(item.modality)
        value = concept_fidelity(named, ref)
        if named:
            reason = f"named {_fmt(named)}; reference {_fmt(ref)}; {len(named & ref)} shared"
        else:
            reason = f"caption has no 'i {verb} a ...' clause; reference {_fmt(ref)}"
        return Score(value, reason, item.candidate, self.judge_id)

    def _score_many(self, items, done) -> None:
        # No I/O: threads would only add overhead.
        for it in items:
            done(it, self._safe_score(it))
