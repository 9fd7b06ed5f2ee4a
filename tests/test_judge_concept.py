"""The exact concept judge on every caption form the organisms produce."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from avprobe.judge import ConceptJudge, JudgeItem, make_judge, parse_caption
from avprobe.judge.base import ERROR_REFERENCE
from avprobe.organism import world

JUDGE = ConceptJudge()


@pytest.mark.parametrize("query", world.QUERIES)
def test_every_world_caption_scores_exactly(query: str) -> None:
    # Every (query, sight, sound) the world can caption, judged against its own references.
    pairs = list(itertools.product(world.SOURCES, world.SOURCES))
    items, expected = [], []
    for seen, heard in pairs:
        cap = world.caption(query, seen, heard)
        items.append(JudgeItem(cap, world.audio_caption(heard), "audio"))
        expected.append(0.0 if query == world.QUERY_SEE else 1.0)
        items.append(JudgeItem(cap, world.video_caption(seen), "video"))
        expected.append(0.0 if query == world.QUERY_HEAR else 1.0)
        # the counterfactual view: the same caption against another clip's sound
        other = world.SOURCES[(world.SOURCES.index(heard) + 1) % len(world.SOURCES)]
        items.append(JudgeItem(cap, world.audio_caption(other), "audio"))
        expected.append(0.0)
    scores = JUDGE.score_batch(items)
    assert [s.value for s in scores] == expected
    assert all(s.scored for s in scores)


@pytest.mark.parametrize(
    ("caption", "heard", "seen"),
    [
        ("i see a dog . i hear a siren .", {"siren"}, {"dog"}),
        ("i hear a siren . i see a dog .", {"siren"}, {"dog"}),
        ("i hear a siren .", {"siren"}, set()),
        ("i see a dog .", set(), {"dog"}),
        ("i see a dog . i hear a siren", {"siren"}, {"dog"}),  # no final period (cut decode)
        ("i see a dog . i hear a", set(), {"dog"}),  # truncated mid-clause: names nothing
        ("i hear an engine . i see an owl .", {"engine"}, {"owl"}),
        ("i hear a car engine . i see a fire truck .", {"car engine"}, {"fire truck"}),
        ("  I HEAR A   Siren .  i see   a dog .", {"siren"}, {"dog"}),
        ("i hear a siren . i hear a siren .", {"siren"}, set()),
        ("i hear a siren . i hear a dog .", {"siren", "dog"}, set()),
        ("i hear siren .", {"siren"}, set()),  # article dropped
        ("", set(), set()),
        ("the dog barks loudly .", set(), set()),
    ],
)
def test_parse_caption_forms(caption: str, heard: set[str], seen: set[str]) -> None:
    parsed = parse_caption(caption)
    assert parsed.heard == heard
    assert parsed.seen == seen


def test_invented_sound_is_penalised_and_missing_clause_scores_zero() -> None:
    ref = "i hear a siren ."
    assert JUDGE.score("i see a dog . i hear a siren . i hear a drill .", ref, "audio").value == 0.5
    assert JUDGE.score("i hear a siren .", "i hear a siren . i hear a drill .", "audio").value == 0.5
    nothing = JUDGE.score("i see a dog .", ref, "audio")
    assert nothing.value == 0.0 and nothing.scored  # a real, parsed answer
    assert "no 'i hear a ...' clause" in nothing.reason


def test_unparseable_reference_is_unscored_not_zero() -> None:
    s = JUDGE.score("i hear a siren .", "a siren wails", "audio")
    assert math.isnan(s.value) and not s.scored
    assert s.error == ERROR_REFERENCE
    # a reference with only the other modality's clause is unusable for this modality
    s = JUDGE.score("i see a dog .", "i hear a siren .", "video")
    assert s.error == ERROR_REFERENCE and "i see" in s.reason


def test_full_caption_as_reference_uses_only_its_modality() -> None:
    ref = "i see a dog . i hear a siren ."
    assert JUDGE.score("i hear a siren . i see a cat .", ref, "audio").value == 1.0
    assert JUDGE.score("i hear a siren . i see a cat .", ref, "video").value == 0.0


def test_make_judge_concept_and_no_model() -> None:
    assert isinstance(make_judge("concept"), ConceptJudge)
    with pytest.raises(ValueError, match="takes no model"):
        make_judge("concept:whatever")


# Sources: one to three lowercase words that are not grammar words.
_WORD = st.text(alphabet="bcdfgjklmnopqrtuvwxyz", min_size=1, max_size=6).filter(lambda w: w not in {"i", "a", "an"})
_SOURCE = st.lists(_WORD, min_size=1, max_size=3).map(" ".join)
_SET = st.frozensets(_SOURCE, max_size=3)


def _caption(heard: frozenset[str], seen: frozenset[str], sight_first: bool, article: str) -> str:
    sounds = [f"i hear {article} {s} ." for s in sorted(heard)]
    sights = [f"i see {article} {s} ." for s in sorted(seen)]
    return " ".join(sights + sounds if sight_first else sounds + sights)


@settings(max_examples=150, deadline=None)
@given(
    heard=_SET,
    seen=_SET,
    ref_heard=_SET.filter(bool),
    ref_seen=_SET.filter(bool),
    sight_first=st.booleans(),
    article=st.sampled_from(["a", "an"]),
)
def test_score_is_set_overlap_over_max_size(heard, seen, ref_heard, ref_seen, sight_first, article) -> None:
    cap = _caption(heard, seen, sight_first, article)
    audio = JUDGE.score(cap, _caption(ref_heard, frozenset(), True, "a"), "audio")
    video = JUDGE.score(cap, _caption(frozenset(), ref_seen, True, "a"), "video")
    want_audio = len(heard & ref_heard) / max(len(heard), len(ref_heard))
    want_video = len(seen & ref_seen) / max(len(seen), len(ref_seen))
    assert audio.value == pytest.approx(want_audio)
    assert video.value == pytest.approx(want_video)
    assert (audio.value == 1.0) == (heard == ref_heard)
    # the other modality's clauses never change a score
    assert JUDGE.score(_caption(heard, frozenset(), True, "a"), _caption(ref_heard, frozenset(), True, "a"), "audio").value == audio.value
