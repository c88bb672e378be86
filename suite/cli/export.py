"""`capsbench export`: every trained (and pruned) model of a preset -> model.onnx, export.json, parity.json."""

from __future__ import annotations

from capsbench import results as R
from capsbench.suite import rundir
from capsbench.suite.cli import options
from capsbench.suite.errors import CheckpointError
from capsbench.suite.stages import ExportSettings


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
        default=ExportSettings.parity_images,
        help=f"test images for the parity check (default: {ExportSettings.parity_images})",
    )
    p.add_argument("--force", action="store_true", help="re-export finished configs")
    p.set_defaults(func=run)


def run(args) -> int:
    configs = options.select_configs(args)
    out = options.run_dir(args)
    if not any(R.is_trained(rundir.config_dir(out, c)) for c in configs):
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


def format_export_table(rows: list[dict]) -> str:
    head = (
        f"{'config':<11}{'variant':<24}{'status':<15}{'nodes':>6}{'MB':>7}{'max abs err':>13}{'max rel err':>13}"
        f"{'agree':>7}{'ties':>6}  label"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("nodes") is None:
            lines.append(
                f"{r['config_id']:<11}{r.get('variant', '-'):<8}{r['status']:<15}  {r.get('error', '')}"
            )
            continue
        err = f"{r['max_abs_err']:.2e}" if r.get("max_abs_err") is not None else "-"
        rel = f"{r['max_rel_err']:.2e}" if r.get("max_rel_err") is not None else "-"
        agree = f"{r['argmax_agreement']:.3f}" if r.get("argmax_agreement") is not None else "-"
        lines.append(
            f"{r['config_id']:<11}{r['variant']:<24}{r['status']:<15}{r['nodes']:>6}"
            f"{r['file_bytes'] / 1e6:>7.2f}{err:>13}{rel:>13}{agree:>7}{r.get('near_ties', 0):>6}  {r['label']}"
        )
        if r.get("error"):
            lines.append(f"{'':<11}{r['error']}")
    return "\n".join(lines)
