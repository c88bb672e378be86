"""A full training step (forward, margin loss, backward, Adam) of each preset's heaviest net at its batch size.

    .venv/bin/pytest benchmarks/test_bench_train.py --benchmark-only [-k "smoke and eager"]

extra_info carries the step's GFLOP per image, GFLOP/s and the fraction of the fp32 GEMM rate measured in
the same session, as `capsbench bench train` reports them. The compiled rows compile in an untimed first step.
"""

from __future__ import annotations

import pytest
import torch

from capsbench.export.latency import gemm_gflops
from capsbench.models import build_capsnet
from capsbench.suite import trainbench
from capsbench.suite.presets import PRESETS

PRESETS_TIMED = [p for p in ("smoke", "quick", "sabour", "depth") if p in PRESETS]


@pytest.fixture(scope="module")
def gemm_rate() -> float:
    return gemm_gflops(iters=10)["gflops_per_s"]


@pytest.mark.parametrize("backend", trainbench.BACKENDS)
@pytest.mark.parametrize("preset", PRESETS_TIMED)
def test_train_step(benchmark, gemm_rate, preset, backend):
    cfg = trainbench.heaviest_config(preset)
    x, y = trainbench.preloaded_batch(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.seed)
    model = build_capsnet(cfg.model).train()
    step = trainbench.make_step(model, cfg, torch.compile(model) if backend == "compiled" else model)
    gflop = trainbench.train_gflop_per_image(model)
    benchmark.group = f"train step {preset}"
    benchmark.extra_info.update(preset=preset, backend=backend, batch=len(x), config_id=cfg.id)
    benchmark.pedantic(step, args=(x, y), rounds=5, iterations=1, warmup_rounds=2)
    images_per_s = len(x) / benchmark.stats.stats.median
    benchmark.extra_info.update(
        train_gflop_per_image=gflop,
        images_per_s=images_per_s,
        gflops_per_s=images_per_s * gflop,
        gemm_gflops_per_s=gemm_rate,
        gemm_fraction=images_per_s * gflop / gemm_rate,
    )
