"""Benchmark of the benchmark (not a test): does `capsbench check` stay quiet between same-commit timings?

Times one trained, exported run N times (`capsbench time --force` on copies, one after another), compares every
ordered pair with `capsbench check`'s comparison, and prints the false regressions (every one is false: the
code and models are identical), the other verdicts, and the spread across runs of ONNX Runtime's speedup over
torch eager per batch size. Run it on a machine doing nothing else; the load average is recorded per run.

    .venv/bin/python scripts/same_commit_pairs.py runs/smoke --out /tmp/pairs [--runs 5] [--busy-run 3]

`--busy-run K` times the K-th run beside a process spinning on one core (a disturbed run, to see what `check`
makes of it).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from capsbench.reports.compare import compare_runs


def time_copy(src: Path, out: Path, name: str, busy: bool, extra: list[str], delay_ms: float = 0) -> dict:
    dst = out / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        cmd = [sys.executable, "-m", "capsbench.suite.cli", "time", "--force", "--runs-dir", str(out)]
        cmd += ["--run-id", name, "--preset", json.loads((src / "run.json").read_text())["preset"], *extra]
        if delay_ms:  # the test hook: every ONNX Runtime call this much slower (a setting of the time stage)
            cmd += ["--ort-delay-ms", str(delay_ms)]
        log = (out / f"{name}.log").open("w")
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    return {"run": name, "busy": busy, "seconds": time.perf_counter() - t0, "load_before": load_before,
            "load_after": os.getloadavg()[0]}  # fmt: skip


def speedups(run: Path) -> dict[str, float]:
    out = {}
    for cfg in json.loads((run / "run.json").read_text())["configs"]:
        lat = json.loads((run / cfg["config_id"] / "latency.json").read_text())
        for r in lat["rows"]:
            if r.get("status") == "ok" and r["backend"].startswith("ort") and "speedup_vs_torch_eager" in r:
                out[f"{cfg['config_id']}/{r['variant']}/{r['backend']}/{r['batch']}"] = r[
                    "speedup_vs_torch_eager"
                ]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a finished run folder (trained and exported)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--busy-run", type=int, default=None, help="time this run (1-based) beside a busy process"
    )
    ap.add_argument("--reuse", action="store_true", help="time only the runs not yet in --out, compare all")
    ap.add_argument(
        "--slow-ms",
        type=float,
        default=0,
        help="also time a run with this many ms added to every ONNX Runtime call (a real slowdown) and check it "
        "against each run",
    )
    ap.add_argument("time_args", nargs="*", help="extra arguments for 'capsbench time' (after --)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = [f"run{i + 1}" for i in range(args.runs)]
    timings = []
    for i, name in enumerate(names):
        if not (args.reuse and (args.out / name).exists()):
            rec = time_copy(args.run, args.out, name, args.busy_run == i + 1, args.time_args)
            print(json.dumps(rec), flush=True)
            timings.append(rec)
    verdicts: Counter = Counter()
    false_regressions = []
    for cur, base in itertools.permutations(names, 2):
        result = compare_runs(args.out / cur, args.out / base)
        for ch in result["checks"]:
            if "noise" in ch:
                verdicts[(ch["metric"].split("[")[0], ch["status"])] += 1
        false_regressions += [
            f"{cur} vs {base}: {ch['config']} {ch['metric']}" for ch in result["regressions"]
        ]
    slow = {}
    if args.slow_ms:
        if not (args.reuse and (args.out / "slow").exists()):
            timings.append(time_copy(args.run, args.out, "slow", False, args.time_args, args.slow_ms))
        for base in names:
            for ch in compare_runs(args.out / "slow", args.out / base)["checks"]:
                if ch["metric"].startswith("speedup_vs_eager"):
                    slow.setdefault(ch["metric"].split("/")[-1].rstrip("]"), Counter())[ch["status"]] += 1
    per_run = {n: speedups(args.out / n) for n in names}
    spread = {}
    for key in sorted(set.intersection(*(set(s) for s in per_run.values()))):
        values = [per_run[n][key] for n in names]
        spread[key] = {"min": min(values), "median": statistics.median(values), "max": max(values),
                       "cv": statistics.stdev(values) / statistics.mean(values)}  # fmt: skip
    summary = {
        "pairs": len(names) * (len(names) - 1),
        "false_regressions": false_regressions,
        "verdicts": {f"{m}:{s}": n for (m, s), n in sorted(verdicts.items())},
        "speedup_spread": spread,
        "timings": timings,
        "slow_run_vs_each": {
            f"batch {b}": dict(c) for b, c in sorted(slow.items(), key=lambda kv: int(kv[0]))
        },
    }
    (args.out / "pairs.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['pairs']} ordered pairs, {len(false_regressions)} false regressions")
    for line in false_regressions:
        print("  " + line)
    for k, n in summary["verdicts"].items():
        print(f"  {k}: {n}")
    for batch, counts in summary["slow_run_vs_each"].items():
        print(f"  slow run ({args.slow_ms} ms per ORT call) vs each run, {batch}: {counts}")
    for key, s in spread.items():
        print(f"  {key}: speedup {s['min']:.2f}..{s['max']:.2f} (median {s['median']:.2f}, CV {s['cv']:.3f})")


if __name__ == "__main__":
    main()
