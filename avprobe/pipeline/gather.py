"""One way from a model and a sample set to judged results: `gather`, used by `avprobe collect`
and by the pytest plugin alike, so the two cannot drift.

    model ref -> store -> protocol -> adapter and base (loaded on the first miss)
              -> collect (engine) -> judge (streamed, cached) -> counts [+ records, fidelities]

Everything that can be checked before the expensive work is checked first, with one message
naming the fix: the samples (an empty set is an error), the judge (its spec and endpoint),
the device and the dtype.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from avprobe.records import DEFAULT_QUERY, Protocol, SampleRecord
from avprobe.types import Sample, SampleError

EXPERIMENTS = ("caption", "judge", "flow", "lens", "knockout", "shift")
# The caption of the baseline row is what every experiment starts from: always computed.
_ALWAYS = frozenset({"caption"})


def parse_experiments(text: str | Sequence[str]) -> frozenset[str]:
    """`"caption,judge,flow"` -> the set of experiments; unknown names are an error naming the valid ones."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = sorted(set(names) - set(EXPERIMENTS))
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; choose from {','.join(EXPERIMENTS)}")
    if not names:
        raise ValueError(f"--experiments is empty; choose from {','.join(EXPERIMENTS)}")
    return frozenset(names) | _ALWAYS


def protocol_for(experiments: Iterable[str], queries: Sequence[str] | None = None,
                 max_new_tokens: int | None = None) -> Protocol:
    """The `Protocol` computing `experiments`. With all of them (and the default queries and
    length) it is `Protocol()` itself, the protocol the claims read, so their results are reused."""
    exp = set(experiments)
    kw: dict[str, Any] = {
        "queries": tuple(queries) if queries else (DEFAULT_QUERY,),
        "knockout": "knockout" in exp,
        "flow": "flow" in exp,
        "lens": "lens" in exp,
        "shift": "shift" in exp,
    }
    if max_new_tokens is not None:
        kw["max_new_tokens"] = max_new_tokens
    return Protocol(**kw)


log = logging.getLogger(__name__)

# Judge items scored together: enough to keep a remote endpoint busy, few enough to stay small.
JUDGE_CHUNK = 256
# Failure examples kept per reason group in the summary (counts are always exact; every failure
# is in `GatherResult.failed` and, from the CLI, in --errors-out).
MAX_EXAMPLES = 3


class GatherError(RuntimeError):
    """A run that cannot give results, with the reason and the fix (one message, no traceback)."""


# ---- samples ----------------------------------------------------------------------------

def limit_balanced(samples: Sequence[Sample], n: int | None) -> list[Sample]:
    """The first n samples, half factual and half counterfactual (audio-only kept in
    proportion), so a limited run keeps the paper's shape. None keeps all."""
    if n is None or n >= len(samples):
        return list(samples)
    if n < 1:
        raise ValueError(f"--limit must be a positive number of samples, got {n}")
    fac = [s for s in samples if s.kind == "factual"]
    cf = [s for s in samples if s.kind == "counterfactual"]
    k = n // 2
    return fac[: n - min(k, len(cf))] + cf[:k]


def load_samples(spec: str, limit: int | None = None) -> tuple[list[Sample], list[SampleError]]:
    """(samples, manifest errors) for `organism`, `organism:N` (the organism evaluation set of N
    samples) or a manifest path. Bad manifest rows come back as `SampleError`s (counted and
    reported; the run goes on); a set with no usable sample is an error."""
    errors: list[SampleError] = []
    if spec == "organism" or spec.startswith("organism:"):
        from avprobe.organism.dataset import N_EVAL, eval_samples

        _, _, n = spec.partition(":")
        try:
            size = int(n) if n else N_EVAL
        except ValueError:
            raise ValueError(f"--samples {spec!r}: write organism or organism:N (N even)") from None
        samples = eval_samples(size)
    else:
        from avprobe.media.manifest import read_manifest

        result = read_manifest(spec)
        samples, errors = result.samples, result.errors
    if not samples:
        raise ValueError(f"{spec}: no usable sample ({len(errors)} bad rows"
                         + (f", first: {errors[0].reason}" if errors else "") + ")")
    return limit_balanced(samples, limit), errors


def clips_per_batch(spec: str | int | None) -> int | None:
    """`--clips-per-batch`: a positive count, or `auto` (None: chosen by memory, see
    `collect.auto_clips_per_batch`). Anything else is refused before any work."""
    if spec is None or isinstance(spec, int) and not isinstance(spec, bool):
        n = spec
    elif str(spec).strip().lower() == "auto":
        return None
    else:
        try:
            n = int(str(spec))
        except ValueError:
            raise ValueError(f"--clips-per-batch {spec!r}: write a positive number of clips or auto") from None
    if n is not None and n < 1:
        raise ValueError(f"--clips-per-batch must be at least 1 (1 = the one-clip engine) or auto, got {n}")
    return n


# ---- counters ---------------------------------------------------------------------------

@dataclass
class CollectCounts:
    """Counters of one run (or the merge of shards): no records are kept."""

    samples: int = 0  # samples this run was given (after --limit and sharding)
    queries: int = 1
    computed: int = 0  # records computed and stored
    cached: int = 0  # records found in the store
    failed: int = 0  # samples that failed (manifest, decode or engine)
    missing: int = 0  # records absent from a read-only store (--offline)
    failures: dict[str, dict[str, Any]] = field(default_factory=dict)  # group -> count, examples
    judged: int = 0  # judge items (caption x reference modality)
    unscored: int = 0
    unscored_by_error: dict[str, int] = field(default_factory=dict)
    no_reference: int = 0  # (condition, modality) pairs without a reference: nothing to judge
    elapsed_s: float = 0.0
    peak_rss_mb: float = 0.0  # the process's peak resident memory (merged: the largest shard's)

    @property
    def records(self) -> int:
        return self.samples * self.queries

    def add_failure(self, err: SampleError) -> None:
        """Count a `SampleError`, grouped by its cause (`avprobe.media.manifest.failure_cause`:
        ten different decode causes are ten groups, one cause on many files is one)."""
        from avprobe.media.manifest import add_failure

        self.failed += 1
        add_failure(self.failures, err, MAX_EXAMPLES)

    def add_scores(self, scores: Iterable[Any]) -> None:
        for s in scores:
            self.judged += 1
            if not s.scored:
                self.unscored += 1
                self.unscored_by_error[s.error or "unknown"] = self.unscored_by_error.get(s.error or "unknown", 0) + 1

    def describe(self) -> str:
        return (f"{self.computed} computed, {self.cached} cached, {self.failed} failed"
                + (f", {self.missing} missing" if self.missing else ""))

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "queries": self.queries,
            "records": self.records,
            "computed": self.computed,
            "cached": self.cached,
            "failed": self.failed,
            "missing": self.missing,
            "failures": self.failures,
            "judge": {
                "items": self.judged,
                "scored": self.judged - self.unscored,
                "unscored": self.unscored,
                "unscored_by_error": self.unscored_by_error,
                "no_reference": self.no_reference,
            },
            "elapsed_s": round(self.elapsed_s, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
        }

    @classmethod
    def merge(cls, parts: Iterable[CollectCounts]) -> CollectCounts:
        """Sum of shard counters (failure examples: the first few of each group)."""
        out = cls()
        for p in parts:
            out.queries = p.queries
            for name in ("samples", "computed", "cached", "failed", "missing", "judged", "unscored", "no_reference"):
                setattr(out, name, getattr(out, name) + getattr(p, name))
            out.elapsed_s = max(out.elapsed_s, p.elapsed_s)
            out.peak_rss_mb = max(out.peak_rss_mb, p.peak_rss_mb)
            for group, g in p.failures.items():
                o = out.failures.setdefault(group, {"count": 0, "examples": []})
                o["count"] += g["count"]
                o["examples"] = (o["examples"] + g["examples"])[:MAX_EXAMPLES]
            for k, v in p.unscored_by_error.items():
                out.unscored_by_error[k] = out.unscored_by_error.get(k, 0) + v
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CollectCounts:
        j = d["judge"]
        return cls(samples=d["samples"], queries=d["queries"], computed=d["computed"], cached=d["cached"],
                   failed=d["failed"], missing=d.get("missing", 0), failures=dict(d["failures"]),
                   judged=j["items"], unscored=j["unscored"], unscored_by_error=dict(j["unscored_by_error"]),
                   no_reference=j["no_reference"], elapsed_s=d["elapsed_s"], peak_rss_mb=d.get("peak_rss_mb", 0.0))


# ---- judging, streamed ------------------------------------------------------------------

FidelityKey = tuple[str, str, str]  # (sample id, query, condition key)


_clips_per_batch = clips_per_batch  # for callers whose parameter has its name (gather_evidence)

def judge_items(record: SampleRecord) -> Iterable[tuple[FidelityKey, int, Any]]:
    """(key, 0 audio | 1 video, JudgeItem) for every condition's caption of a record, against
    the first reference caption of each modality (as the paper did); a modality without a
    reference yields its key with item None (nothing to judge against: NaN, not unscored)."""
    from avprobe.judge import JudgeItem

    refs = ((record.meta["audio_captions"] or [None])[0], (record.meta["video_captions"] or [None])[0])
    for c in record.conditions:
        key = (record.sample_id, record.query, c["key"])
        for j, (modality, ref) in enumerate(zip(("audio", "video"), refs)):
            yield key, j, (JudgeItem(c["text"], ref, modality) if ref else None)


class StreamJudge:
    """Judges records as they stream by, in chunks of `JUDGE_CHUNK` items, keeping only the
    pending items; with `keep=True` the fidelities are kept too (the claims need them)."""

    def __init__(self, judge: Any, counts: CollectCounts, chunk: int = JUDGE_CHUNK, keep: bool = False) -> None:
        self.judge = judge
        self.counts = counts
        self.chunk = chunk
        self.keep = keep
        self.pending: list[tuple[FidelityKey, int, Any]] = []
        self.fidelity: dict[FidelityKey, list[float]] = {}

    def add(self, record: SampleRecord) -> None:
        for key, j, item in judge_items(record):
            if self.keep:
                self.fidelity.setdefault(key, [float("nan"), float("nan")])
            if item is None:
                self.counts.no_reference += 1
            else:
                self.pending.append((key, j, item))
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        scores = self.judge.score_batch([item for _, _, item in pending])
        self.counts.add_scores(scores)
        if self.keep:
            for (key, j, _), s in zip(pending, scores):
                self.fidelity[key][j] = s.value

    def fidelities(self) -> dict[FidelityKey, tuple[float, float]]:
        return {k: (v[0], v[1]) for k, v in self.fidelity.items()}


# ---- progress ---------------------------------------------------------------------------

class Progress:
    """A rich progress bar over samples (samples/s, ETA, counts so far) on stderr, shown only
    once something is computed (a fully cached run stays quiet), or nothing with show=False."""

    def __init__(self, label: str, total: int, counts: CollectCounts, show: bool = True) -> None:
        self.label, self.total, self.counts, self.show = label, total, counts, show
        self.bar: Any = None
        self.task: Any = None
        self.done = 0
        self.start = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def _start(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                       TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total, info="")

    def sample_done(self) -> None:
        self.done += 1
        if self.show and self.bar is None and self.counts.computed + self.counts.failed > 0:
            self._start()
        if self.bar is not None:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, completed=self.done, info=f"{rate:.2f} samples/s | {self.counts.describe()}")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---- device -----------------------------------------------------------------------------

def resolve_device(spec: str) -> str:
    """`auto`: this process's GPU under a launcher (LOCAL_RANK), else the CPU. A device that
    this machine does not have is refused here, before any weights load."""
    import torch

    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if spec == "auto":
        return f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and "LOCAL_RANK" in os.environ:
        spec = f"cuda:{local}"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {spec!r} is not a torch device; use cpu, cuda, cuda:N, mps or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: this machine has no CUDA GPU; use --device cpu (or auto)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {spec}: MPS is not available here; use --device cpu (or auto)")
    return spec


def resolve_dtype(spec: str) -> str:
    """`auto` or a torch floating dtype (its name, or bf16 / fp16 / fp32); anything else is
    refused here, before any weights load. Returns torch's name."""
    if spec == "auto":
        return spec
    from avprobe.adapters.registry import torch_dtype

    return str(torch_dtype(spec)).removeprefix("torch.")


# ---- the one orchestration --------------------------------------------------------------

@dataclass
class GatherResult:
    """What one gather produced: counters always; records, failures and fidelities with keep=True."""

    counts: CollectCounts
    records: list[SampleRecord] = field(default_factory=list)
    failed: list[SampleError] = field(default_factory=list)
    fidelity: dict[FidelityKey, tuple[float, float]] = field(default_factory=dict)
    judge: Any = None


def base_layout_mismatch(model: Any, base: Any) -> str | None:
    """Why a base model's prompt differs in order from the model's (None when it does not): the
    shift teacher-forces the model's caption through the base, so it would measure the order too."""
    ours, theirs = model.settings.prompt_layout, base.settings.prompt_layout
    if ours == theirs:
        return None
    return (f"{model.name} is prompted {ours} but its base model {base.name} {theirs}: the shift will measure the "
            f"prompt's order too; give the base an avprobe.json with \"prompt_layout\": \"{ours}\"")


def gather(
    ref: Any,
    samples: Sequence[Sample],
    store: Any,
    protocol: Protocol,
    *,
    judge: Any = None,
    base_model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    allow_download: bool = False,
    refresh: bool = False,
    keep: bool = True,
    manifest_errors: Sequence[SampleError] = (),
    progress: bool = True,
    label: str | None = None,
    collect_command: str | None = None,
    on_failure: Callable[[SampleError], None] | None = None,
    clips_per_batch: int | None = 1,
) -> GatherResult:
    """Records of `samples` from `store` (computing misses), judged by `judge` (if any).

    `ref` is a ModelRef: its weights load on the first cache miss only, and the vision-only base
    model (`base_model`, for the shift) with them; the audio-ablated self is `protocol.self_shift`
    (`records.shift_bases` splits a `--base-model` spec into the two). `keep=False` keeps counters only (memory flat over
    any number of samples: the CLI); `keep=True` keeps records and fidelities (the claims).
    With a read-only store every miss is counted and one `GatherError` says how many results
    are missing and which command computes them (`collect_command`). `clips_per_batch`: records
    computed in one batched decode (1: the one-clip engine; None: chosen by memory; see
    `collect.collect`); the records are the same either way.
    """
    from avprobe.pipeline.collect import collect
    from avprobe.store import CacheMiss

    device = resolve_device(device)
    dtype = resolve_dtype(dtype)
    counts = CollectCounts(queries=len(protocol.queries))
    result = GatherResult(counts=counts, judge=judge)
    for err in manifest_errors:
        counts.samples += 1
        counts.add_failure(err)
        result.failed.append(err)
        if on_failure:
            on_failure(err)
    counts.samples += len(samples)

    def get_adapter() -> Any:
        log.info("loading %s on %s", ref.name, device)
        return ref.load(device=device, dtype=dtype, local_files_only=not allow_download)

    def get_base() -> Any:
        if not protocol.shift:
            return None
        if not base_model:
            if not protocol.self_shift:
                log.warning("%s: no shift base configured (--base-model M, self-ablated or both); the shift claims "
                            "will be skipped", ref.name)
            return None
        from avprobe.adapters import ref as make_ref

        base_ref = make_ref(base_model, local_files_only=not allow_download)
        mismatch = base_layout_mismatch(ref, base_ref)
        if mismatch:
            log.warning("%s", mismatch)
        return base_ref.load(device=device, dtype=dtype, local_files_only=not allow_download)

    streamer = StreamJudge(judge, counts, keep=keep) if judge is not None else None
    seen: dict[str, int] = {}
    t0 = time.perf_counter()
    with Progress(label or ref.name, len(samples), counts, show=progress) as bar:

        def on_progress(sample: Sample, what: str) -> None:
            if what == "failed":
                seen.pop(sample.id, None)
                bar.sample_done()
                return
            setattr(counts, what, getattr(counts, what) + 1)
            seen[sample.id] = seen.get(sample.id, 0) + 1
            if seen[sample.id] == counts.queries:
                del seen[sample.id]
                bar.sample_done()

        for item in collect(ref, samples, store, protocol, get_adapter=get_adapter, get_base=get_base,
                            refresh=refresh, on_progress=on_progress, clips_per_batch=clips_per_batch):
            if isinstance(item, CacheMiss):  # counted by on_progress
                continue
            if isinstance(item, SampleError):
                counts.add_failure(item)
                result.failed.append(item)
                if on_failure:
                    on_failure(item)
                continue
            if streamer is not None:
                streamer.add(item)
            if keep:
                result.records.append(item)
        if streamer is not None:
            streamer.flush()
            result.fidelity = streamer.fidelities()
    counts.elapsed_s = time.perf_counter() - t0
    if counts.missing:
        cmd = collect_command or f"avprobe collect --model {ref.name} --store {store.root}"
        raise GatherError(f"{ref.name}: {counts.missing:,} of {counts.records:,} results missing in the read-only "
                          f"store {store.root} (--offline); compute them with:\n    {cmd}")
    return result


def gather_evidence(
    model: str,
    *,
    store_root: Any,
    samples: str | None = None,
    limit: int | None = None,
    loaded_samples: tuple[list[Sample], list[SampleError]] | None = None,
    judge: str | None = None,
    judge_url: str | None = None,
    base_model: str | None = None,
    offline: bool = False,
    device: str = "cpu",
    dtype: str = "auto",
    allow_download: bool = False,
    refresh: bool = False,
    quiet: Callable[[], Any] | None = None,
    clips_per_batch: str | int = 1,
    max_new_tokens: int | None = None,
) -> Any:
    """One model's judged `Evidence`, the way the claims suite reads it: the pytest plugin and
    `avprobe report` (offline, from claims.json's run settings) both call this, so a report
    redrawn later reads exactly the results the claims read. `samples` is a spec for
    `load_samples` (default: the organism evaluation set), unless `loaded_samples` are given;
    `quiet` is a context manager factory wrapped around the work (the plugin's uncapture);
    `clips_per_batch` ("auto" or N) is how many clips a computed batch decodes together."""
    import contextlib
    from pathlib import Path

    from avprobe.adapters import ref as make_ref
    from avprobe.judge import make_judge
    from avprobe.pipeline.evidence import evidence_from
    from avprobe.records import shift_bases
    from avprobe.store import Store

    ref = make_ref(model, local_files_only=not allow_download)
    root = Path(store_root)
    store = Store(root, readonly=bool(offline))
    # `base_model` may name the vision-only base, the audio-ablated self, or both ("M,self-ablated")
    base, self_ablated = shift_bases(base_model or ref.settings.base_model)
    # all experiments, or the model's own subset (avprobe.json), e.g. a counterpart's: as `avprobe collect`
    protocol = protocol_for(parse_experiments(ref.settings.experiments or EXPERIMENTS), ref.settings.queries,
                            max_new_tokens)
    if self_ablated and protocol.shift:
        protocol = replace(protocol, self_shift=True)
    if not protocol.shift:
        base = None
    sample_list, bad_rows = loaded_samples if loaded_samples is not None else load_samples(samples or "organism", limit)
    # The judge first: a bad spec or a missing endpoint fails before any compute. Its cache is
    # the store, read-only too when offline (cached verdicts are still read).
    kw: dict[str, Any] = {"cache": store}
    if judge_url:
        kw["base_url"] = judge_url
    judge_obj = make_judge(judge or ref.settings.judge or "openai", **kw)
    cmd = f"avprobe collect --model {model} --samples {samples or 'organism'} --store {root}"
    if limit:
        cmd += f" --limit {limit}"
    # the same protocol, so that the command fills exactly these keys
    for opt, value in (("base-model", base_model), ("max-new-tokens", max_new_tokens)):
        if value is not None:
            cmd += f" --{opt} {value}"
    try:
        with (quiet() if quiet is not None else contextlib.nullcontext()):
            result = gather(ref, sample_list, store, protocol, judge=judge_obj, base_model=base, device=device,
                            dtype=dtype, allow_download=allow_download, refresh=refresh, keep=True,
                            manifest_errors=bad_rows, label=f"{model}: collecting", collect_command=cmd,
                            clips_per_batch=_clips_per_batch(clips_per_batch))
    finally:
        close = getattr(judge_obj, "close", None)
        if close is not None:
            close()
    log.info("%s: %s", model, result.counts.describe())
    if not result.records:
        raise GatherError(f"{model}: no results ({result.counts.failed} samples failed; first: "
                          f"{result.failed[0].reason if result.failed else 'none'})")
    settings = {**ref.settings.inputs_view(), "source": ref.settings_source}
    bases = ", ".join([*([base] if base else []), *(["self-ablated"] if self_ablated else [])]) or None
    return evidence_from(model, result, bases, settings=settings)
