"""`capsbench prune`: channel-prune a preset's trained configs, fine-tune them and re-measure activation health."""

from __future__ import annotations

import argparse

from capsbench.models.pruning import CAPSULE_CRITERIA, CRITERIA
from capsbench.suite import rundir
from capsbench.suite.cli import options
from capsbench.suite.errors import CheckpointError, ConfigError
from capsbench.suite.presets import CONTROLS, PROCEDURES
from capsbench.suite.stages import PruneSettings
from capsbench.suite.stages import prune as pruning


def _ratios(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ratios like 0,0.25,0.5, got {text!r}"
        ) from None
    if not values or any(not 0.0 <= v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"ratios must lie in [0, 1), got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="channel-prune trained configs (CHIP), fine-tune, and measure inactive capsules again",
        description="For every trained config of a preset: score the backbone convs' and PrimaryCaps' channels "
        "on training images (CHIP by default), remove the lowest-scoring ones (whole capsule types for "
        "PrimaryCaps), fine-tune, and write <config>/prune_<criterion>_b<B>_c<C>/{pruned.pt, prune.json, "
        "health_pruned.json}. Finished settings are skipped; interrupted ones resume. Train first with "
        "'capsbench train' and the same preset and options.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    options.add_device(p)
    p.add_argument(
        "--backbone",
        type=options.ratio,
        default=0.5,
        help="share of every backbone conv's channels to remove",
    )
    p.add_argument(
        "--caps",
        type=options.ratio,
        default=0.5,
        help="share of PrimaryCaps capsule types and of every intermediate layer's capsules to remove",
    )
    p.add_argument(
        "--sweep",
        type=_ratios,
        default=None,
        metavar="R,R,...",
        help="prune at each ratio R for backbone and caps alike, e.g. 0,0.25,0.5,0.75 (overrides --backbone/--caps)",
    )
    p.add_argument(
        "--grid", action="store_true", help="with --sweep: every (backbone, caps) pair of the ratios"
    )
    p.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="chip",
        help="chip: per-image CHIP, averaged (Sui et al. 2021); chip-mean: CHIP of the batch-averaged maps "
        "(the paper's code); l1: filter L1 norms (default: chip)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=options.nonnegative_int,
        default=pruning.DEFAULT_FINETUNE_EPOCHS,
        help=f"epochs of fine-tuning after surgery, 0 for none (default: {pruning.DEFAULT_FINETUNE_EPOCHS})",
    )
    p.add_argument(
        "--score-images",
        type=options.positive_int,
        default=pruning.DEFAULT_SCORE_IMAGES,
        help="training images the channel scores are computed on (default: 640). Per-image CHIP does one "
        "eigendecomposition per channel per image: on a CPU, lower this or use chip-mean for wide layers",
    )
    p.add_argument(
        "--intermediate",
        type=options.ratio,
        default=None,
        help="a share of every intermediate layer's capsules to remove other than --caps' (0: PrimaryCaps "
        "types only). Not output-preserving: routing re-normalises over the parents",
    )
    p.add_argument(
        "--capsule-criterion",
        choices=CAPSULE_CRITERIA,
        default="chip",
        help="how intermediate capsules are chosen: chip (CHIP of the unit-length poses: information, not "
        "length), weight_norm, random, length (the least active first; picks the dead ones by construction) "
        "(default: chip)",
    )
    p.add_argument(
        "--procedure",
        choices=PROCEDURES,
        default="finetune",
        help="finetune: keep the surviving weights and fine-tune; authors: prune backbone and PrimaryCaps, "
        "re-initialise the capsule layers, retrain for --finetune-epochs (the paper's code) (default: finetune)",
    )
    p.add_argument(
        "--controls",
        nargs="+",
        choices=CONTROLS,
        default=(),
        help="beside every pair: extra_training (the unpruned net trained F more epochs), scratch (the pruned "
        "architecture from scratch for E+F epochs), random (random channels and capsules, fine-tuned F epochs)",
    )
    p.add_argument(
        "--reinit-caps",
        action="store_true",
        help="re-initialise the routed capsule layers after pruning (implied by --procedure authors)",
    )
    p.add_argument(
        "--keep-intermediate",
        action="store_true",
        help="keep surgery.pt and finetune.pt after pruning (removed by default: a third of a run folder)",
    )
    p.add_argument("--force", action="store_true", help="redo finished settings instead of skipping them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.grid and not args.sweep:
        raise ConfigError("--grid needs --sweep R,R,... (the ratios to combine)")
    if args.sweep:
        pairs = (
            [(b, c) for b in args.sweep for c in args.sweep] if args.grid else [(r, r) for r in args.sweep]
        )
    else:
        pairs = [(args.backbone, args.caps)]
    configs = options.select_configs(args)
    run_dir = options.run_dir(args)
    folders = {c.id: rundir.config_dir(run_dir, c) for c in configs}
    untrained = [c for c in configs if not (folders[c.id] / rundir.METRICS_FILE).is_file()]
    if untrained:
        raise CheckpointError(
            f"{len(untrained)} of {len(configs)} configs are not trained in {run_dir} "
            f"({', '.join(c.id for c in untrained)}); run 'capsbench train --preset {args.preset}' first, with the "
            "same overrides, or pick trained ones with --configs"
        )
    trained = []
    for cfg in configs:
        if rundir.is_trained(folders[cfg.id]):
            trained.append(cfg)
        else:
            print(f"{cfg.id}: its training did not finish (see metrics.json), skipped")
    prune = PruneSettings(
        pairs=tuple(pairs),
        criterion=args.criterion,
        finetune_epochs=args.finetune_epochs,
        intermediate_ratio=args.intermediate,
        capsule_criterion=args.capsule_criterion,
        procedure=args.procedure,
        controls=tuple(args.controls),
        reinit_caps_layers=args.reinit_caps,
        score_images=args.score_images,
        write_sweep=True,
    )
    result = options.run_stages(args, trained, ["prune"], options.stage_settings(args, prune=prune))
    rows = [
        r if "acc_before" in r else pruning.sweep_row(r)
        for c in trained
        for r in result.results[c.id].get("prune", [])
    ]
    print(pruning.format_sweep(rows))
    print(f"results: {run_dir}/<config>/prune_*/prune.json")
    return result.exit_code
