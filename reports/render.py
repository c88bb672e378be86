"""The HTML report: a run folder's result files -> one self-contained report.html (inline CSS and SVG).

Every number shown comes from the JSON files; charts are hand-made SVG (reports/svg.py), so it opens offline.
"""

from __future__ import annotations

import datetime as _dt
import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import jinja2

from capsbench.reports import svg
from capsbench.reports.compare import compare_runs
from capsbench.reports.load import eager_p50, load_run

TEMPLATES = Path(__file__).parent / "templates"

# What the paper claims, in words (no table of the paper could be read: see README and shared/paper.md).
PAPER_CLAIMS = [
    (
        "deeper_loses_accuracy",
        "Adding capsule layers does not improve accuracy, or lowers it (Sahu & Altahhan 2024; Everett et al. 2023).",
    ),
    ("deeper_more_inactive", "Deeper capsule layers have more inactive capsules (vanishing activations)."),
    (
        "pruning_fewer_inactive",
        "Pruned models have fewer inactive capsules than the unpruned models of the same configuration.",
    ),
    (
        "pruning_better_accuracy",
        "Pruned models have better accuracy than the unpruned models of the same configuration.",
    ),
]


def _layer_names(health: dict | None) -> list[str]:
    return [layer["name"] for layer in health["layers"]] if health else []


def _inactive_cells(health: dict | None) -> list[str]:
    return [f"{layer['inactive']}/{layer['num_capsules']}" for layer in health["layers"]] if health else []


def _main_prune(c: dict) -> dict | None:
    """The pruning result a config's table row shows: the one with the largest ratios that finished."""
    done = [p for p in c["prunes"] if p.get("status") == "complete"]
    if not done:
        return None
    return max(
        done, key=lambda p: (p["settings"]["backbone_ratio"] + p["settings"]["caps_ratio"], p["folder"])
    )


def _acc(c: dict) -> float | None:
    m = c["metrics"]
    return m.get("test_accuracy") if m and m.get("status") == "complete" else None


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


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
                "depth": len(cfg["model"]["intermediate"]),
                "caps": cfg["model"]["primary_types"],
                "dim": cfg["model"]["primary_dim"],
                "seed": cfg["seed"],
                "epochs": m.get("epochs"),
                "status": m.get("status", "not trained"),
                "error": m.get("error"),
                "accuracy": _pct(acc),
                "pruned_accuracy": _pct(pruned_acc),
                "delta": "-" if acc is None or pruned_acc is None else f"{100 * (pruned_acc - acc):+.2f}",
                "prune_setting": (
                    f"b{prune['settings']['backbone_ratio']:.2f} c{prune['settings']['caps_ratio']:.2f} "
                    f"{prune['settings'].get('criterion', '')}"
                )
                if prune
                else "-",
                "parameters": m.get("parameters"),
                "pruned_parameters": prune["summary"]["parameters"]["after"] if prune else None,
                "flops": prune["summary"]["flops"]["before"] if prune else None,
                "pruned_flops": prune["summary"]["flops"]["after"] if prune else None,
                "inactive": _inactive_cells(c["health"]),
                "inactive_pruned": _inactive_cells(prune.get("health_pruned")) if prune else [],
                "train_seconds": m.get("train_seconds_total"),
            }
        )
    return rows


def seed_groups(configs: list[dict]) -> list[dict]:
    """Configs that differ only in seed, with mean and std of accuracy (unpruned and pruned)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for c in configs:
        key = c["label"].rsplit("| seed", 1)[0].strip() + f" | {c['config']['dataset']}"
        groups[key].append(c)
    out = []
    for key, members in groups.items():
        accs = [a for c in members if (a := _acc(c)) is not None]
        pruned = [p["summary"]["test_accuracy"]["after_finetune"] for c in members if (p := _main_prune(c))]
        out.append(
            {
                "label": key,
                "seeds": len(members),
                "accuracy_mean": statistics.fmean(accs) if accs else None,
                "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "pruned_mean": statistics.fmean(pruned) if pruned else None,
                "pruned_std": statistics.stdev(pruned) if len(pruned) > 1 else 0.0,
            }
        )
    return out


def depth_chart(configs: list[dict]) -> str | None:
    """Accuracy vs number of intermediate capsule layers, unpruned and pruned, per capsule shape (mean over seeds)."""
    buckets: dict[tuple[str, bool], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in configs:
        mdl = c["config"]["model"]
        shape = f"{mdl['primary_types']} caps x {mdl['primary_dim']} dims"
        depth = len(mdl["intermediate"])
        if (a := _acc(c)) is not None:
            buckets[(shape, False)][depth].append(100 * a)
        if p := _main_prune(c):
            buckets[(shape, True)][depth].append(100 * p["summary"]["test_accuracy"]["after_finetune"])
    if not buckets:
        return None
    series = []
    for (shape, pruned), by_depth in sorted(buckets.items()):
        pts = sorted((float(d), statistics.fmean(v)) for d, v in by_depth.items())
        errs = [statistics.stdev(by_depth[int(d)]) if len(by_depth[int(d)]) > 1 else 0.0 for d, _ in pts]
        series.append(svg.Series(f"{shape}{' pruned' if pruned else ''}", pts, dashed=pruned, errors=errs))
    return svg.line_chart(
        series,
        "intermediate capsule layers",
        "test accuracy (%)",
        "Accuracy vs depth (solid: unpruned, dashed: pruned)",
        integer_x=True,
    )


def health_heatmaps(configs: list[dict]) -> tuple[str | None, str | None]:
    with_health = [c for c in configs if c["health"]]
    if not with_health:
        return None, None
    max_depth = max(len(c["config"]["model"]["intermediate"]) for c in with_health)
    cols = ["primary"] + [f"intermediate{i + 1}" for i in range(max_depth)] + ["class"]

    def grid(get_health) -> tuple[list[str], list[list[float | None]]]:
        rows, values = [], []
        for c in with_health:
            h = get_health(c)
            if not h:
                continue
            by_name = {layer["name"]: layer["inactive_fraction"] for layer in h["layers"]}
            rows.append(f"{c['id']} {c['label'].split('|')[1].strip()}")
            values.append([by_name.get(col) for col in cols])
        return rows, values

    rows, values = grid(lambda c: c["health"])
    before = svg.heatmap(rows, cols, values, "Inactive capsules before pruning")
    rows, values = grid(lambda c: (_main_prune(c) or {}).get("health_pruned"))
    after = svg.heatmap(rows, cols, values, "Inactive capsules after pruning + fine-tuning") if rows else None
    return before, after


def length_charts(configs: list[dict], limit: int = 6) -> list[dict]:
    """Capsule-length distributions per layer (share of samples per 0.02-wide bin) for the deepest configs."""
    chosen = sorted((c for c in configs if c["health"]), key=lambda c: -len(c["health"]["layers"]))[:limit]
    charts = []
    for c in chosen:
        series = []
        for layer in c["health"]["layers"]:
            edges, counts = layer["histogram"]["edges"], layer["histogram"]["counts"]
            total = sum(counts) or 1
            pts = [((edges[i] + edges[i + 1]) / 2, 100 * n / total) for i, n in enumerate(counts)]
            series.append(svg.Series(layer["name"], pts))
        charts.append(
            {
                "id": c["id"],
                "svg": svg.line_chart(
                    series, "capsule length", "share of samples (%)", f"Capsule lengths, {c['id']}"
                ),
            }
        )
    return charts


def sweep_chart(configs: list[dict]) -> str | None:
    series = []
    for c in configs:
        for sweep in c["sweeps"]:
            by_caps: dict[float, list[tuple[float, float]]] = defaultdict(list)
            for r in sweep["rows"]:
                if r.get("acc_after_finetune") is not None:
                    by_caps[r["caps_ratio"]].append((r["backbone_ratio"], 100 * r["acc_after_finetune"]))
            for caps, pts in sorted(by_caps.items()):
                series.append(svg.Series(f"{c['id']} caps {caps:.2f}", pts))
    if not series:
        return None
    return svg.line_chart(
        series[:9],
        "backbone pruning ratio",
        "test accuracy after fine-tuning (%)",
        "Accuracy vs pruning ratio (one line per config and capsule ratio)",
    )


def latency_rows(configs: list[dict]) -> list[dict]:
    rows = []
    for c in configs:
        eager = eager_p50(c["latency"])  # the C++ runner's rows are compared with the same torch timings
        for source in (c["latency"], c["latency_cpp"]):
            if not source:
                continue
            for r in source["rows"]:
                base = eager.get((r.get("variant"), r.get("batch")))
                rows.append(
                    {
                        "id": c["id"],
                        "variant": r.get("variant", "model"),
                        "backend": r.get("backend"),
                        "provider": r.get("provider", ""),
                        "batch": r.get("batch"),
                        "p50": r.get("p50_ms"),
                        "p90": r.get("p90_ms"),
                        "p99": r.get("p99_ms"),
                        "first": r.get("first_run_ms"),
                        "throughput": r.get("throughput_ips"),
                        "error": r.get("error"),
                        "speedup": (base / r["p50_ms"]) if base and r.get("p50_ms") else None,
                        "gemm_fraction": r.get("gemm_fraction"),
                    }
                )
    return rows


def latency_charts(rows: list[dict]) -> list[dict]:
    charts = []
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["p50"]:
            by_key[(r["id"], r["variant"])].append(r)
    for (cid, variant), rs in by_key.items():
        batches = sorted({r["batch"] for r in rs})
        backends = sorted({r["backend"] for r in rs})
        groups = [
            (
                b,
                [
                    next((r["p50"] for r in rs if r["backend"] == b and r["batch"] == n), None)
                    for n in batches
                ],
            )
            for b in backends
        ]
        charts.append(
            {
                "id": cid,
                "variant": variant,
                "svg": svg.bar_chart(
                    [str(n) for n in batches],
                    groups,
                    "p50 latency (ms, log scale)",
                    f"Latency {cid} ({variant})",
                    "batch size",
                    log_y=True,
                ),
            }
        )
    return charts


def pareto_chart(configs: list[dict], rows: list[dict]) -> str | None:
    """Accuracy vs ORT p50 at the smallest timed batch, unpruned and pruned variants."""
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for c in configs:
        ort = [r for r in rows if r["id"] == c["id"] and str(r["backend"]).startswith("ort") and r["p50"]]
        variants = [("unpruned", "model", _acc(c))]
        variants += [
            ("pruned", p["folder"], p["summary"]["test_accuracy"]["after_finetune"])
            for p in c["prunes"]
            if p.get("status") == "complete"
        ]
        for group, variant, acc in variants:
            mine = [r for r in ort if r["variant"] == variant]
            if acc is None or not mine:
                continue
            smallest = min(r["batch"] for r in mine)
            p50 = min(r["p50"] for r in mine if r["batch"] == smallest)
            groups[group].append((p50, 100 * acc))
    if not groups:
        return None
    return svg.scatter_chart(
        [svg.Series(k, v) for k, v in groups.items()],
        "ONNX Runtime p50 latency (ms)",
        "test accuracy (%)",
        "Accuracy vs latency (Pareto view)",
    )


def _trend(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope, None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def findings(configs: list[dict], lat_rows: list[dict]) -> tuple[list[str], list[dict]]:
    """Sentences for the summary and the paper's claims with what this run shows for each."""
    trained = [c for c in configs if _acc(c) is not None]
    notes, claims = [], []
    failed = [c for c in configs if (c["metrics"] or {}).get("status") not in ("complete",)]
    if trained:
        best = max(trained, key=_acc)
        notes.append(
            f"{len(trained)} of {len(configs)} configs trained; best test accuracy "
            f"{100 * _acc(best):.2f}% ({best['id']}, {best['label']})."
        )
    if failed:
        notes.append(
            f"{len(failed)} config(s) did not finish: "
            + ", ".join(f"{c['id']} ({(c['metrics'] or {}).get('status', 'not trained')})" for c in failed)
            + "."
        )
    depths = [float(len(c["config"]["model"]["intermediate"])) for c in trained]
    acc_slope = _trend(depths, [100 * _acc(c) for c in trained])
    dead = [c["health"]["routed_inactive_fraction"] for c in trained if c["health"]]
    dead_slope = (
        _trend(
            [float(len(c["config"]["model"]["intermediate"])) for c in trained if c["health"]],
            [100 * d for d in dead],
        )
        if dead
        else None
    )
    pruned = [(c, p) for c in trained if (p := _main_prune(c))]
    better = [1 for c, p in pruned if p["summary"]["test_accuracy"]["after_finetune"] > _acc(c)]
    fewer = [
        1
        for _, p in pruned
        if p["summary"]["routed_inactive"]["after_finetune"] < p["summary"]["routed_inactive"]["before"]
    ]
    nonzero_dead = [1 for _, p in pruned if p["summary"]["routed_inactive"]["before"] > 0]

    def verdict(ok: bool | None, text: str) -> dict:
        return {"status": "not measured" if ok is None else ("held" if ok else "did not hold"), "ours": text}

    claims.append(
        verdict(
            None if acc_slope is None else acc_slope <= 0,
            "no depth variation in this run"
            if acc_slope is None
            else f"accuracy changes by {acc_slope:+.2f} points per added layer (least squares)",
        )
    )
    claims.append(
        verdict(
            None if dead_slope is None else dead_slope > 0,
            "no depth variation in this run"
            if dead_slope is None
            else f"share of inactive routed capsules changes by {dead_slope:+.2f} points per added layer",
        )
    )
    claims.append(
        verdict(
            None if not pruned else (len(fewer) > len(pruned) / 2),
            "no pruned model in this run"
            if not pruned
            else f"{len(fewer)} of {len(pruned)} pruned configs have fewer inactive routed capsules "
            f"({len(nonzero_dead)} had any to lose)",
        )
    )
    claims.append(
        verdict(
            None if not pruned else (len(better) > len(pruned) / 2),
            "no pruned model in this run"
            if not pruned
            else f"{len(better)} of {len(pruned)} pruned configs beat their unpruned accuracy",
        )
    )
    speedups = [r["speedup"] for r in lat_rows if r["speedup"] and str(r["backend"]).startswith("ort")]
    if speedups:
        notes.append(
            f"ONNX Runtime vs torch eager (p50): {min(speedups):.2f}x to {max(speedups):.2f}x "
            f"over {len(speedups)} timings."
        )
    return notes, [{"claim": text, **v} for (_, text), v in zip(PAPER_CLAIMS, claims, strict=True)]


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


def build_context(run_dir: Path, baseline_dir: Path | None = None) -> dict[str, Any]:
    run = load_run(run_dir)
    configs = sorted(
        run["configs"],
        key=lambda c: (
            c["config"]["dataset"],
            c["config"]["model"]["primary_types"],
            c["config"]["model"]["primary_dim"],
            len(c["config"]["model"]["intermediate"]),
            c["config"]["seed"],
        ),
    )
    lat = latency_rows(configs)
    notes, claims = findings(configs, lat)
    before, after = health_heatmaps(configs)
    env = run["run"].get("environment", {})
    return {
        "title": f"capsbench report: {run['run'].get('preset') or Path(run_dir).name}",
        "run_dir": str(run_dir),
        "run": run["run"],
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "environment": env,
        "configs": configs,
        "rows": config_rows(configs),
        "groups": seed_groups(configs),
        "multi_seed": any(g["seeds"] > 1 for g in seed_groups(configs)),
        "notes": notes,
        "claims": claims,
        "depth_chart": depth_chart(configs),
        "heatmap_before": before,
        "heatmap_after": after,
        "length_charts": length_charts(configs),
        "sweep_chart": sweep_chart(configs),
        "latency": lat,
        "latency_charts": latency_charts(lat),
        "pareto_chart": pareto_chart(configs, lat),
        "comparison": compare_runs(run_dir, baseline_dir) if baseline_dir else None,
        "layer_names": _layer_names,
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
    out_path = Path(out_path) if out_path else Path(run_dir) / "report.html"
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(html)
    tmp.replace(out_path)
    return out_path
