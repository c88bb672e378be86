"""The health stage: capsule lengths of the trained net over the evaluation set -> health.json, kept in step
with the checkpoint (measured again when the checkpoint is newer)."""

from __future__ import annotations

from capsbench import results as R
from capsbench.suite import train as training
from capsbench.suite.errors import CheckpointError
from capsbench.suite.stages.base import Context, Stage


def _output(ctx: Context) -> str:
    return ctx.settings.health.output or R.HEALTH_FILE


def done(ctx: Context) -> bool:
    s = ctx.settings
    if s.force or s.health.output is not None or s.health.threshold is not None:
        return False  # an explicit measurement is always made
    health, ckpt = ctx.out / R.HEALTH_FILE, ctx.out / R.CHECKPOINT_FILE
    return health.is_file() and ckpt.is_file() and health.stat().st_mtime_ns >= ckpt.stat().st_mtime_ns


def run(ctx: Context) -> dict:
    if not R.is_trained(ctx.out):
        raise CheckpointError(
            f"{ctx.cfg.id}: not trained (or its training failed, see {R.METRICS_FILE}); run 'capsbench train'"
        )
    if done(ctx):
        return R.read_result(ctx.out / R.HEALTH_FILE, "health")
    return training.measure_health(
        ctx.cfg,
        ctx.out,
        ctx.splits(),
        device=ctx.device,
        threshold=ctx.settings.health.threshold,
        output=_output(ctx),
    )


STAGE = Stage(
    "health",
    run=run,
    done=done,
    help="inactive capsules per layer of the trained net",
)
