"""Tiny inline-SVG chart helpers for the HTML report (no plotting library, no JavaScript).

Every function returns one self-contained ``<svg>`` string with its text escaped. Numbers
are written with few decimals so a report with many figures stays small. NaN values break a
line rather than being drawn as 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

# Colours shared by the report's figures (and its CSS legend swatches).
ROLE_COLORS = {
    "video": "#e6550d",
    "audio": "#3182bd",
    "image": "#756bb1",
    "query": "#31a354",
    "special": "#969696",
    "generated": "#8c6d31",
}
GRID = "#e5e7eb"
AXIS = "#6b7280"
TEXT = "#374151"


@dataclass(frozen=True)
class Series:
    """One line of a line chart; `lower`/`upper` draw a shaded interval, `marks` filled dots."""

    name: str
    ys: tuple[float, ...]
    color: str
    xs: tuple[float, ...] | None = None  # default 0..n-1
    dash: bool = False
    lower: tuple[float, ...] | None = None
    upper: tuple[float, ...] | None = None
    marks: tuple[bool, ...] | None = None  # True: filled marker (e.g. a significant window)
    width: float = 2.0


@dataclass(frozen=True)
class Region:
    """A shaded rectangle in data coordinates; y bounds None span the whole plot."""

    x0: float
    x1: float
    label: str = ""
    color: str = "#9ca3af"
    y0: float | None = None
    y1: float | None = None
    opacity: float = 0.12
    tag: str = ""  # short text drawn inside the region's top-left corner


@dataclass(frozen=True)
class HLine:
    """A horizontal reference line (e.g. a baseline), dashed by default."""

    y: float
    label: str = ""
    color: str = AXIS
    dash: bool = True


def _n(x: float) -> str:
    """Short number for SVG attributes."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if abs(x) < 1e6 else f"{x:.0f}"


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    if not (_finite(lo) and _finite(hi)) or hi <= lo:
        return [lo] if _finite(lo) else [0.0]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out = []
    v = first
    while v <= hi + step * 1e-6:
        out.append(round(v, 10))
        v += step
    return out


def _fmt_tick(v: float, percent: bool) -> str:
    if percent:
        return f"{v * 100:.0f}%"
    if float(v).is_integer():
        return str(int(v))
    return f"{v:.3g}"


def _svg_open(width: int, height: int, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{escape(label)}"><title>{escape(label)}</title>')


def line_chart(
    series: Sequence[Series],
    *,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    y_range: tuple[float, float] | None = None,
    x_range: tuple[float, float] | None = None,
    regions: Sequence[Region] = (),
    hlines: Sequence[HLine] = (),
    percent: bool = False,
    width: int = 380,
    height: int = 250,
    legend: bool = True,
    integer_x: bool = True,
) -> str:
    """A line chart with axes, grid, optional shaded regions, reference lines and a legend."""
    left, right, top = 46, 10, 24 if title else 10
    n_leg = len(series) + sum(1 for h in hlines if h.label) if legend else 0
    leg_rows = math.ceil(n_leg / 3) if n_leg else 0
    bottom = 36 + 16 * leg_rows
    pw, ph = width - left - right, height - top - bottom
    xs_all = [x for s in series for x in (s.xs or range(len(s.ys)))]
    if x_range is None:
        x_range = (min(xs_all), max(xs_all)) if xs_all else (0.0, 1.0)
    x0, x1 = x_range
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y_range is None:
        vals = [v for s in series for v in (*s.ys, *(s.lower or ()), *(s.upper or ())) if _finite(v)]
        vals += [h.y for h in hlines if _finite(h.y)]
        lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
        lo = min(lo, 0.0)
        y_range = (lo, hi if hi > lo else lo + 1.0)
    y0, y1 = y_range

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        y = min(max(y, y0), y1)  # values outside the range sit on the frame
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [_svg_open(width, height, title or y_label)]
    if title:
        out.append(f'<text x="{left}" y="15" class="ct">{escape(title)}</text>')
    for r in regions:
        ya = py(r.y1) if r.y1 is not None else top
        yb = py(r.y0) if r.y0 is not None else top + ph
        xa, xb = px(max(r.x0, x0)), px(min(r.x1, x1))
        out.append(f'<rect x="{_n(xa)}" y="{_n(ya)}" width="{_n(max(xb - xa, 1))}" height="{_n(max(yb - ya, 1))}" '
                   f'fill="{r.color}" fill-opacity="{r.opacity}"><title>{escape(r.label)}</title></rect>')
        if r.tag:
            out.append(f'<text x="{_n(xa + 3)}" y="{_n(ya + 10)}" class="hx">{escape(r.tag)}</text>')
    for t in nice_ticks(y0, y1):
        y = py(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{_n(y)}" y2="{_n(y)}" stroke="{GRID}"/>'
                   f'<text x="{left - 4}" y="{_n(y + 3)}" text-anchor="end" class="tk">{_fmt_tick(t, percent)}</text>')
    xt = nice_ticks(x0, x1, 8)
    if integer_x:
        xt = sorted({int(round(t)) for t in xt if abs(t - round(t)) < 1e-9} or {int(x0), int(x1)})
    for t in xt:
        x = px(t)
        out.append(f'<line x1="{_n(x)}" x2="{_n(x)}" y1="{top + ph}" y2="{top + ph + 4}" stroke="{AXIS}"/>'
                   f'<text x="{_n(x)}" y="{top + ph + 14}" text-anchor="middle" class="tk">{_fmt_tick(t, False)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="{AXIS}" stroke-width="0.8"/>')
    if x_label:
        out.append(f'<text x="{left + pw / 2:.0f}" y="{top + ph + 27}" text-anchor="middle" class="al">{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text transform="translate(11 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" '
                   f'class="al">{escape(y_label)}</text>')
    for h in hlines:
        if _finite(h.y):
            dash = ' stroke-dasharray="5 4"' if h.dash else ""
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{_n(py(h.y))}" y2="{_n(py(h.y))}" stroke="{h.color}" '
                       f'stroke-width="1.5"{dash}><title>{escape(h.label)}</title></line>')
    for s in series:
        xs = list(s.xs) if s.xs is not None else list(range(len(s.ys)))
        if s.lower is not None and s.upper is not None:
            for seg in _segments(xs, s.lower, s.upper):
                pts = [f"{_n(px(x))},{_n(py(u))}" for x, _, u in seg]
                pts += [f"{_n(px(x))},{_n(py(lo))}" for x, lo, _ in reversed(seg)]
                out.append(f'<polygon points="{" ".join(pts)}" fill="{s.color}" fill-opacity="0.15" stroke="none"/>')
        dash = ' stroke-dasharray="6 4"' if s.dash else ""
        for seg in _segments(xs, s.ys):
            pts = " ".join(f"{_n(px(x))},{_n(py(y))}" for x, y in seg)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{s.color}" stroke-width="{s.width}"{dash}>'
                       f'<title>{escape(s.name)}</title></polyline>')
        if s.marks is not None:
            for x, y, m in zip(xs, s.ys, s.marks):
                if _finite(y):
                    fill = s.color if m else "#fff"
                    out.append(f'<circle cx="{_n(px(x))}" cy="{_n(py(y))}" r="{3.2 if m else 2.4}" fill="{fill}" '
                               f'stroke="{s.color}" stroke-width="1.2"/>')
    if legend and n_leg:
        items = [(s.name, s.color, s.dash) for s in series] + [(h.label, h.color, h.dash) for h in hlines if h.label]
        col_w = pw / 3
        for i, (name, color, dashed) in enumerate(items):
            lx = left + (i % 3) * col_w
            ly = top + ph + 44 + 16 * (i // 3)
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            out.append(f'<line x1="{_n(lx)}" x2="{_n(lx + 16)}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                       f'stroke-width="2.5"{dash}/><text x="{_n(lx + 20)}" y="{ly}" class="lg">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _segments(xs: Sequence[float], *cols: Sequence[float]) -> list[list[tuple[float, ...]]]:
    """Runs of points where every column is finite (NaN breaks the line)."""
    segs: list[list[tuple[float, ...]]] = [[]]
    for row in zip(xs, *cols):
        if all(_finite(v) for v in row[1:]):
            segs[-1].append(row)
        elif segs[-1]:
            segs.append([])
    return [s for s in segs if s]


@dataclass(frozen=True)
class Bar:
    """One bar of a grouped bar chart, with an optional interval."""

    name: str
    value: float
    color: str
    lo: float | None = None
    hi: float | None = None


def bar_chart(
    groups: Sequence[tuple[str, Sequence[Bar]]],
    *,
    title: str = "",
    y_label: str = "",
    y_range: tuple[float, float] = (0.0, 1.0),
    percent: bool = False,
    hlines: Sequence[HLine] = (),
    width: int = 380,
    height: int = 230,
) -> str:
    """Grouped vertical bars with value labels and error bars; NaN bars are marked 'n/a'."""
    left, right, top, bottom = 46, 10, 24 if title else 10, 40
    pw, ph = width - left - right, height - top - bottom
    y0, y1 = y_range

    def py(y: float) -> float:
        y = min(max(y, y0), y1)
        return top + ph - (y - y0) / (y1 - y0) * ph

    out = [_svg_open(width, height, title or y_label)]
    if title:
        out.append(f'<text x="{left}" y="15" class="ct">{escape(title)}</text>')
    for t in nice_ticks(y0, y1):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{_n(py(t))}" y2="{_n(py(t))}" stroke="{GRID}"/>'
                   f'<text x="{left - 4}" y="{_n(py(t) + 3)}" text-anchor="end" class="tk">{_fmt_tick(t, percent)}</text>')
    if y_label:
        out.append(f'<text transform="translate(11 {top + ph / 2:.0f}) rotate(-90)" text-anchor="middle" '
                   f'class="al">{escape(y_label)}</text>')
    gw = pw / max(1, len(groups))
    for gi, (glabel, bars) in enumerate(groups):
        gx = left + gi * gw
        bw = min(34.0, (gw - 12) / max(1, len(bars)))
        start = gx + (gw - bw * len(bars)) / 2
        for bi, b in enumerate(bars):
            x = start + bi * bw
            if not _finite(b.value):
                out.append(f'<text x="{_n(x + bw / 2)}" y="{_n(py(y0) - 4)}" text-anchor="middle" class="tk">n/a</text>')
                continue
            y = py(b.value)
            out.append(f'<rect x="{_n(x + 1)}" y="{_n(y)}" width="{_n(bw - 2)}" height="{_n(py(y0) - y)}" '
                       f'fill="{b.color}"><title>{escape(b.name)}: {_fmt_val(b.value, percent)}</title></rect>')
            if _finite(b.lo) and _finite(b.hi):
                cx = x + bw / 2
                out.append(f'<path d="M{_n(cx)} {_n(py(b.lo))}V{_n(py(b.hi))}M{_n(cx - 3)} {_n(py(b.lo))}h6'
                           f'M{_n(cx - 3)} {_n(py(b.hi))}h6" stroke="#111827" stroke-width="1" fill="none"/>')
            out.append(f'<text x="{_n(x + bw / 2)}" y="{_n(py(max(b.value, b.hi if _finite(b.hi) else b.value)) - 3)}" '
                       f'text-anchor="middle" class="tk">{_fmt_val(b.value, percent)}</text>')
        out.append(f'<text x="{_n(gx + gw / 2)}" y="{top + ph + 14}" text-anchor="middle" class="al">{escape(glabel)}</text>')
    for h in hlines:
        if _finite(h.y):
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{_n(py(h.y))}" y2="{_n(py(h.y))}" stroke="{h.color}" '
                       f'stroke-dasharray="5 4"><title>{escape(h.label)}</title></line>')
    out.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="{AXIS}"/>')
    # legend: one entry per distinct bar name
    seen: dict[str, str] = {}
    for _, bars in groups:
        for b in bars:
            seen.setdefault(b.name, b.color)
    for i, (name, color) in enumerate(seen.items()):
        lx = left + i * (pw / max(1, len(seen)))
        out.append(f'<rect x="{_n(lx)}" y="{top + ph + 22}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{_n(lx + 14)}" y="{top + ph + 31}" class="lg">{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _fmt_val(v: float, percent: bool) -> str:
    return f"{v * 100:.0f}%" if percent else f"{v:.2f}"


def heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    col_colors: Sequence[str],
    col_vmax: Sequence[float],
    row_classes: Sequence[str] | None = None,
    col_groups: Sequence[tuple[str, int, int]] = (),
    scales: Sequence[ColorScale] = (),
    cell: int = 15,
    label_width: int = 120,
    label: str = "",
) -> str:
    """Rows x columns of cells whose opacity is value / col_vmax[column], coloured per column.

    `row_classes` become CSS classes of the row labels (and of each row's group, so a row can
    be highlighted from the page); `col_groups` are (title, first column, end column) headings;
    `scales` are drawn under the cells (what full colour means). Cells carry no tooltips: a
    report with many of them stays small.
    """
    n_rows, n_cols = len(row_labels), len(col_labels)
    head = 36 if col_groups else 18
    scale_h = 30 * len(scales) + (6 if scales else 0)
    width = max(label_width + n_cols * cell + 4, label_width + 250 if scales else 0)
    height = head + n_rows * cell + 4 + scale_h
    out = [_svg_open(width, height, label or "heatmap")]
    for title, a, b in col_groups:
        x = label_width + a * cell
        out.append(f'<text x="{_n(x + (b - a) * cell / 2)}" y="12" text-anchor="middle" class="tk">{escape(title)}</text>'
                   f'<line x1="{x + 1}" x2="{x + (b - a) * cell - 1}" y1="16" y2="16" stroke="{AXIS}"/>')
    for j, lab in enumerate(col_labels):
        out.append(f'<text x="{_n(label_width + j * cell + cell / 2)}" y="{head - 3}" text-anchor="middle" '
                   f'class="hx">{escape(lab)}</text>')
    for i, lab in enumerate(row_labels):
        cls = f' class="{escape(row_classes[i])}"' if row_classes else ""
        y = head + i * cell
        out.append(f'<g data-row="{i}"{cls}><text x="{label_width - 4}" y="{y + cell - 2}" text-anchor="end" '
                   f'class="hy">{escape(lab)}</text>')
        for j in range(n_cols):
            v = values[i][j]
            vm = col_vmax[j] if col_vmax[j] > 0 else 1.0
            op = min(1.0, max(0.0, v / vm)) if _finite(v) else 0.0
            if op >= 0.02:
                out.append(f'<rect x="{label_width + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                           f'fill="{col_colors[j]}" opacity="{op:.1f}"/>')
        out.append("</g>")
    out.append(f'<rect x="{label_width}" y="{head}" width="{n_cols * cell}" height="{n_rows * cell}" fill="none" '
               f'stroke="{GRID}"/>')
    y = head + n_rows * cell + 10
    for sc in scales:
        out.append(color_scale(sc, label_width, y))
        y += 30
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class ColorScale:
    """What a heatmap's colour means: opacity 0 at `lo`, full `color` at `hi`."""

    title: str
    color: str
    hi: float
    lo: float = 0.0
    percent: bool = True


def color_scale(sc: ColorScale, x: float, y: float, steps: int = 6, step_w: int = 18) -> str:
    """A stepped colour bar (SVG fragment) with its end values and title, at (x, y)."""
    out = [f'<text x="{_n(x - 6)}" y="{_n(y + 11)}" text-anchor="end" class="hy">{escape(sc.title)}</text>']
    for i in range(steps):
        op = i / (steps - 1)
        out.append(f'<rect x="{_n(x + i * step_w)}" y="{_n(y)}" width="{step_w}" height="13" fill="{sc.color}" '
                   f'fill-opacity="{op:.2f}" stroke="{GRID}" stroke-width="0.5"/>')
    end = x + steps * step_w
    out.append(f'<text x="{_n(x)}" y="{_n(y + 24)}" class="hx" text-anchor="start">{_fmt_val(sc.lo, sc.percent)}</text>'
               f'<text x="{_n(end)}" y="{_n(y + 24)}" class="hx" text-anchor="end">{_scale_val(sc.hi, sc.percent)}</text>')
    return "".join(out)


def _scale_val(v: float, percent: bool) -> str:
    if percent:
        return f"{v * 100:.0f}%" if v >= 0.1 else f"{v * 100:.1f}%"
    return f"{v:.3g}"
