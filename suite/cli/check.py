"""`capsbench check RUN_DIR --baseline BASE`: exit non-zero when accuracy, health, parity or latency regressed.

Latency is compared as ratios to torch eager from the same run, and as absolute p50 only on the same machine.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from capsbench.files import atomic_write
from capsbench.reports.compare import Tolerances, compare_runs
from capsbench.reports.completeness import completeness_problems
from capsbench.reports.load import ReportError
from capsbench.suite.cli.options import nonnegative_float, nonnegative_int
from capsbench.suite.errors import CapsbenchError


def register(sub) -> None:
    d = Tolerances()
    p = sub.add_parser(
        "check",
        help="regression check of a run against a baseline run (for CI)",
        description="Compare a run with a baseline run config by config. Fails (exit 1) when test accuracy drops "
        "by more than --accuracy-drop, inactive routed capsules rise by more than --inactive-rise, a parity check "
        "fails, ONNX Runtime's speedup over torch eager (measured in the same run) falls by more than "
        "--speedup-drop, or, with --gate-absolute and both runs timed on the same machine, p50 latency rises "
        "by more than --latency-rise (on different machines: a row's fraction of the same run's GEMM rate falls by more "
        "than --speedup-drop). A latency change counts only when the whole 95% bootstrap interval of the "
        "ratio, from both runs' raw timed calls resampled round (process) by round, lies beyond the "
        "tolerance; one whose interval crosses the tolerance is reported as NOISY ('noise too large to gate'), "
        "a measurement marked unstable as UNSTABLE, and a config whose machine probe (fp32 GEMM rate at the start and "
        "end of every timing round) moved by more than --machine-shift within a run or between the two runs on "
        "one machine as DISTURBED: all not gated and never a regression. A config of the baseline missing from the run also fails. Refuses (exit 2) "
        "to compare when either run has a failed stage (pipeline.json), lacks a result file the other has, or "
        "holds a model.onnx that is not the file its export recorded. Prints every check with both values, the "
        "tolerance and the noise.",
    )
    p.add_argument("run_dir", type=Path, help="the run to check")
    p.add_argument("--baseline", type=Path, required=True, help="the baseline run folder")
    p.add_argument(
        "--accuracy-drop",
        type=nonnegative_float,
        default=d.accuracy_drop,
        help=f"absolute (default {d.accuracy_drop})",
    )
    p.add_argument(
        "--inactive-rise",
        type=nonnegative_int,
        default=d.inactive_rise,
        help=f"capsules (default {d.inactive_rise})",
    )
    p.add_argument(
        "--speedup-drop",
        type=nonnegative_float,
        default=d.speedup_drop,
        help=f"relative (default {d.speedup_drop})",
    )
    p.add_argument(
        "--latency-rise",
        type=nonnegative_float,
        default=d.latency_rise,
        help=f"relative (default {d.latency_rise})",
    )
    p.add_argument(
        "--gate-absolute",
        action="store_true",
        help="also fail on absolute p50 rises on the same machine (default: reported only, since a shared "
        "machine's speed shifts between processes by more than one run's noise)",
    )
    p.add_argument(
        "--machine-shift",
        type=nonnegative_float,
        default=d.machine_shift,
        help=f"relative move of the machine probe beyond which latency is not gated (default {d.machine_shift})",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the full comparison as JSON here")
    p.set_defaults(func=run)


def format_check(ch: dict) -> str:
    """One gate: its verdict, the two values, the tolerance and (for latency) the noise and what it compares."""
    label = {
        "regressed": "REGRESSED",
        "unstable": "UNSTABLE",
        "not_gated": "NOT GATED",
        "noisy": "NOISY",
        "disturbed": "DISTURBED",
        "info": "info",
    }.get(ch["status"], "ok")
    line = (
        f"{label:<9} {ch['config']} {ch['metric']}: baseline {ch['baseline']} -> {ch['current']} "
        f"(tolerance {ch['tolerance']}"
    )
    if "noise" in ch:
        line += f"; noise: {ch['noise']}; {ch['gate']}"
    return line + ")"


def run(args) -> int:
    tol = Tolerances(
        accuracy_drop=args.accuracy_drop,
        inactive_rise=args.inactive_rise,
        speedup_drop=args.speedup_drop,
        latency_rise=args.latency_rise,
        machine_shift=args.machine_shift,
        gate_absolute=args.gate_absolute,
    )
    try:
        if problems := completeness_problems(args.run_dir, args.baseline):
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CapsbenchError(f"cannot compare: {problems[0]}{more}")
        result = compare_runs(args.run_dir, args.baseline, tol)
    except ReportError as e:
        raise CapsbenchError(str(e)) from e
    if args.json:
        atomic_write(args.json, lambda f: f.write(json.dumps(result, indent=2) + "\n"))
    for ch in result["checks"]:
        print(format_check(ch))
    for cid in result["missing_configs"]:
        print(f"MISSING   {cid}: in the baseline, not in this run")
    where = (
        "same machine"
        if result["same_machine"]
        else "different machines: latency compared machine-normalised, as same-run ratios only"
    )
    kinds = Counter(ch["status"] for ch in result["not_gated"])
    why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items()))
    print(
        f"{len(result['checks'])} checks, {len(result['regressions'])} regressions, "
        f"{len(result['not_gated'])} not gated{f' ({why})' if why else ''} ({where})"
    )
    return 0 if result["ok"] else 1
