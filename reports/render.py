"""The HTML report: a run folder's result files -> one self-contained report.html (inline CSS and SVG).

Every number shown comes from the JSON files; charts are matplotlib figures inlined as SVG (reports/charts.py),
so the page opens offline. `render_report(run_dir, out_path=None, baseline_dir=None)` is the one door in.
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import jinja2

from capsbench import results as R
from capsbench.claims import CLAIMS, RULE, VERDICTS, Verdict, mean_inactive_fraction
from capsbench.files import atomic_write
from capsbench.reports import charts
from capsbench.reports.charts import PALETTE, Panel, Series
from capsbench.reports.compare import compare_runs
from capsbench.reports.load import eager_p50, load_run

TEMPLATES = Path(__file__).parent / "templates"

MIN_SEEDS_FOR_CLAIMS = 3

# The per-config stages whose files (the results contract's `required`) say what "missing" means in the header.
CONFIG_STAGES = ("train", "health", "prune", "export", "time", "cpp")
BACKENDS = [  # (column title, test on the backend name)
    ("Python ORT", lambda b: b.startswith("ort") and not b.startswith("ort_cpp")),
    ("C++ ORT", lambda b: b.startswith("ort_cpp")),
    ("torch eager", lambda b: b == "torch_eager"),
    ("torch.compile", lambda b: b.startswith("torch_compile")),
]


def _backend_title(backend: str) -> str | None:
    return next((title for title, test in BACKENDS if test(str(backend))), None)


# ---------------------------------------------------------------- numbers as the page prints them


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def _fmt_int(v: Any) -> str:
    if v is None:
        return "-"
    v = float(v)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def _fmt_num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _delta_pct(before: float | None, after: float | None) -> str:
    if before is None or after is None or not before:
        return "-"
    return f"{100 * (after - before) / before:+.1f}%"


# ---------------------------------------------------------------- reading configs


def _acc(c: dict) -> float | None:
    m = c["metrics"]
    return m.get("test_accuracy") if m and m.get("status") == R.Status.COMPLETE else None


def _shape(c: dict) -> str:
    mdl = c["config"]["model"]
    return f"{mdl['primary_types']} types x {mdl['primary_dim']} dims"


def _depth(c: dict) -> int:
    return len(c["config"]["model"]["intermediate"])


def _group_key(c: dict) -> str:
    """Configs that differ only in seed share this key."""
    return c["label"].rsplit("| seed", 1)[0].strip() + f" | {c['config']['dataset']}"


def _prune_variant(p: dict) -> str:
    """'pruned' for the method under test, the control's name (e.g. 'random', 'l1') when the file marks one."""
    return str(p.get("control") or "pruned")


def _done_prunes(c: dict) -> list[dict]:
    return [p for p in c["prunes"] if p.get("status") == R.Status.COMPLETE]


def _main_prune(c: dict) -> dict | None:
    """The pruned model a config's rows show: the method under test (not a control) with the largest ratios."""
    done = [p for p in _done_prunes(c) if not p.get("control")]
    if not done:
        return None
    return max(
        done, key=lambda p: (p["settings"]["backbone_ratio"] + p["settings"]["caps_ratio"], p["folder"])
    )


def _inactive_total(health: dict | None) -> tuple[int, int] | None:
    if not health:
        return None
    return sum(x["inactive"] for x in health["layers"]), sum(x["num_capsules"] for x in health["layers"])


# ---------------------------------------------------------------- header


def header(run: dict, configs: list[dict]) -> dict:
    """Preset, device, execution providers actually used, commit, date, seeds, stage status and cautions."""
    meta = run["run"]
    env: dict[str, Any] = (
        meta.get("environment")
        or next(((c["metrics"] or {}).get("environment") for c in configs if c["metrics"]), {})
        or {}
    )
    if env.get("device", "cpu") != "cpu" or env.get("cuda_available"):
        device = f"GPU: {env.get('gpu') or env.get('gpu_name') or env.get('device')}"
    else:
        device = f"CPU: {env.get('cpu', 'unknown')}, {env.get('cpu_threads', '?')} threads"
    providers: set[str] = set()
    for c in configs:
        for session in ((c["latency"] or {}).get("sessions") or {}).values():
            if session and session.get("provider"):
                providers.add(f"{session['provider']} (Python)")
        for runner in ((c["latency_cpp"] or {}).get("runner") or {}).values():
            if runner and runner.get("provider"):
                providers.add(f"{runner['provider']} (C++)")
    seeds = sorted({c["config"]["seed"] for c in configs})
    groups = defaultdict(list)
    for c in configs:
        groups[_group_key(c)].append(c)
    min_seeds = min(len(g) for g in groups.values())
    epochs = sorted({c["config"].get("epochs") for c in configs if c["config"].get("epochs") is not None})
    cautions = []
    if min_seeds < MIN_SEEDS_FOR_CLAIMS:
        cautions.append(
            f"{min_seeds} seed(s) per configuration (fewer than {MIN_SEEDS_FOR_CLAIMS}): differences between "
            "configurations cannot be told from seed-to-seed noise, so this run can neither support nor refute "
            "the paper's claims. Read it as a check of the pipeline."
        )
    if meta.get("preset") == "smoke":
        cautions.append(
            f"The smoke preset trains on a subset for {', '.join(map(str, epochs))} epoch(s): far from the paper's schedule."
        )
    return {
        "preset": meta.get("preset") or "-",
        "device": device,
        "providers": sorted(providers) or ["none recorded (no latency results)"],
        "commit": env.get("git_commit") or "-",
        "started": meta.get("started") or "-",
        "seeds": seeds,
        "environment": env,
        "cautions": cautions,
        "stages": stage_status(run, configs),
    }


class Cell(R.StrEnum):
    """A stage's cell in the report's pipeline table (also its CSS class; "not run" shows as n/a)."""

    OK = "ok"
    FAILED = "failed"
    NOT_RUN = "not run"  # never run for this config (e.g. a preset that times only its first configs)
    MISSING = "missing"  # run, but a file it always leaves is not there


def stage_status(run: dict, configs: list[dict]) -> list[dict]:
    """Per config: each requested stage ok / failed (with its error) / missing files, from pipeline.json."""
    stages = run["run"].get("stages") or list(CONFIG_STAGES)
    rows = []
    for c in configs:
        folder = Path(run["dir"]) / c["id"]
        record = c.get("pipeline") or {}
        cells = []
        for stage in stages:
            if stage not in CONFIG_STAGES:
                continue
            rec = record.get(stage) or {}
            missing = [f for f in R.STAGE_FILES[stage].required if not list(folder.glob(f))]
            if rec.get("status") == R.StageStatus.FAILED:
                cells.append({"stage": stage, "status": Cell.FAILED, "detail": rec.get("error", "")})
            elif missing and record and not rec:
                # Never run for this config (e.g. a preset that times only its first configs): not a loss.
                cells.append({"stage": stage, "status": Cell.NOT_RUN, "detail": ""})
            elif missing:
                cells.append({"stage": stage, "status": Cell.MISSING, "detail": ", ".join(missing)})
            else:
                cells.append({"stage": stage, "status": Cell.OK, "detail": ""})
        rows.append(
            {
                "id": c["id"],
                "label": c["label"],
                "cells": cells,
                "pipeline": record.get("status") or "no pipeline.json",
            }
        )
    return rows


# ---------------------------------------------------------------- tables


def config_rows(configs: list[dict]) -> list[dict]:
    rows = []
    for c in configs:
        m, cfg, prune = c["metrics"] or {}, c["config"], _main_prune(c)
        acc = _acc(c)
        pruned_acc = prune["summary"]["test_accuracy"]["after_finetune"] if prune else None
        rows.append(
            {
                "id": c["id"],
                "label": c["label"],
                "dataset": cfg["dataset"],
                "epochs": m.get("epochs"),
                "status": m.get("status", "not trained"),
                "error": m.get("error"),
                "accuracy": _pct(acc),
                "pruned_accuracy": _pct(pruned_acc),
                "delta": "-" if acc is None or pruned_acc is None else f"{100 * (pruned_acc - acc):+.2f}",
                "parameters": m.get("parameters"),
                "inactive": [
                    f"{x['inactive']}/{x['num_capsules']}" for x in (c["health"] or {}).get("layers", [])
                ],
            }
        )
    return rows


def seed_groups(configs: list[dict]) -> list[dict]:
    """Configs that differ only in seed, with mean and std of accuracy (unpruned and pruned)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in configs:
        groups[_group_key(c)].append(c)
    out = []
    for key, members in groups.items():
        accs = [a for c in members if (a := _acc(c)) is not None]
        pruned = [p["summary"]["test_accuracy"]["after_finetune"] for c in members if (p := _main_prune(c))]
        out.append(
            {
                "label": key,
                "seeds": len(members),
                "accuracy_mean": statistics.fmean(accs) if accs else None,
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
                "pruned_mean": statistics.fmean(pruned) if pruned else None,
                "pruned_std": statistics.stdev(pruned) if len(pruned) > 1 else None,
            }
        )
    return out


def _latency_row(c: dict, variant: str, backend_title: str, batch: int | None = None) -> dict | None:
    rows = [
        r
        for src in (c["latency"], c["latency_cpp"])
        for r in (src or {}).get("rows", [])
        if r.get("variant", "model") == variant
        and _backend_title(r.get("backend")) == backend_title
        and r.get("p50_ms")
    ]
    if not rows:
        return None
    if batch is None:
        batch = min(r["batch"] for r in rows)
    return next((r for r in rows if r["batch"] == batch), None)


def pruning_rows(configs: list[dict]) -> list[dict]:
    """Each pruned model (and control) beside its parent: accuracy, inactive capsules, size, cost, latency."""
    out = []
    for c in configs:
        done = _done_prunes(c)
        if not done:
            continue
        flops = (c["latency"] or {}).get("flops_per_image") or {}
        batches = sorted({r["batch"] for r in (c["latency"] or {}).get("rows", []) if r.get("p50_ms")})
        big = batches[-1] if batches else None

        def lat(variant: str, batch: int | None, c: dict = c) -> float | None:
            r = _latency_row(c, variant, "Python ORT", batch) if batch is not None else None
            return r["p50_ms"] if r else None

        parent_inactive = _inactive_total(c["health"])
        parent = {
            "variant": "unpruned",
            "folder": "-",
            "accuracy": _acc(c),
            "inactive": parent_inactive,
            "fraction": mean_inactive_fraction(c["health"]),
            "parameters": done[0]["summary"]["parameters"]["before"],
            "macs": done[0]["summary"]["flops"]["before"],
            "flops": flops.get("model"),
            "p50_small": lat("model", batches[0] if batches else None),
            "p50_big": lat("model", big),
        }
        rows = [parent]
        for p in done:
            s = p["summary"]
            rows.append(
                {
                    "variant": _prune_variant(p),
                    "folder": p["folder"],
                    "accuracy": s["test_accuracy"]["after_finetune"],
                    "inactive": _inactive_total(p.get("health_pruned")),
                    "fraction": mean_inactive_fraction(p.get("health_pruned")),
                    "parameters": s["parameters"]["after"],
                    "macs": s["flops"]["after"],
                    "flops": flops.get(p["folder"]),
                    "p50_small": lat(p["folder"], batches[0] if batches else None),
                    "p50_big": lat(p["folder"], big),
                }
            )
        for r in rows[1:]:
            r["d_accuracy"] = (
                "-"
                if r["accuracy"] is None or parent["accuracy"] is None
                else f"{100 * (r['accuracy'] - parent['accuracy']):+.2f}"
            )
            r["d_parameters"] = _delta_pct(parent["parameters"], r["parameters"])
            r["d_macs"] = _delta_pct(parent["macs"], r["macs"])
            r["d_flops"] = _delta_pct(parent["flops"], r["flops"])
            r["d_p50_small"] = _delta_pct(parent["p50_small"], r["p50_small"])
            r["d_p50_big"] = _delta_pct(parent["p50_big"], r["p50_big"])
            r["d_fraction"] = (
                "-"
                if r["fraction"] is None or parent["fraction"] is None
                else f"{100 * (r['fraction'] - parent['fraction']):+.1f}"
            )
        out.append(
            {
                "id": c["id"],
                "label": c["label"],
                "rows": rows,
                "batch_small": batches[0] if batches else None,
                "batch_big": big,
            }
        )
    return out


def latency_tables(configs: list[dict]) -> list[dict]:
    """Per model (config x variant): one row per batch size, backends side by side."""
    tables = []
    for c in configs:
        rows = [r for src in (c["latency"], c["latency_cpp"]) for r in (src or {}).get("rows", [])]
        if not rows:
            continue
        backends = [t for t, _ in BACKENDS if any(_backend_title(r.get("backend")) == t for r in rows)]
        eager = eager_p50(c["latency"])
        variants = list(dict.fromkeys(r.get("variant", "model") for r in rows))
        for variant in variants:
            mine = [r for r in rows if r.get("variant", "model") == variant]
            lines = []
            for batch in sorted({r["batch"] for r in mine}):
                cells: list[dict[str, Any] | None] = []  # None: no row of this backend at this batch
                for b in backends:
                    r = next(
                        (r for r in mine if r["batch"] == batch and _backend_title(r.get("backend")) == b),
                        None,
                    )
                    if r is None:
                        cells.append(None)
                        continue
                    base = eager.get((variant, batch))
                    stable = r.get("stable")
                    cells.append(
                        {
                            "backend": r.get("backend"),
                            "error": r.get("error") if not r.get("p50_ms") else None,
                            "min": r.get("min_ms"),
                            "p50": r.get("p50_ms"),
                            "p90": r.get("p90_ms"),
                            "first": r.get("first_run_ms"),
                            "ips": r.get("throughput_ips"),
                            "spread": r.get("spread"),
                            "stable": "n/a" if stable is None else ("stable" if stable else "unstable"),
                            "speedup": base / r["p50_ms"] if base and r.get("p50_ms") else None,
                        }
                    )
                lines.append({"batch": batch, "cells": cells})
            tables.append(
                {
                    "id": c["id"],
                    "label": c["label"],
                    "variant": variant,
                    "backends": backends,
                    "rows": lines,
                    "machine": machine_line(c["latency"]),
                }
            )
    return tables


def machine_line(latency: dict | None) -> str | None:
    """How fast the machine ran while a config was timed (its GEMM probe) and which rounds were set aside."""
    if not latency:
        return None
    probe = latency.get("machine_probe")
    if not probe:
        return None
    line = (
        f"machine probe: fp32 GEMM {probe['gflops_per_s']:.0f} GFLOP/s, its fastest calls varied "
        f"{probe['drift']:.2f}× over {latency.get('rounds', '?')} round(s)"
    )
    set_aside = latency.get("rounds_set_aside") or []
    if set_aside:
        line += f"; {len(set_aside)} round(s) set aside and timed again ({set_aside[0]})"
    return line


# ---------------------------------------------------------------- charts


def _layer_axis(depth: int) -> list[tuple[float, str]]:
    return [(0, "primary"), *((i, f"caps {i}") for i in range(1, depth + 1)), (depth + 1, "class")]


def _layer_x(name: str, index: int, n_layers: int, max_depth: int) -> float:
    """Where a layer sits on the depth profile's x axis: primary at 0, class capsules at max_depth + 1."""
    if name == "primary" or index == 0:
        return 0
    if name == "class" or index == n_layers - 1:
        return max_depth + 1
    digits = "".join(ch for ch in name if ch.isdigit())
    return float(digits) if digits else float(index)


def depth_profile(configs: list[dict]) -> list[dict]:
    """Per capsule shape: mean capsule length (log) and inactive fraction per layer, unpruned vs pruned vs
    controls, mean over seeds with the seeds' min-max as a band. Class capsules are aligned on the right."""
    by_shape: dict[str, list[dict]] = defaultdict(list)
    for c in configs:
        if c["health"]:
            by_shape[_shape(c)].append(c)
    out = []
    for n, (shape, members) in enumerate(sorted(by_shape.items())):
        max_depth = max(_depth(c) for c in members)
        # (depth, variant) -> layer x -> seeds' values
        length: dict[tuple[int, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        inactive: dict[tuple[int, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
        for c in members:
            healths = [("unpruned", c["health"])]
            healths += [(_prune_variant(p), p.get("health_pruned")) for p in _done_prunes(c)]
            for variant, h in healths:
                layers = (h or {}).get("layers", [])
                for index, layer in enumerate(layers):
                    x = _layer_x(layer["name"], index, len(layers), max_depth)
                    length[(_depth(c), variant)][x].append(layer["mean_length"])
                    inactive[(_depth(c), variant)][x].append(layer["inactive_fraction"])
        depths = sorted({d for d, _ in length})
        order = {"unpruned": 0, "pruned": 1}

        def series(table, order=order, depths=depths):
            out_ = []
            for d, variant in sorted(table, key=lambda k: (k[0], order.get(k[1], 2), k[1])):
                xs = sorted(table[(d, variant)])
                out_.append(
                    Series(
                        f"{d} caps layers, {variant}",
                        xs,
                        [table[(d, variant)][x] for x in xs],
                        color=PALETTE[depths.index(d) % len(PALETTE)],
                        variant=variant,
                    )
                )
            return out_

        seeds = max(len(v) for t in length.values() for v in t.values())
        chart_id = f"depth-profile-{n}"
        ticks = _layer_axis(max_depth)
        svg = charts.panels(
            chart_id,
            [
                Panel(
                    series(length),
                    "layer",
                    "mean capsule length (log)",
                    "Capsule length per layer",
                    log_y=True,
                    band=True,
                    xticks=ticks,
                ),
                Panel(
                    series(inactive),
                    "layer",
                    "inactive fraction",
                    "Inactive capsules per layer",
                    band=True,
                    xticks=ticks,
                    ylim=(-0.03, 1.03),
                ),
            ],
            size=(10.5, 3.6),
        )
        out.append({"id": chart_id, "shape": shape, "seeds": seeds, "svg": svg})
    return out


def depth_profile_rows(configs: list[dict]) -> list[dict]:
    """The depth profile's numbers: per config and variant, mean length and inactive count per layer."""
    rows = []
    for c in configs:
        variants = [("unpruned", "-", c["health"])]
        variants += [(_prune_variant(p), p["folder"], p.get("health_pruned")) for p in _done_prunes(c)]
        for variant, folder, h in variants:
            if h:
                rows.append(
                    {
                        "id": c["id"],
                        "variant": variant,
                        "folder": folder,
                        "layers": [
                            {
                                "name": x["name"],
                                "length": x["mean_length"],
                                "inactive": f"{x['inactive']}/{x['num_capsules']}",
                            }
                            for x in h["layers"]
                        ],
                    }
                )
    return rows


def accuracy_depth_chart(configs: list[dict]) -> str | None:
    """Accuracy vs number of intermediate capsule layers per capsule shape, unpruned vs pruned vs controls."""
    buckets: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in configs:
        if (a := _acc(c)) is not None:
            buckets[(_shape(c), "unpruned")][_depth(c)].append(100 * a)
        for p in _done_prunes(c):
            buckets[(_shape(c), _prune_variant(p))][_depth(c)].append(
                100 * p["summary"]["test_accuracy"]["after_finetune"]
            )
    if not buckets:
        return None
    shapes = sorted({s for s, _ in buckets})
    series = []
    rank = {"unpruned": 0, "pruned": 1}
    for (shape, variant), by_depth in sorted(
        buckets.items(), key=lambda kv: (kv[0][0], rank.get(kv[0][1], 2), kv[0][1])
    ):
        xs = sorted(by_depth)
        vals = [by_depth[x] for x in xs]
        series.append(
            Series(
                f"{shape}, {variant}",
                [float(x) for x in xs],
                vals,
                color=PALETTE[shapes.index(shape) % len(PALETTE)],
                variant=variant,
                point_labels=[f"{statistics.fmean(v):.2f}" for v in vals],
            )
        )
    depths = sorted({x for s in series for x in s.x})
    return charts.panels(
        "accuracy-depth",
        [
            Panel(
                series,
                "intermediate capsule layers",
                "test accuracy (%)",
                "Accuracy vs depth",
                xticks=[(d, f"{d:g}") for d in depths],
            )
        ],
        size=(7.5, 3.4),
    )


def latency_charts(configs: list[dict]) -> list[dict]:
    """Per config: p50 per batch size for every backend and variant, error bars from min to p90."""
    out = []
    for n, c in enumerate(configs):
        rows = [
            r
            for src in (c["latency"], c["latency_cpp"])
            for r in (src or {}).get("rows", [])
            if r.get("p50_ms")
        ]
        if not rows:
            continue
        keys = list(
            dict.fromkeys((r.get("variant", "model"), _backend_title(r.get("backend"))) for r in rows)
        )
        backends = [t for t, _ in BACKENDS]
        series = []
        for variant, backend in keys:
            mine = sorted(
                (
                    r
                    for r in rows
                    if (r.get("variant", "model"), _backend_title(r.get("backend"))) == (variant, backend)
                ),
                key=lambda r: r["batch"],
            )
            per_image = [[r["p50_ms"] / r["batch"]] for r in mine]
            series.append(
                Series(
                    f"{backend}, {'unpruned' if variant == 'model' else 'pruned ' + variant.removeprefix('prune_')}",
                    [float(r["batch"]) for r in mine],
                    per_image,
                    color=PALETTE[backends.index(backend) % len(PALETTE)] if backend in backends else None,
                    variant="unpruned" if variant == "model" else "pruned",
                    lo=[(r.get("min_ms") or r["p50_ms"]) / r["batch"] for r in mine],
                    hi=[(r.get("p90_ms") or r["p50_ms"]) / r["batch"] for r in mine],
                )
            )
        chart_id = f"latency-{n}"
        svg = charts.panels(
            chart_id,
            [
                Panel(
                    series,
                    "batch size",
                    "p50 ms per image (log)",
                    f"Latency, {c['id']}",
                    log_y=True,
                    log_x=True,
                )
            ],
            size=(8.5, 3.6),
        )
        out.append({"id": chart_id, "config": c["id"], "label": c["label"], "svg": svg})
    return out


def pareto_chart(configs: list[dict]) -> str | None:
    """Accuracy vs Python ORT p50 at batch 1 (or the smallest timed batch): each pruned model beside its parent."""
    groups: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    arrows = []
    batches = set()
    for c in configs:
        parent = None
        variants = [("unpruned", "model", _acc(c), c["id"])]
        variants += [
            (
                _prune_variant(p),
                p["folder"],
                p["summary"]["test_accuracy"]["after_finetune"],
                f"{c['id']} {_prune_variant(p)}",
            )
            for p in _done_prunes(c)
        ]
        for group, variant, acc, text in variants:
            r = _latency_row(c, variant, "Python ORT")
            if acc is None or r is None:
                continue
            batches.add(r["batch"])
            point = (r["p50_ms"], 100 * acc)
            groups[group].append((*point, f"{text} (d{_depth(c)})"))
            if group == "unpruned":
                parent = point
            elif parent:
                arrows.append((parent, point))
    if not groups:
        return None
    return charts.scatter_chart(
        "pareto",
        sorted(groups.items(), key=lambda kv: {"unpruned": 0, "pruned": 1}.get(kv[0], 2)),
        f"Python ORT p50 latency at batch {'/'.join(map(str, sorted(batches)))} (ms, log)",
        "test accuracy (%)",
        "Accuracy vs latency",
        arrows=arrows,
        log_x=True,
    )


def sweep_chart(configs: list[dict]) -> str | None:
    series = []
    for c in configs:
        for sweep in c["sweeps"]:
            by_caps: dict[float, list[tuple[float, float]]] = defaultdict(list)
            for r in sweep["rows"]:
                if r.get("acc_after_finetune") is not None:
                    by_caps[r["caps_ratio"]].append((r["backbone_ratio"], 100 * r["acc_after_finetune"]))
            for caps, pts in sorted(by_caps.items()):
                pts.sort()
                series.append(
                    Series(f"{c['id']} caps {caps:.2f}", [x for x, _ in pts], [[y] for _, y in pts])
                )
    if not series:
        return None
    return charts.panels(
        "sweep",
        [
            Panel(
                series[:8],
                "backbone pruning ratio",
                "test accuracy after fine-tuning (%)",
                "Accuracy vs pruning ratio",
            )
        ],
        size=(7.5, 3.4),
    )


# ---------------------------------------------------------------- the paper's claims


def _claim_row(claim, v: dict | None = None, **fallback) -> dict:
    v = v or {}
    interval = v.get("interval")
    return {
        "key": claim.key if claim else str(v.get("claim")),
        "claim": claim.text if claim else str(v.get("claim")),
        "source": claim.source if claim else v.get("source", "?"),
        "stratum": v.get("stratum") or fallback.get("stratum", "-"),
        "verdict": v.get("verdict")
        if v.get("verdict") in VERDICTS
        else fallback.get("verdict", Verdict.INCONCLUSIVE),
        "test": v.get("test") or fallback.get("test", "-"),
        "n": v.get("n"),
        "non_tied": v.get("non_tied"),
        "effect": v.get("effect"),
        "effect_name": v.get("effect_name") or "",
        "interval": interval if isinstance(interval, list) and len(interval) == 2 else None,
        "level": v.get("interval_level"),
        "p_value": v.get("p_holm", v.get("p_value")),
        "note": v.get("note") or fallback.get("note", ""),
        "chart": claim.chart if claim else "",
    }


def claims(run: dict, configs: list[dict]) -> list[dict]:
    """One row per claim of the registry (capsbench/claims.py) and stratum, from `verdicts.json` when the run has
    one (see suite/verdicts.py; each entry: claim, stratum, verdict, test, n, non_tied, effect, interval, p_value,
    p_holm, note). Without one, each claim is 'not testable' (the run cannot speak to it) or 'inconclusive' with
    the descriptive numbers: a report never says 'did not hold' without a test. Claims unknown to the registry
    are listed after it; a verdict outside the four words is shown as 'inconclusive'."""
    given: dict[str, list[dict]] = defaultdict(list)
    for v in (run.get("verdicts") or {}).get("verdicts", []):
        given[v.get("claim")].append(v)
    trained = [c for c in configs if _acc(c) is not None]
    depths = {_depth(c) for c in trained}
    pruned = [(c, p) for c in trained if (p := _main_prune(c))]
    out = []
    for claim in CLAIMS:
        if entries := given.pop(claim.key, []):
            out += [_claim_row(claim, v) for v in entries]
            continue
        if claim.key.startswith("deeper") or claim.key == "larger_dims_train_deeper":
            dims = {c["config"]["model"]["primary_dim"] for c in trained}
            testable = len(depths) >= 2 if claim.key.startswith("deeper") else {8, 16} <= dims
            by_depth = defaultdict(list)
            for c in trained:
                acc = _acc(c)
                assert acc is not None, "trained holds only the configs with a test accuracy"
                by_depth[_depth(c)].append(100 * acc)
            why = "; ".join(
                f"depth {d}: {statistics.fmean(v):.2f}% (n={len(v)})" for d, v in sorted(by_depth.items())
            )
        else:
            testable = bool(pruned)
            why = f"{len(pruned)} pruned model(s) in this run" if pruned else "no pruned model in this run"
            alive = [
                f
                for c, _ in pruned
                if 0 < (f := (c["health"] or {}).get("routed_inactive_fraction") or 0) < 1
            ]
            if claim.key == "pruning_fewer_inactive" and pruned and not alive:
                testable, why = False, "no unpruned model is partly alive: no inactive capsule to lose"
        out.append(
            _claim_row(
                claim,
                verdict=Verdict.INCONCLUSIVE if testable else Verdict.NOT_TESTABLE,
                test="none: no verdicts.json in this run (run the verdicts stage)",
                note=why,
            )
        )
    for entries in given.values():  # claims the statistics stage knows and this page does not
        out += [_claim_row(None, v) for v in entries]
    return out


def _budgets(configs: list[dict]) -> str:
    """The inits and training budgets behind the run's verdicts, e.g. 'fan_in init, 1 epoch(s) on 6000 images'."""
    seen = []
    for c in configs:
        cfg, m = c["config"], c["config"]["model"]
        images = cfg.get("train_subset") or "all"
        text = (
            f"{R.model_value(m, 'caps_init')} init, {cfg.get('epochs')} epoch(s) on {images} training images"
        )
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


def precheck_rows(run: dict) -> dict | None:
    """precheck.json as a table: per config its placement, largest gradient and each routed layer's RMS length
    at initialisation, measured beside the gain recursion's prediction."""
    pre = run.get("precheck")
    if not pre:
        return None
    rows = []
    for c in pre.get("configs", []):
        layers = c.get("layers") or []
        rows.append(
            {
                "id": c.get("config_id"),
                "label": c.get("label"),
                "placement": c.get("placement"),
                "max_grad": c.get("max_grad_rms"),
                "profile": [
                    (la.get("name"), la.get("measured_rms_length"), la.get("predicted_rms_length"))
                    for la in layers
                ],
            }
        )
    return {"rule": pre.get("rule", ""), "rows": rows}


# ---------------------------------------------------------------- the page


def build_context(run_dir: Path, baseline_dir: Path | None = None) -> dict[str, Any]:
    run = load_run(run_dir)
    configs = sorted(
        run["configs"],
        key=lambda c: (c["config"]["dataset"], _shape(c), _depth(c), c["config"]["seed"]),
    )
    groups = seed_groups(configs)
    return {
        "title": f"capsbench report: {run['run'].get('preset') or Path(run_dir).name}",
        "run_dir": str(run_dir),
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "head": header(run, configs),
        "configs": configs,
        "rows": config_rows(configs),
        "groups": groups,
        "multi_seed": any(g["seeds"] > 1 for g in groups),
        "claims": claims(run, configs),
        "precheck": precheck_rows(run),
        "claims_rule": RULE,
        "claims_budget": _budgets(configs),
        # The history's trend page beside the report (`capsbench all --history`), when there is one.
        "trend": R.TREND_FILE if (Path(run_dir) / R.TREND_FILE).is_file() else None,
        "threshold": next((c["health"].get("threshold") for c in configs if c["health"]), None),
        "depth_profiles": depth_profile(configs),
        "depth_rows": depth_profile_rows(configs),
        "accuracy_depth": accuracy_depth_chart(configs),
        "pruning": pruning_rows(configs),
        "sweep_chart": sweep_chart(configs),
        "latency_tables": latency_tables(configs),
        "latency_charts": latency_charts(configs),
        "pareto_chart": pareto_chart(configs),
        "comparison": compare_runs(run_dir, baseline_dir) if baseline_dir else None,
    }


def render_report(run_dir: Path, out_path: Path | None = None, baseline_dir: Path | None = None) -> Path:
    """Write report.html (default: inside the run folder) and return its path."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=_pct, si=_fmt_int, num=_fmt_num)
    html = env.get_template("report.html.j2").render(**build_context(Path(run_dir), baseline_dir))
    out_path = Path(out_path) if out_path else Path(run_dir) / R.REPORT_FILE
    # The project's one writer: a unique temporary created exclusively (a link planted at any name is never
    # followed), fsync, rename; the temporary goes on any failure.
    return atomic_write(out_path, lambda f: f.write(html))
