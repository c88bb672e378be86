"""Regression checks of a run against a baseline run, from result files only.

Accuracy and activation health on absolute tolerances; latency only as ratios to torch eager measured in the
same run, or as absolute p50 when both runs were measured on the same machine (cross-machine times are noise).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from capsbench.reports.load import eager_p50, load_run


@dataclass(frozen=True)
class Tolerances:
    accuracy_drop: float = 0.01  # absolute: 1 point of test accuracy
    inactive_rise: int = 0  # routed capsules
    speedup_drop: float = 0.20  # relative fall of ORT's speedup over torch eager (same-run ratio)
    latency_rise: float = 0.25  # relative rise of p50, same machine only


def machine_fingerprint(env: dict[str, Any]) -> tuple:
    return (env.get("cpu"), env.get("cpu_count") or env.get("cpu_threads"), env.get("gpu"))


def _speedups(c: dict) -> dict[tuple, float]:
    lat = c.get("latency")
    if not lat:
        return {}
    eager = eager_p50(lat)
    return {
        (r.get("variant"), r["backend"], r["batch"]): eager[(r.get("variant"), r["batch"])] / r["p50_ms"]
        for r in lat["rows"]
        if str(r.get("backend")).startswith("ort")
        and r.get("p50_ms")
        and (r.get("variant"), r["batch"]) in eager
    }


def _p50s(c: dict) -> dict[tuple, float]:
    lat = c.get("latency")
    return {
        (r.get("variant"), r["backend"], r["batch"]): r["p50_ms"]
        for r in (lat or {}).get("rows", [])
        if r.get("p50_ms")
    }


def compare_runs(run_dir: Path, baseline_dir: Path, tol: Tolerances | None = None) -> dict[str, Any]:
    tol = tol or Tolerances()
    cur, base = load_run(Path(run_dir)), load_run(Path(baseline_dir))
    base_by_id = {c["id"]: c for c in base["configs"]}
    same_machine = machine_fingerprint(cur["run"].get("environment", {})) == machine_fingerprint(
        base["run"].get("environment", {})
    )
    checks: list[dict[str, Any]] = []

    def check(cid: str, metric: str, baseline: Any, current: Any, regressed: bool, tolerance: str) -> None:
        checks.append(
            {
                "config": cid,
                "metric": metric,
                "baseline": baseline,
                "current": current,
                "tolerance": tolerance,
                "status": "regressed" if regressed else "ok",
            }
        )

    for c in cur["configs"]:
        b = base_by_id.get(c["id"])
        if b is None:
            continue
        cm, bm = c.get("metrics") or {}, b.get("metrics") or {}
        if bm.get("status") == "complete":
            ok = cm.get("status") == "complete"
            ca, ba = cm.get("test_accuracy"), bm["test_accuracy"]
            check(
                c["id"],
                "test_accuracy",
                ba,
                ca if ok else cm.get("status", "missing"),
                not ok or ca < ba - tol.accuracy_drop,
                f"-{tol.accuracy_drop}",
            )
        if b.get("health") and c.get("health"):
            bi, ci = b["health"]["routed_inactive"], c["health"]["routed_inactive"]
            check(c["id"], "routed_inactive", bi, ci, ci > bi + tol.inactive_rise, f"+{tol.inactive_rise}")
        for name, par in (c.get("parity") or {}).items():
            if par is not None:
                check(
                    c["id"],
                    f"{name}.passed",
                    True,
                    par.get("passed"),
                    par.get("passed") is not True,
                    "must pass",
                )
        bs, cs = _speedups(b), _speedups(c)
        for key in sorted(set(bs) & set(cs), key=str):
            check(
                c["id"],
                f"speedup_vs_eager[{'/'.join(map(str, key))}]",
                round(bs[key], 4),
                round(cs[key], 4),
                cs[key] < bs[key] * (1 - tol.speedup_drop),
                f"-{int(tol.speedup_drop * 100)}%",
            )
        if same_machine:
            bp, cp = _p50s(b), _p50s(c)
            for key in sorted(set(bp) & set(cp), key=str):
                check(
                    c["id"],
                    f"p50_ms[{'/'.join(map(str, key))}]",
                    round(bp[key], 4),
                    round(cp[key], 4),
                    cp[key] > bp[key] * (1 + tol.latency_rise),
                    f"+{int(tol.latency_rise * 100)}%",
                )
    missing = sorted(set(base_by_id) - {c["id"] for c in cur["configs"]})
    regressions = [ch for ch in checks if ch["status"] == "regressed"]
    return {
        "run": str(run_dir),
        "baseline": str(baseline_dir),
        "same_machine": same_machine,
        "tolerances": asdict(tol),
        "checks": checks,
        "regressions": regressions,
        "missing_configs": missing,
        "ok": not regressions and not missing,
    }
