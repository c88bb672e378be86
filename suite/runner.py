"""The task runner: one config after another into runs/<run-id>/<config-id>/, resuming finished stages.

A config that diverges or fails is recorded with its error and the run goes on; the summary says which failed.
"""

from __future__ import annotations

import time
from pathlib import Path

from capsbench.suite import train as training
from capsbench.suite.env import environment, pick_device
from capsbench.suite.errors import DatasetError, DivergenceError
from capsbench.suite.presets import RunConfig
from capsbench.suite.results import read_result, write_json

RUN_FILE = "run.json"
DEFAULT_RUNS_DIR = Path("runs")


def config_dir(run_dir: Path, cfg: RunConfig) -> Path:
    return Path(run_dir) / cfg.id


def train_grid(
    configs: list[RunConfig],
    run_dir: Path,
    *,
    preset: str | None = None,
    data_dir: str | Path | None = None,
    device: str | None = None,
    force: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Train and measure health for every config; returns one summary row per config."""
    run_dir = Path(run_dir)
    dev = pick_device(device)
    write_json(
        run_dir / RUN_FILE,
        "run",
        {
            "preset": preset,
            "configs": [{"config_id": c.id, "label": c.label} for c in configs],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(dev),
        },
    )
    rows, cache = [], {}
    for i, cfg in enumerate(configs, 1):
        out = config_dir(run_dir, cfg)
        if progress:
            print(f"[{i}/{len(configs)}] {cfg.id}  {cfg.label}", flush=True)
        key = (cfg.dataset, cfg.train_subset, cfg.eval_subset, cfg.seed)
        try:
            if key not in cache:
                cache.clear()  # keep one dataset in memory at a time
                cache[key] = training.load_splits(cfg, data_dir)
            splits = cache[key]
            metrics, health = training.train_and_measure(
                cfg, out, splits, device=dev, force=force, progress=progress
            )
        except DatasetError:
            raise  # every config needs the data: stop with the dataset's own message
        except DivergenceError as e:
            rows.append({**read_result(out / training.METRICS_FILE, "metrics"), "out_dir": str(out)})
            print(f"  diverged: {e}", flush=True)
            continue
        rows.append(summary_row(cfg, metrics, health, out))
    return rows


def summary_row(cfg: RunConfig, metrics: dict, health: dict, out: Path) -> dict:
    return {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": metrics["status"],
        "test_accuracy": metrics.get("test_accuracy"),
        "epochs": metrics.get("epochs"),
        "train_seconds": metrics.get("train_seconds_total"),
        "inactive": [f"{layer['inactive']}/{layer['num_capsules']}" for layer in health["layers"]],
        "out_dir": str(out),
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
