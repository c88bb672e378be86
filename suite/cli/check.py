"""`capsbench check RUN_DIR --baseline BASE`: exit non-zero when accuracy, health, parity or latency regressed.

Latency is compared as ratios to torch eager from the same run, and as absolute p50 only on the same machine.
"""

from __future__ import annotations

import json
from pathlib import Path

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
        "--speedup-drop, or, when both runs were timed on the same machine, p50 latency rises by more than "
        "--latency-rise. A config of the baseline missing from the run also fails. Refuses (exit 2) to compare "
        "when either run has a failed stage (pipeline.json), lacks a result file the other has, or holds a "
        "model.onnx that is not the file its export recorded.",
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
    p.add_argument("--json", type=Path, default=None, help="also write the full comparison as JSON here")
    p.set_defaults(func=run)


def run(args) -> int:
    tol = Tolerances(args.accuracy_drop, args.inactive_rise, args.speedup_drop, args.latency_rise)
    try:
        if problems := completeness_problems(args.run_dir, args.baseline):
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CapsbenchError(f"cannot compare: {problems[0]}{more}")
        result = compare_runs(args.run_dir, args.baseline, tol)
    except ReportError as e:
        raise CapsbenchError(str(e)) from e
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for ch in result["regressions"]:
        print(
            f"REGRESSED {ch['config']} {ch['metric']}: baseline {ch['baseline']} -> {ch['current']} "
            f"(tolerance {ch['tolerance']})"
        )
    for cid in result["missing_configs"]:
        print(f"MISSING   {cid}: in the baseline, not in this run")
    where = (
        "same machine" if result["same_machine"] else "different machines: latency compared as ratios only"
    )
    print(f"{len(result['checks'])} checks, {len(result['regressions'])} regressions ({where})")
    return 0 if result["ok"] else 1
