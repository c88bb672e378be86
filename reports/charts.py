"""The report's charts: matplotlib figures rendered as inline SVG, text kept as text, one style for all.

Figures are built with `matplotlib.figure.Figure` (no pyplot, no GUI backend, no global state) and saved as SVG.
Every data series sits in an SVG group whose id starts with `data-`, every axes background in one starting with
`axes-` (the same chart and axes numbers), so a test can check that each data marker lies inside its axes.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import matplotlib
from cycler import cycler
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

# Okabe & Ito's colour-blind-safe palette (Wong, Nature Methods 8:441, 2011), the palette of many papers' figures.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]

# One style sheet for every chart: seaborn's "ticks" look (no top/right spines, light grid) at paper-figure
# font sizes, with text left as SVG text so the browser renders it and tests can read it.
STYLE = {
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Helvetica", "Arial", "sans-serif"],
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "axes.axisbelow": True,
    "grid.color": "#e5e5e5",
    "grid.linewidth": 0.6,
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.formatter.useoffset": False,
    "lines.linewidth": 1.4,
    "lines.markersize": 5,
    "errorbar.capsize": 3,
    "figure.constrained_layout.use": True,
    "figure.facecolor": "white",
}

LINESTYLES = {"unpruned": "-", "pruned": "--"}  # any other variant (a control) is dotted
MARKERS = {"unpruned": "o", "pruned": "^"}


def variant_style(variant: str) -> tuple[str, str]:
    return LINESTYLES.get(variant, ":"), MARKERS.get(variant, "s")


@dataclass
class Series:
    """One line of points; `values[i]` holds every seed's value at `x[i]` (mean drawn, spread as band/bars)."""

    label: str
    x: list[float]
    values: list[list[float]]
    color: str | None = None
    variant: str = "unpruned"
    point_labels: list[str] = field(default_factory=list)
    lo: list[float] | None = None  # an explicit spread (e.g. min and p90 of a timing) instead of the seeds'
    hi: list[float] | None = None

    @property
    def mean(self) -> list[float]:
        return [sum(v) / len(v) for v in self.values]

    @property
    def seeds(self) -> int:
        return max((len(v) for v in self.values), default=0)


def _plain(v: float, _pos=None) -> str:
    """Tick labels without exponents: 0.001, 0.5, 1, 1000."""
    return f"{v:g}" if 1e-4 <= abs(v) < 1e6 or v == 0 else f"{v:.0e}"


LOG_FLOOR = 1e-12  # the lowest value a log axis shows; smaller values (vanished capsules: 0) are drawn here


def _to_svg(fig: Figure, chart_id: str) -> str:
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": chart_id}):  # ids unique per chart and stable across runs
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    # Natural size (width/height in pt) kept, shrunk by CSS on narrow screens.
    text = re.sub(r"<svg ", '<svg class="chart" ', text, count=1)
    return text


def _mark_axes(ax, chart_id: str, a: int) -> None:
    ax.patch.set_gid(f"axes-{chart_id}-a{a}")


def _draw_series(ax, s: Series, chart_id: str, a: int, i: int, band: bool, log_y: bool) -> None:
    ls, marker = variant_style(s.variant)
    mean = s.mean
    if log_y:
        # A capsule length of 0 (or below the floor) has no place on a log axis: draw it at the floor, inside
        # the axes, instead of a line running off the chart (the caption says so).
        mean = [max(m, LOG_FLOOR) for m in mean]
    (line,) = ax.plot(s.x, mean, ls=ls, marker=marker, color=s.color, label=s.label, clip_on=False)
    line.set_gid(f"data-{chart_id}-a{a}-s{i}")
    lo: list[float] | None
    hi: list[float] | None
    if s.lo is not None and s.hi is not None:
        lo, hi = s.lo, s.hi
    elif s.seeds > 1:
        lo = [min(v) for v in s.values]
        hi = [max(v) for v in s.values]
    else:
        lo = hi = None
    if lo is not None and hi is not None:
        if log_y:
            lo, hi = [max(v, LOG_FLOOR) for v in lo], [max(v, LOG_FLOOR) for v in hi]
        if band:
            ax.fill_between(s.x, lo, hi, color=line.get_color(), alpha=0.18, lw=0).set_gid(
                f"spread-{chart_id}-a{a}-s{i}"
            )
        else:
            # max(0, ...): the mean of equal values can round a hair past them (three seeds all at 10.70 %)
            err = [
                [max(0.0, m - lo_) for m, lo_ in zip(mean, lo, strict=True)],
                [max(0.0, h - m) for m, h in zip(mean, hi, strict=True)],
            ]
            bars = ax.errorbar(s.x, mean, yerr=err, fmt="none", ecolor=line.get_color(), elinewidth=1)
            for j, part in enumerate(bars.lines[2]):
                part.set_gid(f"spread-{chart_id}-a{a}-s{i}-{j}")
    for x, y, text in zip(s.x, mean, s.point_labels, strict=False):
        if text:
            ax.annotate(text, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, color="#333")


def _fit(ax, series: Sequence[Series], log_y: bool, log_x: bool, pad: float = 0.08) -> None:
    """Axis limits that hold every point and every spread with a margin (no clipped data)."""
    ys = [y for s in series for v in s.values for y in v]
    ys += [y for s in series for y in (s.lo or []) + (s.hi or [])]
    xs = [x for s in series for x in s.x]
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    if log_y:
        lo, hi = max(lo, LOG_FLOOR), max(hi, LOG_FLOOR)
        ratio = max(hi / lo, 1.5)
        ax.set_yscale("log")
        ax.set_ylim(lo / ratio**pad, hi * ratio ** (2.5 * pad))
        # Label 1-2-5 steps when the data spans less than two decades: a lone "1" tells nothing.
        subs = (1.0, 2.0, 5.0) if hi / lo < 100 else (1.0,)
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
    else:
        span = (hi - lo) or max(abs(hi), 1.0) * 0.05
        ax.set_ylim(lo - pad * span, hi + pad * span * 2.5)  # room above for point labels
    if log_x:
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(xs) / 1.4, max(xs) * 1.6)
        ax.set_xticks(sorted(set(xs)), [_plain(x) for x in sorted(set(xs))])
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _p: ""))
    else:
        span = (max(xs) - min(xs)) or 1.0
        ax.set_xlim(min(xs) - pad * span, max(xs) + pad * span * 1.5)


@dataclass
class Panel:
    """One axes of a figure: its series and how to draw them."""

    series: Sequence[Series]
    xlabel: str
    ylabel: str
    title: str
    log_y: bool = False
    log_x: bool = False
    band: bool = False  # seeds' spread as a band (True) or as error bars
    xticks: Sequence[tuple[float, str]] | None = None
    ylim: tuple[float, float] | None = None  # a fixed range, e.g. a fraction's (0, 1)


def panels(
    chart_id: str, specs: Sequence[Panel], size: tuple[float, float] = (9.6, 3.5), legend: bool = True
) -> str:
    """Line charts side by side: each series' mean over seeds with markers, the spread as error bars or a band."""
    # STYLE's keys are rcParams names; matplotlib's stubs want a dict keyed by their Literal of every name.
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
        fig = Figure(figsize=size)
        axes = fig.subplots(1, len(specs), squeeze=False)[0]
        for a, (ax, p) in enumerate(zip(axes, specs, strict=True)):
            _mark_axes(ax, chart_id, a)
            for i, s in enumerate(p.series):
                _draw_series(ax, s, chart_id, a, i, p.band, p.log_y)
            _fit(ax, p.series, p.log_y, p.log_x)
            if p.ylim:
                ax.set_ylim(*p.ylim)
            if p.xticks:
                ax.set_xticks([x for x, _ in p.xticks], [t for _, t in p.xticks])
            elif not p.log_x:
                ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.set(xlabel=p.xlabel, ylabel=p.ylabel, title=p.title)
        handles, labels = axes[0].get_legend_handles_labels()
        if legend and handles:
            if len(labels) > 6:  # a long legend beside the panels crowds them: put it underneath
                fig.legend(handles, labels, loc="outside lower center", ncols=min(5, (len(labels) + 1) // 2))
            else:
                fig.legend(handles, labels, loc="outside right upper")
        return _to_svg(fig, chart_id)


def scatter_chart(
    chart_id: str,
    groups: Sequence[tuple[str, list[tuple[float, float, str]]]],
    xlabel: str,
    ylabel: str,
    title: str,
    *,
    arrows: Sequence[tuple[tuple[float, float], tuple[float, float]]] = (),
    log_x: bool = False,
    size: tuple[float, float] = (5.6, 3.6),
) -> str:
    """Labelled points, one marker style per group (unpruned, pruned, controls); arrows parent -> pruned."""
    # STYLE's keys are rcParams names; matplotlib's stubs want a dict keyed by their Literal of every name.
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
        fig = Figure(figsize=size)
        ax = fig.subplots()
        _mark_axes(ax, chart_id, 0)
        xs, ys = [], []
        for i, (name, pts) in enumerate(groups):
            _, marker = variant_style(name)
            sc = ax.scatter(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker=marker,
                s=30,
                label=name,
                clip_on=False,
                zorder=3,
            )
            sc.set_gid(f"data-{chart_id}-a0-s{i}")
            for x, y, text in pts:
                ax.annotate(text, (x, y), xytext=(5, 4), textcoords="offset points", fontsize=7, color="#333")
                xs.append(x)
                ys.append(y)
        for (x0, y0), (x1, y1) in arrows:
            ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": "#888", "lw": 0.8})
        if xs:
            if log_x:
                ax.set_xscale("log")
                lo, hi = min(xs), max(xs)
                ax.set_xlim(lo / 1.25, hi * 1.6)
                ax.xaxis.set_major_formatter(FuncFormatter(_plain))
                ax.xaxis.set_minor_formatter(FuncFormatter(_plain))
            else:
                span = (max(xs) - min(xs)) or max(xs) * 0.1 or 1.0
                ax.set_xlim(min(xs) - 0.1 * span, max(xs) + 0.3 * span)
            span = (max(ys) - min(ys)) or 1.0
            ax.set_ylim(min(ys) - 0.15 * span, max(ys) + 0.2 * span)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(loc="best")
        return _to_svg(fig, chart_id)
