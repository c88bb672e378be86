"""The end-of-run summary table of `capsbench all` and `capsbench train`, read from the run folder's result files.

One row per model: the trained net of a config, then each of its pruned nets (one per pruning setting). Every
value comes from a result file through `rundir` (never from the runner's memory), so the table printed after a
run says what its files say; a field a file lacks (a stage not run, an older result) is shown as "-".
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from capsbench import results as R
from capsbench.results import RowStatus, StageStatus, Status
from capsbench.suite import rundir

# (key, header over two lines, width, align): the table's columns in order; the label is last and unpadded.
COLUMNS = (
    ("config_id", ("config", ""), 10, "<"),
    ("status", ("status", ""), 8, "<"),
    ("model", ("model", "(pruned: criterion, ratios)"), 27, "<"),
    ("accuracy", ("test", "acc %"), 6, ">"),
    ("routed_inactive", ("routed", "inact. %"), 8, ">"),
    ("deepest_length", ("deepest", "mean len"), 8, ">"),
    ("batch", ("ORT", "batch"), 5, ">"),
    ("ort_p50_ms", ("ORT p50", "ms"), 8, ">"),
    ("speedup", ("vs", "eager"), 6, ">"),
    ("timing", ("timing", ""), 8, "<"),
    ("failed", ("failed", "stages"), 12, "<"),
    ("label", ("label", ""), 0, "<"),
)

LEGEND = (
    "model: the trained net, or a pruned one: <criterion> b<backbone channel ratio> c<capsule type ratio>. "
    "test acc %: test accuracy (a pruned net's after its fine-tuning). routed inact. %: share of the routed "
    "capsules (the layers after the primary one) whose length stays below the inactivity threshold. deepest "
    "mean len: mean capsule length in the last capsule layer. ORT p50 ms: median ONNX Runtime (Python) latency "
    "at the smallest timed batch (ORT batch); vs eager: torch eager p50 / ORT p50 there (>1: ORT is faster); "
    "timing: the measurement's stability verdict, when it has one."
)


def _pruned_name(prune: dict, folder: str) -> str:
    s = prune.get("settings") or {}
    if "backbone_ratio" not in s or "caps_ratio" not in s:
        return f"pruned {folder}"
    name = f"pruned {s.get('criterion', '?')} b{s['backbone_ratio']:.2f} c{s['caps_ratio']:.2f}"
    if s.get("intermediate_ratio"):
        name += f" i{s['intermediate_ratio']:.2f}"
    return name + (" reinit" if s.get("reinit_caps_layers") else "")


def _health_cells(health: dict | None) -> dict[str, Any]:
    layers = (health or {}).get("layers") or []
    return {
        "routed_inactive": (health or {}).get("routed_inactive_fraction"),
        "deepest_length": layers[-1].get("mean_length") if layers else None,
    }


def _latency_cells(latency: dict | None, variant: str) -> dict[str, Any]:
    """Python ORT's p50 at the smallest batch timed for `variant`, and its speedup over torch eager."""
    rows = [r for r in (latency or {}).get("rows", []) if r.get("variant", "model") == variant]
    ort = [r for r in rows if str(r.get("backend", "")).startswith("ort")]
    if not ort:
        return {"batch": None, "ort_p50_ms": None, "speedup": None, "timing": None}
    batch = min(r["batch"] for r in ort)
    row = next(r for r in ort if r["batch"] == batch)
    p50 = row.get("p50_ms") if row.get("status", RowStatus.OK) == RowStatus.OK else None
    speedup = row.get("speedup_vs_torch_eager") if p50 else None
    if p50 and speedup is None:
        eager = next(
            (
                r
                for r in rows
                if r.get("backend") == "torch_eager" and r["batch"] == batch and r.get("p50_ms")
            ),
            None,
        )
        speedup = eager["p50_ms"] / p50 if eager else None
    if row.get("status", RowStatus.OK) != RowStatus.OK:
        timing = str(row["status"])
    elif row.get("stable") is None:
        timing = None
    else:
        timing = "stable" if row["stable"] else "unstable"
    return {"batch": batch, "ort_p50_ms": p50, "speedup": speedup, "timing": timing}


def config_ids(run_dir: Path) -> list[str]:
    """The configs of a run folder in run.json's order, then any other config folder."""
    run = R.read_if_valid(Path(run_dir) / R.RUN_FILE, "run") or {}
    ids = [c["config_id"] for c in run.get("configs", [])]
    others = sorted(d.name for d in Path(run_dir).iterdir() if d.is_dir() and (d / R.CONFIG_FILE).is_file())
    return ids + [i for i in others if i not in ids]


def summary_rows(run_dir: Path, ids: list[str] | None = None) -> list[dict[str, Any]]:
    """One dict per model (each config's trained net, then its pruned nets) with the table's raw values:
    fractions as fractions, times in ms, None where a result file or field is missing."""
    run_dir = Path(run_dir)
    if ids is None and not run_dir.is_dir():
        return []
    rows = []
    for cfg_id in config_ids(run_dir) if ids is None else ids:
        out = rundir.config_dir(run_dir, cfg_id)
        config = R.read_if_valid(out / R.CONFIG_FILE, "config") or {}
        pipeline = R.read_if_valid(out / R.PIPELINE_FILE, "pipeline") or {}
        metrics = R.read_if_valid(out / R.METRICS_FILE, "metrics") or {}
        latency = R.read_if_valid(out / R.LATENCY_FILE, "latency")
        status = pipeline.get("status") or metrics.get("status") or "missing"
        failed = [
            k for k, v in pipeline.items() if isinstance(v, dict) and v.get("status") == StageStatus.FAILED
        ]
        if metrics.get("status") not in (None, Status.COMPLETE):  # e.g. diverged: the train stage's own word
            status, failed = metrics["status"], failed or ["train"]
        common = {
            "config_id": cfg_id,
            "status": status,
            "failed": ",".join(failed) or None,
            "label": config.get("label") or pipeline.get("label") or metrics.get("label", ""),
        }
        rows.append(
            {
                **common,
                "model": "trained",
                "variant": R.BASE.name,
                "accuracy": metrics.get("test_accuracy")
                if metrics.get("status") == Status.COMPLETE
                else None,
                **_health_cells(R.read_if_valid(out / R.HEALTH_FILE, "health")),
                **_latency_cells(latency, R.BASE.name),
            }
        )
        for path in sorted(out.glob(R.in_pruned(R.PRUNE_FILE))):
            prune = R.read_if_valid(path, "prune")
            if prune is None:
                continue
            folder = path.parent.name
            rows.append(
                {
                    **common,
                    "model": _pruned_name(prune, folder),
                    "variant": folder,
                    "accuracy": ((prune.get("summary") or {}).get("test_accuracy") or {}).get(
                        "after_finetune"
                    ),
                    **_health_cells(R.read_if_valid(path.parent / R.HEALTH_PRUNED_FILE, "health")),
                    **_latency_cells(latency, folder),
                }
            )
    return rows


def cell(key: str, value: Any) -> str:
    """One value as the table prints it."""
    if value is None or value == "":
        return "-"
    if key in ("accuracy", "routed_inactive"):
        return f"{100 * value:.2f}"
    if key == "deepest_length":  # significant digits: a vanishing length must not print as 0.000
        return f"{value:.3g}"
    if key == "ort_p50_ms":
        return f"{value:.3f}"
    if key == "speedup":
        return f"{value:.2f}x"
    return terminal_safe(str(value))


def terminal_safe(text: str) -> str:
    """Text from a result file made safe to print: control characters (an ESC that would start a terminal
    escape sequence: set the title, move the cursor, recolour) shown as their \\x.. escape, never sent raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def format_summary(rows: list[dict[str, Any]], legend: bool = True) -> str:
    """The summary table: a header naming every column, a rule, one line per model; repeated config cells of a
    config's pruned rows are left blank. With `legend`, a note on what the columns measure."""

    def line(cells: list[str]) -> str:
        return " ".join(
            f"{c:{align}{width}}" if width else c
            for c, (_, _, width, align) in zip(cells, COLUMNS, strict=True)
        ).rstrip()

    head = [line([h[0] for _, h, _, _ in COLUMNS]), line([h[1] for _, h, _, _ in COLUMNS])]
    lines = [*head, "-" * max(len(h) for h in head)]
    previous = None
    for r in rows:
        same = r["config_id"] == previous
        cells = []
        for key, *_ in COLUMNS:
            if same and key in ("config_id", "status", "failed", "label"):
                cells.append("")
            else:
                cells.append(cell(key, r.get(key)))
        lines.append(line(cells))
        previous = r["config_id"]
    if legend:
        lines.append(textwrap.fill(LEGEND, width=110))
    return "\n".join(lines)
