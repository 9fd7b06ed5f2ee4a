"""The counterfactual builder: give clips the audio of a semantically unrelated clip.

Relatedness is the cosine similarity of the two clips' audio-caption embeddings (each clip:
the normalised mean of its captions' embeddings, `avprobe.embedding`). A pair is allowed when
the similarity is below `threshold`, the two clips' label sets are disjoint (when both have
labels), they are different clips (and different source videos when `youtube_id` is known),
and the audio is not used yet. Video clips are visited in a seeded random order and each takes
a seeded random pick among its allowed audios, so the result depends only on the input rows
(sorted by id) and the seed.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from avprobe.types import Sample, SampleError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.25  # all-MiniLM-L6-v2: unrelated sound captions sit near 0.0-0.25, paraphrases above 0.6

EmbedFn = Callable[[Sequence[str]], np.ndarray]
AudioProbe = Callable[[str], None]  # raises MediaError when the file has no usable audio track
AUDIO_STAGE = "audio-probe"  # the stage of a clip left out of a split for its audio


@dataclass(frozen=True)
class Pair:
    """A counterfactual: the video of `video_id` with the audio of `audio_id`."""

    video_id: str
    audio_id: str
    similarity: float


@dataclass(frozen=True)
class SimilarityStats:
    """Summary of cosine similarities over a set of pairs."""

    n: int
    mean: float
    median: float
    p95: float
    max: float

    @classmethod
    def of(cls, sims: np.ndarray) -> SimilarityStats:
        sims = np.asarray(sims, dtype=np.float64)
        if sims.size == 0:
            nan = math.nan
            return cls(0, nan, nan, nan, nan)
        return cls(
            int(sims.size),
            float(sims.mean()),
            float(np.median(sims)),
            float(np.percentile(sims, 95)),
            float(sims.max()),
        )


@dataclass
class BuildReport:
    """What the builder did: counts, shortfall reasons, chosen vs random similarities."""

    requested: int
    built: int
    pool: int  # factual input clips
    threshold: float
    seed: int
    chosen: SimilarityStats
    random: SimilarityStats
    skipped: Counter = field(default_factory=Counter)  # reason -> video clips that found no audio
    ignored_rows: int = 0  # input rows that are not factual

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = dict(self.skipped)
        return d


def _default_embed(texts: Sequence[str]) -> np.ndarray:
    from avprobe.embedding import embed

    return embed(texts)


def clip_embeddings(samples: Sequence[Sample], embed_fn: EmbedFn | None = None) -> np.ndarray:
    """[n, d] unit vectors: the mean embedding of each sample's audio captions, renormalised.

    Each distinct caption is embedded once (AudioCaps-style captions repeat a lot).
    """
    embed_fn = embed_fn or _default_embed
    for s in samples:
        if not s.audio_captions:
            raise ValueError(f"sample {s.id!r} has no audio captions: cannot judge what its audio is about")
    texts = sorted({c for s in samples for c in s.audio_captions})
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    vecs = np.asarray(embed_fn(texts), dtype=np.float32)
    if vecs.shape[0] != len(texts):
        raise ValueError(f"embed_fn returned {vecs.shape[0]} vectors for {len(texts)} texts")
    where = {t: i for i, t in enumerate(texts)}
    out = np.stack([vecs[[where[c] for c in s.audio_captions]].mean(axis=0) for s in samples])
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def _meta(sample: Sample, key: str) -> str | None:
    return dict(sample.meta).get(key)


def make_counterfactual(video: Sample, audio: Sample, similarity: float | None = None) -> Sample:
    """The sample showing `video`'s frames with `audio`'s sound (captions follow their media)."""
    if video.video is None:
        raise ValueError(f"sample {video.id!r} has no video file to show")
    audio_path = audio.audio or audio.video
    if audio_path is None:
        raise ValueError(f"sample {audio.id!r} has no audio to lend")
    meta = (("similarity", f"{similarity:.4f}"),) if similarity is not None else ()
    return Sample(
        id=f"cf_{video.id}__{audio.id}",
        video=video.video,
        audio=audio_path,
        audio_captions=audio.audio_captions,
        video_captions=video.video_captions,
        kind="counterfactual",
        labels=audio.labels,
        video_labels=video.video_labels,
        video_source=video.id,
        audio_source=audio.id,
        meta=meta,
    )


def build_counterfactuals(
    samples: Sequence[Sample],
    n: int = 250,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    exclude_videos: frozenset[str] = frozenset(),
    embed_fn: EmbedFn | None = None,
    n_random: int = 2000,
) -> tuple[list[Sample], BuildReport]:
    """Build up to `n` counterfactual samples from the factual rows of `samples`.

    Returns the samples (sorted by id) and a report; when fewer than `n` pairs satisfy the
    constraints the shortfall is in the report and logged, never hidden.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = sorted((s for s in samples if s.kind == "factual"), key=lambda s: s.id)
    ignored = len(samples) - len(pool)
    ids = [s.id for s in pool]
    if len(set(ids)) != len(ids):
        dup = [k for k, c in Counter(ids).items() if c > 1][:5]
        raise ValueError(f"duplicate sample ids in the input: {dup}")
    m = len(pool)
    rng = np.random.default_rng(seed)
    emb = clip_embeddings(pool, embed_fn) if m else np.zeros((0, 0), dtype=np.float32)

    # Clips that must never be paired with clip i: same label, same source video.
    by_label: dict[str, list[int]] = defaultdict(list)
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(pool):
        for lab in set(s.labels):
            by_label[lab].append(i)
        yid = _meta(s, "youtube_id")
        if yid:
            by_source[yid].append(i)
    has_audio = np.array([(s.audio or s.video) is not None for s in pool], dtype=bool)

    used = np.zeros(m, dtype=bool)
    pairs: list[Pair] = []
    out: list[Sample] = []
    skipped: Counter = Counter()
    for vi in rng.permutation(m):
        if len(out) >= n:
            break
        video = pool[vi]
        if video.video is None or video.id in exclude_videos:
            continue
        sims = emb @ emb[vi]
        ok = has_audio & ~used & (sims < threshold)
        ok[vi] = False
        for lab in set(video.labels):
            ok[by_label[lab]] = False
        yid = _meta(video, "youtube_id")
        if yid:
            ok[by_source[yid]] = False
        cand = np.flatnonzero(ok)
        if cand.size == 0:
            skipped["no unused audio below the threshold with disjoint labels"] += 1
            continue
        ai = int(cand[rng.integers(cand.size)])
        used[ai] = True
        pairs.append(Pair(video.id, pool[ai].id, float(sims[ai])))
        out.append(make_counterfactual(video, pool[ai], float(sims[ai])))

    rand = np.zeros(0)
    if m >= 2 and n_random > 0:
        rr = np.random.default_rng([seed, 1])
        a = rr.integers(m, size=n_random)
        b = (a + rr.integers(1, m, size=n_random)) % m  # never a == b
        rand = np.einsum("ij,ij->i", emb[a], emb[b])
    report = BuildReport(
        requested=n,
        built=len(out),
        pool=m,
        threshold=threshold,
        seed=seed,
        chosen=SimilarityStats.of(np.array([p.similarity for p in pairs])),
        random=SimilarityStats.of(rand),
        skipped=skipped,
        ignored_rows=ignored,
    )
    if len(out) < n:
        log.warning(
            "built %d of %d counterfactuals from %d factual clips (threshold %.2f): %s",
            len(out),
            n,
            m,
            threshold,
            dict(skipped) or "not enough video clips",
        )
    out.sort(key=lambda s: s.id)
    return out, report


def paper_split(
    samples: Sequence[Sample],
    n: int = 500,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    *,
    embed_fn: EmbedFn | None = None,
    audio_probe: AudioProbe | None = None,
) -> tuple[list[Sample], BuildReport | None, list[SampleError]]:
    """The paper's evaluation shape: n samples, half factual, half counterfactual.

    Every row's audio (its `audio` file, else its video's own track) is probed first
    (`audio_probe`, default: PyAV reads the container's header): a clip without an audio track
    can be neither a factual audio-visual sample nor the sound of a counterfactual, so it is
    left out and returned as a `SampleError` with its cause. Counterfactual rows already in the
    input are used when there are enough; otherwise they are built from the factual rows.
    Factual samples are drawn from clips whose video is not used by a counterfactual, so no
    video appears twice (and, when there are enough clips, whose audio is not lent to one
    either). Returns (samples, the builder's report or None, the clips left out). Raises
    ValueError when the input is too small, saying how many it has.
    """
    if n <= 0 or n % 2:
        raise ValueError(f"n must be a positive even number, got {n}")
    half = n // 2
    samples, skipped = with_audio(samples, audio_probe)
    rng = np.random.default_rng([seed, 2])
    factual = sorted((s for s in samples if s.kind == "factual"), key=lambda s: s.id)
    given_cf = sorted((s for s in samples if s.kind == "counterfactual"), key=lambda s: s.id)
    report: BuildReport | None = None
    if len(given_cf) >= half:
        pick = rng.choice(len(given_cf), size=half, replace=False)
        cf = sorted((given_cf[i] for i in pick), key=lambda s: s.id)
    else:
        if len(factual) < 2 * half:
            raise ValueError(
                f"paper split of {n} needs at least {2 * half} factual clips to build from "
                f"(or {half} counterfactual rows); the input has {len(factual)} factual, {len(given_cf)} counterfactual"
                + (f" with an audio track ({len(skipped)} left out without one)" if skipped else "")
            )
        cf, report = build_counterfactuals(factual, half, seed, threshold, embed_fn=embed_fn)
        if len(cf) < half:
            raise ValueError(
                f"only {len(cf)} of {half} counterfactual pairs satisfy the constraints "
                f"(threshold {threshold}); raise --threshold or give more clips"
            )
    used_videos = {s.video_source for s in cf}
    used_audio = {s.audio_source for s in cf}
    rest = [s for s in factual if s.id not in used_videos and s.video is not None]
    # Prefer factual clips whose sound is not also lent to a counterfactual (no clip heard twice).
    fresh = [s for s in rest if s.id not in used_audio]
    if len(fresh) >= half:
        rest = fresh
    else:
        log.info("paper split: %d factual clips share their audio with a counterfactual", half - len(fresh))
    if len(rest) < half:
        raise ValueError(
            f"paper split needs {half} factual clips not used as counterfactual videos; only {len(rest)} are left"
        )
    pick = rng.choice(len(rest), size=half, replace=False)
    fac = sorted((rest[i] for i in pick), key=lambda s: s.id)
    return fac + cf, report, skipped


def _probe_with_pyav(path: str) -> None:
    from avprobe.media.decode import probe_audio

    probe_audio(path)


def with_audio(samples: Sequence[Sample], probe: AudioProbe | None = None
               ) -> tuple[list[Sample], list[SampleError]]:
    """(the samples whose audio has a track, a SampleError for each of the others).

    A sample's audio is its `audio` file, else its video's own track; each file is probed once.
    """
    from avprobe.media.decode import MediaError

    probe = probe or _probe_with_pyav
    seen: dict[str, tuple[str | None, str] | None] = {}  # path -> None (has audio) or (path, reason)
    kept: list[Sample] = []
    skipped: list[SampleError] = []
    for s in samples:
        path = s.audio or s.video
        if path is None:
            skipped.append(SampleError(s.id, AUDIO_STAGE, None, "names neither an audio nor a video file"))
            continue
        if path not in seen:
            try:
                probe(path)
                seen[path] = None
            except MediaError as exc:
                seen[path] = (exc.path or path, exc.reason)
        bad = seen[path]
        if bad is None:
            kept.append(s)
        else:
            skipped.append(SampleError(s.id, AUDIO_STAGE, bad[0], bad[1]))
    if skipped:
        log.warning("%d of %d clips left out: no usable audio track (first: %s: %s)", len(skipped), len(samples),
                    skipped[0].sample_id, skipped[0].reason)
    return kept, skipped
