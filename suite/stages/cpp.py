"""The C++ timing stage: the CMake-built ONNX Runtime runner times every exported model of a config in the
Python timing's rounds and row schema (latency_cpp.json), its outputs checked against PyTorch's. The work is
suite/timing.py's."""

from __future__ import annotations

from capsbench.results import LATENCY_CPP_FILE
from capsbench.suite.stages.base import Context, Stage
from capsbench.suite.timing import finished_latency, onnx_shas, time_config_cpp


def done(ctx: Context) -> bool:
    s = ctx.settings
    return (
        not s.force and finished_latency(ctx.out / LATENCY_CPP_FILE, s.time, onnx_shas(ctx.out)) is not None
    )


def run(ctx: Context) -> dict:
    return time_config_cpp(
        ctx.cfg,
        ctx.out,
        ctx.splits,
        ctx.settings.time,
        force=ctx.settings.force,
        progress=ctx.log if ctx.settings.progress else None,
    )


STAGE = Stage(
    "cpp",
    run=run,
    done=done,
    help="latency from the C++ ONNX Runtime runner, its outputs checked against PyTorch's",
)
