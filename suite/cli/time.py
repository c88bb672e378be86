"""`capsbench time`: latency of the exported models in ONNX Runtime against torch eager, per batch size."""

from __future__ import annotations

from capsbench.export.latency import format_table
from capsbench.results import LATENCY_FILE
from capsbench.suite.cli import options


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
    options.add_timing(p)
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


def format_latency(result: dict) -> str:
    """The p50 table per variant, with ORT's speedup over torch eager and GFLOP/s against the GEMM rate."""
    parts = []
    for variant in dict.fromkeys(r["variant"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["variant"] == variant]
        gflop = result["flops_per_image"][variant] / 1e9
        parts.append(f"{result['config_id']} {variant} ({gflop:.3f} GFLOP/image)  {result['label']}")
        parts.append(format_table(rows))
        ok = [r for r in rows if r.get("status") == "ok" and r.get("gemm_fraction") is not None]
        if ok and result.get("gemm"):
            best = max(ok, key=lambda r: r["gflops_per_s"])
            parts.append(
                f"best: {best['backend']} at batch {best['batch']}: {best['gflops_per_s']:.1f} GFLOP/s = "
                f"{100 * best['gemm_fraction']:.0f}% of the {result['gemm']['gflops_per_s']:.1f} GFLOP/s fp32 "
                f"GEMM rate"
            )
        errors = [r for r in rows if r.get("status") != "ok"]
        parts.extend(f"  {r['backend']} batch {r['batch']}: {r['error']}" for r in errors)
    return "\n".join(parts)
