"""Manifests: JSONL or CSV files listing clips and their reference captions (docs/manifest.md).

`read_manifest` validates every row and returns the good samples plus one problem per bad row
(with its line number); `load_manifest` raises a `ManifestError` listing all of them at once.
Relative media paths are resolved against the manifest's folder.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from avprobe.types import Sample, SampleError

log = logging.getLogger(__name__)

KINDS = ("factual", "counterfactual")
LIST_FIELDS = ("audio_captions", "video_captions", "labels", "video_labels")
PATH_FIELDS = ("video", "audio")
STR_FIELDS = ("id", "video", "audio", "kind", "video_source", "audio_source")
KNOWN_FIELDS = frozenset(STR_FIELDS + LIST_FIELDS)
MAX_EXAMPLES = 3  # examples kept per failure group


@dataclass(frozen=True)
class RowProblem:
    """One bad manifest row: where it is and everything wrong with it."""

    line: int
    id: str | None
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        who = f" (id {self.id!r})" if self.id else ""
        return f"line {self.line}{who}: " + "; ".join(self.reasons)


class ManifestError(ValueError):
    """A manifest with bad rows; the message lists every one of them."""

    def __init__(self, path: str | Path, problems: Sequence[RowProblem | str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        lines = "\n  ".join(str(p) for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} bad row(s):\n  {lines}")


@dataclass
class ManifestResult:
    """Validated rows (`samples`) and the rows that failed (`problems`, also as `errors`)."""

    path: Path
    samples: list[Sample] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def errors(self) -> list[SampleError]:
        """Bad rows as per-sample error records (stage `manifest`, path `file:line`)."""
        return [
            SampleError(p.id or f"line{p.line}", "manifest", f"{self.path}:{p.line}", "; ".join(p.reasons))
            for p in self.problems
        ]


def _cell_list(value: str) -> list[str] | str:
    """A CSV cell holding a list: a JSON array, or a single value ('' -> [])."""
    v = value.strip()
    if not v:
        return []
    if v.startswith("["):
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError as exc:
            return f"not a valid JSON array ({exc.msg})"
        return parsed
    return [value]


def _rows(path: Path) -> Iterable[tuple[int, dict | None, list[str]]]:
    """(line number, raw row or None, reasons) for each data row; bytes decoded line by line."""
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = raw.split(b"\n")
    if path.suffix.lower() == ".csv":
        yield from _csv_rows(lines)
        return
    for no, b in enumerate(lines, start=1):
        if not b.strip():
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield no, None, [f"not valid UTF-8 (byte {exc.start}): re-save the manifest as UTF-8"]
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield no, None, [f"not valid JSON ({exc.msg} at column {exc.colno})"]
            continue
        if not isinstance(row, dict):
            yield no, None, [f"expected a JSON object, got {type(row).__name__}"]
            continue
        yield no, row, []


def _csv_rows(lines: list[bytes]) -> Iterable[tuple[int, dict | None, list[str]]]:
    texts: list[str] = []
    bad: dict[int, str] = {}
    for no, b in enumerate(lines, start=1):
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError as exc:
            bad[no] = f"not valid UTF-8 (byte {exc.start}): re-save the manifest as UTF-8"
            texts.append(b.decode("utf-8", errors="replace"))
    reader = csv.DictReader(io.StringIO("\n".join(texts)))
    if reader.fieldnames is None:
        return
    header = [h.strip() for h in reader.fieldnames]
    reader.fieldnames = header
    for row in reader:
        no = reader.line_num  # last physical line of the record
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        reasons = [bad[no]] if no in bad else []
        if None in row:
            reasons.append(f"{len(row[None])} more cell(s) than the header has columns")
            row.pop(None)
        parsed: dict = {}
        for k, v in row.items():
            if v is None:
                reasons.append(f"missing cell for column {k!r}")
                continue
            if k in LIST_FIELDS:
                cell = _cell_list(v)
                if isinstance(cell, str):
                    reasons.append(f"{k}: {cell}")
                    continue
                parsed[k] = cell
            elif v.strip() == "" and k != "id":
                continue  # empty optional cell
            else:
                parsed[k] = v
        yield no, parsed, reasons


def _str_list(row: dict, key: str, reasons: list[str], *, required: bool) -> tuple[str, ...]:
    value = row.get(key)
    if value is None:
        if required:
            reasons.append(f"{key} is missing")
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        reasons.append(f"{key} must be a list of strings, got {type(value).__name__}")
        return ()
    out = []
    for i, v in enumerate(value):
        if not isinstance(v, str):
            reasons.append(f"{key}[{i}] must be a string, got {type(v).__name__}")
        elif not v.strip():
            reasons.append(f"{key}[{i}] is empty")
        elif "\ufffd" in v:
            reasons.append(f"{key}[{i}] holds undecodable bytes (U+FFFD)")
        else:
            out.append(v.strip())
    if required and not value:
        reasons.append(f"{key} is empty: give at least one caption")
    return tuple(out)


def _resolve(p: str, base: Path) -> str:
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q))


def parse_row(row: dict, base: Path, *, check_files: bool = False) -> tuple[Sample | None, list[str]]:
    """Validate one raw row; (Sample, []) when good, (None, reasons) when not."""
    reasons: list[str] = []
    for k in STR_FIELDS:
        if k in row and row[k] is not None and not isinstance(row[k], str):
            reasons.append(f"{k} must be a string, got {type(row[k]).__name__}")
    sid = row.get("id")
    if not isinstance(sid, str) or not sid.strip():
        reasons.append("id is missing or empty")
        sid = None
    video, audio = row.get("video"), row.get("audio")
    video = video if isinstance(video, str) and video.strip() else None
    audio = audio if isinstance(audio, str) and audio.strip() else None
    if video is None and audio is None:
        reasons.append("neither video nor audio is given")
    video = _resolve(video, base) if video else None
    audio = _resolve(audio, base) if audio else None
    if check_files:
        for name, p in (("video", video), ("audio", audio)):
            if p is not None and not Path(p).is_file():
                reasons.append(f"{name} file not found: {p}")
    audio_caps = _str_list(row, "audio_captions", reasons, required=True)
    video_caps = _str_list(row, "video_captions", reasons, required=False)
    labels = _str_list(row, "labels", reasons, required=False)
    video_labels = _str_list(row, "video_labels", reasons, required=False)
    kind = row.get("kind") or "factual"
    vsrc, asrc = row.get("video_source") or None, row.get("audio_source") or None
    if kind not in KINDS:
        reasons.append(f"kind must be one of {KINDS}, got {kind!r}")
    elif kind == "counterfactual":
        if not vsrc or not asrc:
            reasons.append("a counterfactual row needs video_source and audio_source (the clip ids it mixes)")
        elif vsrc == asrc:
            reasons.append(f"video_source and audio_source are the same clip ({vsrc!r}): not a counterfactual")
    meta = []
    for k in sorted(set(row) - KNOWN_FIELDS):
        v = row[k]
        meta.append((str(k), v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)))
    if reasons:
        return None, reasons
    sample = Sample(
        id=sid.strip(),  # type: ignore[union-attr]
        video=video,
        audio=audio,
        audio_captions=audio_caps,
        video_captions=video_caps,
        kind=kind,
        labels=labels,
        video_labels=video_labels,
        video_source=vsrc,
        audio_source=asrc,
        meta=tuple(meta),
    )
    return sample, []


def read_manifest(path: str | Path, *, check_files: bool = False) -> ManifestResult:
    """Read and validate a .jsonl or .csv manifest; bad rows are collected, not raised."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    if path.suffix.lower() not in (".jsonl", ".csv", ".json"):
        raise ManifestError(path, [f"unknown manifest format {path.suffix!r}: use .jsonl or .csv"])
    base = path.resolve().parent
    result = ManifestResult(path=path)
    seen: dict[str, int] = {}
    for no, row, reasons in _rows(path):
        sample = None
        sid = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None
        if row is not None:
            sample, more = parse_row(row, base, check_files=check_files)
            reasons = reasons + more
        if sample is not None and sample.id in seen:
            reasons.append(f"duplicate id (first on line {seen[sample.id]})")
        if reasons:
            result.problems.append(RowProblem(no, sid, tuple(reasons)))
            continue
        seen[sample.id] = no  # type: ignore[union-attr]
        result.samples.append(sample)  # type: ignore[arg-type]
    log.info("%s: %d rows ok, %d bad", path, len(result.samples), len(result.problems))
    return result


def load_manifest(path: str | Path, *, check_files: bool = False) -> list[Sample]:
    """Read a manifest and return its samples; raise ManifestError listing every bad row."""
    result = read_manifest(path, check_files=check_files)
    if result.problems:
        raise ManifestError(path, result.problems)
    return result.samples


def _rel(p: str | None, base: Path) -> str | None:
    if p is None:
        return None
    q = Path(p).resolve()
    try:
        return str(q.relative_to(base))
    except ValueError:
        return str(q)


def sample_to_row(sample: Sample, base: Path | None = None) -> dict:
    """A sample as a manifest row (paths relative to `base` when inside it)."""
    row: dict = {"id": sample.id}
    for k in PATH_FIELDS:
        v = getattr(sample, k)
        if v is not None:
            row[k] = _rel(v, base) if base is not None else v
    row["audio_captions"] = list(sample.audio_captions)
    row["video_captions"] = list(sample.video_captions)
    if sample.labels:
        row["labels"] = list(sample.labels)
    if sample.video_labels:
        row["video_labels"] = list(sample.video_labels)
    row["kind"] = sample.kind
    if sample.video_source:
        row["video_source"] = sample.video_source
    if sample.audio_source:
        row["audio_source"] = sample.audio_source
    for k, v in sample.meta:
        row.setdefault(k, v)
    return row


def write_manifest(samples: Iterable[Sample], path: str | Path) -> Path:
    """Write samples as JSONL (atomic); media paths are written relative to the file's folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(json.dumps(sample_to_row(s, base), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


# --- failures grouped by cause -----------------------------------------------------------------

# "TypeName: message", as load_many and mux_samples word an exception they did not foresee.
_TYPED = re.compile(r"([A-Za-z_][\w.]*(?:Error|Exception|Warning|Exit)):\s*(.*)", re.DOTALL)
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"(?<![\w.])(?:~|\.{1,2})?/[^\s'\",;()\[\]]+")
_NUMBER = re.compile(r"\b0x[0-9a-fA-F]+\b|(?<![\w.])-?\d+(?:\.\d+)?(?:e-?\d+)?")
_CAUSE_CHARS = 160


def failure_cause(err: SampleError) -> str:
    """The group a failure belongs to: `stage: [ExceptionType: ]message`, the message with its
    particulars (the file's path, other paths, quoted names, numbers) replaced by placeholders.

    So ten different causes are ten groups, while one cause met on many files (`decoded 3 of
    10 frames`, `decoded 7 of 250 frames`) is one.
    """
    reason = err.reason.strip()
    m = _TYPED.fullmatch(reason)
    kind, msg = (m.group(1), m.group(2)) if m else (None, reason)
    if err.path:
        msg = msg.replace(err.path, "<path>")
    msg = _QUOTED.sub("'…'", msg)
    msg = _PATH.sub("<path>", msg)
    msg = _NUMBER.sub("<n>", msg)
    msg = " ".join(msg.split())[:_CAUSE_CHARS]
    return f"{err.stage}: {kind}: {msg}" if kind else f"{err.stage}: {msg}"


def add_failure(groups: dict[str, dict], err: SampleError, max_examples: int = MAX_EXAMPLES) -> str:
    """Count `err` in `groups` (cause -> {"count", "examples"}), keeping its first
    `max_examples` records as examples; returns the cause."""
    cause = failure_cause(err)
    g = groups.setdefault(cause, {"count": 0, "examples": []})
    g["count"] += 1
    if len(g["examples"]) < max_examples:
        g["examples"].append({"sample_id": err.sample_id, "path": err.path, "reason": err.reason})
    return cause


def group_failures(errors: Iterable[SampleError], max_examples: int = MAX_EXAMPLES) -> dict[str, dict]:
    """Failures grouped by `failure_cause`, the largest group first."""
    groups: dict[str, dict] = {}
    for e in errors:
        add_failure(groups, e, max_examples)
    return dict(sorted(groups.items(), key=lambda kv: (-kv[1]["count"], kv[0])))
