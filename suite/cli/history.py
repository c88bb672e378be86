"""`capsbench history add|report`: remember finished runs in a history file and draw their trends."""

from __future__ import annotations

from pathlib import Path

from capsbench.suite.errors import CapsbenchError


def register(sub) -> None:
    p = sub.add_parser(
        "history",
        help="remember runs in a history file (SQLite) and draw their trends",
        description="A history of runs: 'add' records a finished run's gated metrics (test accuracy, inactive "
        "capsules, parity, ONNX Runtime's speedup over torch eager, p50 of every backend with its rounds and "
        "spread, the machine probe) with its commit, date, preset, config ids and machine fingerprint (CPU, "
        "ISA, cores, GPU) in one SQLite file; 'report' draws it. 'capsbench check RUN --history FILE' judges a "
        "run against it. See docs/history.md.",
    )
    hs = p.add_subparsers(dest="history_command", metavar="ACTION", required=True)
    a = hs.add_parser(
        "add",
        help="record a finished run in the history",
        description="Record a finished run in the history file (created when absent). Adding the same run "
        "twice changes nothing (runs are keyed by a hash of their recorded content); two processes may add at "
        "once. A run with a failed stage or a swapped model.onnx is refused, and so is a history file that is "
        "corrupt, of a newer schema or not a capsbench history (exit 2; the file is never overwritten).",
    )
    a.add_argument("run_dir", type=Path, help="the finished run folder")
    a.add_argument("--history", type=Path, required=True, help="the history file (SQLite)")
    a.set_defaults(func=run_add)
    r = hs.add_parser(
        "report",
        help="draw the history as one self-contained HTML page",
        description="One HTML page (charts as inline PNG, opens offline): per gated metric and config the "
        "value over the runs in the order they were added, labelled by commit, with the history's band "
        "(median of the previous 20 runs +- 4 times their noise), change points (PELT, kept at Welch t-test "
        "p < 0.001) marked with their commit, and a table of the open regressions.",
    )
    r.add_argument("--history", type=Path, required=True, help="the history file (SQLite)")
    r.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    r.set_defaults(func=run_report)


def run_add(args) -> int:
    from capsbench.suite.history import add_run

    a = add_run(args.run_dir, args.history)
    what = "added" if a.added else "already in the history (unchanged)"
    print(
        f"{args.run_dir}: {what}: preset {a.preset}, commit {(a.commit or 'unknown')[:12]}, machine "
        f"{a.machine_id}, {a.configs} config(s), {a.metrics} metrics -> {args.history}"
    )
    return 0


def run_report(args) -> int:
    from capsbench.reports.trend import HistoryReadError, render_trend

    try:
        out = render_trend(args.history, args.output)
    except HistoryReadError as e:
        raise CapsbenchError(str(e)) from e
    print(f"trend page: {out}")
    return 0
