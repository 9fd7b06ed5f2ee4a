"""Offline embedding baseline: cosine similarity of sentence embeddings (all-MiniLM-L6-v2).

A weaker proxy for the rubric judge, for users with no LLM at hand: it measures topical
similarity, not whether each sound (or sight) is present or invented. Every report that
uses it says so (`proxy = True`, and the label says "weaker proxy").

The caption's sound sentences (for audio) or sight sentences (for video) are picked by cue
words: "i hear ..." / "i see ..." in the organism grammar, and a small lexicon of hearing
words for free text. A caption with no sentence for the modality scores 0.0, as with the
concept judge.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from avprobe.judge.base import Judge, JudgeCache, JudgeItem, Score

EmbedFn = Callable[[Sequence[str]], np.ndarray]

EMBEDDING_MODEL = "all-MiniLM-L6-v2"
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\s+\.(?:\s+|$)|\n+")
# Words that mark a sentence as being about sound. Deliberately small: this is a baseline.
_HEARING = re.compile(r"\b(hear|hears|heard|hearing|listen\w*)\b", re.IGNORECASE)
_SOUND_CUES = re.compile(
    r"\b(sound\w*|audio|audible|noise\w*|noisy|voice\w*|"
    r"speech|speak\w*|talk\w*|says?|said|shout\w*|scream\w*|yell\w*|whisper\w*|music\w*|"
    r"sing\w*|song\w*|melod\w*|bark\w*|meow\w*|chirp\w*|tweet\w*|honk\w*|beep\w*|buzz\w*|"
    r"hum|hums|humming|roar\w*|rumbl\w*|ring|rings|ringing|siren\w*|whistl\w*|applau\w*|"
    r"clap\w*|cheer\w*|laugh\w*|cr(?:y|ies|ying)|thunder\w*|bang\w*|knock\w*|echo\w*|"
    r"splash\w*|sizzl\w*|crackl\w*|loud\w*|quiet\w*|silen\w*|footsteps)\b",
    re.IGNORECASE,
)
_SIGHT_CUES = re.compile(r"\b(see|sees|seen|seeing|watch\w*|show\w*|visible|appear\w*|look\w*)\b", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """Sentences of a caption (handles both "a. b." and the organisms' "a . b .")."""
    return [s.strip(" .") for s in _SENTENCE.split(text) if s and s.strip(" .")]


def modality_sentences(text: str, modality: str) -> list[str]:
    """The caption's sentences about sound (audio) or about what is seen (video)."""
    out = []
    for sentence in split_sentences(text):
        hearing = bool(_HEARING.search(sentence))
        seeing = bool(_SIGHT_CUES.search(sentence))
        if hearing or seeing:
            # An explicit verb decides: "i see a siren" is about sight despite "siren".
            sound, sight = hearing, seeing
        else:
            sound = bool(_SOUND_CUES.search(sentence))
            sight = not sound
        if (modality == "audio" and sound) or (modality == "video" and sight):
            out.append(sentence)
    return out


def _default_embed(texts: Sequence[str]) -> np.ndarray:
    from avprobe.embedding import embed  # loads torch + MiniLM only when first used

    return embed(texts)


class EmbeddingJudge(Judge):
    """Cosine similarity of the caption's modality sentences to the reference, clipped to [0, 1]."""

    backend = "embedding"
    proxy = True

    def __init__(self, *, embed_fn: EmbedFn | None = None, cache: JudgeCache | None = None, max_workers: int = 1) -> None:
        super().__init__(cache=cache, max_workers=max_workers)
        self._embed = embed_fn or _default_embed

    @property
    def model(self) -> str:
        return EMBEDDING_MODEL

    @property
    def label(self) -> str:
        return f"{self.judge_id} cosine similarity [weaker proxy, not an LLM judge]"

    def settings(self) -> dict[str, str]:
        return {"model": EMBEDDING_MODEL, "selection": "cue-words-v1"}

    def _score(self, item: JudgeItem) -> Score:
        scores: list[Score] = []
        self._score_many([item], lambda _it, s: scores.append(s))
        return scores[0]

    def _score_many(self, items: Sequence[JudgeItem], done: Callable[[JudgeItem, Score], None]) -> None:
        # One embedding call for the whole batch: the model, not Python, is the cost.
        picked = [modality_sentences(it.candidate, it.modality) for it in items]
        texts: list[str] = []
        for it, sentences in zip(items, picked, strict=True):
            if sentences:
                texts.extend([" . ".join(sentences), it.reference])
        vectors = np.asarray(self._embed(texts), dtype=np.float64) if texts else np.zeros((0, 0))
        if vectors.shape[0] != len(texts):
            raise RuntimeError(f"embedding function returned {vectors.shape[0]} vectors for {len(texts)} texts")
        row = 0
        for it, sentences in zip(items, picked, strict=True):
            what = "sound" if it.modality == "audio" else "sight"
            if not sentences:
                done(it, Score(0.0, f"caption has no {what} sentence", it.candidate, self.judge_id, meta=self.settings()))
                continue
            a, b = vectors[row], vectors[row + 1]
            row += 2
            cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
            value = min(1.0, max(0.0, cos))
            reason = f"cosine {cos:.3f} between {what} sentences {' . '.join(sentences)!r} and the reference"
            done(it, Score(value, reason, it.candidate, self.judge_id, meta=self.settings()))
