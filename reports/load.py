"""Reading a run folder's result files into plain dicts: the report's only input.

Knows the file names and kinds the stages write; refuses JSON from a newer schema than it understands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


class ReportError(Exception):
    """A run folder cannot be reported on (missing, empty, unreadable, newer schema)."""


def read_json(path: Path, kind: str | None = None) -> dict[str, Any] | None:
    """A result file's contents, None when it does not exist; read through the suite's one validating reader
    (suite/rundir.read_result: UTF-8, a JSON object, a schema version this capsbench understands)."""
    from capsbench.suite.errors import CheckpointError
    from capsbench.suite.rundir import read_result

    if not path.is_file():
        return None
    try:
        return read_result(path, kind)
    except (OSError, CheckpointError) as e:
        raise ReportError(str(e)) from e


def load_config_dir(folder: Path) -> dict[str, Any] | None:
    config = read_json(folder / "config.json", "config")
    if config is None:
        return None
    prunes = []
    for sub in sorted(folder.glob("prune_*/")):
        result = read_json(sub / "prune.json", "prune")
        if result is not None:
            result["health_pruned"] = read_json(sub / "health_pruned.json", "health")
            result["export"] = read_json(sub / "export.json", "export")
            result["parity"] = read_json(sub / "parity.json", "parity")
            prunes.append(result)
    sweeps = [read_json(p, "prune_sweep") for p in sorted(folder.glob("prune_sweep_*.json"))]
    label = config.get("label")
    return {
        "id": config["config_id"],
        # A tampered label shows as invalid instead of breaking the report.
        "label": label if isinstance(label, str) else f"(invalid label: {label!r})",
        "config": config["config"],
        "metrics": read_json(folder / "metrics.json", "metrics"),
        "health": read_json(folder / "health.json", "health"),
        "prunes": prunes,
        "sweeps": [s for s in sweeps if s],
        "exports": {p.stem: read_json(p, "export") for p in sorted(folder.glob("export*.json"))},
        # The trained net's parity, then each pruned net's (in its prune_* folder).
        "parity": {
            str(p.relative_to(folder).with_suffix("")): read_json(p, "parity")
            for p in [*sorted(folder.glob("parity*.json")), *sorted(folder.glob("prune_*/parity.json"))]
        },
        "latency": read_json(folder / "latency.json", "latency"),
        "latency_cpp": read_json(folder / "latency_cpp.json", "latency"),
        # Which stages ran and how they ended ('capsbench all' writes it; single-stage commands do not).
        "pipeline": read_json(folder / "pipeline.json", "pipeline"),
    }


def load_run(run_dir: Path) -> dict[str, Any]:
    """Everything a run folder holds: run.json and one entry per config folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder; run 'capsbench all' (or 'capsbench train') first")
    configs = [c for d in sorted(run_dir.iterdir()) if d.is_dir() and (c := load_config_dir(d)) is not None]
    if not configs:
        raise ReportError(
            f"{run_dir}: no config results here; run 'capsbench all' (or 'capsbench train') first"
        )
    return {
        "dir": str(run_dir),
        "run": read_json(run_dir / "run.json", "run") or {},
        "configs": configs,
        # The statistics stage's verdicts on the paper's claims (schema in render.claims), when it ran.
        "verdicts": read_json(run_dir / "verdicts.json", "verdicts"),
    }


def eager_p50(latency: dict | None) -> dict[tuple, float]:
    """torch eager's p50 (ms) by (variant, batch) from a latency.json: the same-run base of every speedup."""
    return {
        (r.get("variant"), r["batch"]): r["p50_ms"]
        for r in (latency or {}).get("rows", [])
        if r.get("backend") == "torch_eager" and r.get("p50_ms")
    }
