"""`capsbench prune`: channel-prune a preset's trained configs, fine-tune them and re-measure activation health."""

from __future__ import annotations

import argparse

from capsbench import results as R
from capsbench.suite import pruning, rundir
from capsbench.suite.cli import options
from capsbench.suite.errors import CheckpointError, ConfigError
from capsbench.suite.prune_settings import PruneSettings


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
    options.add_pruning(p, defaults="capsbench's: chip, 2 fine-tuning epochs, 640 score images, no controls")
    p.add_argument("--force", action="store_true", help="redo finished settings instead of skipping them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    p.set_defaults(func=run)


def format_sweep(rows: list[dict]) -> str:
    head = (
        f"{'config':<11}{'b':>5}{'c':>5}{'acc':>7}{'surg':>7}{'tuned':>7}{'params':>16}{'MFLOPs':>16}"
        "  inactive per layer before -> after"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        params = f"{r['parameters_before']}->{r['parameters_after']}"
        flops = f"{r['flops_before'] / 1e6:.1f}->{r['flops_after'] / 1e6:.1f}"
        lines.append(
            f"{r['config_id']:<11}{r['backbone_ratio']:>5.2f}{r['caps_ratio']:>5.2f}{r['acc_before']:>7.4f}"
            f"{r['acc_after_surgery']:>7.4f}{r['acc_after_finetune']:>7.4f}{params:>16}{flops:>16}  "
            f"{' '.join(r['inactive_before'])} -> {' '.join(r['inactive_after'])}"
        )
    return "\n".join(lines)


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
    untrained = [c for c in configs if not (folders[c.id] / R.METRICS_FILE).is_file()]
    if untrained:
        raise CheckpointError(
            f"{len(untrained)} of {len(configs)} configs are not trained in {run_dir} "
            f"({', '.join(c.id for c in untrained)}); run 'capsbench train --preset {args.preset}' first, with the "
            "same overrides, or pick trained ones with --configs"
        )
    trained = []
    for cfg in configs:
        if R.is_trained(folders[cfg.id]):
            trained.append(cfg)
        else:
            print(f"{cfg.id}: its training did not finish (see metrics.json), skipped")
    prune = options.prune_settings(args, PruneSettings(), pairs=tuple(pairs), write_sweep=True)
    result = options.run_stages(args, trained, ["prune"], options.stage_settings(args, prune=prune))
    rows = [
        r if "acc_before" in r else pruning.sweep_row(r)
        for c in trained
        for r in result.results[c.id].get("prune", [])
    ]
    print(format_sweep(rows))
    print(f"results: {run_dir}/<config>/prune_*/prune.json")
    return result.exit_code
