"""The prune stage: every variant of the settings (suite/prune_settings.py) of one trained config, done by
suite/pruning.py, scoring the trained net once."""

from __future__ import annotations

from capsbench import results as R
from capsbench.suite import pruning
from capsbench.suite.stages.base import Context, Stage


def done(ctx: Context) -> bool:
    if ctx.settings.force:
        return False
    for v in ctx.settings.prune.variants(ctx.cfg.epochs):
        res = R.read_if_valid(ctx.out / v.folder / R.PRUNE_FILE, "prune")
        if res is None or res.get("settings") != v.to_dict():
            return False
    return True


def run(ctx: Context) -> list[dict]:
    p = ctx.settings.prune
    base = pruning.TrainedBase(ctx.cfg, ctx.out, ctx.splits(), ctx.device)
    kw = dict(force=ctx.settings.force, progress=ctx.settings.progress)
    variants = p.variants(ctx.cfg.epochs)
    if p.write_sweep and not p.controls:
        return pruning.prune_sweep(base, variants, p.criterion, **kw)
    return [pruning.prune_config(base, v, **kw) for v in variants]


STAGE = Stage(
    "prune",
    run=run,
    done=done,
    help="prune channels and capsules, fine-tune (and the controls), measure health again",
)
