"""The train stage: train (or resume, or skip) one config; a divergence is recorded in metrics.json."""

from __future__ import annotations

from capsbench.suite import rundir
from capsbench.suite import train as training
from capsbench.suite.errors import DivergenceError
from capsbench.suite.stages.base import Context, Stage


def run(ctx: Context) -> dict:
    if done(ctx):  # without loading the dataset
        return rundir.read_result(ctx.out / rundir.METRICS_FILE, "metrics")
    try:
        return training.train(
            ctx.cfg,
            ctx.out,
            ctx.splits(),
            device=ctx.device,
            force=ctx.settings.force,
            progress=ctx.settings.progress,
            compile_mode=ctx.settings.compile_mode,
        )
    except DivergenceError as e:
        training.write_failure(ctx.out, ctx.cfg, "diverged", str(e))
        raise


def done(ctx: Context) -> bool:
    return not ctx.settings.force and rundir.is_trained(ctx.out)


STAGE = Stage(
    "train",
    reads=(),
    writes=(rundir.CONFIG_FILE, rundir.CHECKPOINT_FILE, rundir.METRICS_FILE),
    run=run,
    done=done,
    help="train, resuming from the last finished epoch",
    gate=True,
)
