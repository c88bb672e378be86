"""`capsbench health RUN_DIR`: (re)measure activation health of a run's trained configs, e.g. at another threshold."""

from __future__ import annotations

from pathlib import Path

from capsbench import results as R
from capsbench.suite.cli import options
from capsbench.suite.errors import CheckpointError
from capsbench.suite.presets import RunConfig
from capsbench.suite.stages import HealthSettings


def register(sub) -> None:
    p = sub.add_parser(
        "health",
        help="measure inactive capsules per layer of a run's trained models",
        description="Record every capsule's length over the evaluation set and count inactive capsules "
        "(mean and std of the length both below --threshold). Writes health.json (or --output) per config.",
    )
    p.add_argument("run_dir", type=Path, help="a run folder, e.g. runs/smoke")
    p.add_argument(
        "--threshold",
        type=options.nonnegative_float,
        default=None,
        help="inactive threshold (default: the config's, 0.01)",
    )
    p.add_argument("--output", default=R.HEALTH_FILE, help="file name to write in each config folder")
    options.add_data_dir(p)
    options.add_device(p)
    p.set_defaults(func=run)


def run(args) -> int:
    folder = Path(args.run_dir)
    dirs = sorted(d for d in folder.iterdir() if (d / R.CONFIG_FILE).is_file()) if folder.is_dir() else []
    if not dirs:
        raise CheckpointError(f"{args.run_dir}: no trained configs here; run 'capsbench train' first")
    configs = []
    for d in dirs:
        cfg = RunConfig.from_dict(R.read_result(d / R.CONFIG_FILE, "config")["config"])
        if cfg.id != d.name:  # config.json edited by hand: measuring it would write into a new, stray folder
            raise CheckpointError(
                f"{d / R.CONFIG_FILE}: describes config {cfg.id}, not {d.name} (the folder it is in); it was "
                "edited: restore it, or train the edited config with 'capsbench train'"
            )
        if R.is_trained(d):
            configs.append(cfg)
        else:
            print(f"{cfg.id}: not trained (or failed), skipped")
    settings = options.stage_settings(
        args, health=HealthSettings(threshold=args.threshold, output=args.output)
    )
    result = options.run_stages(args, configs, ["health"], settings, folder)
    for cfg in configs:
        health = result.results[cfg.id].get("health")
        if health is not None:
            per_layer = " ".join(
                f"{lay['name']}={lay['inactive']}/{lay['num_capsules']}" for lay in health["layers"]
            )
            print(f"{cfg.id}: threshold {health['threshold']}: {per_layer}")
    return result.exit_code
