"""`capsbench report RUN_DIR`: render the run's results into one self-contained report.html."""

from __future__ import annotations

from pathlib import Path

from capsbench.reports.load import ReportError
from capsbench.reports.render import render_report
from capsbench.suite.errors import CapsbenchError


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="write the HTML report of a run",
        description="Read a run folder's result files (metrics, health, pruning, export, latency) and write one "
        "self-contained HTML file (inline CSS and SVG charts, no external requests: it opens offline).",
    )
    p.add_argument("run_dir", type=Path, help="a run folder, e.g. runs/smoke")
    p.add_argument(
        "--baseline", type=Path, default=None, help="another run folder to show regressions against"
    )
    p.add_argument("--output", type=Path, default=None, help="where to write (default: RUN_DIR/report.html)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        path = render_report(args.run_dir, args.output, args.baseline)
    except ReportError as e:
        raise CapsbenchError(str(e)) from e
    print(f"report: {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0
