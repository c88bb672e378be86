"""ONNX Runtime and torch eager on the same exported model and inputs, per batch size (grouped side by side)."""

from __future__ import annotations

import torch

from capsbench.export.latency import STABILITY_RULE, Contention, judge_contention, summarize, take_batch

SPREAD = ("n", "min_ms", "p50_ms", "p90_ms", "iqr_ms", "iqr_rel", "cv", "stable", "unstable_reason")
CONTENTION = ("other_cores", "contention_window_s")


def _info(benchmark, bench, backend: str, batch: int, **extra) -> None:
    benchmark.group = f"batch {batch}"
    benchmark.extra_info.update(backend=backend, batch=batch, model=bench.label, **extra)


def _timed(benchmark, batch: int, fn) -> None:
    """Run the benchmark, then put the timing harness's statistics and stability verdict of its timed rounds in
    extra_info, with the CPU time other processes took meanwhile (unstable above the harness's limit), so this
    route reports what 'capsbench time' and 'capsbench check' do (one summariser: export/latency.py)."""
    with Contention() as contention:
        benchmark(fn)
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    stats = judge_contention(summarize(benchmark.stats.stats.data, batch), contention)
    benchmark.extra_info.update({k: stats[k] for k in SPREAD + CONTENTION}, stability_rule=STABILITY_RULE)


def test_ort(benchmark, bench, batch):
    run, sync = bench.session.runner(take_batch(bench.images, batch))
    _info(benchmark, bench, f"ort_{bench.session.execution_provider.name}", batch, **bench.session.info)
    _timed(benchmark, batch, run if sync is None else (lambda: (run(), sync())))


def test_torch_eager(benchmark, bench, batch):
    device = torch.device("cuda" if bench.session.on_cuda and torch.cuda.is_available() else "cpu")
    model = bench.model.to(device)
    x = torch.from_numpy(take_batch(bench.images, batch)).to(device)
    _info(benchmark, bench, "torch_eager", batch, device=str(device), threads=torch.get_num_threads())

    def run():
        with torch.inference_mode():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    _timed(benchmark, batch, run)
