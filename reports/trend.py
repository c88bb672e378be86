"""The history of a benchmark, read from its store file: the statistics that judge a series, and the trend page.

The store is one SQLite file written by `capsbench history add` (suite/history.py owns writing it; its layout,
HISTORY_SCHEMA, is defined here so that this reader and that writer share one definition). This module only
reads it (read-only SQLite connection) and never imports capsbench.suite.

Statistics (used by `capsbench check --history` and by the trend page):
- `noise_sigma`: a series' noise, 1.4826 * MAD of its successive differences / sqrt(2): robust to outliers and,
  unlike the MAD about the median, to a step or a steady drift inside the window (their differences are one
  outlier, or a constant the median of the differences removes).
- `change_points`: PELT (ruptures, least-squares cost) with a BIC-like penalty scaled by that noise, each change
  point kept only when a Welch t-test between its two segments gives p < CHANGE_P (the E-Divisive + t-test idea
  of Hunter / Apache Otava, with a maintained library that needs only numpy and scipy; see docs/history.md).

`render_trend(history, out)` writes one self-contained HTML page: per gated metric and config the value over the
runs (x: commit), the history's band (rolling median +- Z_LIMIT noise), change points marked with their commit,
and a table of open regressions.
"""

from __future__ import annotations

import base64
import html
import io
import math
import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from capsbench.results import CheckStatus

HISTORY_SCHEMA = 1  # the store's layout; a store of a newer one is refused
APPLICATION_ID = 0x43415053  # "CAPS": SQLite's application_id of a capsbench history
SQLITE_MAGIC = b"SQLite format 3\x00"

Z_LIMIT = 4.0  # robust z-score beyond which a change is evidence, not noise
CHANGE_P = 0.001  # Welch t-test p-value below which a change point is kept
PELT_PENALTY = 3.0  # penalty = PELT_PENALTY * sigma^2 * log(n) (BIC would be 2)
MIN_RUNS = 3  # fewer comparable runs: "no history yet"
LOG_FLOOR = 0.03  # noise floor of a latency figure, in log units (about 3 %)

# How each kind of metric is judged: scale ("log": relative changes; "linear": absolute) and its noise floor.
KINDS: dict[str, dict[str, Any]] = {
    "speedup": {"scale": "log", "floor": LOG_FLOOR, "higher_is_better": True},
    "p50": {"scale": "log", "floor": LOG_FLOOR, "higher_is_better": False},
    "accuracy": {"scale": "linear", "floor": 0.002, "higher_is_better": True},  # 0.2 points
    "count": {"scale": "linear", "floor": 0.2, "higher_is_better": False},  # capsules
    "fraction": {"scale": "linear", "floor": 0.005, "higher_is_better": False},
    "parity": {"scale": "linear", "floor": 0.0, "higher_is_better": True},
    "probe": {"scale": "log", "floor": LOG_FLOOR, "higher_is_better": True},
}


class HistoryReadError(Exception):
    """The store cannot be read (not a SQLite file, corrupt, not a capsbench history, newer schema)."""


# ------------------------------------------------------------------------------------------------ reading


def open_store(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A connection to a capsbench history, after refusing anything else: a file that is not SQLite, a corrupt
    database, another program's database, a newer schema. `readonly` opens it so that nothing can be written.
    A new (absent or empty) file is accepted for writing only."""
    path = Path(path)
    if path.is_dir():
        raise HistoryReadError(f"{path}: a folder, not a history file")
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            if f.read(16) != SQLITE_MAGIC:
                raise HistoryReadError(
                    f"{path}: not a capsbench history (not a SQLite file); refused, left as it is"
                )
    elif readonly:
        raise HistoryReadError(f"{path}: no such history; 'capsbench history add' creates it")
    try:
        if readonly:
            con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)
        else:
            con = sqlite3.connect(path, timeout=60, isolation_level=None)
        ok = con.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            con.close()
            raise HistoryReadError(f"{path}: corrupt history ({ok}); refused, left as it is")
        app = con.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as e:
        raise HistoryReadError(f"{path}: corrupt history ({e}); refused, left as it is") from e
    if tables and app != APPLICATION_ID:
        con.close()
        raise HistoryReadError(f"{path}: a SQLite file but not a capsbench history; refused, left as it is")
    if "schema_version" in tables:
        row = con.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else None
        if not isinstance(version, int) or version > HISTORY_SCHEMA:
            con.close()
            raise HistoryReadError(
                f"{path}: history schema {version} is newer than this capsbench's ({HISTORY_SCHEMA}); "
                "upgrade capsbench to use it (the file is left as it is)"
            )
    elif tables:
        con.close()
        raise HistoryReadError(f"{path}: corrupt history (no schema_version table); refused, left as it is")
    return con


@dataclass
class Entry:
    """One run's value of one metric of one config."""

    seq: int
    commit: str | None
    date: str | None
    run_id: str
    value: float
    stable: bool | None
    reason: str | None
    rounds: int | None
    spread: float | None
    probe_drift: float | None


@dataclass
class Series:
    preset: str
    machine_id: str
    config: str
    label: str
    metric: str
    kind: str
    entries: list[Entry] = field(default_factory=list)


def read_series(path: Path, con: sqlite3.Connection | None = None) -> dict[tuple, Series]:
    """Every (preset, machine_id, config, metric) series of the store, its entries in the order they were added
    (the history's order: CI appends runs as commits land)."""
    own = con is None
    con = con or open_store(path, readonly=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "metrics" not in tables:
            return {}
        rows = con.execute(
            "SELECT r.seq, r.commit_sha, r.date, r.run_id, r.preset, r.machine_id, m.config_id, c.label, "
            "m.metric, m.kind, m.value, m.stable, m.reason, m.rounds, m.spread, c.probe_drift "
            "FROM metrics m JOIN runs r ON r.seq = m.run_seq "
            "LEFT JOIN configs c ON c.run_seq = m.run_seq AND c.config_id = m.config_id "
            "ORDER BY r.seq"
        ).fetchall()
    finally:
        if own:
            con.close()
    out: dict[tuple, Series] = {}
    for seq, commit, date, run_id, preset, machine, cid, label, metric, kind, value, stable, *rest in rows:
        key = (preset, machine, cid, metric)
        s = out.setdefault(key, Series(preset, machine, cid, label or "", metric, kind))
        s.label = label or s.label
        reason, rounds, spread, drift = rest
        s.entries.append(
            Entry(
                seq,
                commit,
                date,
                run_id,
                value,
                None if stable is None else bool(stable),
                reason,
                rounds,
                spread,
                drift,
            )  # fmt: skip
        )
    return out


# ------------------------------------------------------------------------------------------------ statistics


def transform(values, scale: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    return np.log(x) if scale == "log" else x


def noise_sigma(x: np.ndarray, floor: float) -> float:
    """The series' noise: 1.4826 * MAD of successive differences / sqrt(2), never below `floor`."""
    if len(x) < 3:
        return floor
    d = np.diff(x)
    mad = float(np.median(np.abs(d - np.median(d))))
    return max(1.4826 * mad / math.sqrt(2), floor)


def change_points(values, scale: str = "log", floor: float = LOG_FLOOR, min_size: int = 2) -> list[dict]:
    """Where the level of a series changed: [{index (first run of the new level), before, after (segment
    means, back on the series' scale), change (relative for "log", absolute for "linear"), p}], PELT with
    a least-squares cost and a penalty of PELT_PENALTY * sigma^2 * log(n), each kept when a Welch t-test of
    its two neighbouring segments says p < CHANGE_P."""
    import ruptures as rpt
    from scipy import stats

    x = transform(values, scale)
    n = len(x)
    if n < 2 * min_size + 1 or not np.all(np.isfinite(x)):
        return []
    sigma = noise_sigma(x, floor)
    if sigma <= 0:
        sigma = 1e-9
    ends = (
        rpt.Pelt(model="l2", min_size=min_size, jump=1)
        .fit(x.reshape(-1, 1))
        .predict(pen=PELT_PENALTY * sigma**2 * math.log(n))
    )
    bounds = [0, *ends]
    out = []
    for i in range(1, len(bounds) - 1):
        a, b = x[bounds[i - 1] : bounds[i]], x[bounds[i] : bounds[i + 1]]
        if np.ptp(np.concatenate([a, b])) == 0:
            continue
        with warnings.catch_warnings():  # nearly identical values (a deterministic metric): p is exact enough
            warnings.simplefilter("ignore", RuntimeWarning)
            p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)  # segments hold min_size >= 2 runs
        if not math.isfinite(p):  # both segments constant: a clean step
            p = 0.0
        if p >= CHANGE_P:
            continue
        before, after = float(np.mean(a)), float(np.mean(b))
        change = math.exp(after - before) - 1 if scale == "log" else after - before
        back = math.exp if scale == "log" else float
        out.append(
            {"index": bounds[i], "before": back(before), "after": back(after), "change": change, "p": p}
        )
    return out


def worse_sign(kind: str) -> int:
    """+1 when a rise is worse (times, inactive capsules), -1 when a fall is (speedups, accuracy)."""
    return -1 if KINDS[kind]["higher_is_better"] else 1


def round_error(rounds, scale: str) -> float:
    """The standard error of a run's figure from its rounds (fresh processes): their standard deviation over
    sqrt(rounds); 0 with fewer than 2 rounds."""
    r = transform([v for v in rounds or () if v and v > 0], scale)
    return float(np.std(r, ddof=1) / math.sqrt(len(r))) if len(r) >= 2 else 0.0


class _Against(NamedTuple):
    """The current value judged against one reference of the history (see judge)."""

    status: CheckStatus
    reference: str  # which reference: the window's median, or that of its oldest runs
    ref: float  # the reference's value, on the metric's own scale
    change: float  # relative (log scale) or absolute (linear) change of the current value from it
    z: float  # robust z-score of that change, signed like the change (> 0: a rise)


def judge(history, current: float, kind: str, tolerance: float, rounds=None) -> dict[str, Any]:
    """The verdict on `current` against `history` (the last N comparable values, oldest first).

    Two references: the window's median (a step) and the median of its oldest quarter (at least MIN_RUNS runs;
    a slow drift, which moves the window's median along with it). Against each the change is measured on the
    kind's scale (relative for times and speedups, absolute for accuracy and counts) and as a robust z-score,
    change / noise_sigma(window). 'regressed' when, against either reference, the change is worse than the
    tolerance AND z lies beyond Z_LIMIT; 'noisy' when it is worse than the tolerance but the history's own
    spread is too wide to tell; 'no_history' below MIN_RUNS values; else 'ok'. The noise is the history's
    (noise_sigma) combined with this run's own between-round error (`rounds`: its figure per round, see
    round_error): a run whose processes disagreed (one round 1.9x, two 1.3x) proves less than one whose
    rounds agree."""
    spec = KINDS[kind]
    if len(history) < MIN_RUNS:
        return {
            "status": CheckStatus.NO_HISTORY,
            "noise": f"{len(history)} comparable run(s) in the history, {MIN_RUNS} needed",
        }
    h = transform(history, spec["scale"])
    c = float(transform([current], spec["scale"])[0])
    own = round_error(rounds, spec["scale"])
    sigma = math.hypot(noise_sigma(h, spec["floor"]), own)
    worse = worse_sign(kind)
    oldest = max(MIN_RUNS, len(h) // 4)
    refs = [("median of the window", float(np.median(h)))]
    if len(h) > oldest:
        refs.append((f"median of its oldest {oldest}", float(np.median(h[:oldest]))))
    if spec["scale"] == "log":
        limit = math.log(1 + tolerance) if worse > 0 else -math.log(max(1 - tolerance, 1e-9))
    else:
        limit = tolerance
    results: list[_Against] = []
    for name, ref in refs:
        d = worse * (c - ref)  # > 0: worse
        z = d / sigma if sigma > 0 else (math.inf if d > 0 else 0.0)
        beyond = d > limit + 1e-12
        status = (
            CheckStatus.REGRESSED
            if beyond and z > Z_LIMIT
            else CheckStatus.NOISY
            if beyond
            else CheckStatus.OK
        )
        change = math.exp(c - ref) - 1 if spec["scale"] == "log" else c - ref
        back = math.exp(ref) if spec["scale"] == "log" else ref
        results.append(_Against(status, name, back, change, worse * z))
    rank = {CheckStatus.REGRESSED: 2, CheckStatus.NOISY: 1, CheckStatus.OK: 0}
    top = max(results, key=lambda r: (rank[r.status], abs(r.z)))
    unit = "%" if spec["scale"] == "log" else ""
    sig = f"{100 * (math.exp(sigma) - 1):.1f}%" if spec["scale"] == "log" else f"{sigma:.4g}"
    shown_change = f"{100 * top.change:+.1f}%" if unit else f"{top.change:+.4g}"
    noise = (
        f"robust z {top.z:+.1f} (limit {Z_LIMIT:g}) against the {top.reference} {top.ref:.4g} "
        f"({shown_change}), noise {sig} from {len(h)} runs" + (" and this run's rounds" if own else "")
    )
    if top.status == CheckStatus.NOISY:
        noise = f"history too noisy to gate: {noise}"
    return {
        "status": top.status,
        "reference": round(float(np.median(h) if spec["scale"] == "linear" else math.exp(np.median(h))), 6),
        "z": round(top.z, 2),
        "change": round(top.change, 4),
        "sigma": sigma,
        "runs": len(h),
        "noise": noise,
    }


# ------------------------------------------------------------------------------------------------ the page


def _usable(e: Entry) -> bool:
    return e.stable is not False


def open_regressions(series: dict[tuple, Series], tolerance: dict[str, float]) -> list[dict]:
    """Change points that made a metric worse by more than its kind's tolerance and whose new level still
    holds: the latest segment is still worse than the one before the change by more than the tolerance."""
    out = []
    for s in series.values():
        spec = KINDS.get(s.kind)
        tol = tolerance.get(s.kind)
        if spec is None or tol is None:
            continue
        entries = [e for e in s.entries if _usable(e)]
        values = [e.value for e in entries]
        if s.kind == "parity":
            continue
        cps = change_points(values, spec["scale"], spec["floor"])
        if not cps:
            continue
        worse = worse_sign(s.kind)
        x = transform(values, spec["scale"])
        last_start = cps[-1]["index"]
        for cp in cps:
            before = transform([cp["before"]], spec["scale"])[0]
            latest = float(np.mean(x[last_start:]))
            d_cp = worse * (transform([cp["after"]], spec["scale"])[0] - before)
            d_now = worse * (latest - before)
            limit = (
                (math.log(1 + tol) if worse > 0 else -math.log(max(1 - tol, 1e-9)))
                if spec["scale"] == "log"
                else tol
            )
            if d_cp > limit and d_now > limit:
                e = entries[cp["index"]]
                out.append(
                    {
                        "preset": s.preset,
                        "machine": s.machine_id,
                        "config": s.config,
                        "label": s.label,
                        "metric": s.metric,
                        "commit": e.commit,
                        "run": e.run_id,
                        "change": cp["change"],
                        "p": cp["p"],
                        "scale": spec["scale"],
                    }
                )
    return out


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _chart(s: Series) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = KINDS[s.kind]
    entries = s.entries
    if not entries:
        return None
    xs = np.arange(len(entries))
    ys = np.asarray([e.value for e in entries], dtype=float)
    usable = np.asarray([_usable(e) for e in entries])
    fig, ax = plt.subplots(figsize=(11, 2.8), layout="constrained")
    # the band: rolling median of the previous runs +- Z_LIMIT noise, on the kind's scale
    lo: list[float] = []
    hi: list[float] = []
    mid: list[float] = []
    for i in range(len(entries)):
        prev = [e.value for e in entries[max(0, i - 20) : i] if _usable(e)]
        if len(prev) < MIN_RUNS:
            lo.append(np.nan)
            hi.append(np.nan)
            mid.append(np.nan)
            continue
        h = transform(prev, spec["scale"])
        m, sd = float(np.median(h)), noise_sigma(h, spec["floor"])
        back = np.exp if spec["scale"] == "log" else (lambda v: v)
        mid.append(back(m))
        lo.append(back(m - Z_LIMIT * sd))
        hi.append(back(m + Z_LIMIT * sd))
    ax.fill_between(
        xs, lo, hi, color="#9ecae1", alpha=0.45, label=f"history band (median +- {Z_LIMIT:g} noise)"
    )
    ax.plot(xs, mid, color="#3182bd", lw=1, label="median of the previous 20 runs")
    ax.plot(xs[usable], ys[usable], "o-", color="#222", ms=3.5, lw=0.8, label=s.metric)
    if (~usable).any():
        ax.plot(xs[~usable], ys[~usable], "x", color="#999", ms=5, label="unstable (not in the band)")
    idx = np.flatnonzero(usable)
    if s.kind != "parity":
        for cp in change_points(ys[usable], spec["scale"], spec["floor"]):
            x = idx[cp["index"]]
            ax.axvline(x, color="#d62728", ls="--", lw=1.2)
            commit = (entries[x].commit or "?")[:8]
            ax.annotate(
                f"{commit} {100 * cp['change']:+.0f}%"
                if spec["scale"] == "log"
                else f"{commit} {cp['change']:+.3g}",
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                color="#d62728",
                fontsize=8,
            )
    ax.set_xticks(xs)
    ax.set_xticklabels(
        [f"{(e.commit or '?')[:7]} {e.run_id[:12]}" for e in entries], rotation=60, fontsize=6, ha="right"
    )
    ax.set_xlabel("commit and run, in the order added")
    ax.set_ylabel(s.metric.split("[")[0])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    out = _png(fig)
    plt.close(fig)
    return out


# Tolerances of the trend page's open regressions: `capsbench check`'s defaults (reports/compare.Tolerances), for
# the kinds it gates by default.
DEFAULT_TOLERANCE = {
    "speedup": 0.20,
    "accuracy": 0.01,
    "count": 0.0,
}  # the gated kinds (p50: --gate-absolute)
# What the page draws: the metrics `check` gates (speedups, accuracy, inactive capsules) and, as context, p50 and
# the machine probe.
DRAWN = ("speedup", "accuracy", "count", "p50", "probe")


def render_trend(history: Path, out: Path, tolerance: dict[str, float] | None = None) -> Path:
    """The trend page of a history file -> `out` (one HTML file, charts as inline PNG)."""
    import jinja2

    from capsbench.files import atomic_write

    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    series = read_series(history)
    groups: dict[tuple, list[dict]] = {}
    for key in sorted(
        series,
        key=lambda k: (
            k[0],
            k[1],
            k[2],
            DRAWN.index(series[k].kind) if series[k].kind in DRAWN else 99,
            k[3],
        ),
    ):
        s = series[key]
        if s.kind not in DRAWN:
            continue
        png = _chart(s)
        if png is None:
            continue
        groups.setdefault((s.preset, s.machine_id, s.config, s.label), []).append(
            {"metric": s.metric, "png": png, "runs": len(s.entries)}
        )
    regressions = open_regressions(series, tol)
    for r in regressions:
        r["change_text"] = f"{100 * r['change']:+.1f}%" if r["scale"] == "log" else f"{r['change']:+.4g}"
    runs = _runs(history)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=jinja2.select_autoescape(["j2", "html"]),
    )
    page = env.get_template("trend.html.j2").render(
        history=str(history),
        groups=[
            {"preset": p, "machine": m, "config": c, "label": lbl, "charts": charts}
            for (p, m, c, lbl), charts in groups.items()
        ],
        regressions=regressions,
        runs=runs,
        z_limit=Z_LIMIT,
        tolerance=tol,
    )
    atomic_write(out, lambda f: f.write(page))
    return out


def _runs(history: Path) -> list[dict]:
    con = open_store(history, readonly=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" not in tables:
            return []
        rows = con.execute(
            "SELECT seq, run_id, commit_sha, date, preset, machine_id, machine FROM runs ORDER BY seq"
        ).fetchall()
    finally:
        con.close()
    return [
        dict(zip(("seq", "run", "commit", "date", "preset", "machine_id", "machine"), r, strict=True))
        for r in rows
    ]


def escape(text: Any) -> str:
    return html.escape(str(text))
