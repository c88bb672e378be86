"""`capsbench all`: the whole benchmark for a preset, then the HTML report and a summary table."""

from __future__ import annotations

import argparse

from capsbench.export.latency import DEFAULT_BATCH_SIZES
from capsbench.reports.load import ReportError
from capsbench.reports.render import render_report
from capsbench.suite import pipeline
from capsbench.suite.cli import options
from capsbench.suite.errors import CapsbenchError, ConfigError
from capsbench.suite.export_stage import TimeSettings
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
        "a stage is recorded (pipeline.json) and the run goes on. Exit code 1 when any config failed.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    options.add_device(p)
    p.add_argument("--only", nargs="+", choices=pipeline.STAGES, default=None, help="run only these stages")
    p.add_argument("--skip", nargs="+", choices=pipeline.STAGES, default=[], help="skip these stages")
    p.add_argument("--seeds", type=int, default=1, help="train every config with N seeds (seed, seed+1, ...)")
    p.add_argument(
        "--prune",
        type=_pair,
        nargs="+",
        default=None,
        metavar="B,C",
        help="(backbone, capsule) pruning ratio pairs (default: the preset's)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        default=None,
        help="fine-tune epochs after pruning (default: the preset's)",
    )
    p.add_argument("--criterion", default="chip", help="channel score: chip, chip-mean or l1 (default: chip)")
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_BATCH_SIZES),
        metavar="N",
        help="batch sizes to time (default: %(default)s)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=TimeSettings.iters,
        help="timed runs per batch size (default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for ORT, C++ and torch (default: all cores)"
    )
    p.add_argument(
        "--provider", default="auto", help="ONNX Runtime provider: auto, cpu or cuda (default: auto)"
    )
    p.add_argument(
        "--baseline", default=None, help="a baseline run folder: the report shows regressions against it"
    )
    p.add_argument("--force", action="store_true", help="redo finished stages")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    preset = get_preset(args.preset)
    if args.seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    configs = [c.replace(seed=c.seed + k) for c in options.select_configs(args) for k in range(args.seeds)]
    stages = tuple(s for s in (args.only or pipeline.STAGES) if s not in args.skip)
    settings = pipeline.PipelineSettings(
        stages=stages,
        prune_pairs=tuple(args.prune or preset.prune_pairs),
        criterion=args.criterion,
        finetune_epochs=preset.finetune_epochs if args.finetune_epochs is None else args.finetune_epochs,
        time=options.time_settings(args),
        device=args.device,
        force=args.force,
        progress=not args.no_progress,
    )
    out = options.run_dir(args)
    records = pipeline.run_all(configs, out, settings, preset=args.preset, data_dir=args.data_dir)
    print(pipeline.format_summary(pipeline.summary_rows(out, records)))
    if "report" in stages:
        try:
            path = render_report(out, baseline_dir=args.baseline)
        except ReportError as e:
            raise CapsbenchError(str(e)) from e
        print(f"report: {path}")
    print(f"results: {out}")
    return 0 if all(r["status"] == "complete" for r in records) else 1
