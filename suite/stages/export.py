"""The export stage: every trained (and pruned) model of a config -> model.onnx, export.json, and parity.json on
real test images. The work is suite/exporting.py's."""

from __future__ import annotations

from capsbench import results as R
from capsbench.export import ExportError
from capsbench.results import present_variants, sha256
from capsbench.suite.checkpoints import not_trained_message
from capsbench.suite.errors import CheckpointError
from capsbench.suite.exporting import ExportStatus, export_config, export_done
from capsbench.suite.stages.base import Context, Stage

# --------------------------------------------------------------------------------------------------- stage


def done(ctx: Context) -> bool:
    out = ctx.out
    return (
        not ctx.settings.force
        and R.is_trained(out)
        and all(export_done(out, v, sha256(out / v.checkpoint)) for v in present_variants(out))
    )


def run(ctx: Context) -> list[dict]:
    """Export every variant; a variant that fails export or parity fails the stage (after the others ran)."""
    s = ctx.settings
    if not R.is_trained(ctx.out):
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
