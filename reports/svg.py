"""Hand-made SVG charts for the report: line, scatter, grouped bars and heatmaps, each with axes, units and legend.

Pure functions from numbers to an SVG string; no plotting library, no external requests, diffable output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f")
WIDTH, HEIGHT = 640, 360
MARGIN = {"left": 64, "right": 170, "top": 36, "bottom": 52}


@dataclass
class Series:
    name: str
    points: list[tuple[float, float]]
    dashed: bool = False
    errors: list[float] = field(default_factory=list)  # +- per point (e.g. std over seeds)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for mult in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * mult) <= n:
            step *= mult
            break
    start = math.floor(lo / step) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


class _Frame:
    """Maps data to pixels inside the plot area; draws axes, grid, labels and the legend."""

    def __init__(self, xs, ys, x_label, y_label, title, log_y=False, x_ticks=None, y_range=None):
        self.log_y = log_y
        self.x0, self.x1 = MARGIN["left"], WIDTH - MARGIN["right"]
        self.y0, self.y1 = HEIGHT - MARGIN["bottom"], MARGIN["top"]
        xs = list(xs) or [0.0, 1.0]
        ys = [y for y in ys if not log_y or y > 0] or [1.0]
        self.xmin, self.xmax = min(xs), max(xs)
        if self.xmax == self.xmin:
            self.xmin, self.xmax = self.xmin - 1, self.xmax + 1
        if log_y:
            lo, hi = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys)))
            self.ymin, self.ymax = lo, max(hi, lo + 1)
            self.y_ticks = [float(e) for e in range(int(self.ymin), int(self.ymax) + 1)]
        else:
            lo, hi = y_range if y_range else (min(ys), max(ys))
            pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
            low = lo if y_range else lo - pad
            if not y_range and lo >= 0 > low:
                low = 0.0  # counts, shares and latencies never go below zero
            ticks = nice_ticks(low, hi + (0 if y_range else pad))
            self.ymin, self.ymax, self.y_ticks = ticks[0], ticks[-1], ticks
        self.x_ticks = x_ticks if x_ticks is not None else nice_ticks(self.xmin, self.xmax)
        self.x_ticks = [t for t in self.x_ticks if self.xmin <= t <= self.xmax]
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">',
            f'<text x="{WIDTH / 2 - MARGIN["right"] / 2}" y="18" text-anchor="middle" font-size="13" '
            f'font-weight="bold">{escape(title)}</text>',
        ]
        self._axes(x_label, y_label)

    def px(self, x: float) -> float:
        return self.x0 + (x - self.xmin) / (self.xmax - self.xmin) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        if self.log_y:
            y = math.log10(max(y, 1e-12))
        return self.y0 - (y - self.ymin) / (self.ymax - self.ymin) * (self.y0 - self.y1)

    def _axes(self, x_label: str, y_label: str) -> None:
        p = self.parts
        for t in self.y_ticks:
            y = self.y0 - (t - self.ymin) / (self.ymax - self.ymin) * (self.y0 - self.y1)
            label = _fmt(10**t) if self.log_y else _fmt(t)
            p.append(f'<line x1="{self.x0}" y1="{y:.1f}" x2="{self.x1}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            p.append(f'<text x="{self.x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        for t in self.x_ticks:
            x = self.px(t)
            p.append(f'<line x1="{x:.1f}" y1="{self.y0}" x2="{x:.1f}" y2="{self.y0 + 4}" stroke="#333"/>')
            p.append(f'<text x="{x:.1f}" y="{self.y0 + 16}" text-anchor="middle">{_fmt(t)}</text>')
        p.append(f'<line x1="{self.x0}" y1="{self.y0}" x2="{self.x1}" y2="{self.y0}" stroke="#333"/>')
        p.append(f'<line x1="{self.x0}" y1="{self.y0}" x2="{self.x0}" y2="{self.y1}" stroke="#333"/>')
        p.append(
            f'<text x="{(self.x0 + self.x1) / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(x_label)}</text>'
        )
        cy = (self.y0 + self.y1) / 2
        p.append(
            f'<text x="16" y="{cy}" text-anchor="middle" transform="rotate(-90 16 {cy})">{escape(y_label)}</text>'
        )

    def legend(self, entries: Sequence[tuple[str, str, bool]]) -> None:
        x = self.x1 + 16
        for i, (name, color, dashed) in enumerate(entries):
            y = self.y1 + 8 + i * 18
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            self.parts.append(
                f'<line x1="{x}" y1="{y}" x2="{x + 22}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>'
            )
            self.parts.append(f'<circle cx="{x + 11}" cy="{y}" r="3" fill="{color}"/>')
            self.parts.append(f'<text x="{x + 28}" y="{y + 4}">{escape(name)}</text>')

    def svg(self) -> str:
        return "\n".join([*self.parts, "</svg>"])


def line_chart(
    series: Sequence[Series],
    x_label: str,
    y_label: str,
    title: str,
    *,
    log_y: bool = False,
    integer_x: bool = False,
    y_range: tuple[float, float] | None = None,
) -> str:
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points] + [
        y + sign * e
        for s in series
        for (_, y), e in zip(s.points, s.errors, strict=False)
        for sign in (-1, 1)
    ]
    ticks = sorted({float(x) for x in xs}) if integer_x else None
    f = _Frame(xs, ys, x_label, y_label, title, log_y=log_y, x_ticks=ticks, y_range=y_range)
    entries = []
    for i, s in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        pts = sorted(s.points)
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        path = " ".join(f"{f.px(x):.1f},{f.py(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            f.parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for j, (x, y) in enumerate(pts):
            f.parts.append(
                f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="3.5" fill="{color}">'
                f"<title>{escape(s.name)}: {_fmt(x)}, {_fmt(y)}</title></circle>"
            )
            if j < len(s.errors) and s.errors[j]:
                e = s.errors[j]
                f.parts.append(
                    f'<line x1="{f.px(x):.1f}" y1="{f.py(y - e):.1f}" x2="{f.px(x):.1f}" '
                    f'y2="{f.py(y + e):.1f}" stroke="{color}"/>'
                )
        entries.append((s.name, color, s.dashed))
    f.legend(entries)
    return f.svg()


def scatter_chart(
    groups: Sequence[Series], x_label: str, y_label: str, title: str, *, log_x: bool = False
) -> str:
    """Points only; with log_x the x values are plotted as log10 and labelled as such."""
    tx = (lambda v: math.log10(max(v, 1e-12))) if log_x else (lambda v: v)
    moved = [Series(g.name, [(tx(x), y) for x, y in g.points]) for g in groups]
    xs = [x for g in moved for x, _ in g.points]
    ys = [y for g in moved for _, y in g.points]
    f = _Frame(xs, ys, (f"log10 {x_label}" if log_x else x_label), y_label, title)
    entries = []
    for i, g in enumerate(moved):
        color = PALETTE[i % len(PALETTE)]
        for (x, y), (ox, _) in zip(g.points, groups[i].points, strict=True):
            f.parts.append(
                f'<circle cx="{f.px(x):.1f}" cy="{f.py(y):.1f}" r="4" fill="{color}" fill-opacity="0.8">'
                f"<title>{escape(g.name)}: {_fmt(ox)}, {_fmt(y)}</title></circle>"
            )
        entries.append((g.name, color, False))
    f.legend(entries)
    return f.svg()


def bar_chart(
    categories: Sequence[str],
    groups: Sequence[tuple[str, Sequence[float | None]]],
    y_label: str,
    title: str,
    x_label: str = "",
    *,
    log_y: bool = False,
) -> str:
    """Grouped bars: one group of bars per category, one colour per group name."""
    ys = [v for _, vals in groups for v in vals if v is not None]
    n = max(len(categories), 1)
    f = _Frame([0, n], ys + ([] if log_y else [0.0]), x_label, y_label, title, log_y=log_y, x_ticks=[])
    slot = (f.x1 - f.x0) / n
    width = slot * 0.8 / max(len(groups), 1)
    base = f.y0
    for c, cat in enumerate(categories):
        f.parts.append(
            f'<text x="{f.x0 + slot * (c + 0.5):.1f}" y="{f.y0 + 16}" text-anchor="middle">'
            f"{escape(cat)}</text>"
        )
        for g, (name, vals) in enumerate(groups):
            v = vals[c] if c < len(vals) else None
            if v is None:
                continue
            x = f.x0 + slot * c + slot * 0.1 + g * width
            y = f.py(v)
            f.parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{width - 1:.1f}" height="{max(base - y, 0):.1f}" '
                f'fill="{PALETTE[g % len(PALETTE)]}"><title>{escape(name)} {escape(cat)}: {_fmt(v)}'
                f"</title></rect>"
            )
    f.legend([(name, PALETTE[g % len(PALETTE)], False) for g, (name, _) in enumerate(groups)])
    return f.svg()


def _heat_color(v: float | None) -> str:
    if v is None:
        return "#f4f4f4"
    v = min(max(v, 0.0), 1.0)  # white (0, all active) -> dark red (1, all inactive)
    r, g, b = 255, int(255 - 200 * v), int(255 - 220 * v)
    return f"rgb({r},{g},{b})"


def heatmap(
    rows: Sequence[str],
    cols: Sequence[str],
    values: Sequence[Sequence[float | None]],
    title: str,
    value_label: str = "fraction inactive",
) -> str:
    """rows x cols cells coloured by a value in [0, 1] (blank: layer absent); each cell shows its value."""
    cell_w, cell_h, left, top = 78, 22, 230, 40
    width = left + cell_w * max(len(cols), 1) + 150
    height = top + max(cell_h * len(rows), 7 * 16 + 30) + 12  # room for the colour legend
    p = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(title)}" font-family="sans-serif" font-size="11">',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for j, col in enumerate(cols):
        p.append(
            f'<text x="{left + cell_w * (j + 0.5)}" y="{top - 6}" text-anchor="middle">{escape(col)}</text>'
        )
    for i, row in enumerate(rows):
        y = top + i * cell_h
        p.append(f'<text x="{left - 6}" y="{y + 15}" text-anchor="end">{escape(row)}</text>')
        for j in range(len(cols)):
            v = values[i][j] if j < len(values[i]) else None
            x = left + j * cell_w
            p.append(
                f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{_heat_color(v)}">'
                f"<title>{escape(row)} / {escape(cols[j])}: {'-' if v is None else f'{v:.2f}'}</title></rect>"
            )
            if v is not None:
                ink = "#fff" if v > 0.6 else "#222"
                p.append(
                    f'<text x="{x + cell_w / 2 - 1}" y="{y + 15}" text-anchor="middle" fill="{ink}">{v:.2f}</text>'
                )
    lx = left + cell_w * max(len(cols), 1) + 16
    for k in range(6):
        v = k / 5
        p.append(
            f'<rect x="{lx}" y="{top + k * 16}" width="16" height="14" fill="{_heat_color(v)}" stroke="#ccc"/>'
        )
        p.append(f'<text x="{lx + 22}" y="{top + k * 16 + 11}">{v:.1f}</text>')
    p.append(f'<text x="{lx}" y="{top + 6 * 16 + 14}">{escape(value_label)}</text>')
    p.append(f'<text x="{lx}" y="{top + 6 * 16 + 28}">blank: no such layer</text>')
    p.append("</svg>")
    return "\n".join(p)
