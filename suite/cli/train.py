"""`capsbench train`: train every config of a preset and measure its activation health."""

from __future__ import annotations

from capsbench.suite.cli import options, summary
from capsbench.suite.train import COMPILE_MODES, PRECISIONS


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a preset's configs and measure activation health",
        description="Train every config of a preset (resuming from the last finished epoch when a run is "
        "rerun) and write runs/<run-id>/<config-id>/{config.json, checkpoint.pt, metrics.json, health.json}. "
        "A config whose loss diverges is recorded as such and the run goes on; the exit code is 1 then.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    options.add_device(p)
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="auto",
        choices=("off", *COMPILE_MODES),
        metavar="MODE",
        help="torch.compile for training. auto (the default): time the first 4 steps eager and compile for the "
        "rest only when the steps left would save at least twice a compile's cost (measured on 2 CPU threads: "
        "a compiled step takes 0.65-1.0 x an eager one on the quick and sabour nets, a first compile 16-40 s: "
        "there the quick and sabour grids compile, the smoke and depth grids train eager); the decision is "
        "recorded in metrics.json. off: eager. --compile alone or MODE default, max-autotune, or on CUDA "
        "reduce-overhead (CUDA graphs, untested here): always compile",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: autocast the forward and the loss to bfloat16 (weights, Adam, squash, capsule lengths and "
        "evaluation stay fp32). Recorded in metrics.json: a config trained in the other precision is trained "
        "again (default: %(default)s)",
    )
    p.add_argument("--force", action="store_true", help="retrain finished configs instead of skipping them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    p.set_defaults(func=run)


def run(args) -> int:
    configs = options.select_configs(args)
    out = options.run_dir(args)
    result = options.run_stages(
        args,
        configs,
        ["train", "health"],
        options.stage_settings(
            args, compile_mode=None if args.compile == "off" else args.compile, precision=args.precision
        ),
    )
    print(summary.format_summary(summary.summary_rows(out, [c.id for c in configs])))
    print(f"results: {out}")
    return result.exit_code
