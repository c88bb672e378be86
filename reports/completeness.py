"""Whether two runs can be compared at all: every result the comparison reads is there in both, no stage failed,
and every model.onnx is the file its export recorded. `capsbench check` refuses (one line, non-zero) otherwise,
so a run with deleted, failed or swapped results never passes as "0 regressions".

Reads result files only (pipeline.json, export.json, the files' presence and hashes).
"""

from __future__ import annotations

from pathlib import Path

from capsbench import results as R
from capsbench.reports.load import ReportError, read_json


def _present(folder: Path) -> set[str]:
    """The compared files of one config folder, with the variants' (prune_*/...) files."""
    found = {name for name in R.COMPARED if (folder / name).is_file()}
    for sub in R.prune_dirs(folder):
        found |= {f"{sub.name}/{n}" for n in R.VARIANT_FILES if (sub / n).is_file()}
    return found | {n for n in R.VARIANT_FILES if (folder / n).is_file()}


def _problems_of_run(run_dir: Path) -> list[str]:
    """Failed stages (pipeline.json) and ONNX files that are not the ones their export recorded."""
    problems = []
    for cid, folder in R.config_dirs(run_dir).items():
        pipeline = read_json(folder / R.PIPELINE_FILE, "pipeline") or {}
        failed = [
            k for k, v in pipeline.items() if isinstance(v, dict) and v.get("status") == R.StageStatus.FAILED
        ]
        if failed:
            problems.append(f"{run_dir}: config {cid}: stage {', '.join(failed)} failed (pipeline.json)")
        for export in [folder / R.EXPORT_FILE, *sorted(folder.glob(R.in_pruned(R.EXPORT_FILE)))]:
            info = read_json(export, "export")
            onnx = export.parent / R.ONNX_FILE
            if info is not None and onnx.is_file() and info.get("onnx_sha256") != R.sha256(onnx):
                problems.append(f"{onnx}: not the file its export recorded (sha256 differs from export.json)")
    return problems


def completeness_problems(run_dir: Path, baseline_dir: Path) -> list[str]:
    """Why `run_dir` and `baseline_dir` cannot be compared; empty when they can."""
    run_dir, baseline_dir = Path(run_dir), Path(baseline_dir)
    for d in (run_dir, baseline_dir):
        if not d.is_dir():
            raise ReportError(f"{d}: no such run folder")
    problems = _problems_of_run(run_dir) + _problems_of_run(baseline_dir)
    cur, base = R.config_dirs(run_dir), R.config_dirs(baseline_dir)
    for cid in sorted(set(cur) & set(base)):
        have, want = _present(cur[cid]), _present(base[cid])
        if missing := sorted(want - have):
            problems.append(f"{run_dir}: config {cid} lacks {', '.join(missing)} (the baseline has them)")
        if missing := sorted(have - want):
            problems.append(f"{baseline_dir}: config {cid} lacks {', '.join(missing)} (the run has them)")
    return problems
