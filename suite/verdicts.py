"""The paper's four claims tested on a run's result files -> verdicts.json at the run's root (read by the report).

`verdicts(configs)` is pure: it takes the configs as reports.load reads them and returns the verdicts; only
`write_verdicts` touches files. Each claim is a paired difference per unit (a config and seed), summarised by its
mean with a seeded 95 % percentile-bootstrap interval and an exact two-sided sign test:

    held          the interval excludes 0 on the claim's side
    did not hold  the interval excludes 0 on the other side, or lies at 0 (every unit's difference is 0)
    inconclusive  the interval contains 0: the effect is within seed noise
    not testable  fewer than MIN_UNITS units, or nothing to test (no unpruned net had an inactive capsule)
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from pathlib import Path

MIN_UNITS = 3
RESAMPLES = 10_000
LEVEL = 0.95
BOOTSTRAP_SEED = 0
RULE = (
    "held: the 95% bootstrap interval of the mean paired difference excludes 0 on the claim's side; did not hold: "
    "it lies at or beyond 0 on the other side; inconclusive: it contains 0 (within seed noise); not testable: "
    f"fewer than {MIN_UNITS} paired units or nothing to test"
)
CLAIMS = (
    "deeper_loses_accuracy",
    "deeper_more_inactive",
    "pruning_fewer_inactive",
    "pruning_better_accuracy",
)


# ---------------------------------------------------------------------------------------------- statistics


def bootstrap_interval(diffs: list[float], level: float = LEVEL, resamples: int = RESAMPLES) -> list[float]:
    """Percentile bootstrap interval of the mean of `diffs` (seeded: the same data give the same interval)."""
    rng = random.Random(BOOTSTRAP_SEED)
    n = len(diffs)
    means = sorted(statistics.fmean(rng.choices(diffs, k=n)) for _ in range(resamples))
    lo = means[int((1 - level) / 2 * resamples)]
    hi = means[min(int((1 + level) / 2 * resamples), resamples - 1)]
    return [lo, hi]


def sign_test(diffs: list[float]) -> float:
    """Exact two-sided sign test p-value over the non-zero differences (1.0 when all are zero)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def paired_verdict(diffs: list[float], direction: int) -> tuple[str, list[float] | None]:
    """The verdict on "the mean difference has the sign `direction`" (+1 or -1), with its interval."""
    if len(diffs) < MIN_UNITS:
        return "not testable", None
    lo, hi = bootstrap_interval(diffs)
    if (direction > 0 and lo > 0) or (direction < 0 and hi < 0):
        return "held", [lo, hi]
    if (direction > 0 and hi <= 0) or (direction < 0 and lo >= 0):
        return "did not hold", [lo, hi]
    return "inconclusive", [lo, hi]


def _entry(claim: str, diffs: list[float], direction: int, test: str, effect_name: str, note: str) -> dict:
    verdict, interval = paired_verdict(diffs, direction)
    if verdict == "not testable" and len(diffs) < MIN_UNITS:
        note = (
            f"{len(diffs)} paired unit(s), fewer than {MIN_UNITS}: too small a run to test this claim; {note}"
        )
    return {
        "claim": claim,
        "verdict": verdict,
        "test": test,
        "n": len(diffs),
        "effect": statistics.fmean(diffs) if diffs else None,
        "effect_name": effect_name,
        "interval": interval,
        "interval_level": LEVEL if interval else None,
        "p_value": sign_test(diffs) if len(diffs) >= MIN_UNITS else None,
        "note": note.strip(),
    }


# ---------------------------------------------------------------------------------------------- the run's units


def _accuracy(c: dict) -> float | None:
    m = c.get("metrics") or {}
    return m.get("test_accuracy") if m.get("status") == "complete" else None


def _inactive(c: dict) -> float | None:
    h = c.get("health")
    return None if not h else h.get("routed_inactive_fraction")


def _depth(c: dict) -> int:
    return len(c["config"]["model"]["intermediate"])


def _shape_key(c: dict) -> str:
    """What a config is apart from its depth: everything but the intermediate layers (seed included)."""
    cfg = dict(c["config"])
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k != "intermediate"}
    return repr(sorted((k, repr(v)) for k, v in cfg.items()))


def _done(c: dict) -> list[dict]:
    return [p for p in c.get("prunes", []) if p.get("status") == "complete"]


def _pruned(c: dict) -> dict | None:
    """The pruned net under test (not a control) with the largest ratios, as the report shows it."""
    done = [p for p in _done(c) if not p.get("control")]
    if not done:
        return None
    return max(
        done, key=lambda p: (p["settings"]["backbone_ratio"] + p["settings"]["caps_ratio"], p["folder"])
    )


def _control(c: dict, name: str, pruned: dict) -> dict | None:
    """The control of `name` beside the pruned net (same ratios; extra_training has none)."""
    for p in _done(c):
        if p.get("control") != name:
            continue
        s, t = p["settings"], pruned["settings"]
        if name == "extra_training" or (s["backbone_ratio"], s["caps_ratio"]) == (
            t["backbone_ratio"],
            t["caps_ratio"],
        ):
            return p
    return None


def _after(p: dict, what: str) -> float | None:
    s = p["summary"]
    if what == "accuracy":
        return s["test_accuracy"]["after_finetune"]
    frac = s.get("routed_inactive_fraction") or {}
    return frac.get("after_finetune")


# ---------------------------------------------------------------------------------------------- the claims


def _deeper(configs: list[dict], claim: str) -> dict:
    value, direction = (_accuracy, -1) if claim == "deeper_loses_accuracy" else (_inactive, +1)
    groups: dict[str, dict[int, dict]] = defaultdict(dict)
    for c in configs:
        if value(c) is not None:
            groups[_shape_key(c)][_depth(c)] = c
    diffs, pairs = [], set()
    for by_depth in groups.values():
        if len(by_depth) >= 2:
            lo, hi = min(by_depth), max(by_depth)
            diffs.append(value(by_depth[hi]) - value(by_depth[lo]))
            pairs.add((lo, hi))
    what = "test accuracy" if claim == "deeper_loses_accuracy" else "inactive fraction of routed capsules"
    depths = ", ".join(f"{a} vs {b}" for a, b in sorted(pairs)) or "none"
    test = (
        f"paired by capsule shape and seed, deepest minus shallowest depth ({depths}): mean difference, "
        f"{int(LEVEL * 100)}% bootstrap interval ({RESAMPLES} resamples), two-sided sign test"
    )
    notes = [] if diffs else ["no capsule shape and seed was trained at two depths"]
    if claim == "deeper_loses_accuracy":
        notes.append("'held': deeper nets are less accurate beyond seed noise; 'did not hold': more accurate")
    note = "; ".join(notes)
    return _entry(claim, diffs, direction, test, f"difference in {what} (deeper - shallower)", note)


def _pruning(configs: list[dict], claim: str) -> dict:
    what, direction = ("accuracy", +1) if claim == "pruning_better_accuracy" else ("inactive", -1)
    units = []  # (config, pruned net)
    for c in configs:
        if (_accuracy(c) is not None) and (p := _pruned(c)) is not None:
            units.append((c, p))
    parent = {"accuracy": _accuracy, "inactive": _inactive}[what]
    # At equal epochs when the run has the control: extra training alone, base + F epochs.
    extra = [(c, p, e) for c, p in units if (e := _control(c, "extra_training", p)) is not None]
    if extra and len(extra) == len(units):
        reference = "the unpruned net trained for the same total epochs (extra_training control)"
        diffs = [_after(p, what) - _after(e, what) for _, p, e in extra]
        had = [_after(e, what) for _, _, e in extra]
    else:
        reference = "the unpruned parent (fewer epochs: confounded with the fine-tuning's extra training)"
        diffs = [_after(p, what) - parent(c) for c, p in units]
        had = [parent(c) for c, _ in units]
    label = "test accuracy" if what == "accuracy" else "inactive fraction of routed capsules"
    test = (
        f"paired per config and seed, pruned minus {reference}: mean difference, {int(LEVEL * 100)}% bootstrap "
        f"interval ({RESAMPLES} resamples), two-sided sign test"
    )
    notes = []
    for name in ("extra_training", "scratch", "random"):
        rows = [
            _after(p, what) - _after(k, what) for c, p in units if (k := _control(c, name, p)) is not None
        ]
        if len(rows) >= MIN_UNITS:
            lo, hi = bootstrap_interval(rows)
            notes.append(
                f"pruned - {name}: {statistics.fmean(rows):+.4f} [{lo:+.4f}, {hi:+.4f}] (n={len(rows)})"
            )
    parent_rows = [_after(p, what) - parent(c) for c, p in units]
    if len(parent_rows) >= MIN_UNITS:
        lo, hi = bootstrap_interval(parent_rows)
        notes.append(f"pruned - parent: {statistics.fmean(parent_rows):+.4f} [{lo:+.4f}, {hi:+.4f}]")
    entry = _entry(
        claim, diffs, direction, test, f"difference in {label} (pruned - reference)", "; ".join(notes)
    )
    if what == "inactive" and units and not any(h and h > 0 for h in had):
        entry.update(verdict="not testable", interval=None, interval_level=None)
        entry["note"] = "no reference net had an inactive capsule to lose. " + entry["note"]
    if not units:
        entry["note"] = "no pruned net in this run. " + entry["note"]
    return entry


def verdicts(configs: list[dict]) -> dict:
    """The verdicts.json payload (without schema_version/kind) for configs as reports.load reads them."""
    return {
        "rule": RULE,
        "min_units": MIN_UNITS,
        "verdicts": [
            _deeper(configs, "deeper_loses_accuracy"),
            _deeper(configs, "deeper_more_inactive"),
            _pruning(configs, "pruning_fewer_inactive"),
            _pruning(configs, "pruning_better_accuracy"),
        ],
    }


def write_verdicts(run_dir: Path) -> Path:
    """Read a run folder's results, test the claims, write verdicts.json at its root; returns its path."""
    from capsbench.reports.load import load_run
    from capsbench.suite.rundir import VERDICTS_FILE, write_json

    run_dir = Path(run_dir)
    return write_json(run_dir / VERDICTS_FILE, "verdicts", verdicts(load_run(run_dir)["configs"]))
