"""Import AudioCaps: its CSV (audiocap_id, youtube_id, start_time, caption) plus a folder of
downloaded clips -> manifest samples, and the list of clips that are not in the folder.

AudioCaps has several captions per clip (5 in val/test): rows are grouped by
(youtube_id, start_time) into one sample whose `audio_captions` are in audiocap_id order.
AudioCaps has no video captions; pass them in separately if you have them.

A clip is found under any of the names download tools use (searched recursively):
`<id>`, `Y<id>`, `<id>_<start>`, `<id>_<start>_<end>`, `Y<id>_<start>_<end>`, with start/end
written as `30`, `30.0`, `30.000` or in milliseconds (`30000`), and a video extension.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from avprobe.types import Sample

log = logging.getLogger(__name__)

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".m4v", ".avi")
AUDIO_EXTS = (".wav", ".flac", ".m4a", ".mp3", ".ogg", ".opus", ".aac")
REQUIRED_COLUMNS = ("youtube_id", "start_time", "caption")


@dataclass(frozen=True)
class MissingClip:
    """A clip the CSV names but the folder lacks (or holds only as audio)."""

    youtube_id: str
    start_time: float
    audiocap_ids: tuple[str, ...]
    note: str = "not found"

    def __str__(self) -> str:
        return f"{self.youtube_id}\t{_fmt(self.start_time)}\t{','.join(self.audiocap_ids)}\t{self.note}"


@dataclass
class ImportResult:
    """Samples for the clips found, the clips missing, and the CSV rows that were unusable."""

    samples: list[Sample] = field(default_factory=list)
    missing: list[MissingClip] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _fmt(t: float) -> str:
    return str(int(t)) if float(t).is_integer() else f"{t:g}"


def candidate_stems(youtube_id: str, start: float, seconds: float = 10.0) -> list[str]:
    """File stems a downloaded clip may carry, most specific first."""
    end = start + seconds
    spellings = [(_fmt(start), _fmt(end)), (f"{start:.1f}", f"{end:.1f}"), (f"{start:.3f}", f"{end:.3f}")]
    spellings.append((str(int(round(start * 1000))), str(int(round(end * 1000)))))
    stems: list[str] = []
    for s, e in spellings:
        stems += [f"{youtube_id}_{s}_{e}", f"Y{youtube_id}_{s}_{e}", f"{youtube_id}_{s}"]
    stems += [youtube_id, f"Y{youtube_id}"]
    return list(dict.fromkeys(stems))


def index_folder(folder: str | Path) -> dict[str, dict[str, Path]]:
    """stem -> {'video': path, 'audio': path} for media files under `folder` (recursive)."""
    index: dict[str, dict[str, Path]] = defaultdict(dict)
    for p in sorted(Path(folder).rglob("*")):
        ext = p.suffix.lower()
        kind = "video" if ext in VIDEO_EXTS else "audio" if ext in AUDIO_EXTS else None
        if kind is None or not p.is_file():
            continue
        index[p.stem].setdefault(kind, p)
    return index


def read_audiocaps_csv(path: str | Path) -> tuple[dict[tuple[str, float], list[tuple[str, str]]], list[str]]:
    """(youtube_id, start) -> [(audiocap_id, caption)], plus one problem string per bad row."""
    path = Path(path)
    groups: dict[tuple[str, float], list[tuple[str, str]]] = defaultdict(list)
    problems: list[str] = []
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    texts = []
    bad_utf8 = set()
    for no, b in enumerate(raw.split(b"\n"), start=1):
        try:
            texts.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            bad_utf8.add(no)
            texts.append(b.decode("utf-8", errors="replace"))
    reader = csv.DictReader(io.StringIO("\n".join(texts)))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    reader.fieldnames = cols
    lacking = [c for c in REQUIRED_COLUMNS if c not in cols]
    if lacking:
        raise ValueError(f"{path}: not an AudioCaps CSV, missing column(s) {lacking}; columns are {cols}")
    for row in reader:
        no = reader.line_num
        if no in bad_utf8:
            problems.append(f"line {no}: not valid UTF-8")
            continue
        yid = (row.get("youtube_id") or "").strip()
        cap = (row.get("caption") or "").strip()
        acid = (row.get("audiocap_id") or "").strip() or f"line{no}"
        try:
            start = float((row.get("start_time") or "").strip())
        except ValueError:
            problems.append(f"line {no}: start_time {row.get('start_time')!r} is not a number")
            continue
        if not yid:
            problems.append(f"line {no}: youtube_id is empty")
            continue
        if not cap:
            problems.append(f"line {no} ({yid}): caption is empty")
            continue
        groups[(yid, start)].append((acid, cap))
    return groups, problems


def _acid_key(acid: str) -> tuple[int, int | str]:
    return (0, int(acid)) if acid.isdigit() else (1, acid)


def import_audiocaps(
    csv_path: str | Path,
    clips_dir: str | Path,
    *,
    video_captions: Mapping[str, Sequence[str]] | None = None,
    clip_seconds: float = 10.0,
) -> ImportResult:
    """Samples for the AudioCaps clips present in `clips_dir`; the rest go to `missing`.

    `video_captions` maps a sample id (`<youtube_id>_<start>`) or a youtube_id to captions.
    """
    groups, problems = read_audiocaps_csv(csv_path)
    index = index_folder(clips_dir)
    video_captions = video_captions or {}
    result = ImportResult(problems=problems)
    for (yid, start), caps in sorted(groups.items()):
        caps = sorted(caps, key=lambda c: _acid_key(c[0]))
        acids = tuple(a for a, _ in caps)
        found = audio_only = None
        for stem in candidate_stems(yid, start, clip_seconds):
            entry = index.get(stem, {})
            if "video" in entry:
                found = entry["video"]
                break
            audio_only = audio_only or entry.get("audio")
        if found is None:
            note = f"audio only ({audio_only.name}): need the video" if audio_only else "not found"
            result.missing.append(MissingClip(yid, start, acids, note))
            continue
        sid = f"{yid}_{_fmt(start)}"
        vcaps = video_captions.get(sid) or video_captions.get(yid) or ()
        result.samples.append(
            Sample(
                id=sid,
                video=str(found.resolve()),
                audio_captions=tuple(dict.fromkeys(c for _, c in caps)),
                video_captions=tuple(vcaps),
                meta=(("audiocap_ids", ",".join(acids)), ("start_time", _fmt(start)), ("youtube_id", yid)),
            )
        )
    log.info(
        "AudioCaps: %d clips found, %d missing, %d bad CSV rows",
        len(result.samples),
        len(result.missing),
        len(result.problems),
    )
    return result


def read_video_captions(path: str | Path) -> dict[str, list[str]]:
    """A CSV with columns (id or youtube_id), caption -> {key: [captions]}."""
    out: dict[str, list[str]] = defaultdict(list)
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        key = "id" if "id" in (reader.fieldnames or []) else "youtube_id"
        if key not in (reader.fieldnames or []) or "caption" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: video captions CSV needs columns id (or youtube_id) and caption")
        for row in reader:
            k, cap = (row.get(key) or "").strip(), (row.get("caption") or "").strip()
            if k and cap:
                out[k].append(cap)
    return dict(out)
