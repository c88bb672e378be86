"""The time stage: every exported model of a config on every backend (ONNX Runtime, torch eager, torch.compile)
and batch size -> latency.json. The work is suite/timing.py's, the rounds export/timing.py's."""

from __future__ import annotations

from capsbench.export.timing import TimeSettings
from capsbench.results import LATENCY_FILE
from capsbench.suite.stages.base import Context, Stage
from capsbench.suite.timing import finished_latency, onnx_shas, time_config

__all__ = ["STAGE", "TimeSettings"]


def done(ctx: Context) -> bool:
    s = ctx.settings
    return not s.force and finished_latency(ctx.out / LATENCY_FILE, s.time, onnx_shas(ctx.out)) is not None


def run(ctx: Context) -> dict:
    return time_config(
        ctx.cfg,
        ctx.out,
        ctx.splits,
        ctx.settings.time,
        force=ctx.settings.force,
        gemm_cache=ctx.shared.setdefault("gemm", {}),
        progress=ctx.log if ctx.settings.progress else None,
    )


STAGE = Stage(
    "time",
    run=run,
    done=done,
    help="latency in ONNX Runtime, torch eager (and torch.compile) per batch size",
)
