"""`capsbench train`: train every config of a preset and measure its activation health."""

from __future__ import annotations

from capsbench.suite import rundir
from capsbench.suite.cli import options


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a preset's configs and measure activation health",
        description="Train every config of a preset (resuming from the last finished epoch when a run is "
        "rerun) and write runs/<run-id>/<config-id>/{config.json, checkpoint.pt, metrics.json, health.json}. "
        "A config whose loss diverges is recorded as such and the run goes on; the exit code is 1 then.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    options.add_device(p)
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        metavar="MODE",
        help="train with torch.compile (MODE: default, max-autotune; on CUDA reduce-overhead = CUDA graphs, "
        "untested here). Off by default: on a 2-core CPU the first compile costs more than it saves on small "
        "runs ('capsbench bench train' measures both)",
    )
    p.add_argument("--force", action="store_true", help="retrain finished configs instead of skipping them")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    p.set_defaults(func=run)


def summary_row(out, cfg_id: str, label: str) -> dict:
    metrics = rundir.read_if_valid(out / rundir.METRICS_FILE, "metrics") or {"status": "failed"}
    health = (
        rundir.read_if_valid(out / rundir.HEALTH_FILE, "health") if metrics["status"] == "complete" else None
    )
    return {
        "config_id": cfg_id,
        "label": label,
        "status": metrics["status"],
        "test_accuracy": metrics.get("test_accuracy"),
        "train_seconds": metrics.get("train_seconds_total"),
        "inactive": [f"{lay['inactive']}/{lay['num_capsules']}" for lay in (health or {}).get("layers", [])],
        "error": metrics.get("error", ""),
    }


def format_table(rows: list[dict]) -> str:
    head = f"{'config':<11}{'status':<10}{'acc':>7}{'train s':>9}  inactive per layer (primary..class)  label"
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{r['test_accuracy']:.4f}" if r.get("test_accuracy") is not None else "-"
        secs = f"{r['train_seconds']:.0f}" if r.get("train_seconds") is not None else "-"
        inactive = " ".join(r.get("inactive", [])) or r.get("error", "")[:40]
        lines.append(f"{r['config_id']:<11}{r['status']:<10}{acc:>7}{secs:>9}  {inactive:<36} {r['label']}")
    return "\n".join(lines)


def run(args) -> int:
    configs = options.select_configs(args)
    out = options.run_dir(args)
    result = options.run_stages(
        args, configs, ["train", "health"], options.stage_settings(args, compile_mode=args.compile)
    )
    print(format_table([summary_row(rundir.config_dir(out, c), c.id, c.label) for c in configs]))
    print(f"results: {out}")
    return result.exit_code
