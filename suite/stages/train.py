"""The train stage: train (or resume, or skip) one config; a divergence is recorded in metrics.json. Before a
fresh training, the net's health at initialisation as training sees it (batch statistics) -> health_init.json."""

from __future__ import annotations

from capsbench import results as R
from capsbench.results import Status
from capsbench.suite import train as training
from capsbench.suite.errors import DivergenceError
from capsbench.suite.stages.base import Context, Stage

INIT_HEALTH_IMAGES = 512


def measure_init_health(ctx: Context) -> dict:
    """The config's net exactly as train() initialises it (same seed), measured with BatchNorm on each batch's
    statistics over the first training images: in eval mode its untrained running statistics would make
    every capsule look dead."""
    import torch

    from capsbench.models import build_capsnet
    from capsbench.models.health import init_health

    torch.manual_seed(ctx.cfg.seed)
    model = build_capsnet(ctx.cfg.model).to(ctx.device)
    images = ctx.splits().train_x[:INIT_HEALTH_IMAGES]
    health = init_health(
        model, training.eval_batches(images, ctx.device, 128), ctx.cfg.inactive_threshold, ctx.device
    )
    health = {"config_id": ctx.cfg.id, "label": ctx.cfg.label, "images": len(images), **health}
    R.write_json(ctx.out / R.HEALTH_INIT_FILE, "health", health)
    return health


def run(ctx: Context) -> dict:
    if done(ctx):  # without loading the dataset
        return R.read_result(ctx.out / R.METRICS_FILE, "metrics")
    if ctx.settings.force or not (ctx.out / R.HEALTH_INIT_FILE).is_file():
        measure_init_health(ctx)
    try:
        return training.train(
            ctx.cfg,
            ctx.out,
            ctx.splits(),
            device=ctx.device,
            force=ctx.settings.force,
            progress=ctx.settings.progress,
            compile_mode=ctx.settings.train.compile,
            precision=ctx.settings.train.precision,
        )
    except DivergenceError as e:
        training.write_failure(ctx.out, ctx.cfg, Status.DIVERGED, str(e))
        raise


def done(ctx: Context) -> bool:
    """Trained, and in the precision asked for: a bf16 training is not the fp32 one (nor the reverse)."""
    if ctx.settings.force or not R.is_trained(ctx.out):
        return False
    metrics = R.read_if_valid(ctx.out / R.METRICS_FILE, "metrics") or {}
    return training.trained_precision(metrics) == ctx.settings.train.precision


STAGE = Stage(
    "train",
    run=run,
    done=done,
    help="train, resuming from the last finished epoch",
    gate=True,
)
