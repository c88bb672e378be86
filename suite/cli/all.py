"""`capsbench all`: the whole benchmark for a preset, then the HTML report and a summary table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capsbench.suite import plan, stages
from capsbench.suite.cli import options, summary
from capsbench.suite.errors import ConfigError
from capsbench.suite.presets import get_preset


def _pair(text: str) -> tuple[float, float]:
    try:
        b, c = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected BACKBONE,CAPS ratios like 0.5,0.25, got {text!r}"
        ) from None
    if not (0 <= b < 1 and 0 <= c < 1):
        raise argparse.ArgumentTypeError(f"ratios must lie in [0, 1), got {text!r}")
    return b, c


def register(sub) -> None:
    p = sub.add_parser(
        "all",
        help="run every stage for a preset and write the report",
        description="For every config of a preset: train -> health -> prune + fine-tune -> health -> export to "
        "ONNX -> parity -> time (ONNX Runtime from Python and from the C++ runner, torch eager), then write "
        "report.html. Every stage caches its results, so rerunning resumes a killed run; a config that fails "
        "a stage is recorded (its message in pipeline.json, its traceback in error.txt) and the run goes on. Exit code "
        "1 when a config failed, 2 when one needs a fix from you (a missing or corrupt file, an unavailable "
        "provider).",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    options.add_device(p)
    p.add_argument("--only", nargs="+", choices=stages.NAMES, default=None, help="run only these stages")
    p.add_argument("--skip", nargs="+", choices=stages.NAMES, default=[], help="skip these stages")
    p.add_argument(
        "--seeds",
        type=options.positive_int,
        default=None,
        help="train every config with N seeds (seed, seed+1, ...; default: the preset's)",
    )
    p.add_argument(
        "--prune",
        type=_pair,
        nargs="+",
        default=None,
        metavar="B,C",
        help="(backbone, capsule) pruning ratio pairs (default: the preset's)",
    )
    options.add_pruning(p, defaults="the preset's")
    p.add_argument(
        "--timed-configs",
        type=int,
        default=None,
        metavar="N",
        help="export and time only the first N configs (default: the preset's; 0: all)",
    )
    options.add_timing(p)
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a baseline run folder: the report shows regressions against it",
    )
    p.add_argument(
        "--history",
        type=Path,
        default=None,
        help="a history file (SQLite, created when absent): add the finished run to it, draw its trend page "
        "beside the report (trend.html) and link it from the report (docs/history.md)",
    )
    options.add_training(p, compile_flag="--train-compile")
    p.add_argument("--force", action="store_true", help="redo finished stages")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: every config in this process, one after another; ray: each config's train -> prune -> "
        "export chain as a task on a Ray cluster (one GPU or CPU each), then the timing stages on this machine "
        "one config at a time (needs pip install 'capsbench[ray]'; default: %(default)s)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --executor ray: the cluster's address, e.g. 10.0.0.5:6379 (default: $RAY_ADDRESS, else a "
        "Ray instance started on this machine for the run)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=2,
        help="with --executor ray: how often a config whose worker died is retried (default: %(default)s)",
    )
    p.set_defaults(func=run)


def _executor(args):
    if args.executor == "local":
        if args.address is not None:
            raise ConfigError("--address needs --executor ray")
        return None
    from capsbench.suite.executors import ray as ray_executor

    ray_executor.check_installed()
    return ray_executor.make(args.address, args.max_retries)


def run(args) -> int:
    executor = _executor(args)
    preset = get_preset(args.preset)
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    strata = options.select_strata(args)
    names = plan.with_implied(args.only or stages.NAMES, args.skip)
    pairs = tuple(args.prune) if args.prune else None
    the_plan = plan.make_plan(
        strata,
        names,
        preset.timed_configs if args.timed_configs is None else args.timed_configs,
        prune_for=lambda st: options.prune_settings(args, st.prune or preset.prune, pairs=pairs),
    )
    if sum(bool(step.configs) for step in the_plan.steps) > 1:  # more than one config step: say how it splits
        print("plan: " + "; ".join(the_plan.describe()), flush=True)
    settings = options.stage_settings(
        args,
        prune=preset.prune,
        time=options.time_settings(args),
        report=stages.ReportSettings(baseline=args.baseline),
        train=options.training_settings(args),
    )
    out = options.run_dir(args)
    result = plan.execute(
        the_plan,
        settings,
        lambda configs, names, step_settings: options.run_stages(
            args, configs, names, step_settings, executor=executor
        ),
    )
    if args.history is not None:
        _record_history(out, args.history, result)
    print(summary.format_summary(summary.summary_rows(out, [r["config_id"] for r in result.records])))
    if (report := result.results.get("", {}).get("report")) is not None:
        print(f"report: {report}")
    print(f"results: {out}")
    return result.exit_code


def _record_history(out: Path, history: Path, result) -> None:
    """Add the finished run to the history, draw the trend page beside the report and link it from the report."""
    from capsbench.reports.render import render_report
    from capsbench.reports.trend import HistoryReadError, render_trend
    from capsbench.results import REPORT_FILE, TREND_FILE
    from capsbench.suite.history import add_run

    if result.failures:
        print(f"history: {out} not added to {history}: a stage failed (see above)", file=sys.stderr)
        return
    added = add_run(out, history)
    try:
        trend = render_trend(history, out / TREND_FILE)
    except HistoryReadError as e:
        raise ConfigError(str(e)) from e
    if (out / REPORT_FILE).is_file():
        render_report(out)  # now with the link to the trend page
    print(f"history: {'added to' if added.added else 'already in'} {history}; trend: {trend}")
