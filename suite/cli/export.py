"""`capsbench export`: every trained (and pruned) model of a preset -> model.onnx, export.json, parity.json."""

from __future__ import annotations

from capsbench.suite import rundir
from capsbench.suite.cli import options
from capsbench.suite.errors import CheckpointError
from capsbench.suite.stages import ExportSettings
from capsbench.suite.stages.export import PARITY_IMAGES, format_export_table


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export trained models to ONNX and check parity with PyTorch",
        description="Export every trained config of a preset (checkpoint.pt, and every pruned net the pruning "
        "stage wrote: prune_*/pruned.pt) to ONNX with the routing iterations unrolled and a dynamic batch "
        "axis, check it with onnx.checker, and compare ONNX Runtime with PyTorch on real test images. Writes "
        "model.onnx, export.json and parity.json beside each checkpoint (a pruned net's in its prune_* folder). "
        "Finished exports of an unchanged checkpoint are skipped unless --force. Exit code 2 when a config "
        "is not trained or fails export or parity.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    p.add_argument(
        "--opset", type=options.positive_int, default=None, help="ONNX opset (default: the exporter's)"
    )
    p.add_argument(
        "--parity-images",
        type=options.positive_int,
        default=PARITY_IMAGES,
        help=f"test images for the parity check (default: {PARITY_IMAGES})",
    )
    p.add_argument("--force", action="store_true", help="re-export finished configs")
    p.set_defaults(func=run)


def run(args) -> int:
    configs = options.select_configs(args)
    out = options.run_dir(args)
    if not any(rundir.is_trained(rundir.config_dir(out, c)) for c in configs):
        raise CheckpointError(
            f"{out}: none of the {len(configs)} selected configs is trained yet; "
            f"run 'capsbench train --preset {args.preset}' first"
        )
    settings = options.stage_settings(
        args, export=ExportSettings(opset=args.opset, parity_images=args.parity_images)
    )
    result = options.run_stages(args, configs, ["export"], settings)
    print(format_export_table([row for c in configs for row in result.results[c.id].get("export", [])]))
    print(f"results: {out}")
    return result.exit_code
