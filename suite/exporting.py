"""The export stage's work on a config's run folder: every trained (and pruned) model -> model.onnx, export.json
and parity.json on real test images, through export/ (which knows nothing of run folders or training)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsbench.export import ExportError, ParityError, export_onnx, parity
from capsbench.results import (
    StrEnum,
    Variant,
    is_trained,
    present_variants,
    read_if_valid,
    read_result,
    sha256,
    write_json,
)
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_model, not_trained_message
from capsbench.suite.presets import RunConfig


class ExportStatus(StrEnum):
    """A variant's row of the export stage (what `capsbench export` prints): done and exported are fine."""

    DONE = "done"  # exported and checked before, for this checkpoint
    EXPORTED = "exported"
    PARITY_FAILED = "parity failed"
    EXPORT_FAILED = "export failed"
    NOT_TRAINED = "not trained"


# ------------------------------------------------------------------------------------------------ export


def export_done(out: Path, v: Variant, checkpoint_sha: str) -> bool:
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
    force: bool,
    opset: int | None,
    num_parity_images: int,
) -> list[dict[str, Any]]:
    """Export every model of one trained config and check parity; one row per variant.

    `splits` is called only when something must be (re)done. A failed export or parity is recorded in the
    row (and parity.json) and the next variant goes on.
    """
    out = Path(out_dir)
    if not is_trained(out):
        head = {"config_id": cfg.id, "label": cfg.label, "status": ExportStatus.NOT_TRAINED}
        return [{**head, "error": not_trained_message(cfg, out)}]
    rows = []
    for v in present_variants(out):
        row: dict[str, Any] = {"config_id": cfg.id, "label": cfg.label, "variant": v.name}
        ckpt_sha = sha256(out / v.checkpoint)
        if not force and export_done(out, v, ckpt_sha):
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
