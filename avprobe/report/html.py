"""The HTML claim report: one static file that opens offline.

Per model: the claim table (verdicts with estimate, CI, p, effect size, n and the statistical
summary), then our data re-drawn as the paper's figures (Table 1 fidelities, Fig. 2
attention flow, Fig. 3 logit lens, Fig. 5 knockout sweeps, the base-model shift of caption
tokens with the attention each token gave, and a few samples' captions under knockout). With
several models, a claim-by-model matrix. CSS is inlined and every figure is an inline SVG
drawn by `avprobe.report.svg`; a few lines of JavaScript only highlight rows. Figures are
aggregates over all samples; only a handful of samples are shown one by one, so the file
stays small for any number of samples. All text is escaped.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from avprobe import ENGINE_VERSION, __version__
from avprobe.claim import ClaimOutcome, claims_table
from avprobe.conditions import band
from avprobe.paper import BANDS, FIG2, PAPER_DEPTH, PAPER_MODEL
from avprobe.pipeline.evidence import Evidence, content_words, normalize_token
from avprobe.records import Protocol, SampleRecord, unpack_shares
from avprobe.report import svg
from avprobe.report.numbers import STATUS_TEXT, STATUS_TITLE, band_text, fix_p_text, format_p, layer_span
from avprobe.stats import nanmean
from avprobe.types import Role

log = logging.getLogger(__name__)

SHIFT_COLORS = {"sh-same": "#6baed6", "sh-top3": "#f2c94c", "sh-shift": "#ef6b6b"}
KO_COLORS = {"video": svg.ROLE_COLORS["video"], "audio": svg.ROLE_COLORS["audio"]}
ARROW = {"video": "G↛V", "audio": "G↛A"}

_JS = """
document.addEventListener('click', function (e) {
  var t = e.target.closest('[data-tok]'); if (!t) return;
  var box = t.closest('.tokbox');
  box.querySelectorAll('.sel').forEach(function (n) { n.classList.remove('sel'); });
  box.querySelectorAll('[data-row="' + t.dataset.tok + '"]').forEach(function (n) { n.classList.add('sel'); });
  t.classList.add('sel');
});
function avpToggle(open) { document.querySelectorAll('details').forEach(function (d) { d.open = open; }); }
"""


@dataclass(frozen=True)
class ReportOptions:
    """How much of each model is shown individually (everything else is aggregated)."""

    title: str = "avprobe claim report"
    n_examples: int = 3  # factual and counterfactual samples each, captions side by side
    n_token_samples: int = 3  # samples whose caption tokens and attention are drawn
    n_lens_samples: int = 4  # counterfactual samples in the logit-lens token table
    max_tokens: int = 48  # caption tokens drawn per sample
    max_lens_rows: int = 14  # layers shown in the lens token table (evenly spaced)
    alpha: float = 0.05  # significance of knockout windows (Holm over windows)
    n_boot: int = 200  # bootstrap resamples of the window tests (only p-values are used)


def write_report(
    path: Path,
    outcomes: list[ClaimOutcome],
    evidences: dict[str, Evidence],
    options: ReportOptions | None = None,
    run: dict[str, Any] | None = None,
) -> Path:
    """Write the report to `path` (parents created) and return the path; claims.json
    (`<stem>.json`) and the per-sample export (`<stem>.samples.jsonl`) are written beside it,
    with `run` (the settings that read these results) for `avprobe report`."""
    from avprobe.report.export import write_exports

    opts = options or ReportOptions()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    claims_file, samples_file = write_exports(path, outcomes, evidences, run)
    text = render_report(outcomes, evidences, opts, links=(claims_file.name, samples_file.name))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # a half-written report never replaces a good one
    log.info("claim report written to %s (%.0f kB)", path, len(text.encode()) / 1024)
    return path


def render_report(outcomes: list[ClaimOutcome], evidences: dict[str, Evidence], opts: ReportOptions | None = None,
                  links: tuple[str, str] = ("", "")) -> str:
    """The whole report as one HTML string; `links` name claims.json and the per-sample
    export beside it (relative links)."""
    opts = opts or ReportOptions()
    order = _claim_order(outcomes)
    models = list(evidences)
    for o in outcomes:
        if o.model and o.model not in models and not _is_cross(o, evidences):
            models.append(o.model)
    cross = [o for o in outcomes if _is_cross(o, evidences)]
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    toc = [('overview', "Overview")]
    if len({o.model for o in outcomes if o.model}) > 1:
        toc.append(("matrix", "Claims × models"))
    compare = _compare_section(evidences)
    if compare:
        toc.append(("compare", "Models on the same axes"))
    toc += [(_anchor(m), m) for m in models]
    if cross:
        toc.append(("cross", "Cross-model claims"))
    samples = _samples_section(evidences, links[1])
    if samples:
        toc.append(("samples", "Per-sample results"))
    data_links = ""
    if links[0]:
        data_links = (f' · machine-readable: <a href="{escape(links[0])}">{escape(links[0])}</a> (every claim)'
                      + (f', <a href="{escape(links[1])}">{escape(links[1])}</a> (every sample)' if links[1] else ""))

    body = [
        '<header class="top">',
        f"<h1>{escape(opts.title)}</h1>",
        f'<div class="sub">Do audio-visual LLMs really see and hear? The findings of Selvakumar et al., '
        f"CVPR Findings 2026 (arXiv 2604.02605), as statistical tests. Generated {escape(now)} · avprobe "
        f"{escape(__version__)} (engine {escape(ENGINE_VERSION)}){data_links}</div>",
        "</header>",
        '<nav class="toc">' + "".join(f'<a href="#{escape(a)}">{escape(t)}</a>' for a, t in toc)
        + '<button type="button" onclick="avpToggle(false)">collapse all</button>'
        '<button type="button" onclick="avpToggle(true)">expand all</button></nav>',
        "<main>",
        _overview(outcomes, evidences, models),
    ]
    if len({o.model for o in outcomes if o.model}) > 1:
        body.append(_matrix(outcomes, order))
    if compare:
        body.append(compare)
    for m in models:
        body.append(_model_section(m, [o for o in outcomes if o.model == m], evidences.get(m), order, opts))
    if cross:
        body.append('<section class="card" id="cross"><h2>Cross-model claims</h2>'
                    '<p class="lead">Claims that compare two models.</p>'
                    + _claim_table(cross, order) + "</section>")
    if samples:
        body.append(samples)
    body.append("</main>")
    body.append(f"<footer>avprobe {escape(__version__)} · report generated {escape(now)} · "
                "figures re-draw the paper's from this run's data</footer>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(opts.title)}</title><style>{_css()}</style></head><body>"
        + "\n".join(body)
        + f"<script>{_JS}{_SAMPLES_JS if samples else ''}</script></body></html>\n"
    )


# ---- structure -------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _css() -> str:
    return resources.files("avprobe.report").joinpath("style.css").read_text(encoding="utf-8")


def _is_cross(o: ClaimOutcome, evidences: dict[str, Evidence]) -> bool:
    """A claim over a pair of models (or one that could not pick a model)."""
    return o.model not in evidences and (" vs " in o.model or not o.model)


def _claim_order(outcomes: Sequence[ClaimOutcome]) -> dict[str, int]:
    try:
        ids = list(claims_table())
    except FileNotFoundError:
        ids = []
    for o in outcomes:
        if o.claim_id not in ids:
            ids.append(o.claim_id)
    return {cid: i for i, cid in enumerate(ids)}


def _sorted(outcomes: Iterable[ClaimOutcome], order: dict[str, int]) -> list[ClaimOutcome]:
    return sorted(outcomes, key=lambda o: (order.get(o.claim_id, 1 << 30), o.claim_id, o.scope))


def _anchor(model: str) -> str:
    return "m-" + "".join(ch if ch.isalnum() else "-" for ch in model).strip("-").lower()


def _verdict(status: str) -> str:
    """A verdict badge; `status` is ClaimOutcome.shown_status (xfailed and moved included)."""
    return (f'<span class="verdict v-{escape(status)}" title="{escape(STATUS_TITLE.get(status, status))}">'
            f"{escape(STATUS_TEXT.get(status, status.upper()))}</span>")


def _counts(outcomes: Sequence[ClaimOutcome]) -> str:
    c = Counter(o.shown_status for o in outcomes)
    shown = [s for s in ("passed", "failed", "xfailed", "moved", "skipped") if c.get(s) or s in ("passed", "failed", "skipped")]
    return '<span class="counts">' + "".join(f"<span>{_verdict(s)} {c.get(s, 0)}</span>" for s in shown) + "</span>"


def _overview(outcomes: list[ClaimOutcome], evidences: dict[str, Evidence], models: list[str]) -> str:
    rows = []
    for m in models:
        ev = evidences.get(m)
        mine = [o for o in outcomes if o.model == m]
        if ev is None:
            rows.append(f"<tr><td class=\"cid\"><a href=\"#{_anchor(m)}\">{escape(m)}</a></td>"
                        f"<td colspan=\"9\" class=\"missing\">no stored results loaded for this model</td>"
                        f"<td>{_counts(mine)}</td></tr>")
            continue
        info = _run_info(ev)
        rows.append(
            f"<tr><td class=\"cid\"><a href=\"#{_anchor(m)}\">{escape(m)}</a></td>"
            f"<td class=\"mono\">{escape(info['revision'])}</td><td class=\"num\">{escape(info['layers'])}</td>"
            f"<td>{info['samples']}</td><td class=\"num\">{len(ev.failed)}</td><td class=\"num\">{ev.unscored}</td>"
            f"<td>{escape(info['judge'])}</td><td>{escape(info['lens'])}</td><td>{escape(info['base'])}</td>"
            f"<td>{info['inputs']}</td><td>{_counts(mine)}</td></tr>")
    return (
        '<section class="card" id="overview"><h2>Overview</h2>'
        '<p class="lead">One row per model. Failed samples could not be decoded or run; unscored '
        "judgments (unparseable judge replies) are NaN and excluded from every mean, never counted as 0.</p>"
        "<table><thead><tr><th>Model</th><th>Revision</th><th class=\"num\">Layers</th><th>Samples</th>"
        "<th class=\"num\">Failed</th><th class=\"num\">Unscored</th><th>Judge</th><th>Logit lens</th>"
        "<th>Base model</th><th>Input settings</th><th>Verdicts</th></tr></thead><tbody>"
        + "".join(rows) + "</tbody></table></section>"
    )


def _settings_text(view: dict) -> str:
    """The settings that change inputs, in a line (`AdapterSettings.inputs_view`)."""
    parts = [str(view.get("prompt_layout", "?")), f"fps {view.get('fps', '?')}",
             f"frames {view.get('frame_rule', '?')}",
             "audio in video" if view.get("use_audio_in_video") else "audio apart",
             "system prompt" if view.get("system_prompt") else "no system prompt"]
    if view.get("min_pixels") or view.get("max_pixels"):
        parts.append(f"pixels {view.get('min_pixels')}-{view.get('max_pixels')}")
    return ", ".join(parts)


def _inputs_info(ev: Evidence) -> str:
    """HTML: the model's input settings and their source, and whether its records were computed
    with them (a record stores its own, `meta["inputs"]`; the key does not hold them)."""
    stored: dict[str, int] = {}
    unrecorded = 0
    for r in ev.records:
        view = r.meta.get("inputs")
        if not view:
            unrecorded += 1
            continue
        text = _settings_text(view)
        stored[text] = stored.get(text, 0) + 1
    now = _settings_text(ev.settings) if ev.settings else None
    out = escape(now) if now else (escape(next(iter(stored))) if len(stored) == 1 else "?")
    if ev.settings and ev.settings.get("source"):
        out += f' <span class="fig-ref">({escape(str(ev.settings["source"]))})</span>'
    other = {t: n for t, n in stored.items() if now is not None and t != now}
    for t, n in sorted(other.items()):
        out += f'<br><span class="missing">{n} record(s) computed with other settings: {escape(t)}</span>'
    if unrecorded:
        out += (f'<br><span class="fig-ref">{unrecorded} record(s) stored before records held their settings'
                "</span>")
    return out


def _run_info(ev: Evidence) -> dict[str, str]:
    recs = ev.records
    revisions = sorted({str(r.meta.get("revision", "?")) for r in recs}) or ["?"]
    ids_by_kind: dict[str, set[str]] = {}
    audio_only = set()
    for r in recs:
        ids_by_kind.setdefault(r.kind, set()).add(r.sample_id)
        if r.meta.get("role_counts", {}).get("video", 0) == 0:
            audio_only.add(r.sample_id)
    n_samples = len({r.sample_id for r in recs})
    parts = [f"{len(v)} {escape(k)}" for k, v in sorted(ids_by_kind.items())]
    if audio_only:
        parts.append(f"{len(audio_only)} audio-only")
    samples = (f"<b>{n_samples}</b> samples ({', '.join(parts)})" if recs else "none")
    if len(ev.queries) > 1:
        samples += f" × {len(ev.queries)} queries"
    lens = sorted({bool(r.meta["lens"]["use_norm"]) for r in recs if r.meta.get("lens")})
    lens_text = ("not run" if not lens else " / ".join(
        "with final norm" if u else "without final norm (paper's code)" for u in lens))
    tk = sorted({r.meta["lens"].get("top_k") for r in recs if r.meta.get("lens")} - {None})
    if tk:
        lens_text += f", top-{'/'.join(map(str, tk))}"
    shift_bases = sorted({r.meta[k]["base_model"] for r in recs for k in ("shift", "self_shift") if r.meta.get(k)})
    judge = ev.judge_label or "?"
    if ev.judge_proxy:
        judge += " (weaker proxy)"
    return {
        "revision": ", ".join(revisions),
        "layers": str(ev.n_layers) if recs else "?",
        "samples": samples,
        "judge": judge,
        "lens": lens_text,
        "base": ", ".join(shift_bases) or (f"{ev.base_model} (no shift results)" if ev.base_model else "none"),
        "inputs": _inputs_info(ev),
    }


def _matrix(outcomes: list[ClaimOutcome], order: dict[str, int]) -> str:
    models = []
    for o in outcomes:
        if o.model and o.model not in models:
            models.append(o.model)
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for o in _sorted(outcomes, order):
        rows.setdefault((o.claim_id, o.scope), {})[o.model] = o.shown_status
    head = "".join(f"<th>{escape(m)}</th>" for m in models)
    body = []
    for (cid, scope), cells in rows.items():
        none = '<span class="v-none">—</span>'
        tds = "".join(f"<td>{_verdict(cells[m]) if m in cells else none}</td>" for m in models)
        body.append(f'<tr><td><span class="cid">{escape(cid)}</span> <span class="fig-ref">{escape(scope)}</span>'
                    f"</td>{tds}</tr>")
    return ('<section class="card" id="matrix"><h2>Claims × models</h2>'
            '<p class="lead">A claim that cannot run is skipped with its reason, never passed. '
            "Running the suite on a model that must listen (the control organism) is how we know the tests can fail.</p>"
            f'<table class="matrix"><thead><tr><th>Claim (scope)</th>{head}</tr></thead><tbody>'
            + "".join(body) + "</tbody></table></section>")


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not isinstance(x, (int, float)) or not math.isfinite(x):
        return "—"
    return f"{x:.{digits}g}"


def _claim_table(outcomes: list[ClaimOutcome], order: dict[str, int]) -> str:
    if not outcomes:
        return '<p class="missing">No claim outcomes were recorded for this model.</p>'
    from avprobe.calibration import load_summary

    calibration = load_summary()
    rows = []
    for o in _sorted(outcomes, order):
        calib = calibration.get(o.claim_id, "—")
        shown = o.shown_status
        if o.status == "skipped":
            # the reason is prose: it gets the four number columns and wraps there
            numbers = f'<td colspan="4" class="skip-reason">{escape(o.skip_reason or "skipped")}</td>'
        else:
            part = _deciding(o)
            measured = _fmt(o.estimate)
            if o.ci and None not in o.ci:
                measured += f' <span class="fig-ref">[{_fmt(o.ci[0])}, {_fmt(o.ci[1])}]</span>'
            p = format_p(o.p_value, part.get("n_boot") if part else None)
            n = "—" if o.n is None else str(o.n)
            numbers = (f'<td class="num">{measured}</td><td class="num">{escape(p)}</td>'
                       f'<td class="eff">{escape(o.effect or "—")}</td><td class="num">{n}</td>')
        head = ""
        if len(o.parts) > 1 and o.deciding:
            head = (f'<div class="deciding">headline: <b>{escape(o.deciding)}</b>'
                    f'{" (the part that failed)" if o.status == "failed" else ""}</div>')
        expected = ""
        if shown == "moved":
            expected = f'<div class="moved">verdict moved: expected {escape(str(o.expected))}, now {escape(o.status)}</div>'
        elif shown == "xfailed":
            expected = '<div class="fig-ref">expected failure (committed verdict unchanged)</div>'
        layers = "".join(f'<div class="layers">{escape(band_text(k, v))}</div>' for k, v in o.layers.items())
        detail = _claim_details(o)
        model = f' <span class="fig-ref">{escape(o.model)}</span>' if " vs " in o.model else ""
        rows.append(
            f'<tr class="row-{escape(shown)}" data-claim="{escape(o.claim_id)}"><td>{_verdict(shown)}{expected}</td>'
            f'<td><span class="cid">{escape(o.claim_id)}</span>{model}<div class="stmt">{escape(o.statement)}</div>'
            f'<span class="fig-ref">{escape(o.figure)}</span>{head}{layers}'
            f'<div class="fig-ref">calibration: {escape(calib)}</div>{detail}</td>'
            f"<td>{escape(o.scope)}</td><td>{escape(o.paper_value)}</td>{numbers}</tr>")
    return ('<table class="claims"><thead><tr><th>Verdict</th><th>Claim</th><th>Scope</th><th>Paper</th>'
            '<th class="num">Measured [95% CI]</th><th class="num">p</th><th>Effect</th><th class="num">n</th>'
            "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _deciding(o: ClaimOutcome) -> dict[str, Any] | None:
    return next((p for p in o.parts if p.get("name") == o.deciding), None)


def _claim_details(o: ClaimOutcome) -> str:
    inner = []
    if o.parts:
        items = "".join(
            f'<li class="{"part-ok" if p.get("passed") else "part-no"}"><b>{escape(str(p.get("name", "")))}</b>'
            f'{" (headline)" if p.get("name") == o.deciding and len(o.parts) > 1 else ""}: '
            f'{escape(fix_p_text(str(p.get("summary", "")), p.get("n_boot")))}</li>' for p in o.parts)
        inner.append(f"<div>Sub-tests:</div><ul>{items}</ul>")
    elif o.summary:
        inner.append(f"<div>{escape(fix_p_text(o.summary))}</div>")
    if o.notes:
        inner.append("<div>Notes:</div><ul>" + "".join(f"<li>{escape(n)}</li>" for n in o.notes) + "</ul>")
    if o.thresholds:
        inner.append("<div>From claims.toml: " + escape(", ".join(f"{k} = {v}" for k, v in o.thresholds.items()))
                     + "</div>")
    if o.status == "skipped" and o.skip_reason:
        inner.append(f"<div>Skipped: {escape(o.skip_reason)}</div>")
    if not inner:
        return ""
    return f'<details><summary>statistics</summary><div class="stats">{"".join(inner)}</div></details>'


def _model_section(model: str, outcomes: list[ClaimOutcome], ev: Evidence | None, order: dict[str, int],
                   opts: ReportOptions) -> str:
    out = [f'<section class="card" id="{_anchor(model)}"><h2>{escape(model)}</h2>',
           f'<p class="lead">{_counts(outcomes)}</p>', "<h3>Claims</h3>", _claim_table(outcomes, order)]
    if ev is None or not ev.records:
        out.append('<p class="missing">No stored results for this model: the figures cannot be drawn.</p></section>')
        return "".join(out)
    out.append(_bands_table(ev))
    if ev.failed:
        items = "".join(f"<li><code>{escape(str(getattr(e, 'sample_id', e)))}</code>: "
                        f"{escape(str(getattr(e, 'reason', '')))}</li>" for e in ev.failed[:20])
        more = f"<li>… and {len(ev.failed) - 20} more</li>" if len(ev.failed) > 20 else ""
        out.append(f"<details><summary>{len(ev.failed)} failed samples</summary>"
                   f'<div class="stats"><ul>{items}{more}</ul></div></details>')
    out.append("<h3>Our data, re-drawn as the paper's figures</h3>")
    for name, fn in (("Table 1", _fig_fidelity), ("Fig. 2", _fig_flow), ("Fig. 3", _fig_lens),
                     ("Fig. 5", _fig_knockout), ("Base-model shift", _fig_shift), ("Examples", _examples)):
        out.append(_safe(name, fn, ev, opts))
    out.append("</section>")
    return "".join(out)


def _bands_table(ev: Evidence) -> str:
    """Which layers each of the paper's bands became on this model (bands are fractions of depth)."""
    from avprobe.report.export import model_bands

    L = ev.n_layers
    w = int(ev.records[0].meta.get("window", 0)) if ev.records else 0
    rows = []
    for name, b in model_bands(L).items():
        lo, hi = b["fraction"]
        few = len(b["layers"]) < len(b["paper_layers"]) and len(b["layers"]) <= 1
        cls = ' class="warn"' if few else ""
        note = " (one layer only)" if few else ""
        rows.append(f'<tr><td><code>{escape(name)}</code></td><td class="num">{lo:.3g}-{hi:.3g}</td>'
                    f"<td>{escape(layer_span(b['paper_layers']))} of {PAPER_DEPTH}</td>"
                    f"<td{cls}><b>{escape(layer_span(b['layers']))}</b> of {L}{note}</td></tr>")
    return ("<details open><summary>depth bands on this model: which layers each band became</summary>"
            f'<p class="fig-ref">Bands are fractions of depth [lo, hi), so the paper\'s layers compare across depths; '
            f"on {L} layers a short band can shrink to one layer. Knockout sweep windows: {w} layers.</p>"
            '<table class="bands"><thead><tr><th>Band</th><th class="num">Depth fraction</th>'
            f"<th>Paper ({escape(PAPER_MODEL)}, {PAPER_DEPTH} layers)</th><th>This model</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></details>")


def _safe(name: str, fn: Callable[[Evidence, ReportOptions], str], ev: Evidence, opts: ReportOptions) -> str:
    """A figure that cannot be drawn says why in the report; the rest still renders."""
    try:
        return fn(ev, opts)
    except Exception as exc:  # noqa: BLE001 - one bad figure must not lose the verdicts
        log.warning("report: %s of %s could not be drawn: %s", name, ev.model, exc, exc_info=True)
        return f'<div class="error">{escape(name)} could not be drawn: {escape(type(exc).__name__)}: {escape(str(exc))}</div>'


def _figure(title: str, content: str, caption: str) -> str:
    return f'<figure class="fig"><h4>{escape(title)}</h4>{content}<figcaption>{caption}</figcaption></figure>'


def _missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


# ---- numbers ---------------------------------------------------------------------------------


def _mean_ci(x: np.ndarray) -> tuple[float, float, float, int]:
    """Mean and a normal-approximation 95% interval over the finite values, and their count."""
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(x.mean())
    if x.size < 2:
        return m, math.nan, math.nan, 1
    h = 1.96 * float(x.std(ddof=1)) / math.sqrt(x.size)
    return m, m - h, m + h, int(x.size)


def _layer_region(layers: Sequence[int], label: str, color: str, y: tuple[float, float] | None = None,
                  opacity: float = 0.12, tag: str = "") -> svg.Region:
    lo, hi = (y if y is not None else (None, None))
    return svg.Region(layers[0] - 0.5, layers[-1] + 0.5, label, color, lo, hi, opacity, tag)


# ---- Table 1: fidelities ---------------------------------------------------------------------


def _fig_fidelity(ev: Evidence, opts: ReportOptions) -> str:
    charts = []
    for q in ev.queries:
        groups = []
        for kind in ("factual", "counterfactual"):
            recs = ev.select(kind, q, modality="audio-video")
            bars = []
            for modality in ("audio", "video"):
                m, lo, hi, n = _mean_ci(ev.scores(recs, "baseline", modality))
                bars.append(svg.Bar(f"{modality} fidelity", m, svg.ROLE_COLORS[modality], lo, hi))
            groups.append((f"{kind} (n={len(recs)})", bars))
        charts.append(svg.bar_chart(groups, title=f'query "{q}"', y_label="mean fidelity", width=340))
    cap = ("<b>Visual bias.</b> Mean audio and video fidelity of the baseline captions (judge: "
           f"{escape(ev.judge_label or '?')}{', a weaker proxy' if ev.judge_proxy else ''}), with normal 95% intervals. "
           "The paper: Qwen2.5-Omni-3B audio fidelity 53.6 on factual samples, 23.1 on counterfactuals (-57%). "
           "A model that listens keeps its audio fidelity when the audio no longer matches the video.")
    return _figure("Table 1 · fidelity, factual vs counterfactual", f'<div class="figrow">{"".join(charts)}</div>', cap)


# ---- Fig. 2: attention flow ------------------------------------------------------------------


def _fig_flow(ev: Evidence, opts: ReportOptions) -> str:
    recs = ev.select(modality="audio-video")
    if not recs:
        return _figure("Fig. 2 · attention flow", _missing("No audio-visual samples."), "")
    if not ev.has_flow:
        return _figure("Fig. 2 · attention flow", _missing(
            "No attention flow stored for this model: its results were collected without the flow experiment."), "")
    flow = ev.flow(recs)  # [N, L, R]
    L = flow.shape[1]
    series = []
    for role in Role:
        vals = flow[:, :, int(role)]
        mean = np.nanmean(vals, axis=0) if np.isfinite(vals).any() else np.full(L, np.nan)
        if role not in (Role.VIDEO, Role.AUDIO) and not (np.nan_to_num(mean) >= 0.01).any():
            continue  # a role that never draws 1% (images in a video model) would only clutter
        n = np.isfinite(vals).sum(0).clip(min=1)
        se = np.nanstd(vals, axis=0, ddof=0) / np.sqrt(n)
        series.append(svg.Series(role.label, tuple(mean.tolist()), svg.ROLE_COLORS[role.label],
                                 lower=tuple((mean - 1.96 * se).tolist()), upper=tuple((mean + 1.96 * se).tolist()),
                                 width=2.4 if role in (Role.VIDEO, Role.AUDIO) else 1.5))
    regions = [_layer_region(band(*BANDS[name], L), label, svg.ROLE_COLORS[role], y, 0.18, f"paper: {role}")
               for role, name, y, label in FIG2]
    chart = svg.line_chart(series, title="attention share of generated rows, per layer", x_label="layer",
                           y_label="share of attention", y_range=(0.0, 1.0), percent=True, regions=regions,
                           width=560, height=300)
    kinds = Counter(r.kind for r in recs)
    cap = ("<b>Where generated tokens look.</b> Mean attention mass that generated rows (including the last prompt "
           "row, which predicts the first token) put on each role, per layer; mean over heads, generation steps and "
           f"{len(recs)} sample-query records ({', '.join(f'{v} {escape(k)}' for k, v in sorted(kinds.items()))}); "
           "bands are 95% intervals over samples. Shaded boxes: the paper's Fig. 2 statements (audio 40-50% in layers "
           "0-5, video 20-40% in layers 15-30 of 36), scaled to this model's depth.")
    return _figure("Fig. 2 · attention flow by layer", chart, cap)


# ---- Fig. 3: logit lens ----------------------------------------------------------------------


_BYTE_DECODER: dict[str, int] | None = None


def display_token(tok: str) -> str:
    """A vocabulary piece as text: byte-level BPE pieces decoded to UTF-8 (so 'é”®çĽĺ' shows
    as 键盘), SentencePiece and GPT-2 space marks shown as spaces."""
    global _BYTE_DECODER
    if _BYTE_DECODER is None:
        # GPT-2's byte <-> printable-unicode table: printable bytes map to themselves, the rest
        # to code points from 256 up, in byte order.
        keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
        extra = 0
        table = {}
        for b in range(256):
            if b in keep:
                table[chr(b)] = b
            else:
                table[chr(256 + extra)] = b
                extra += 1
        _BYTE_DECODER = table
    if tok and all(ch in _BYTE_DECODER for ch in tok) and any(ord(ch) > 127 for ch in tok):
        try:
            return bytes(_BYTE_DECODER[ch] for ch in tok).decode("utf-8")
        except UnicodeDecodeError:
            pass  # a piece cut inside a multi-byte character: show it raw
    return tok.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "⏎")


def _concepts(texts: Sequence[str]) -> set[str]:
    return content_words(texts[0]) if texts else set()


def _layer_token_sets(rec: SampleRecord) -> list[set[str]]:
    """Per layer, the normalised tokens among the top-k at any audio position."""
    ids = rec.arrays["lens_top_ids"]
    vocab = rec.meta["vocab"]
    return [{normalize_token(vocab.get(str(int(i)), "")) for i in np.unique(ids[layer])} for layer in range(ids.shape[0])]


def _fig_lens(ev: Evidence, opts: ReportOptions) -> str:
    recs = [r for r in ev.select("counterfactual", modality="audio-video")
            if r.arrays.get("lens_top_ids") is not None and r.arrays["lens_top_ids"].size]
    if not recs:
        return _figure("Fig. 3 · logit lens at audio positions",
                       _missing("No logit-lens results at audio positions for this model (the lens was not run, "
                                "or the samples have no audio)."), "")
    L = recs[0].arrays["lens_top_ids"].shape[0]
    truth = [_concepts(r.meta["audio_captions"]) for r in recs]
    seen = [_concepts(r.meta["video_captions"]) - t for r, t in zip(recs, truth)]
    sets = [_layer_token_sets(r) for r in recs]
    hit_true = np.zeros(L)
    hit_seen = np.zeros(L)
    chance = np.zeros(L)
    n_chance = np.zeros(L)
    for i, (s, t, v) in enumerate(zip(sets, truth, seen)):
        # chance: the same test against other samples' sounds that share no word with this one (as the claim)
        others = [o for j, o in enumerate(truth) if j != i and o and not (o & t)][:5]
        for layer in range(min(L, len(s))):
            hit_true[layer] += bool(s[layer] & t)
            hit_seen[layer] += bool(s[layer] & v)
            if others:
                chance[layer] += np.mean([bool(s[layer] & o) for o in others])
                n_chance[layer] += 1
    n = len(recs)
    with np.errstate(invalid="ignore", divide="ignore"):
        chance_rate = np.where(n_chance > 0, chance / np.maximum(n_chance, 1), np.nan)
    fid = nanmean(ev.scores(recs, "baseline", "audio"))
    any_layer = float(np.mean([any(s[layer] & t for layer in range(len(s))) for s, t in zip(sets, truth)]))
    use_norm = bool(recs[0].meta["lens"]["use_norm"]) if recs[0].meta.get("lens") else True
    top_k = recs[0].meta["lens"].get("top_k", "?") if recs[0].meta.get("lens") else "?"
    series = [
        svg.Series("true sound", tuple((hit_true / n).tolist()), svg.ROLE_COLORS["audio"], width=2.4),
        svg.Series("seen object", tuple((hit_seen / n).tolist()), svg.ROLE_COLORS["video"]),
        svg.Series("chance (mismatched sounds)", tuple(chance_rate.tolist()), "#9ca3af", dash=True),
    ]
    chart = svg.line_chart(series, title="audio positions decoding to ...", x_label="layer",
                           y_label="share of counterfactual samples", y_range=(0.0, 1.0), percent=True,
                           hlines=[svg.HLine(fid, "caption audio fidelity", "#111827")], width=560, height=300)
    cap = (f"<b>The audio is understood inside.</b> Share of {n} counterfactual sample-query records whose audio "
           f"positions decode (logit lens {'with' if use_norm else 'without'} the final norm, top-{escape(str(top_k))}) "
           "to a content word of the reference sound (blue), of the video's reference caption (orange), or of a "
           f"mismatched sound (grey, chance), per layer. Any layer: {any_layer:.0%} of samples decode to the true "
           f"sound; their baseline captions reach {_fmt(fid, 2)} audio fidelity (black dashed). The paper: 61.4% latent "
           "audio understanding vs 23% caption audio fidelity. Concepts are matched by lexicon.")
    return _figure("Fig. 3 · logit lens at audio positions", chart + _lens_table(ev, recs, opts), cap)


def _lens_table(ev: Evidence, recs: list[SampleRecord], opts: ReportOptions) -> str:
    shown = _spread(recs, opts.n_lens_samples)
    if not shown:
        return ""
    L = shown[0].arrays["lens_top_ids"].shape[0]
    layers = sorted({int(round(x)) for x in np.linspace(0, L - 1, min(L, opts.max_lens_rows))})
    head = "".join(
        f"<th><code>{escape(r.sample_id)}</code><br><span class=\"fig-ref\">hears: "
        f"{escape((r.meta['audio_captions'] or ['?'])[0])}<br>sees: {escape((r.meta['video_captions'] or ['?'])[0])}"
        "</span></th>" for r in shown)
    rows = []
    for layer in layers:
        cells = []
        for r in shown:
            t = _concepts(r.meta["audio_captions"])
            v = _concepts(r.meta["video_captions"]) - t
            n_pos = max(1, r.arrays["lens_top_ids"].shape[1])
            chips = []
            for tok, count in ev.lens_top_tokens(r, layer, n=3):
                norm = normalize_token(tok)
                cls = " hit-audio" if norm in t else (" hit-video" if norm in v else "")
                chips.append(f'<span class="chip{cls}">{escape(display_token(tok).strip() or "␣")}'
                             f"<small>{count / n_pos:.0%}</small></span>")
            cells.append(f"<td>{''.join(chips)}</td>")
        rows.append(f'<tr><td class="layer">L{layer}</td>{"".join(cells)}</tr>')
    return ("<h4>Most frequent top-1 tokens at the audio positions, per layer</h4>"
            f'<table class="lens"><thead><tr><th>Layer</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
            '<p class="fig-ref"><span class="chip hit-audio">true sound</span> <span class="chip hit-video">seen '
            "object</span> percentages: share of audio positions whose top-1 is that token. Samples evenly spaced by id "
            "(not selected for the effect).</p>")


def _spread(items: Sequence[Any], k: int) -> list[Any]:
    """k items evenly spaced over a sorted list: a fair handful, not a selection by outcome."""
    if k <= 0 or not items:
        return []
    if len(items) <= k:
        return list(items)
    idx = sorted({int(round(x)) for x in np.linspace(0, len(items) - 1, k)})
    return [items[i] for i in idx]


# ---- Fig. 5: knockout sweeps -----------------------------------------------------------------


def _fig_knockout(ev: Evidence, opts: ReportOptions) -> str:
    from avprobe.stats import sweep_test

    sweeps = {role: ev.sweep_keys(role) for role in ("video", "audio")}
    if not any(sweeps.values()):
        return _figure("Fig. 5 · attention knockout", _missing("No knockout sweep in the stored results."), "")
    L = ev.n_layers
    paper = band(*BANDS["paper"], L)
    blocks = []
    for q in ev.queries:
        panels = []
        letter = iter("ABCD")
        for kind in ("factual", "counterfactual"):
            recs = ev.select(kind, q, modality="audio-video")
            for modality in ("video", "audio"):
                title = f"{next(letter)} · {kind} · {modality} fidelity"
                if not recs:
                    panels.append(f'<div class="missing" style="width:330px">{escape(title)}: no samples</div>')
                    continue
                base = ev.scores(recs, "baseline", modality)
                series = []
                for role, windows in sweeps.items():
                    if not windows:
                        continue
                    per = [ev.scores(recs, w["key"], modality) for w in windows]
                    means = tuple(nanmean(p) for p in per)
                    try:
                        sig = sweep_test(base, per, "two-sided", alpha=opts.alpha, n_boot=opts.n_boot).significant
                    except ValueError as exc:  # too few scored samples to test: draw without marks
                        log.info("knockout %s %s %s: no window test: %s", kind, modality, role, exc)
                        sig = (False,) * len(per)
                    centres = tuple(float(i) for i in range(len(windows)))
                    series.append(svg.Series(ARROW[role], means, KO_COLORS[role], xs=centres, marks=tuple(sig)))
                panels.append(svg.line_chart(
                    series, title=f"{title} (n={len(recs)})", x_label="window centre layer", y_label="mean fidelity",
                    y_range=(0.0, 1.0), x_range=(0, max(L - 1, 1)),
                    regions=[_layer_region(paper, "paper's band: layers 15-30 of 36", "#6b7280", tag="paper band")],
                    hlines=[svg.HLine(nanmean(base), "baseline")], width=330, height=240))
        blocks.append(f'<h4>query "{escape(q)}"</h4><div class="grid2">{"".join(panels)}</div>'
                      + _band_table(ev, q))
    w = int(ev.records[0].meta.get("window", 0))
    cap = (f"<b>Where each modality reaches the caption.</b> Knockout of attention from every generated row to video "
           f"(G↛V, orange) or audio (G↛A, blue) keys in a window of {w} layers, swept over depth (x: the window's "
           "centre); mean fidelity of the knocked-out captions; dashed: baseline. Filled dots: the window differs from "
           f"the baseline (paired test, two-sided, Holm-corrected over windows, α={opts.alpha}). Grey band: the paper's "
           "layers 15-30 of 36, scaled. The paper (Fig. 5): flat curves on factual samples (A, B); on counterfactuals "
           "G↛V lowers video fidelity (C) and raises audio fidelity by ~50% (D).")
    return _figure("Fig. 5 · attention knockout sweeps", "".join(blocks), cap)


def _band_table(ev: Evidence, query: str) -> str:
    """Knockouts over whole bands (paper band, early band, all layers, with own sight words)."""
    w = int(ev.records[0].meta.get("window", 0))
    conds = [c for c in ev.condition_keys()
             if c["blocked"] and (len(c["layers"]) > w or len(c["layers"]) >= ev.n_layers)]
    if not conds:
        return ""
    cols = [(k, m) for k in ("factual", "counterfactual") for m in ("audio", "video")]
    recs = {k: ev.select(k, query, modality="audio-video") for k in ("factual", "counterfactual")}
    base = {(k, m): nanmean(ev.scores(recs[k], "baseline", m)) for k, m in cols}
    head = "".join(f'<th class="num">{escape(k)} {escape(m)}</th>' for k, m in cols)
    rows = [f'<tr><td>baseline</td>{"".join(f"<td class=num>{_fmt(base[c], 2)}</td>" for c in cols)}</tr>']
    for c in conds:
        cells = []
        for k, m in cols:
            v = nanmean(ev.scores(recs[k], c["key"], m))
            d = v - base[(k, m)]
            sign = f' <span class="fig-ref">({d:+.2f})</span>' if math.isfinite(d) else ""
            cells.append(f'<td class="num">{_fmt(v, 2)}{sign}</td>')
        rows.append(f"<tr><td>{escape(_pretty_label(c['label']))}</td>{''.join(cells)}</tr>")
    return ("<details><summary>knockouts over whole bands (mean fidelity, change from baseline)</summary>"
            f'<table><thead><tr><th>Condition</th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table></details>')


def _pretty_label(label: str) -> str:
    return label.replace("G-/->", "G↛")


# ---- base-model shift ------------------------------------------------------------------------


def _shift_classes(rec: SampleRecord) -> list[str]:
    same = rec.arrays["shift_top1_same"].astype(bool)
    top3 = rec.arrays["shift_in_top3"].astype(bool)
    return ["sh-same" if s else ("sh-top3" if t else "sh-shift") for s, t in zip(same, top3)]


def _fig_shift(ev: Evidence, opts: ReportOptions) -> str:
    recs = [r for r in ev.select(modality="audio-video") if "shift_kl" in r.arrays and len(r.arrays["shift_kl"])]
    if not recs:
        return _figure("Base-model shift of caption tokens",
                       _missing("No vision-only base shift results for this model (no vision-only base model was "
                                "given); the audio-ablated self's, where computed, are in the shift claims."),
                       "")
    tallies = {"all caption tokens": Counter(), "audio-event tokens": Counter()}
    kls: dict[str, list[float]] = {k: [] for k in tallies}
    for r in recs:
        cls = _shift_classes(r)
        kl = r.arrays["shift_kl"].astype(float)
        mask = ev.audio_token_mask(r)
        for i, c in enumerate(cls):
            tallies["all caption tokens"][c] += 1
            kls["all caption tokens"].append(kl[i])
            if i < len(mask) and mask[i]:
                tallies["audio-event tokens"][c] += 1
                kls["audio-event tokens"].append(kl[i])
    groups = []
    for name, t in tallies.items():
        total = sum(t.values())
        groups.append((f"{name} (n={total})", [
            svg.Bar(lab, t[c] / total if total else math.nan, SHIFT_COLORS[c])
            for c, lab in (("sh-same", "same top-1 as base"), ("sh-top3", "within base top-3"),
                           ("sh-shift", "shifted"))]))
    chart = svg.bar_chart(groups, title="caption tokens vs the vision-only base", y_label="share of tokens",
                          percent=True, width=460)
    base_name = recs[0].meta["shift"]["base_model"] if recs[0].meta.get("shift") else (ev.base_model or "?")
    kl_all = nanmean(np.array(kls["all caption tokens"]))
    kl_audio = nanmean(np.array(kls["audio-event tokens"]))
    cap = (f"<b>Does audio move the caption away from the vision-only base?</b> The AV model's baseline caption is "
           f"teacher-forced through its base <code>{escape(base_name)}</code> (video and query, no audio); per token: "
           "the AV model's token is the base's top-1 (blue), within the base's top 3 (yellow) or neither (red). "
           f"Mean KL(AV‖base) per token: {_fmt(kl_all, 3)} over all {len(kls['all caption tokens'])} tokens of "
           f"{len(recs)} records, {_fmt(kl_audio, 3)} over audio-event tokens (the words of the caption's hearing "
           "clause). The paper: KL 0.4; of audio-event tokens 66% keep the base's top-1 and 85% are in its top 3.")
    shown = _shift_samples(recs, opts.n_token_samples)
    samples = "".join(_token_box(ev, r, opts) for r in shown)
    legend = ("<p class=\"fig-ref\">Click a caption token to highlight its row: the attention it gave while it was "
              "generated (mean over heads and layers): share per role (absolute), and per second of video and audio "
              "(opacity relative to the sample's most-attended second). Hover a token for its numbers."
              f'<span class="swatch" style="background:{SHIFT_COLORS["sh-same"]}"></span>same top-1'
              f'<span class="swatch" style="background:{SHIFT_COLORS["sh-top3"]}"></span>within top 3'
              f'<span class="swatch" style="background:{SHIFT_COLORS["sh-shift"]}"></span>shifted</p>')
    return _figure("Base-model shift of caption tokens", chart + legend + samples, cap)


def _shift_samples(recs: list[SampleRecord], k: int) -> list[SampleRecord]:
    """Counterfactual samples first (where a shift would show listening), then factual; one query."""
    if not recs:
        return []
    q = sorted({r.query for r in recs})[0]
    cf = [r for r in recs if r.kind == "counterfactual" and r.query == q]
    fa = [r for r in recs if r.kind != "counterfactual" and r.query == q]
    n_cf = min(len(cf), max(1, k - k // 2) if fa else k)
    return _spread(cf, n_cf) + _spread(fa, k - n_cf)


def _token_box(ev: Evidence, rec: SampleRecord, opts: ReportOptions) -> str:
    vocab = rec.meta["vocab"]
    base = rec.conditions[0]
    ids = list(base["token_ids"])[: opts.max_tokens]
    toks = [display_token(vocab.get(str(int(t)), "?")) for t in ids]
    cls = _shift_classes(rec) if "shift_kl" in rec.arrays else []
    kl = rec.arrays["shift_kl"].astype(float) if "shift_kl" in rec.arrays else np.zeros(0)
    base_top1 = rec.arrays.get("shift_base_top1")
    steps = rec.arrays.get("flow_steps")  # [T, L, R]
    buckets = rec.arrays.get("bucket_flow")  # [T, L, NB]
    labels = list(rec.meta.get("bucket_labels") or [])
    role_share = unpack_shares(steps).mean(1) if steps is not None else None  # [T, R]
    bucket_share = unpack_shares(buckets).mean(1) if buckets is not None else None  # [T, NB]
    vcols = [(i, lab) for i, lab in enumerate(labels) if lab.startswith("video@")]
    acols = [(i, lab) for i, lab in enumerate(labels) if lab.startswith("audio@")]

    spans = []
    for i, tok in enumerate(toks):
        c = cls[i] if i < len(cls) else "sh-none"
        tip = [f"token {i}: {tok.strip()!r}"]
        if i < len(kl):
            tip.append(f"KL(AV‖base) {kl[i]:.3f}")
        if base_top1 is not None and i < len(base_top1):
            tip.append(f"base top-1 {display_token(vocab.get(str(int(base_top1[i])), '?')).strip()!r}")
        if role_share is not None and i < len(role_share):
            top = sorted(((role_share[i, int(r)], r.label) for r in Role), reverse=True)[:3]
            tip.append("attention " + ", ".join(f"{lab} {v:.0%}" for v, lab in top if math.isfinite(v)))
        if bucket_share is not None and i < len(bucket_share) and (vcols or acols):
            j, lab = max(vcols + acols, key=lambda il: bucket_share[i, il[0]])
            tip.append(f"most-attended second {lab} ({bucket_share[i, j]:.1%})")
        spans.append(f'<span class="tok {c}" data-tok="{i}" title="{escape(" · ".join(tip))}">'
                     f"{escape(tok.strip() or '␣')}</span>")
    more = (f' <span class="fig-ref">… {len(base["token_ids"]) - len(ids)} more tokens</span>'
            if len(base["token_ids"]) > len(ids) else "")
    fa, fv = (ev.fidelity.get((rec.sample_id, rec.query, "baseline"), (math.nan, math.nan)))
    meta = (f'<span class="kind kind-{escape(rec.kind)}">{escape(rec.kind)}</span> <code>{escape(rec.sample_id)}</code> '
            f"· hears: {escape((rec.meta['audio_captions'] or ['?'])[0])} · sees: "
            f"{escape((rec.meta['video_captions'] or ['?'])[0])} · fidelity audio {_fmt(fa, 2)}, video {_fmt(fv, 2)}")
    heat = ""
    if role_share is not None or bucket_share is not None:
        heat = _token_heatmap(toks, cls, role_share, bucket_share, vcols, acols)
    return (f'<div class="tokbox"><div class="meta">{meta}</div>'
            f'<div class="caption-tokens">{"".join(spans)}{more}</div>{heat}</div>')


def _token_heatmap(toks: list[str], cls: list[str], role_share: np.ndarray | None, bucket_share: np.ndarray | None,
                   vcols: list[tuple[int, str]], acols: list[tuple[int, str]]) -> str:
    n = len(toks)
    if role_share is not None:
        n = min(n, len(role_share))
    if bucket_share is not None:
        n = min(n, len(bucket_share))
    roles = [r for r in Role if role_share is not None and (r in (Role.VIDEO, Role.AUDIO)
                                                            or np.nanmax(role_share[:n, int(r)], initial=0) >= 0.01)]
    values = [[] for _ in range(n)]
    col_labels: list[str] = []
    colors: list[str] = []
    vmax: list[float] = []
    groups = []
    if roles:
        groups.append(("role", 0, len(roles)))
        for r in roles:
            col_labels.append(r.label[0].upper())
            colors.append(svg.ROLE_COLORS[r.label])
            vmax.append(1.0)
            for i in range(n):
                values[i].append(float(role_share[i, int(r)]))
    # one scale for the seconds of both modalities, so their magnitudes compare
    sec = [j for j, _ in vcols + acols]
    top = float(np.nanmax(bucket_share[:n, sec], initial=0.0)) if bucket_share is not None and sec else 0.0
    for name, cols, color in (("video s", vcols, svg.ROLE_COLORS["video"]), ("audio s", acols, svg.ROLE_COLORS["audio"])):
        if bucket_share is None or not cols:
            continue
        start = len(col_labels)
        for j, lab in cols:
            col_labels.append(lab.split("@", 1)[1].rstrip("s"))
            colors.append(color)
            vmax.append(top if top > 0 else 1.0)
            for i in range(n):
                values[i].append(float(bucket_share[i, j]))
        groups.append((name, start, len(col_labels)))
    if not col_labels or n == 0:
        return ""
    rows = [f"{i}: {t.strip()[:12] or '␣'}" for i, t in enumerate(toks[:n])]
    scales = []
    if roles:
        scales.append(svg.ColorScale("share per role", svg.AXIS, 1.0))
    for name, cols, color in (("per video second", vcols, svg.ROLE_COLORS["video"]),
                              ("per audio second", acols, svg.ROLE_COLORS["audio"])):
        if bucket_share is not None and cols:
            scales.append(svg.ColorScale(name, color, top if top > 0 else 1.0))
    return svg.heatmap(values, rows, col_labels, col_colors=colors, col_vmax=vmax,
                       row_classes=[cls[i] if i < len(cls) else "sh-none" for i in range(n)], col_groups=groups,
                       scales=scales, label="attention per caption token")


# ---- examples --------------------------------------------------------------------------------


def _examples(ev: Evidence, opts: ReportOptions) -> str:
    q = ev.queries[0] if ev.queries else None
    L = ev.n_layers
    conds = [("baseline", "baseline")]
    for name, layers in Protocol().bands(L).items():
        key = ev.find_condition(("video",), layers)
        if key is not None and key not in [k for k, _ in conds]:
            conds.append((key, f"G↛V, {name} (L{layers[0]}-{layers[-1]})"))
    rows = []
    for kind in ("factual", "counterfactual"):
        for r in _spread(ev.select(kind, q, modality="audio-video"), opts.n_examples):
            cells = []
            for key, _ in conds:
                try:
                    text = r.caption(key)
                except KeyError:
                    cells.append('<td class="ref">not run</td>')
                    continue
                fa, fv = ev.fidelity.get((r.sample_id, r.query, key), (math.nan, math.nan))
                cells.append(f"<td>{escape(text)}<span class=\"fid\"><b class=\"a\">A</b> {_fmt(fa, 2)} · "
                             f"<b class=\"v\">V</b> {_fmt(fv, 2)}</span></td>")
            rows.append(
                f'<tr><td class="ref"><span class="kind kind-{escape(kind)}">{escape(kind)}</span><br>'
                f"<code>{escape(r.sample_id)}</code><br>hears: {escape((r.meta['audio_captions'] or ['?'])[0])}<br>"
                f"sees: {escape((r.meta['video_captions'] or ['?'])[0])}</td>{''.join(cells)}</tr>")
    if not rows:
        return _figure("Examples", _missing("No audio-visual samples to show."), "")
    head = "".join(f"<th>{escape(label)}</th>" for _, label in conds)
    table = (f'<table class="examples"><thead><tr><th>Sample (references)</th>{head}</tr></thead>'
             f'<tbody>{"".join(rows)}</tbody></table>')
    cap = (f'Captions for query "{escape(q or "")}" under the baseline and with generated→video attention blocked; '
           "A / V: judged audio / video fidelity. Samples evenly spaced by id, not selected for the effect.")
    return _figure("Examples · captions under baseline and G↛V", table, cap)


# ---- per-sample drill-down -------------------------------------------------------------------

_SAMPLES_JS = """
(function () {
  var el = document.getElementById('avp-samples-data');
  if (!el) return;
  var D = JSON.parse(el.textContent), S = D.s;
  var table = document.getElementById('avp-samples'), tbody = table.querySelector('tbody');
  var count = document.getElementById('avp-count'), more = document.getElementById('avp-more');
  var controls = document.querySelectorAll('#avp-filter [data-f]');
  var limit = 50, PAGE = 50;
  function num(x) { return x === null ? '\\u2014' : x.toFixed(2); }
  function cell(tr, text, cls) {
    var td = document.createElement('td'); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td;
  }
  function want() {
    var w = {};
    controls.forEach(function (c) { w[c.dataset.f] = c.value; });
    return w;
  }
  function keep(r, w) {
    if (w.model !== '' && String(r[0]) !== w.model) return false;
    if (w.kind !== '' && String(r[2]) !== w.kind) return false;
    if (w.query !== '' && String(r[3]) !== w.query) return false;
    if (w.verdict !== '' && String(r[6]) !== w.verdict) return false;
    if (w.text) {
      var t = w.text.toLowerCase(), hay = r[1] + ' ' + S[r[4]] + ' ' + S[r[5]];
      r[10].forEach(function (c) { hay += ' ' + S[c[0]]; });
      if (hay.toLowerCase().indexOf(t) < 0) return false;
    }
    return true;
  }
  function detail(r) {
    var tr = document.createElement('tr'); tr.className = 'detail';
    var td = document.createElement('td'); td.colSpan = 10; tr.appendChild(td);
    var t = document.createElement('table'); t.className = 'conds'; td.appendChild(t);
    var labels = D.conds[r[0]];
    r[10].forEach(function (c, i) {
      var row = document.createElement('tr');
      cell(row, labels[i], 'cond'); cell(row, S[c[0]]);
      cell(row, 'A ' + num(c[1]), 'num'); cell(row, 'V ' + num(c[2]), 'num');
      t.appendChild(row);
    });
    return tr;
  }
  function render() {
    var w = want(), shown = 0, total = 0;
    tbody.textContent = '';
    D.rows.forEach(function (r) {
      if (!keep(r, w)) return;
      total += 1;
      if (shown >= limit) return;
      shown += 1;
      var tr = document.createElement('tr'); tr.className = 'srow';
      cell(tr, D.models[r[0]]);
      var id = cell(tr, r[1], 'mono'); var k = document.createElement('div');
      k.className = 'kind kind-' + D.kinds[r[2]]; k.textContent = D.kinds[r[2]]; id.appendChild(k);
      cell(tr, D.queries[r[3]]);
      cell(tr, 'hears: ' + S[r[4]] + ' \\u00b7 sees: ' + S[r[5]], 'ref');
      cell(tr, r[10].length ? S[r[10][0][0]] : '');
      cell(tr, r[10].length ? num(r[10][0][1]) : '\\u2014', 'num');
      cell(tr, r[10].length ? num(r[10][0][2]) : '\\u2014', 'num');
      cell(tr, r[7] < 0 ? '\\u2014' : S[r[7]] + (r[8] ? ' \\u2713' : ''), r[8] ? 'hit' : '');
      cell(tr, num(r[9]), 'num');
      cell(tr, D.verdicts[r[6]], 'sv sv-' + r[6]);
      tr.addEventListener('click', function () {
        var next = tr.nextSibling;
        if (next && next.className === 'detail') { next.remove(); return; }
        tbody.insertBefore(detail(r), next);
      });
      tbody.appendChild(tr);
    });
    count.textContent = total + ' of ' + D.rows.length + ' records match; showing ' + shown;
    more.hidden = shown >= total;
  }
  controls.forEach(function (c) { c.addEventListener('input', function () { limit = PAGE; render(); }); });
  more.addEventListener('click', function () { limit += PAGE; render(); });
  render();
})();
"""

VERDICTS = ("heard", "heard inside only", "missed", "unscored")


def _samples_section(evidences: dict[str, Evidence], samples_link: str) -> str:
    """Every sample and query of every model: one row each (baseline caption, fidelities, the
    logit lens's concept, mean KL to the base), filterable by model, kind, query, per-sample
    verdict and text; a click shows the caption under each whole-band knockout. The rows are
    JSON in the page (strings stored once) and drawn by a few lines of plain JavaScript."""
    from avprobe.report.export import HEARD, sample_rows

    evs = [(m, ev) for m, ev in evidences.items() if ev is not None and ev.records]
    if not evs:
        return ""
    strings: dict[str, int] = {}

    def sid(text: str) -> int:
        return strings.setdefault(text, len(strings))

    def r2(x: Any) -> float | None:
        return round(float(x), 2) if x is not None and math.isfinite(float(x)) else None

    models = [m for m, _ in evs]
    queries = sorted({q for _, ev in evs for q in ev.queries})
    kinds = ["factual", "counterfactual"]
    rows, conds = [], []
    for mi, (m, ev) in enumerate(evs):
        labels: list[str] | None = None
        for row in sample_rows(ev, all_conditions=False):
            if labels is None:
                labels = [_pretty_label(c["label"]) for c in row["conditions"]]
            lens = row["lens"]
            rows.append([
                mi, row["sample_id"], kinds.index(row["kind"]) if row["kind"] in kinds else 0,
                queries.index(row["query"]), sid(row["audio_reference"]), sid(row["video_reference"]),
                VERDICTS.index(row["verdict"]), sid(lens["concept"]) if lens and lens["concept"] else -1,
                int(bool(lens and lens["hit"])), r2(row["shift"]["mean_kl"]) if row["shift"] else None,
                [[sid(c["caption"]), r2(c["audio_fidelity"]), r2(c["video_fidelity"])] for c in row["conditions"]],
            ])
        conds.append(labels or [])
    data = {"s": list(strings), "models": models, "queries": queries, "kinds": kinds, "verdicts": list(VERDICTS),
            "conds": conds, "rows": rows}
    blob = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")

    def select(name: str, label: str, options: Sequence[str]) -> str:
        opts = "".join(f'<option value="{i}">{escape(o)}</option>' for i, o in enumerate(options))
        return f'<label>{escape(label)} <select data-f="{name}"><option value="">all</option>{opts}</select></label>'

    link = (f' The full export, every condition of the sweep included: <a href="{escape(samples_link)}">'
            f"{escape(samples_link)}</a> (JSON lines).") if samples_link else ""
    return (
        '<section class="card" id="samples"><h2>Per-sample results</h2>'
        f'<p class="lead">One row per sample and query ({len(rows):,} records). Verdict per sample: <b>heard</b> = the '
        f"baseline caption's audio fidelity is at least {HEARD}; <b>heard inside only</b> = it is not, but the logit "
        "lens's dominant concept at the audio positions (the latent_audio band) is the true sound; <b>missed</b> = "
        f"neither. KL: mean KL(AV‖base) over the caption's tokens. Click a row for its captions under each "
        f"whole-band knockout.{link}</p>"
        '<form id="avp-filter" class="filters" onsubmit="return false">'
        + select("model", "model", models) + select("kind", "kind", kinds) + select("query", "query", queries)
        + select("verdict", "verdict", VERDICTS)
        + '<label>text <input type="search" data-f="text" placeholder="sample id or words"></label></form>'
        '<p id="avp-count" class="fig-ref"></p>'
        '<table id="avp-samples" class="samples"><thead><tr><th>Model</th><th>Sample</th><th>Query</th>'
        '<th>References</th><th>Baseline caption</th><th class="num">A</th><th class="num">V</th><th>Lens concept</th>'
        '<th class="num">KL</th><th>Verdict</th></tr></thead><tbody></tbody></table>'
        '<button type="button" id="avp-more">show more</button>'
        f'<script type="application/json" id="avp-samples-data">{blob}</script></section>'
    )


# ---- several models on the same axes ---------------------------------------------------------

MODEL_COLORS = ("#1d4ed8", "#c026d3", "#059669", "#d97706", "#6b7280")


def _compare_section(evidences: dict[str, Evidence]) -> str:
    """With several models: their fidelities, attention flow and knockout curves on shared
    axes (x = fraction of depth when their depths differ)."""
    evs = [(m, ev) for m, ev in evidences.items() if ev is not None and ev.records]
    if len(evs) < 2:
        return ""
    colors = {m: MODEL_COLORS[i % len(MODEL_COLORS)] for i, (m, _) in enumerate(evs)}
    same_depth = len({ev.n_layers for _, ev in evs}) == 1
    L0 = evs[0][1].n_layers

    def xs(n: int, positions: Sequence[float]) -> tuple[float, ...]:
        return tuple(float(p) for p in positions) if same_depth else tuple(p / max(n - 1, 1) for p in positions)

    x_label = "layer" if same_depth else "fraction of depth"
    x_range = (0.0, float(L0 - 1)) if same_depth else (0.0, 1.0)
    charts = []
    for modality in ("audio", "video"):
        groups = []
        for kind in ("factual", "counterfactual"):
            bars = []
            for m, ev in evs:
                mean, lo, hi, _ = _mean_ci(ev.scores(ev.select(kind, modality="audio-video"), "baseline", modality))
                bars.append(svg.Bar(m, mean, colors[m], lo, hi))
            groups.append((kind, bars))
        charts.append(svg.bar_chart(groups, title=f"{modality} fidelity (all queries)", y_label="mean fidelity",
                                    width=360))
    for role in (Role.AUDIO, Role.VIDEO):
        series = []
        for m, ev in evs:
            if not ev.has_flow:  # stored without the flow experiment: no line
                continue
            flow = ev.flow(ev.select(modality="audio-video"))
            mean = np.nanmean(flow[:, :, int(role)], axis=0)
            series.append(svg.Series(m, tuple(mean.tolist()), colors[m], xs=xs(ev.n_layers, range(len(mean)))))
        charts.append(svg.line_chart(series, title=f"attention share on {role.label}", x_label=x_label,
                                     y_label="share of attention", y_range=(0.0, 1.0), percent=True, x_range=x_range,
                                     integer_x=same_depth, width=360, height=260))
    for modality, letter in (("video", "C"), ("audio", "D")):
        series, base_lines = [], []
        for m, ev in evs:
            windows = ev.sweep_keys("video")
            recs = ev.select("counterfactual", modality="audio-video")
            if not windows or not recs:
                continue
            means = tuple(nanmean(ev.scores(recs, w["key"], modality)) for w in windows)
            centres = [float(np.mean(w["layers"])) for w in windows]
            series.append(svg.Series(m, means, colors[m], xs=xs(ev.n_layers, centres)))
            base_lines.append(svg.HLine(nanmean(ev.scores(recs, "baseline", modality)), "", colors[m]))
        if series:
            charts.append(svg.line_chart(series, title=f"Fig. 5{letter} · counterfactual {modality} fidelity under G↛V",
                                         x_label=f"window centre ({x_label})", y_label="mean fidelity",
                                         y_range=(0.0, 1.0), x_range=x_range, integer_x=same_depth, hlines=base_lines,
                                         width=360, height=260))
    legend = "".join(f'<span class="swatch" style="background:{c}"></span>{escape(m)}' for m, c in colors.items())
    cap = ("<b>The models on the same axes.</b> Baseline fidelities (normal 95% intervals), the attention share of "
           "generated rows per layer, and the counterfactual fidelities under the G↛V sweep (dashed: each model's "
           f"baseline). {'Both models have ' + str(L0) + ' layers.' if same_depth else 'x is the fraction of depth.'}")
    return ('<section class="card" id="compare"><h2>Models on the same axes</h2>'
            f'<p class="lead">{legend}</p>'
            + _figure("Models compared", f'<div class="figrow">{"".join(charts)}</div>', cap) + "</section>")
