"""`capsbench all`: every stage for every config of a preset, each cached, a failing config recorded and skipped.

train -> health -> prune + fine-tune -> health -> export -> parity -> time (ORT Python, C++ runner, torch eager)
-> report. Each stage skips finished work, so a killed run resumes; `pipeline.json` records every stage's status.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsbench.suite import cpp_stage, export_stage
from capsbench.suite import prune as pruning
from capsbench.suite import train as training
from capsbench.suite.env import environment, pick_device
from capsbench.suite.errors import CapsbenchError, DatasetError
from capsbench.suite.presets import RunConfig
from capsbench.suite.results import read_result, write_json
from capsbench.suite.runner import RUN_FILE, config_dir

STAGES = ("train", "prune", "export", "time", "cpp", "report")
PIPELINE_FILE = "pipeline.json"


@dataclass(frozen=True)
class PipelineSettings:
    stages: tuple[str, ...] = STAGES
    prune_pairs: tuple[tuple[float, float], ...] = ((0.5, 0.5),)
    criterion: str = "chip"
    finetune_epochs: int = 1
    time: export_stage.TimeSettings = field(default_factory=export_stage.TimeSettings)
    device: str | None = None
    force: bool = False
    progress: bool = True


def _stage(record: dict, name: str, fn: Callable[[], Any], log: Callable[[str], None]) -> Any:
    """Run one stage of one config, recording ok/failed with the error; a DatasetError stops the run."""
    t0 = time.perf_counter()
    try:
        result = fn()
    except DatasetError:
        raise
    except (CapsbenchError, RuntimeError, ValueError) as e:  # torch/ORT raise these for bad models or inputs
        record[name] = {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}",
            "seconds": time.perf_counter() - t0,
        }
        if not isinstance(e, CapsbenchError):
            record[name]["traceback"] = traceback.format_exc(limit=8)
        log(f"    {name}: FAILED: {e}")
        return None
    record[name] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 2)}
    log(f"    {name}: ok ({record[name]['seconds']:.1f} s)")
    return result


def run_config(
    cfg: RunConfig,
    out: Path,
    splits_fn: Callable[[], training.Splits],
    s: PipelineSettings,
    gemm_cache: dict,
    log: Callable[[str], None],
) -> dict:
    """All stages of one config; returns its pipeline record (also written to pipeline.json)."""
    record: dict[str, Any] = {"config_id": cfg.id, "label": cfg.label}
    device = pick_device(s.device)

    def train() -> dict:
        return training.train_and_measure(
            cfg, out, splits_fn(), device=device, force=s.force, progress=s.progress
        )

    if "train" in s.stages:
        _stage(record, "train", train, log)
    if not training.is_trained(out):
        record["status"] = "failed"
        write_json(out / PIPELINE_FILE, "pipeline", record)
        return record
    if "prune" in s.stages:

        def prune() -> list[dict]:
            base = pruning.TrainedBase(cfg, out, splits_fn(), device)
            return [
                pruning.prune_config(
                    cfg,
                    out,
                    splits_fn(),
                    b,
                    c,
                    s.criterion,
                    finetune_epochs=s.finetune_epochs,
                    device=device,
                    force=s.force,
                    progress=s.progress,
                    base=base,
                )
                for b, c in s.prune_pairs
            ]

        _stage(record, "prune", prune, log)
    if "export" in s.stages:

        def export() -> list[dict]:
            rows = export_stage.export_config(cfg, out, splits_fn, force=s.force)
            bad = [r for r in rows if r["status"] not in ("done", "exported")]
            if bad:
                raise export_stage.StageError(
                    "; ".join(f"{r.get('variant')}: {r['status']}: {r.get('error', '')}" for r in bad)
                )
            return rows

        _stage(record, "export", export, log)
    if "time" in s.stages:
        _stage(
            record,
            "time",
            lambda: export_stage.time_config(
                cfg, out, splits_fn, s.time, force=s.force, gemm_cache=gemm_cache
            ),
            log,
        )
    if "cpp" in s.stages:
        _stage(
            record,
            "cpp",
            lambda: cpp_stage.time_config_cpp(cfg, out, splits_fn, s.time, force=s.force),
            log,
        )
    failed = [k for k, v in record.items() if isinstance(v, dict) and v.get("status") == "failed"]
    record["status"] = "failed" if failed else "complete"
    write_json(out / PIPELINE_FILE, "pipeline", record)
    return record


def run_all(
    configs: list[RunConfig],
    run_dir: Path,
    settings: PipelineSettings,
    *,
    preset: str | None = None,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Every stage of every config into run_dir; returns one record per config."""
    run_dir = Path(run_dir)
    write_json(
        run_dir / RUN_FILE,
        "run",
        {
            "preset": preset,
            "configs": [{"config_id": c.id, "label": c.label} for c in configs],
            "stages": list(settings.stages),
            "prune_pairs": [list(p) for p in settings.prune_pairs],
            "finetune_epochs": settings.finetune_epochs,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": environment(pick_device(settings.device)),
        },
    )
    cache: dict[tuple, training.Splits] = {}
    gemm_cache: dict[str, dict] = {}
    records = []
    for i, cfg in enumerate(configs, 1):
        key = (cfg.dataset, cfg.train_subset, cfg.eval_subset, cfg.seed)

        def splits_fn(cfg: RunConfig = cfg, key: tuple = key) -> training.Splits:
            if key not in cache:
                cache.clear()  # one dataset in memory at a time
                cache[key] = training.load_splits(cfg, data_dir)
            return cache[key]

        log(f"[{i}/{len(configs)}] {cfg.id}  {cfg.label}")
        records.append(run_config(cfg, config_dir(run_dir, cfg), splits_fn, settings, gemm_cache, log))
    return records


def summary_rows(run_dir: Path, records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        out = Path(run_dir) / r["config_id"]
        metrics = (
            read_result(out / training.METRICS_FILE, "metrics")
            if (out / training.METRICS_FILE).exists()
            else {}
        )
        prunes = sorted(out.glob("prune_*/prune.json"))
        pruned = (
            read_result(prunes[-1], "prune")["summary"]["test_accuracy"]["after_finetune"] if prunes else None
        )
        rows.append(
            {
                "config_id": r["config_id"],
                "status": r["status"],
                "accuracy": metrics.get("test_accuracy"),
                "pruned_accuracy": pruned,
                "stages": " ".join(f"{k}:{v['status']}" for k, v in r.items() if isinstance(v, dict)),
                "label": r["label"],
            }
        )
    return rows


def format_summary(rows: list[dict]) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    head = f"{'config':<11}{'status':<10}{'acc %':>7}{'pruned %':>10}  stages"
    lines = [head, "-" * 100]
    for r in rows:
        lines.append(
            f"{r['config_id']:<11}{r['status']:<10}{pct(r['accuracy']):>7}{pct(r['pruned_accuracy']):>10}"
            f"  {r['stages']}   {r['label']}"
        )
    return "\n".join(lines)
