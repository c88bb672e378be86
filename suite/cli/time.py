"""`capsbench time`: latency of the exported models in ONNX Runtime against torch eager, per batch size."""

from __future__ import annotations

from capsbench.export.latency import DEFAULT_BATCH_SIZES
from capsbench.export.sessions import PROVIDERS
from capsbench.suite.cli import options
from capsbench.suite.rundir import LATENCY_FILE
from capsbench.suite.stages.time import TimeSettings, format_latency


def register(sub) -> None:
    p = sub.add_parser(
        "time",
        help="time exported models in ONNX Runtime and torch eager per batch size",
        description="Time every exported model of a preset with one harness: ONNX Runtime (CPU, or CUDA with "
        "IOBinding and CUDA graphs), torch eager and optionally torch.compile, on the same real test images "
        f"in the same process. Writes {LATENCY_FILE} per config (p50/p90/p99, mean, std, min, first run, "
        "images/s, GFLOP/s against the machine's fp32 GEMM rate) and prints p50 with ORT's speedup over "
        "torch eager. Finished configs with the same settings are skipped unless --force.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_BATCH_SIZES),
        metavar="N",
        help="batch sizes to sweep (default: %(default)s)",
    )
    p.add_argument("--iters", type=int, default=TimeSettings.iters, help="timed runs (default: %(default)s)")
    p.add_argument(
        "--warmup", type=int, default=TimeSettings.warmup, help="untimed runs (default: %(default)s)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=TimeSettings.max_seconds,
        help="stop timing a backend at one batch size after this many seconds, keeping at least 5 runs "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for ORT and torch (default: all cores)"
    )
    p.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="auto",
        help="ONNX Runtime provider: auto (CUDA when it really runs, else CPU), cpu, cuda (default: auto)",
    )
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile (compiles once per batch size: slow)"
    )
    p.add_argument("--force", action="store_true", help="re-time finished configs")
    p.set_defaults(func=run)


def run(args) -> int:
    configs = options.select_configs(args)
    out = options.run_dir(args)
    args.no_progress = False  # the harness's per-backend lines are the command's progress
    settings = options.stage_settings(args, time=options.time_settings(args))
    result = options.run_stages(args, configs, ["time"], settings)
    for cfg in configs:
        latency = result.results[cfg.id].get("time")
        if latency is None:
            continue
        if latency.get("skipped"):
            print(f"  {LATENCY_FILE} is up to date (same settings and models); --force re-times it")
        print(format_latency(latency))
    print(f"results: {out}")
    return result.exit_code
