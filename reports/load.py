"""Reading a run folder's result files into plain dicts: the report's only input.

Reads through the results contract (capsbench/results.py: its file names, kinds and schema version); refuses
JSON from a newer schema than it understands, and figures that cannot be judged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsbench import results as R


class ReportError(R.ResultError):
    """A run folder cannot be reported on (missing, empty, unreadable, newer schema)."""


def read_json(path: Path, kind: str | None = None) -> dict[str, Any] | None:
    """A result file's contents, None when it does not exist; read through the contract's one reader
    (results.read_result: UTF-8, a JSON object, a schema version this capsbench understands), then validated."""
    if not path.is_file():
        return None
    try:
        return validate(path, R.read_result(path, kind))
    except ReportError:
        raise
    except R.ResultError as e:
        raise ReportError(str(e)) from e
    except OSError as e:
        raise ReportError(f"{path}: {e.strerror or e}") from e


# ------------------------------------------------------------------------ validation of what is judged


def _finite(value: Any, low: float | None = None, high: float | None = None) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _positive_samples(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(_finite(x, 0.0) for x in value)


def _refuse(path: Path, field: str, value: Any, want: str) -> None:
    shown = repr(value)
    raise ReportError(
        f"{path}: {field} is {shown[:60]}{'...' if len(shown) > 60 else ''}, not {want}; the file was edited or "
        "written by a broken run: rerun the stage that writes it (or use --force)"
    )


def _check(path: Path, data: dict, field: str, ok: Callable[[Any], bool], want: str) -> None:
    if field in data and not ok(data[field]):
        _refuse(path, field, data[field], want)


def validate(path: Path, data: dict[str, Any] | None) -> dict[str, Any] | None:
    """Refuse (ReportError, one line) a result file whose figures that `check` gates or the report draws are
    of the wrong type or not finite: every comparison with NaN is false, so a NaN accuracy would pass a gate
    as 'ok', and matplotlib cannot draw it. Statuses other than complete/ok carry no figures to judge."""
    if data is None:
        return None
    kind = data.get("kind")
    accuracy = lambda v: _finite(v, 0.0, 1.0)  # noqa: E731
    if kind == "metrics" and data.get("status") == R.Status.COMPLETE:
        for field in ("test_accuracy", "best_test_accuracy"):
            _check(path, data, field, accuracy, "an accuracy in [0, 1]")
        if "test_accuracy" not in data:
            _refuse(path, "test_accuracy", None, "an accuracy in [0, 1]")
    elif kind == "health":
        _check(path, data, "routed_inactive", _count, "a count of capsules")
        for i, layer in enumerate(data.get("layers") or []):
            if not isinstance(layer, dict):
                _refuse(path, f"layers[{i}]", layer, "an object")
            for field in ("inactive", "num_capsules"):
                if field in layer and not _count(layer[field]):
                    _refuse(path, f"layers[{i}].{field}", layer[field], "a count of capsules")
    elif kind == "parity":
        _check(path, data, "passed", lambda v: isinstance(v, bool), "true or false")
    elif kind == "prune" and data.get("status") == R.Status.COMPLETE:
        acc = ((data.get("summary") or {}).get("test_accuracy")) or {}
        if not isinstance(acc, dict):
            _refuse(path, "summary.test_accuracy", acc, "an object")
        for field, value in acc.items():
            if value is not None and not accuracy(value):
                _refuse(path, f"summary.test_accuracy.{field}", value, "an accuracy in [0, 1]")
    elif kind == "latency":
        rows = data.get("rows", [])
        if not isinstance(rows, list):
            _refuse(path, "rows", rows, "a list")
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                _refuse(path, f"rows[{i}]", row, "an object")
            if row.get("status", R.RowStatus.OK) != R.RowStatus.OK:
                continue
            where = f"rows[{i}] ({row.get('variant')}/{row.get('backend')}/{row.get('batch')})"
            for field in ("p50_ms", "min_ms"):
                if field in row and not _finite(row[field], 0.0):
                    _refuse(path, f"{where}.{field}", row[field], "a finite time in ms")
            if "samples_ms" in row and not _positive_samples(row["samples_ms"]):
                _refuse(path, f"{where}.samples_ms", "...", "a list of finite times")
            rounds = row.get("round_samples_ms")
            if rounds is not None and not (isinstance(rounds, list) and all(map(_positive_samples, rounds))):
                _refuse(path, f"{where}.round_samples_ms", "...", "lists of finite times")
            for field in [k for k in row if k.startswith("speedup_vs_")] + ["gemm_fraction", "gflops_per_s"]:
                if row.get(field) is not None and not _finite(row[field], 0.0):
                    _refuse(path, f"{where}.{field}", row[field], "a finite ratio")
    return data


def load_config_dir(folder: Path) -> dict[str, Any] | None:
    config = read_json(folder / R.CONFIG_FILE, "config")
    if config is None:
        return None
    prunes = []
    for sub in R.prune_dirs(folder):
        result = read_json(sub / R.PRUNE_FILE, "prune")
        if result is not None:
            result["health_pruned"] = read_json(sub / R.HEALTH_PRUNED_FILE, "health")
            result["export"] = read_json(sub / R.EXPORT_FILE, "export")
            result["parity"] = read_json(sub / R.PARITY_FILE, "parity")
            prunes.append(result)
    sweeps = [read_json(p, "prune_sweep") for p in sorted(folder.glob(R.SWEEP_GLOB))]
    label = config.get("label")
    return {
        "id": config["config_id"],
        # A tampered label shows as invalid instead of breaking the report.
        "label": label if isinstance(label, str) else f"(invalid label: {label!r})",
        "config": config["config"],
        "metrics": read_json(folder / R.METRICS_FILE, "metrics"),
        "health": read_json(folder / R.HEALTH_FILE, "health"),
        "prunes": prunes,
        "sweeps": [s for s in sweeps if s],
        "exports": {p.stem: read_json(p, "export") for p in sorted(folder.glob("export*.json"))},
        # The trained net's parity, then each pruned net's (in its prune_* folder).
        "parity": {
            str(p.relative_to(folder).with_suffix("")): read_json(p, "parity")
            for p in [*sorted(folder.glob("parity*.json")), *sorted(folder.glob(R.in_pruned(R.PARITY_FILE)))]
        },
        "latency": read_json(folder / R.LATENCY_FILE, "latency"),
        "latency_cpp": read_json(folder / R.LATENCY_CPP_FILE, "latency"),
        # Which stages ran and how they ended ('capsbench all' writes it; single-stage commands do not).
        "pipeline": read_json(folder / R.PIPELINE_FILE, "pipeline"),
    }


def load_run(run_dir: Path) -> dict[str, Any]:
    """Everything a run folder holds: run.json and one entry per config folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: no such run folder; run 'capsbench all' (or 'capsbench train') first")
    configs = [c for d in R.config_dirs(run_dir).values() if (c := load_config_dir(d)) is not None]
    if not configs:
        raise ReportError(
            f"{run_dir}: no config results here; run 'capsbench all' (or 'capsbench train') first"
        )
    return {
        "dir": str(run_dir),
        "run": read_json(run_dir / R.RUN_FILE, "run") or {},
        "configs": configs,
        # The statistics stage's verdicts on the paper's claims (schema in render.claims), when it ran.
        "verdicts": read_json(run_dir / R.VERDICTS_FILE, "verdicts"),
        # Every config's standing before training (`capsbench precheck`), when it ran.
        "precheck": read_json(run_dir / R.PRECHECK_FILE, "precheck"),
    }


def eager_p50(latency: dict | None) -> dict[tuple, float]:
    """torch eager's p50 (ms) by (variant, batch) from a latency.json: the same-run base of every speedup."""
    return {
        (r.get("variant"), r["batch"]): r["p50_ms"]
        for r in (latency or {}).get("rows", [])
        if r.get("backend") == "torch_eager" and r.get("p50_ms")
    }
