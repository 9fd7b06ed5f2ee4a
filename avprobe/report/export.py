"""Machine-readable results beside the HTML report.

- `<stem>.json` (claims.json for reports/claims.html): every claim's outcome, expected
  outcome, parts, estimates, CIs, p-values, thresholds, the concrete layers its bands became
  on the model, its calibration, and the run settings that `avprobe report` reads to redraw
  the report without re-running the claims;
- `<stem>.samples.jsonl`: one line per sample and query: the caption and both fidelities
  under every condition, the logit lens's concept and hit, the base-model shift.

Strict JSON: a NaN is written as null.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from avprobe import ENGINE_VERSION, __version__
from avprobe.claim import ClaimOutcome, claims_table
from avprobe.conditions import band
from avprobe.paper import BANDS, PAPER_DEPTH, band_fractions
from avprobe.pipeline.evidence import Evidence, content_words
from avprobe.records import SampleRecord
from avprobe.report.numbers import format_p

FORMAT = "avprobe-claims/1"
HEARD = 0.5  # baseline audio fidelity at or above which a caption counts as naming the sound


def claims_path(report: Path) -> Path:
    return Path(report).with_suffix(".json")


def samples_path(report: Path) -> Path:
    p = Path(report)
    return p.with_name(p.stem + ".samples.jsonl")


def clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, np.ndarray):
        return clean(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def model_bands(n_layers: int) -> dict[str, dict[str, Any]]:
    """Every named band of `avprobe.paper.BANDS` on the paper's depth and on this model's."""
    return {name: {"fraction": [lo, hi], "paper_layers": list(band(lo, hi, PAPER_DEPTH)),
                   "layers": list(band(lo, hi, n_layers))} for name, (lo, hi) in BANDS.items()}


def claims_document(outcomes: Iterable[ClaimOutcome], evidences: dict[str, Evidence],
                    run: dict[str, Any] | None = None, report_name: str = "", samples_name: str = "") -> dict[str, Any]:
    from avprobe.calibration import DEFAULT_OUT, load_summary

    summary = load_summary()
    rows: dict[str, list[dict[str, Any]]] = {}
    if DEFAULT_OUT.is_file():
        try:
            for r in json.loads(DEFAULT_OUT.read_text())["rows"]:
                rows.setdefault(r["claim"], []).append(r)
        except (ValueError, KeyError):
            rows = {}
    claims = []
    for o in outcomes:
        d = asdict(o)
        d["shown_status"] = o.shown_status
        part = next((p for p in o.parts if p.get("name") == o.deciding), None)
        d["p_text"] = format_p(o.p_value, part.get("n_boot") if part else None)
        # the summary per claim; its scenarios (nulls and powers) are once under "calibration"
        d["calibration"] = summary.get(o.claim_id)
        d.pop("data", None)  # figure series: the report's, large, and in the samples export anyway
        claims.append(d)
    models = {}
    for m, ev in evidences.items():
        models[m] = {
            "n_layers": ev.n_layers,
            "revision": sorted({str(r.meta.get("revision", "?")) for r in ev.records}),
            "records": len(ev.records),
            "samples": len({r.sample_id for r in ev.records}),
            "failed": len(ev.failed),
            "unscored": ev.unscored,
            "judge": ev.judge_label,
            "base_model": ev.base_model,
            "bands": model_bands(ev.n_layers) if ev.records else {},
        }
    return clean({
        "format": FORMAT,
        "avprobe": __version__,
        "engine": ENGINE_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "report": report_name,
        "samples": samples_name,
        "run": run or {},
        "models": models,
        "claims": claims,
        "calibration": {cid: rows[cid] for cid in sorted({c["claim_id"] for c in claims}) if cid in rows},
    })


def read_claims(path: Path) -> tuple[list[ClaimOutcome], dict[str, Any]]:
    """The outcomes and the whole document of a claims.json."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not an avprobe claims file (format {doc.get('format')!r}, expected {FORMAT!r})")
    known = set(ClaimOutcome.__dataclass_fields__)
    out = []
    for c in doc["claims"]:
        c = {k: v for k, v in c.items() if k in known}
        if c.get("ci") is not None:
            c["ci"] = tuple(c["ci"])
        out.append(ClaimOutcome(**c))
    return out, doc


def _latent_layers(n_layers: int) -> tuple[int, ...]:
    """The logit-lens band of the latent_audio claim (all layers without a claims table)."""
    try:
        spec = claims_table()["latent_audio"]["band"]
    except (FileNotFoundError, KeyError):
        return tuple(range(n_layers))
    return band(*band_fractions(spec), n_layers)


def sample_rows(ev: Evidence, all_conditions: bool = True) -> Iterable[dict[str, Any]]:
    """One dict per record: references, captions and fidelities per condition, lens, shift.
    `all_conditions=False` keeps the baseline and the whole-band knockouts (the HTML view)."""
    layers = _latent_layers(ev.n_layers)
    window = int(ev.records[0].meta.get("window", 0)) if ev.records else 0
    for r in sorted(ev.records, key=lambda r: (r.sample_id, r.query)):
        yield sample_row(ev, r, layers, window, all_conditions)


def sample_row(ev: Evidence, r: SampleRecord, lens_layers: tuple[int, ...], window: int,
               all_conditions: bool) -> dict[str, Any]:
    conds = []
    for c in r.conditions:
        sweep = bool(c["blocked"]) and len(c["layers"]) <= window and len(c["layers"]) < ev.n_layers
        if sweep and not all_conditions:
            continue
        fa, fv = ev.fidelity.get((r.sample_id, r.query, c["key"]), (math.nan, math.nan))
        conds.append({"key": c["key"], "label": c.get("label", c["key"]), "blocked": list(c["blocked"]),
                      "layers": list(c["layers"]), "caption": c["text"], "audio_fidelity": fa,
                      "video_fidelity": fv})
    truth = content_words(r.meta["audio_captions"][0]) if r.meta.get("audio_captions") else set()
    lens: dict[str, Any] | None = None
    if r.arrays.get("lens_top_ids") is not None and r.arrays["lens_top_ids"].size:
        concept = ev.lens_concept(r, lens_layers)
        lens = {"layers": list(lens_layers), "concept": concept, "hit": bool(concept is not None and concept in truth)}
    shift = None
    kl = r.arrays.get("shift_kl")
    if kl is not None and len(kl):
        shift = {"tokens": int(len(kl)), "mean_kl": float(np.mean(kl.astype(float))),
                 "top1_same": float(np.mean(r.arrays["shift_top1_same"].astype(bool))),
                 "in_top3": float(np.mean(r.arrays["shift_in_top3"].astype(bool)))}
    fa = conds[0]["audio_fidelity"] if conds else math.nan
    return {
        "model": ev.model,
        "sample_id": r.sample_id,
        "kind": r.kind,
        "query": r.query,
        "audio_reference": (r.meta.get("audio_captions") or [""])[0],
        "video_reference": (r.meta.get("video_captions") or [""])[0],
        "audio_only": r.meta.get("role_counts", {}).get("video", 0) == 0,
        "verdict": sample_verdict(fa, lens["hit"] if lens else None),
        "conditions": conds,
        "lens": lens,
        "shift": shift,
    }


def sample_verdict(audio_fidelity: float, lens_hit: bool | None) -> str:
    """Per sample: the caption names the sound (heard), only the logit lens finds it (heard
    inside only: the paper's latent audio), or neither (missed); unscored when not judged."""
    if not math.isfinite(audio_fidelity):
        return "unscored"
    if audio_fidelity >= HEARD:
        return "heard"
    return "heard inside only" if lens_hit else "missed"


def write_exports(report: Path, outcomes: list[ClaimOutcome], evidences: dict[str, Evidence],
                  run: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write claims.json and the per-sample JSONL beside `report`; return their paths."""
    cpath, spath = claims_path(report), samples_path(report)
    tmp = spath.with_name(spath.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for ev in evidences.values():
            for row in sample_rows(ev):
                f.write(json.dumps(clean(row), ensure_ascii=False, allow_nan=False) + "\n")
    tmp.replace(spath)
    doc = claims_document(outcomes, evidences, run, Path(report).name, spath.name)
    tmp = cpath.with_name(cpath.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(cpath)
    return cpath, spath
