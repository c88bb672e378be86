"""`capsbench train`: train every config of a preset and measure its activation health."""

from __future__ import annotations

from capsbench.suite.cli import options, summary
from capsbench.suite.train import PRECISIONS


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
        default=None,
        metavar="MODE",
        help="train with torch.compile (MODE: default, max-autotune; on CUDA reduce-overhead = CUDA graphs, "
        "untested here). Off by default: on a 2-core CPU the first compile costs more than it saves on small "
        "runs ('capsbench bench train' measures both)",
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
        options.stage_settings(args, compile_mode=args.compile, precision=args.precision),
    )
    print(summary.format_summary(summary.summary_rows(out, [c.id for c in configs])))
    print(f"results: {out}")
    return result.exit_code
