"""The export stage: every trained (and pruned) model of a config -> model.onnx, export.json, and parity.json on
real test images."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsbench.export import ExportError, ParityError, export_onnx, parity
from capsbench.results import StrEnum
from capsbench.suite import rundir
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_model, not_trained_message
from capsbench.suite.errors import CheckpointError
from capsbench.suite.presets import RunConfig
from capsbench.suite.rundir import Variant, present_variants, read_if_valid, read_result, sha256, write_json
from capsbench.suite.stages.base import Context, Stage

PARITY_IMAGES = 1000


class ExportStatus(StrEnum):
    """A variant's row of the export stage (what `capsbench export` prints): done and exported are fine."""

    DONE = "done"  # exported and checked before, for this checkpoint
    EXPORTED = "exported"
    PARITY_FAILED = "parity failed"
    EXPORT_FAILED = "export failed"
    NOT_TRAINED = "not trained"


# ------------------------------------------------------------------------------------------------ export


def _export_done(out: Path, v: Variant, checkpoint_sha: str) -> bool:
    info, par = read_if_valid(out / v.export, "export"), read_if_valid(out / v.parity, "parity")
    return (
        info is not None
        and par is not None
        and (out / v.onnx).is_file()
        and info.get("checkpoint_sha256") == checkpoint_sha
        and par.get("checkpoint_sha256") == checkpoint_sha
        and par.get("passed") is True
    )


def export_config(
    cfg: RunConfig,
    out_dir: Path,
    splits: Callable[[], training.Splits],
    *,
    force: bool = False,
    opset: int | None = None,
    num_parity_images: int = PARITY_IMAGES,
) -> list[dict[str, Any]]:
    """Export every model of one trained config and check parity; one row per variant.

    `splits` is called only when something must be (re)done. A failed export or parity is recorded in the
    row (and parity.json) and the next variant goes on.
    """
    out = Path(out_dir)
    if not rundir.is_trained(out):
        head = {"config_id": cfg.id, "label": cfg.label, "status": ExportStatus.NOT_TRAINED}
        return [{**head, "error": not_trained_message(cfg, out)}]
    rows = []
    for v in present_variants(out):
        row: dict[str, Any] = {"config_id": cfg.id, "label": cfg.label, "variant": v.name}
        ckpt_sha = sha256(out / v.checkpoint)
        if not force and _export_done(out, v, ckpt_sha):
            info, par = read_result(out / v.export, "export"), read_result(out / v.parity, "parity")
            rows.append({**row, "status": ExportStatus.DONE, **_summary(info, par)})
            continue
        try:
            model = load_model(cfg, out / v.checkpoint)
            images = training.test_images(splits(), num_parity_images)
            info = export_onnx(model, out / v.onnx, images[:2], opset=opset)
            info.update(config_id=cfg.id, variant=v.name, checkpoint=v.checkpoint, checkpoint_sha256=ckpt_sha)
            info["onnx_sha256"] = sha256(out / v.onnx)
            write_json(out / v.export, "export", info)
            try:
                par = parity(out / v.onnx, model, images)
                status = ExportStatus.EXPORTED
            except ParityError as e:
                par = {**getattr(e, "result", {}), "passed": False, "error": str(e)}
                status = ExportStatus.PARITY_FAILED
            par.update(config_id=cfg.id, variant=v.name, checkpoint_sha256=ckpt_sha)
            write_json(out / v.parity, "parity", par)
            rows.append({**row, "status": status, **_summary(info, par)})
        except ExportError as e:
            rows.append({**row, "status": ExportStatus.EXPORT_FAILED, "error": str(e)})
    return rows


def _summary(info: dict, par: dict) -> dict[str, Any]:
    return {
        "exporter": info.get("exporter"),
        "nodes": info.get("nodes"),
        "file_bytes": info.get("file_bytes"),
        "max_abs_err": par.get("max_abs_err"),
        "max_rel_err": par.get("max_rel_err"),
        "argmax_agreement": par.get("argmax_agreement"),
        "near_ties": par.get("near_ties"),
        "parity_images": par.get("images"),
        **({"error": par["error"]} if par.get("error") else {}),
    }


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


# --------------------------------------------------------------------------------------------------- stage


def done(ctx: Context) -> bool:
    out = ctx.out
    return (
        not ctx.settings.force
        and rundir.is_trained(out)
        and all(_export_done(out, v, sha256(out / v.checkpoint)) for v in present_variants(out))
    )


def run(ctx: Context) -> list[dict]:
    """Export every variant; a variant that fails export or parity fails the stage (after the others ran)."""
    s = ctx.settings
    if not rundir.is_trained(ctx.out):
        raise CheckpointError(not_trained_message(ctx.cfg, ctx.out))
    rows = export_config(
        ctx.cfg,
        ctx.out,
        ctx.splits,
        force=s.force,
        opset=s.export.opset,
        num_parity_images=s.export.parity_images,
    )
    bad = [r for r in rows if r["status"] not in (ExportStatus.DONE, ExportStatus.EXPORTED)]
    if bad:
        raise ExportError("; ".join(f"{r.get('variant')}: {r['status']}: {r.get('error', '')}" for r in bad))
    return rows


STAGE = Stage(
    "export",
    run=run,
    done=done,
    help="ONNX export and parity with PyTorch on real test images",
)
