"""The report stage: once per run, after every config, the run folder's results -> report.html."""

from __future__ import annotations

from pathlib import Path

from capsbench.suite.stages.base import Context, Stage


def run(ctx: Context) -> Path:
    from capsbench.reports.render import render_report

    return render_report(ctx.run_dir, baseline_dir=ctx.settings.report.baseline)


def done(ctx: Context) -> bool:
    return False  # cheap, and it reads every config: always written again


STAGE = Stage(
    "report",
    run=run,
    done=done,
    help="the self-contained HTML report of the run",
    per_run=True,
)
