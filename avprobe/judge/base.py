"""Judge interface: a `Score` per (candidate, reference, modality), cached, batched.

Every fidelity number in avprobe comes through a `Judge`. A judgment that could not be made
(unparseable reply, dead endpoint, unparseable reference) is a `Score` whose value is NaN:
it is counted and reported as unscored, never averaged in as 0.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

log = logging.getLogger(__name__)

Modality = Literal["audio", "video"]
MODALITIES: tuple[str, ...] = ("audio", "video")

# Namespace of judgments in the result store.
CACHE_NAMESPACE = "judge"

# Why a score is NaN. Transport failures are transient and never cached (a rerun retries
# them); the others are properties of the inputs or of the judge's reply and are cached so
# that a rerun reports the same unscored count.
ERROR_PARSE = "parse"  # the judge replied, but no valid score could be read from it
ERROR_TRANSPORT = "transport"  # no usable reply: connection refused, timeout, HTTP error
ERROR_REFERENCE = "reference"  # the reference caption itself cannot be used
ERROR_INTERNAL = "internal"  # the judge raised; kept as unscored so a batch never loses work
ERROR_UNSPECIFIED = "unspecified"  # a NaN Score built without saying why
_CACHEABLE_ERRORS = frozenset({"", ERROR_PARSE, ERROR_REFERENCE})


def check_modality(modality: str) -> str:
    """Return `modality` if it is "audio" or "video", else raise ValueError."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be 'audio' or 'video', got {modality!r}")
    return modality


@dataclass(frozen=True)
class Score:
    """One fidelity judgment.

    value: in [0, 1], or NaN for unscored. reason: the judge's (or our) explanation.
    raw: the judge's raw reply, kept even when it could not be parsed. judge_id: which judge.
    error: "" when scored, else why not (see ERROR_*). meta: settings the judgment was made
    with (model, sampling parameters, prompt version, attempts).
    """

    value: float
    reason: str
    raw: str
    judge_id: str
    error: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        v = float(self.value)
        object.__setattr__(self, "value", v)
        if not math.isnan(v) and not 0.0 <= v <= 1.0:
            raise ValueError(f"score value must be in [0, 1] or NaN, got {v}")
        if math.isnan(v) and not self.error:
            object.__setattr__(self, "error", ERROR_UNSPECIFIED)
        if not math.isnan(v) and self.error:
            raise ValueError(f"a scored Score cannot carry error {self.error!r}")

    @property
    def scored(self) -> bool:
        return not math.isnan(self.value)

    @classmethod
    def unscored(cls, reason: str, raw: str, judge_id: str, error: str, meta: Mapping[str, Any] | None = None) -> Score:
        """An unscored judgment (NaN) with the reason and the raw reply kept."""
        return cls(math.nan, reason, raw, judge_id, error=error, meta=dict(meta or {}))

    def to_dict(self) -> dict[str, Any]:
        # NaN is not valid JSON: store None and restore NaN when reading.
        return {
            "value": None if math.isnan(self.value) else self.value,
            "reason": self.reason,
            "raw": self.raw,
            "judge_id": self.judge_id,
            "error": self.error,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Score:
        value = d["value"]
        return cls(
            math.nan if value is None else float(value),
            str(d["reason"]),
            str(d["raw"]),
            str(d["judge_id"]),
            error=str(d.get("error", "")),
            meta=dict(d.get("meta") or {}),
        )


@dataclass(frozen=True)
class JudgeItem:
    """What a judge compares: a candidate caption against a reference for one modality."""

    candidate: str
    reference: str
    modality: str

    def __post_init__(self) -> None:
        check_modality(self.modality)


@runtime_checkable
class JudgeCache(Protocol):
    """The two methods of the result store a judge needs (avprobe.store.Store has them)."""

    def get_json(self, namespace: str, parts: Mapping[str, Any]) -> dict | None: ...

    def put_json(self, namespace: str, parts: Mapping[str, Any], value: dict) -> None: ...


@dataclass(frozen=True)
class ScoreSummary:
    """Mean of the scored values plus the unscored count; `label` names the judge."""

    mean: float  # NaN when nothing was scored
    n: int
    n_scored: int
    n_unscored: int
    unscored_by_error: Mapping[str, int]
    label: str
    proxy: bool

    def describe(self) -> str:
        mean = "n/a" if math.isnan(self.mean) else f"{self.mean:.3f}"
        text = f"{mean} over {self.n_scored}/{self.n} scored ({self.n_unscored} unscored) by {self.label}"
        return text


class Judge(abc.ABC):
    """Base class of the fidelity judges.

    Subclasses implement `_score` (one item) and may override `_score_many` (a batch of
    items not in the cache; the default runs `_score` on a bounded thread pool). `score` and
    `score_batch` add caching and turn any exception into an unscored Score, so that a
    batch never loses the judgments it already made.
    """

    #: backend name used in specs and cache keys ("concept", "openai", ...)
    backend: str = "judge"
    #: True for judges that only approximate the rubric (the embedding baseline)
    proxy: bool = False
    #: False where a lookup costs more than judging (the exact concept judge)
    use_cache: bool = True

    def __init__(self, *, cache: JudgeCache | None = None, max_workers: int = 8) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.cache = cache
        self.max_workers = max_workers
        self._cache_write_warned = False

    # -- identity -------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """The model behind the judge ("" for judges without one)."""
        return ""

    @property
    def prompt_version(self) -> str:
        """Version of the prompt text ("" for judges without a prompt)."""
        return ""

    @property
    def judge_id(self) -> str:
        return f"{self.backend}:{self.model}" if self.model else self.backend

    @property
    def label(self) -> str:
        """Human-readable name for reports; proxies say they are proxies."""
        text = self.judge_id
        if self.prompt_version:
            text += f" (prompt {self.prompt_version})"
        if self.proxy:
            text += " [weaker proxy, not an LLM judge]"
        return text

    def settings(self) -> dict[str, Any]:
        """Settings that change judgments (recorded with each Score and in the cache key)."""
        return {}

    # -- scoring --------------------------------------------------------------------------
    @abc.abstractmethod
    def _score(self, item: JudgeItem) -> Score:
        """Judge one item. May raise; the caller turns exceptions into unscored Scores."""

    def _score_many(self, items: Sequence[JudgeItem], done: Callable[[JudgeItem, Score], None]) -> None:
        """Judge items not found in the cache, calling `done(item, score)` as each finishes
        (from any thread), so that finished judgments are cached at once."""
        if self.max_workers == 1 or len(items) <= 1:
            for it in items:
                done(it, self._safe_score(it))
            return
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            futures = {pool.submit(self._safe_score, it): it for it in items}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())

    def _safe_score(self, item: JudgeItem) -> Score:
        try:
            return self._score(item)
        except Exception as exc:  # noqa: BLE001 - a judge failure must not lose the batch
            log.warning("judge %s failed on an item: %r", self.judge_id, exc)
            return Score.unscored(f"judge raised {type(exc).__name__}: {exc}", "", self.judge_id, ERROR_INTERNAL, self.settings())

    def cache_parts(self, item: JudgeItem) -> dict[str, Any]:
        """Key of one judgment in the result store."""
        return {
            "judge": self.backend,
            "model": self.model,
            "prompt_version": self.prompt_version,
            "settings": self.settings(),
            "modality": item.modality,
            "candidate": item.candidate,
            "reference": item.reference,
        }

    def _cache_get(self, item: JudgeItem) -> Score | None:
        if self.cache is None or not self.use_cache:
            return None
        try:
            entry = self.cache.get_json(CACHE_NAMESPACE, self.cache_parts(item))
        except Exception as exc:  # noqa: BLE001 - a broken cache entry means "judge again"
            log.warning("judge cache read failed (%r); judging again", exc)
            return None
        if entry is None:
            return None
        try:
            score = Score.from_dict(entry)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring malformed judge cache entry (%r); judging again", exc)
            return None
        if score.judge_id != self.judge_id:
            log.warning("judge cache entry belongs to %s, not %s; judging again", score.judge_id, self.judge_id)
            return None
        return score

    def _cache_put(self, item: JudgeItem, score: Score) -> None:
        if self.cache is None or not self.use_cache or score.error not in _CACHEABLE_ERRORS:
            return
        try:
            self.cache.put_json(CACHE_NAMESPACE, self.cache_parts(item), score.to_dict())
        except Exception as exc:  # noqa: BLE001 - a judgment stays valid if it cannot be cached
            # Once is enough: a read-only store would otherwise warn for every item.
            (log.debug if self._cache_write_warned else log.warning)("judge cache write failed: %r", exc)
            self._cache_write_warned = True

    def score(self, candidate: str, reference: str, modality: str) -> Score:
        """Judge one candidate caption against one reference for `modality`."""
        return self.score_batch([JudgeItem(candidate, reference, modality)])[0]

    def score_batch(
        self,
        items: Iterable[JudgeItem | tuple[str, str, str]],
        progress: Callable[[int, int], None] | None = None,
    ) -> list[Score]:
        """Judge many items, in order; cached ones make no call, the rest run concurrently
        (at most `max_workers` at a time). Never raises for a single item's failure."""
        items = [it if isinstance(it, JudgeItem) else JudgeItem(*it) for it in items]
        out: list[Score | None] = [self._cache_get(it) for it in items]
        todo = [i for i, s in enumerate(out) if s is None]
        if todo:
            # Identical items are judged once (the same caption often recurs across conditions).
            unique: dict[JudgeItem, list[int]] = {}
            for i in todo:
                unique.setdefault(items[i], []).append(i)
            lock = threading.Lock()
            n_done = 0

            def done(item: JudgeItem, score: Score) -> None:
                nonlocal n_done
                self._cache_put(item, score)
                with lock:
                    for i in unique[item]:
                        out[i] = score
                    n_done += 1
                    if progress is not None:
                        progress(n_done, len(unique))

            self._score_many(list(unique), done)
            for i in todo:
                if out[i] is None:  # a backend bug; recorded, not raised, to keep the batch
                    log.error("%s left an item without a score", type(self).__name__)
                    out[i] = Score.unscored("judge returned no score", "", self.judge_id, ERROR_INTERNAL)
        n_unscored = sum(1 for s in out if s is not None and not s.scored)
        if n_unscored:
            log.info("%s: %d of %d items unscored", self.judge_id, n_unscored, len(items))
        return [s for s in out if s is not None]

    def summarize(self, scores: Sequence[Score]) -> ScoreSummary:
        """Mean over scored values, with the unscored count and this judge's label."""
        return summarize(scores, label=self.label, proxy=self.proxy)

    def close(self) -> None:
        """Release resources (models, connections). Judges stay usable after close only if
        they reload lazily."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


def summarize(scores: Sequence[Score], label: str = "", proxy: bool = False) -> ScoreSummary:
    """Mean over the scored values (NaN if none) and the count of unscored ones, by reason."""
    scored = [s.value for s in scores if s.scored]
    by_error: dict[str, int] = {}
    for s in scores:
        if not s.scored:
            by_error[s.error] = by_error.get(s.error, 0) + 1
    mean = math.fsum(scored) / len(scored) if scored else math.nan
    return ScoreSummary(mean, len(scores), len(scored), len(scores) - len(scored), by_error, label, proxy)
