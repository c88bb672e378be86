"""`capsbench train`: train every config of a preset and measure its activation health."""

from __future__ import annotations

from capsbench.suite.cli import options, summary


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
    options.add_training(p)
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
        options.stage_settings(args, train=options.training_settings(args)),
    )
    print(summary.format_summary(summary.summary_rows(out, [c.id for c in configs])))
    print(f"results: {out}")
    return result.exit_code
