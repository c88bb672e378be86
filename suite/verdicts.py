"""The claims of the registry (capsbench/claims.py) tested on a run's result files -> verdicts.json at the run's
root (read by the report).

`verdicts(configs)` is pure: it takes the configs as reports.load reads them and returns the verdicts; only
`write_verdicts` touches files. Each claim is tested per stratum (a depth step, a depth, a pruning setting) as
paired differences over units (a capsule shape and seed). The decision comes from an exact two-sided sign test over
the non-tied units, Holm-adjusted across every claim and stratum of the run; the effect is the mean difference with
a seeded BCa bootstrap interval. claims.RULE says how these make the four verdicts.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from capsbench.claims import (
    ALPHA,
    BY_KEY,
    LEVEL,
    MIN_NON_TIED,
    RULE,
    Claim,
    Verdict,
    mean_inactive_fraction,
    routed_fractions,
)
from capsbench.results import Status, model_value

RESAMPLES = 9999
BOOTSTRAP_SEED = 0

# ---------------------------------------------------------------------------------------------- statistics


def sign_test(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test p-value over the non-zero differences (1.0 when all are zero)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    k = min(pos, neg)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def bca_interval(diffs: list[float], level: float = LEVEL) -> list[float]:
    """BCa bootstrap interval of the mean of `diffs` (seeded: the same data give the same interval). All
    differences equal: the interval is that value (no spread to resample); BCa undefined (its acceleration
    cannot be estimated): the percentile interval."""
    from scipy import stats

    if len(set(diffs)) <= 1:
        return [float(diffs[0]), float(diffs[0])] if diffs else [math.nan, math.nan]

    def interval(method: str) -> list[float]:
        res = stats.bootstrap(
            (np.asarray(diffs, dtype=float),),
            np.mean,
            confidence_level=level,
            n_resamples=RESAMPLES,
            method=method,
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        )
        return [float(res.confidence_interval.low), float(res.confidence_interval.high)]

    bca = interval("BCa")
    return bca if all(map(math.isfinite, bca)) else interval("percentile")


def holm(p_values: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of the given p-values (None: not tested, left out of the family)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, running, out = len(tested), 0.0, list(p_values)
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def decide(claim: Claim, interval: list[float], p_holm: float | None) -> Verdict:
    """held / did not hold / inconclusive for a testable stratum (see claims.RULE)."""
    lo, hi = interval
    if p_holm is not None and p_holm < ALPHA and (lo > 0 if claim.direction > 0 else hi < 0):
        return Verdict.HELD
    if (hi < 0 if claim.direction > 0 else lo > 0) or (-claim.margin < lo and hi < claim.margin):
        return Verdict.DID_NOT_HOLD
    return Verdict.INCONCLUSIVE


@dataclass
class Stratum:
    """One claim's paired differences in one stratum, before the run-wide decision."""

    claim: Claim
    stratum: str
    reference: str
    diffs: list[float] = field(default_factory=list)
    units: list[str] = field(default_factory=list)
    untestable: str = ""  # why the stratum cannot move, when it cannot
    notes: list[str] = field(default_factory=list)

    @property
    def non_tied(self) -> int:
        return sum(d != 0 for d in self.diffs)

    def why_not_testable(self) -> str:
        if self.untestable:
            return self.untestable
        if self.non_tied < MIN_NON_TIED:
            return (
                f"{self.non_tied} non-tied unit(s) of {len(self.diffs)}, fewer than {MIN_NON_TIED}: a sign test "
                "cannot decide"
            )
        return ""


# ---------------------------------------------------------------------------------------------- the run's units


def _accuracy(c: dict) -> float | None:
    m = c.get("metrics") or {}
    return m.get("test_accuracy") if m.get("status") == Status.COMPLETE else None


def _depth(c: dict) -> int:
    return len(c["config"]["model"]["intermediate"])


def _shared_inactive_diff(after: dict | None, reference: dict | None) -> float | None:
    """Mean over the routed layers both nets have of (inactive fraction after - reference's)."""
    a, r = routed_fractions(after), routed_fractions(reference)
    shared = [k for k in a if k in r]
    if shared:
        return statistics.fmean(a[k] - r[k] for k in shared)
    x, y = mean_inactive_fraction(after), mean_inactive_fraction(reference)
    return None if x is None or y is None else x - y


def _class_length(health: dict | None) -> float | None:
    for layer in (health or {}).get("layers") or []:
        if layer.get("name") == "class":
            return layer.get("mean_length")
    return None


def _first_dead_layer(health: dict | None) -> int | None:
    """1-based index of the first routed layer with every capsule inactive; layers + 1 when none is."""
    fractions = list(routed_fractions(health).values())
    if not fractions:
        return None
    return next((i + 1 for i, f in enumerate(fractions) if f >= 1.0), len(fractions) + 1)


def _key(c: dict, drop: tuple[str, ...], counts_only: bool = False) -> str:
    """What a config is apart from the model fields in `drop` (seed included)."""
    cfg = dict(c["config"])
    model = {k: v for k, v in cfg["model"].items() if k not in drop}
    if counts_only:
        model["intermediate"] = [layer[0] for layer in cfg["model"].get("intermediate", [])]
    cfg["model"] = model
    return repr(sorted((k, repr(v)) for k, v in cfg.items()))


def _done(c: dict) -> list[dict]:
    return [p for p in c.get("prunes", []) if p.get("status") == Status.COMPLETE]


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
    if what == "accuracy":
        return p["summary"]["test_accuracy"]["after_finetune"]
    return (
        mean_inactive_fraction((p.get("after_finetune") or {}).get("health"))
        if p.get("after_finetune")
        else None
    )


def _partly_alive(fraction: float | None) -> bool:
    return fraction is not None and 0.0 < fraction < 1.0


# ---------------------------------------------------------------------------------------------- the claims


def _deeper(configs: list[dict], claim: Claim) -> list[Stratum]:
    accuracy = claim.key == "deeper_loses_accuracy"
    groups: dict[str, dict[int, dict]] = defaultdict(dict)
    for c in configs:
        if _accuracy(c) is not None and (accuracy or c.get("health")):
            groups[_key(c, ("intermediate",))][_depth(c)] = c
    strata: dict[tuple[int, int], Stratum] = {}
    for by_depth in groups.values():
        depths = sorted(by_depth)
        for a, b in itertools.pairwise(depths):
            lo, hi = by_depth[a], by_depth[b]
            s = strata.setdefault(
                (a, b), Stratum(claim, f"depth {a} -> {b}", f"the same shape and seed at depth {a}")
            )
            if accuracy:
                x, y = _accuracy(hi), _accuracy(lo)
            else:
                x, y = mean_inactive_fraction(hi["health"]), mean_inactive_fraction(lo["health"])
            if x is None or y is None:
                continue
            s.diffs.append(x - y)
            s.units.append(hi["id"])
    return [strata[k] for k in sorted(strata)]


def _dims(configs: list[dict], claim: Claim) -> list[Stratum]:
    """Claim (b): per init, d = 16 minus d = 8 at the same capsule count, depth and seed."""
    groups: dict[str, dict[int, dict]] = defaultdict(dict)
    for c in configs:
        m = c["config"]["model"]
        dims = {m["primary_dim"], *(layer[1] for layer in m.get("intermediate", []))}
        if len(dims) == 1 and _class_length(c.get("health")):
            groups[_key(c, ("primary_dim",), counts_only=True)][m["primary_dim"]] = c
    strata: dict[str, Stratum] = {}
    dead: dict[str, list[int]] = defaultdict(list)
    by_depth: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for by_dim in groups.values():
        if 8 not in by_dim or 16 not in by_dim:
            continue
        small, large = by_dim[8], by_dim[16]
        # A config dict leaves out a field at its legacy value (results.LEGACY_MODEL_VALUES): no caps_init is fan_in.
        init = model_value(large["config"]["model"], "caps_init")
        s = strata.setdefault(
            init, Stratum(claim, f"init {init}", "the same capsule count, depth and seed at d = 8")
        )
        la, ls = _class_length(large["health"]), _class_length(small["health"])
        if not la or not ls:  # a length of exactly 0 has no log: no unit
            continue
        diff = math.log10(la) - math.log10(ls)
        s.diffs.append(diff)
        s.units.append(large["id"])
        by_depth[init].setdefault(_depth(large), []).append(diff)
        fa, fb = _first_dead_layer(large["health"]), _first_dead_layer(small["health"])
        if fa is not None and fb is not None:
            dead[init].append(fa - fb)
    for init, s in strata.items():
        s.notes.append(
            "log10 length d16 - d8 by depth: "
            + ", ".join(
                f"{d}: {statistics.fmean(v):+.2f} (n={len(v)})" for d, v in sorted(by_depth[init].items())
            )
        )
        if dead[init]:
            s.notes.append(
                f"first dead layer, d16 - d8: mean {statistics.fmean(dead[init]):+.2f} layers "
                f"(sign test p = {sign_test(dead[init]):.3g}, n = {len(dead[init])})"
            )
        if init == "fan_in":
            s.notes.append(
                "under fan_in the capsule dimension cancels out of each layer's gain at initialisation"
            )
    return [strata[k] for k in sorted(strata)]


def _pruning(configs: list[dict], claim: Claim) -> list[Stratum]:
    what = "accuracy" if claim.key == "pruning_better_accuracy" else "inactive"
    by_stratum: dict[tuple, list[tuple[dict, dict]]] = defaultdict(list)
    for c in configs:
        if _accuracy(c) is None:
            continue
        for p in _done(c):
            if p.get("control"):
                continue
            st = p["settings"]
            key = (_depth(c), st["backbone_ratio"], st["caps_ratio"], p.get("procedure") or "finetune")
            by_stratum[key].append((c, p))
    out = []
    for key in sorted(by_stratum):
        units = by_stratum[key]
        depth, b, cr, procedure = key
        # At equal epochs when every unit has the control: extra training alone, base + F epochs.
        extras = [_control(c, "extra_training", p) for c, p in units]
        equal_epochs = all(extras)
        reference = (
            "the unpruned net trained for the same total epochs (extra_training control)"
            if equal_epochs
            else "the unpruned parent (fewer epochs: confounded with the fine-tuning's extra training)"
        )
        s = Stratum(claim, f"depth {depth}, b{b:.2f} c{cr:.2f}, {procedure}", reference)
        refs = []
        for (c, p), e in zip(units, extras, strict=True):
            by_control = equal_epochs and e is not None
            ref_health = (
                (e.get("after_finetune") or {}).get("health") if by_control and e else c.get("health")
            )
            d: float | None
            if what == "accuracy":
                ref = _after(e, what) if by_control and e else _accuracy(c)
                after = _after(p, what)
                d = None if after is None or ref is None else after - ref
            else:
                d = _shared_inactive_diff((p.get("after_finetune") or {}).get("health"), ref_health)
            if d is None:
                continue
            s.diffs.append(d)
            s.units.append(c["id"])
            refs.append(mean_inactive_fraction(ref_health))
        if what == "inactive" and not any(_partly_alive(f) for f in refs):
            s.untestable = (
                "no reference net in this stratum is partly alive (every one all alive or all dead): nothing "
                "could change"
            )
        for name in ("scratch", "random"):
            pairs = [
                (_after(p, what), _after(k, what))
                for c, p in units
                if (k := _control(c, name, p)) is not None
            ]
            rows = [a - b for a, b in pairs if a is not None and b is not None]
            if len(rows) >= 2:
                lo, hi = bca_interval(rows)
                s.notes.append(
                    f"pruned - {name}: {statistics.fmean(rows):+.4f} [{lo:+.4f}, {hi:+.4f}] (n={len(rows)})"
                )
        out.append(s)
    return out


def _entry(s: Stratum, p_holm: float | None) -> dict:
    claim, why = s.claim, s.why_not_testable()
    interval = None if why or not s.diffs else bca_interval(s.diffs)
    verdict = Verdict.NOT_TESTABLE if why or interval is None else decide(claim, interval, p_holm)
    return {
        "claim": claim.key,
        "source": claim.source,
        "stratum": s.stratum,
        "verdict": verdict,
        "test": (
            f"paired per unit, {claim.difference}, against {s.reference}: exact two-sided sign test over the "
            f"non-tied units, Holm across the run's claims and strata; mean difference with a {int(LEVEL * 100)}% "
            f"BCa bootstrap interval ({RESAMPLES} resamples); equivalence margin ±{claim.margin}"
        ),
        "predicts": claim.predicts,
        "n": len(s.diffs),
        "non_tied": s.non_tied,
        "differences": s.diffs,
        "units": s.units,
        "effect": statistics.fmean(s.diffs) if s.diffs else None,
        "effect_name": claim.difference,
        "interval": interval,
        "interval_level": LEVEL if interval else None,
        "p_value": sign_test(s.diffs) if s.diffs else None,
        "p_holm": p_holm,
        "note": "; ".join([why, *s.notes] if why else s.notes),
    }


BUILDERS = {
    "deeper_loses_accuracy": _deeper,
    "deeper_more_inactive": _deeper,
    "larger_dims_train_deeper": _dims,
    "pruning_fewer_inactive": _pruning,
    "pruning_better_accuracy": _pruning,
}


def verdicts(configs: list[dict]) -> dict:
    """The verdicts.json payload (without schema_version/kind) for configs as reports.load reads them: one entry
    per claim and stratum; a claim with no stratum in the run gets one 'not testable' entry saying why."""
    strata: list[Stratum] = []
    for key, build in BUILDERS.items():
        found = build(configs, BY_KEY[key])
        strata += found or [
            Stratum(BY_KEY[key], "none", "-", untestable="the run has no units for this claim")
        ]
    p_raw = [None if s.why_not_testable() else sign_test(s.diffs) for s in strata]
    p_adj = holm(p_raw)
    return {
        "rule": RULE,
        "min_non_tied": MIN_NON_TIED,
        "alpha": ALPHA,
        "verdicts": [_entry(s, p) for s, p in zip(strata, p_adj, strict=True)],
    }


def write_verdicts(run_dir: Path) -> Path:
    """Read a run folder's results, test the claims, write verdicts.json at its root; returns its path."""
    from capsbench.reports.load import load_run
    from capsbench.results import VERDICTS_FILE, write_json

    run_dir = Path(run_dir)
    return write_json(run_dir / VERDICTS_FILE, "verdicts", verdicts(load_run(run_dir)["configs"]))
