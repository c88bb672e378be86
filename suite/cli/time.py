"""`capsbench time`: latency of the exported models in ONNX Runtime against torch eager, per batch size."""

from __future__ import annotations

from capsbench.export import ExportError
from capsbench.export.latency import DEFAULT_BATCH_SIZES
from capsbench.export.sessions import PROVIDERS
from capsbench.suite import train as training
from capsbench.suite.cli import options
from capsbench.suite.export_stage import (
    LATENCY_FILE,
    StageError,
    TimeSettings,
    format_latency,
    time_config,
)
from capsbench.suite.runner import config_dir


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
    settings = options.time_settings(args)
    cache, gemm_cache = {}, {}
    for i, cfg in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] {cfg.id}  {cfg.label}", flush=True)

        def splits(cfg=cfg):
            key = (cfg.dataset, cfg.train_subset, cfg.eval_subset, cfg.seed)
            if key not in cache:
                cache.clear()
                cache[key] = training.load_splits(cfg, args.data_dir)
            return cache[key]

        try:
            result = time_config(
                cfg,
                config_dir(out, cfg),
                splits,
                settings,
                force=args.force,
                gemm_cache=gemm_cache,
                progress=lambda line: print(line, flush=True),
            )
        except ExportError as e:
            raise StageError(str(e)) from e
        if result.get("skipped"):
            print(f"  {LATENCY_FILE} is up to date (same settings and models); --force re-times it")
        print(format_latency(result))
    print(f"results: {out}")
    return 0
