"""`capsbench check RUN_DIR --baseline BASE | --history FILE`: exit non-zero when accuracy, health, parity or
latency regressed.

Against a baseline run (reports/compare.py): latency is compared as ratios to torch eager from the same run, and
as absolute p50 only on the same machine. Against a history (suite/history.py): every gated metric against the
last --window comparable runs (robust z-score over the history's own noise, plus change points); --confirm
re-times what it would flag and keeps only what the rerun confirms. Both may be given: the check fails when
either does.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from capsbench.files import atomic_write
from capsbench.reports.compare import Tolerances, compare_runs
from capsbench.reports.completeness import completeness_problems
from capsbench.reports.load import ReportError
from capsbench.results import CheckStatus
from capsbench.suite.cli.options import add_data_dir, nonnegative_float, nonnegative_int, positive_int
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
        "tolerance and the noise. With --history FILE (instead of, or beside, --baseline) every gated metric is "
        "judged against the last --window runs of the same preset, config and machine in the history: "
        "REGRESSED when it is worse than the tolerance against the window's median (a step) or against the "
        "median of its oldest quarter (a slow drift) AND its robust z-score (change over the history's noise, "
        "1.4826 MAD of successive differences / sqrt 2) lies beyond 4; 'no history yet' for a config with fewer "
        "than 3 comparable runs. See docs/history.md.",
    )
    p.add_argument("run_dir", type=Path, help="the run to check")
    p.add_argument("--baseline", type=Path, default=None, help="the baseline run folder")
    p.add_argument(
        "--history",
        type=Path,
        default=None,
        help="a history file ('capsbench history add'): judge the run against its last --window comparable runs",
    )
    p.add_argument(
        "--window",
        type=positive_int,
        default=20,
        help="with --history: how many of the latest comparable runs to judge against (default: %(default)s)",
    )
    p.add_argument(
        "--confirm",
        action="store_true",
        help="with --history: time the configs with a latency regression again, once, in fresh processes "
        "(on a copy of their folders) and report a regression only where the rerun regresses too",
    )
    p.add_argument(
        "--format",
        choices=("text", "markdown"),
        default="text",
        help="text (default): one line per check; markdown: a summary table for a CI job's summary page",
    )
    add_data_dir(p)
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


LABELS = {
    CheckStatus.REGRESSED: "REGRESSED",
    CheckStatus.UNSTABLE: "UNSTABLE",
    CheckStatus.NOT_GATED: "NOT GATED",
    CheckStatus.NOISY: "NOISY",
    CheckStatus.DISTURBED: "DISTURBED",
    CheckStatus.INFO: "info",
    CheckStatus.NO_HISTORY: "no history yet",
    CheckStatus.OK: "ok",
}


def format_check(ch: dict) -> str:
    """One gate: its verdict, the two values, the tolerance and (for latency) the noise and what it compares."""
    label = LABELS.get(ch["status"], "ok")
    base = (
        f"history median {ch['baseline']} ({ch['history_runs']} runs)"
        if "history_runs" in ch
        else f"baseline {ch['baseline']}"
    )
    line = f"{label:<9} {ch['config']} {ch['metric']}: {base} -> {ch['current']} (tolerance {ch['tolerance']}"
    if "noise" in ch:
        line += f"; noise: {ch['noise']}" + (f"; {ch['gate']}" if ch.get("gate") else "")
    return line + ")"


def _summary(result: dict) -> str:
    kinds = Counter(ch["status"] for ch in result["not_gated"])
    why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(kinds.items()))
    line = (
        f"{len(result['checks'])} checks, {len(result['regressions'])} regressions, "
        f"{len(result['not_gated'])} not gated{f' ({why})' if why else ''}"
    )
    if "history" in result:
        new = result["no_history"]
        line += f", {len(new)} config(s) with no history yet" if new else ""
        line += f" (history {result['history']}, window {result['window']}, machine {result['machine_id']})"
        if "confirm" in result:
            c = result["confirm"]
            line += (
                f"; --confirm re-timed {len(c['retimed'])} config(s): {len(c['confirmed'])} confirmed, "
                f"{len(c['withdrawn'])} withdrawn"
            )
    elif result["same_machine"]:
        line += " (same machine)"
    else:
        line += " (different machines: latency compared machine-normalised, as same-run ratios only)"
    return line


def markdown(results: list[tuple[str, dict]]) -> str:
    """A summary for a CI job's page per comparison: the verdict, the count of each verdict, one table row per
    check that needs a look (REGRESSED, NOISY, UNSTABLE, DISTURBED, NOT GATED), the configs with no history
    yet, missing configs and the summary line."""
    out = []
    for title, result in results:
        verdict = "passed" if result["ok"] else "**failed**"
        out.append(f"### capsbench check against {title}: {verdict}\n")
        counts = Counter(LABELS.get(ch["status"], ch["status"]) for ch in result["checks"])
        out.append(" · ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + "\n")
        quiet = (CheckStatus.OK, CheckStatus.INFO, CheckStatus.NO_HISTORY)
        shown = [ch for ch in result["checks"] if ch["status"] not in quiet]
        if shown:
            out.append("| verdict | config | metric | reference | current | tolerance | noise |")
            out.append("|---|---|---|---|---|---|---|")
            for ch in shown:
                cells = [
                    LABELS.get(ch["status"], ch["status"]),
                    f"`{ch['config']}`",
                    f"`{ch['metric']}`",
                    str(ch["baseline"]),
                    str(ch["current"]),
                    str(ch["tolerance"]),
                    str(ch.get("noise", "")),
                ]
                out.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
            out.append("")
        if result.get("no_history"):
            new = ", ".join(f"`{c}`" for c in result["no_history"])
            out.append(f"- no history yet (fewer than 3 comparable runs) for some metrics of: {new}")
        for cid in result["missing_configs"]:
            out.append(f"- MISSING `{cid}`: in the reference, not in this run")
        out.append(_summary(result) + "\n")
    return "\n".join(out)


def run(args) -> int:
    if args.baseline is None and args.history is None:
        raise CapsbenchError("check needs --baseline RUN_DIR, --history FILE, or both")
    if args.confirm and args.history is None:
        raise CapsbenchError(
            "--confirm needs --history (it confirms the history check's latency regressions)"
        )
    results: list[tuple[str, dict]] = []
    if args.baseline is not None:
        results.append((f"baseline {args.baseline}", _baseline(args)))
    if args.history is not None:
        results.append((f"history {args.history}", _history(args)))
    if args.json:
        data = (
            results[0][1]
            if len(results) == 1 and args.history is None
            else {
                "baseline": next((r for t, r in results if t.startswith("baseline")), None),
                "history": next((r for t, r in results if t.startswith("history")), None),
                "ok": all(r["ok"] for _, r in results),
            }
        )
        atomic_write(args.json, lambda f: f.write(json.dumps(data, indent=2, default=str) + "\n"))
    if args.format == "markdown":
        print(markdown(results))
    else:
        for _, result in results:
            for ch in result["checks"]:
                print(format_check(ch))
            for cid in result["missing_configs"]:
                print(
                    f"MISSING   {cid}: in the {'history' if 'history' in result else 'baseline'}, not in this run"
                )
            print(_summary(result))
    return 0 if all(r["ok"] for _, r in results) else 1


def _tolerances(args) -> dict:
    """The gates' tolerances from the options, the same for a baseline and a history."""
    fields = (
        "accuracy_drop",
        "inactive_rise",
        "speedup_drop",
        "latency_rise",
        "machine_shift",
        "gate_absolute",
    )
    return {f: getattr(args, f) for f in fields}


def _history(args) -> dict:
    from capsbench.suite.history import HistoryTolerances, check_history, confirm

    tol = HistoryTolerances(**_tolerances(args), window=args.window)
    result = check_history(args.run_dir, args.history, tol)
    if args.confirm:
        result = confirm(args.run_dir, args.history, result, tol, args.data_dir)
    return result


def _baseline(args) -> dict:
    tol = Tolerances(**_tolerances(args))
    try:
        if problems := completeness_problems(args.run_dir, args.baseline):
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise CapsbenchError(f"cannot compare: {problems[0]}{more}")
        return compare_runs(args.run_dir, args.baseline, tol)
    except ReportError as e:
        raise CapsbenchError(str(e)) from e
