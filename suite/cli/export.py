"""`capsbench export`: every trained (and pruned) model of a preset -> model.onnx, export.json, parity.json."""

from __future__ import annotations

from capsbench.export import ExportError
from capsbench.suite import train as training
from capsbench.suite.cli import options
from capsbench.suite.errors import CheckpointError
from capsbench.suite.export_stage import PARITY_IMAGES, StageError, export_config, format_export_table
from capsbench.suite.runner import config_dir


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export trained models to ONNX and check parity with PyTorch",
        description="Export every trained config of a preset (checkpoint.pt, and every pruned net the pruning "
        "stage wrote: prune_*/pruned.pt) to ONNX with the routing iterations unrolled and a dynamic batch "
        "axis, check it with onnx.checker, and compare ONNX Runtime with PyTorch on real test images. Writes "
        "model.onnx, export.json and parity.json beside each checkpoint (a pruned net's in its prune_* folder). "
        "Finished exports of an unchanged checkpoint are skipped unless --force. Exit code 1 when a config "
        "is not trained or fails export or parity.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument(
        "--parity-images",
        type=int,
        default=PARITY_IMAGES,
        help=f"test images for the parity check (default: {PARITY_IMAGES})",
    )
    p.add_argument("--force", action="store_true", help="re-export finished configs")
    p.set_defaults(func=run)


def run(args) -> int:
    configs = options.select_configs(args)
    out = options.run_dir(args)
    rows, cache = [], {}
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {cfg.id}  {cfg.label}", flush=True)

        def splits(cfg=cfg):
            key = (cfg.dataset, cfg.train_subset, cfg.eval_subset, cfg.seed)
            if key not in cache:
                cache.clear()  # one dataset in memory at a time
                cache[key] = training.load_splits(cfg, args.data_dir)
            return cache[key]

        try:
            rows.extend(
                export_config(
                    cfg,
                    config_dir(out, cfg),
                    splits,
                    force=args.force,
                    opset=args.opset,
                    num_parity_images=args.parity_images,
                )
            )
        except ExportError as e:
            raise StageError(str(e)) from e
    if all(r["status"] == "not trained" for r in rows):
        raise CheckpointError(
            f"{out}: none of the {len(configs)} selected configs is trained yet; "
            f"run 'capsbench train --preset {args.preset}' first"
        )
    print(format_export_table(rows))
    print(f"results: {out}")
    return 0 if all(r["status"] in ("exported", "done") for r in rows) else 1
