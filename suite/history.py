"""The history store: every finished run's gated metrics, kept in one SQLite file, and `check --history`'s
judging of a run against it. Torch-free.

Why SQLite (stdlib sqlite3): one file with no server (copied, cached or committed by CI like any artifact),
transactions (an add is all or nothing; a killed add leaves the store as it was), WAL and a busy timeout so that
two processes adding at once both land, and a schema_version table so that an older capsbench refuses a newer
store instead of misreading it. A folder of JSON summaries would need its own locking and its own index to
query "the last N runs of this config on this machine".

Layout (HISTORY_SCHEMA in reports/trend.py, the reader):
    schema_version(version)
    runs(seq, run_key UNIQUE, run_id, run_dir, commit_sha, date, preset, machine_id, machine, added, notes)
    configs(run_seq, config_id, label, probe_gflops, probe_drift)
    metrics(run_seq, config_id, metric, kind, value, stable, reason, rounds, spread, round_values)

`run_key` is the sha256 of the run's recorded content (commit, date, preset, machine, every metric): adding the
same run twice changes nothing, a run timed again (`capsbench time --force`) is a new entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from capsbench.reports.completeness import completeness_problems
from capsbench.reports.load import ReportError, load_run
from capsbench.reports.trend import (
    APPLICATION_ID,
    HISTORY_SCHEMA,
    KINDS,
    HistoryReadError,
    change_points,
    judge,
    open_store,
    read_series,
    worse_sign,
)
from capsbench.results import UNGATED, CheckStatus, RowStatus, Status
from capsbench.suite.errors import CapsbenchError

DEFAULT_WINDOW = 20
OFF_DEVICE = (
    "ONNX Runtime ran partly off its device"  # a row not gated as its provider's (reports/compare.py)
)


class HistoryError(CapsbenchError):
    """The history cannot be used: corrupt, newer schema, not a capsbench history, or a run that cannot be added."""


# ------------------------------------------------------------------------------------------------ a run's record


def _git_head() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def machine_of(run: dict) -> dict[str, Any]:
    """The machine fingerprint: CPU model, ISA extensions, cores, GPU (from the run's and its latency files'
    recorded environment)."""
    env = dict(run["run"].get("environment") or {})
    for c in run["configs"]:
        lat_env = (c.get("latency") or {}).get("environment") or {}
        if lat_env:
            env = {**env, **{k: v for k, v in lat_env.items() if v is not None}}
            break
    isa = env.get("cpu_isa")
    return {
        "cpu": env.get("cpu"),
        "isa": sorted(isa) if isinstance(isa, list) else None,
        "cores": env.get("cpu_count") or env.get("cpu_cores") or env.get("cpu_threads"),
        "gpu": env.get("gpu"),
    }


def machine_id(machine: dict) -> str:
    return hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]


def _round_speedups(eager: dict, ort: dict) -> list[float]:
    e, o = eager.get("round_p50_ms") or [], ort.get("round_p50_ms") or []
    if len(e) != len(o) or not e:
        return []
    return [a / b for a, b in zip(e, o, strict=True) if a and b]


def _spread(values: list[float]) -> float | None:
    """(max - min) / median of a figure's per-round values: how far the rounds (processes) of one run agreed."""
    if len(values) < 2:
        return None
    med = float(np.median(values))
    return (max(values) - min(values)) / med if med else None


def _metric(cid, metric, kind, value, stable=None, reason=None, rounds=None, round_values=()) -> dict:
    rv = [round(float(v), 6) for v in round_values]
    return {
        "config": cid,
        "metric": metric,
        "kind": kind,
        "value": float(value),
        "stable": stable,
        "reason": reason,
        "rounds": rounds,
        "spread": None if (spread := _spread(rv)) is None else round(spread, 6),
        "round_values": rv,
    }


def metrics_of(run: dict) -> list[dict]:
    """The gated metrics of a loaded run (reports.load.load_run), named as `capsbench check` names them."""
    out = []
    for c in run["configs"]:
        cid = c["id"]
        m = c.get("metrics") or {}
        if m.get("status") == Status.COMPLETE and m.get("test_accuracy") is not None:
            out.append(_metric(cid, "test_accuracy", "accuracy", m["test_accuracy"]))
        h = c.get("health") or {}
        if h.get("routed_inactive") is not None:
            out.append(_metric(cid, "routed_inactive", "count", h["routed_inactive"]))
        if h.get("routed_inactive_fraction") is not None:
            out.append(_metric(cid, "routed_inactive_fraction", "fraction", h["routed_inactive_fraction"]))
        for name, par in (c.get("parity") or {}).items():
            if par is not None and isinstance(par.get("passed"), bool):
                out.append(_metric(cid, f"{name}.passed", "parity", 1.0 if par["passed"] else 0.0))
        lat = c.get("latency") or {}
        rows = {
            (r.get("variant"), r["backend"], r["batch"]): r
            for r in lat.get("rows", [])
            if r.get("status", RowStatus.OK) == RowStatus.OK and r.get("p50_ms")
        }
        for (v, backend, batch), r in rows.items():
            key = f"{v}/{backend}/{batch}"
            off = r.get("placement_ok") is False
            stable = r.get("stable") is not False and not off
            reason = f"{OFF_DEVICE} ({r.get('placement_problem')})" if off else r.get("unstable_reason")
            rounds = len(r.get("round_p50_ms") or []) or r.get("rounds")
            out.append(
                _metric(
                    cid,
                    f"p50_ms[{key}]",
                    "p50",
                    r["p50_ms"],
                    stable,
                    reason,
                    rounds,
                    r.get("round_p50_ms") or [],
                )
            )
            eager = rows.get((v, "torch_eager", batch))
            if str(backend).startswith("ort") and eager is not None:
                both = stable and eager.get("stable") is not False
                out.append(
                    _metric(
                        cid,
                        f"speedup_vs_eager[{key}]",
                        "speedup",
                        eager["p50_ms"] / r["p50_ms"],
                        both,
                        reason if not stable else eager.get("unstable_reason"),
                        rounds,
                        _round_speedups(eager, r),
                    )
                )
        probe = lat.get("machine_probe") or {}
        if probe.get("gflops_per_s"):
            out.append(
                _metric(
                    cid,
                    "machine_probe.gflops_per_s",
                    "probe",
                    probe["gflops_per_s"],
                    probe.get("stable"),
                    None,
                    len(probe.get("round_min_ms") or []) or None,
                )  # fmt: skip
            )
    return out


def _date(run: dict, run_dir: Path) -> str:
    r = run["run"]
    if r.get("updated") or r.get("started"):
        return r.get("updated") or r.get("started")
    files = list(Path(run_dir).glob("*/latency.json")) or [Path(run_dir)]
    stamp = max(f.stat().st_mtime for f in files)
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z")


def summarize(run_dir: Path) -> dict[str, Any]:
    """What `history add` records of a finished run, with its content key."""
    run_dir = Path(run_dir)
    try:
        problems = list(dict.fromkeys(completeness_problems(run_dir, run_dir)))
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise HistoryError(f"cannot add to the history: {problems[0]}{more}")
        run = load_run(run_dir)
    except ReportError as e:
        raise HistoryError(str(e)) from e
    env = run["run"].get("environment") or {}
    machine = machine_of(run)
    configs = []
    for c in run["configs"]:
        probe = (c.get("latency") or {}).get("machine_probe") or {}
        configs.append(
            {
                "config": c["id"],
                "label": c.get("label") or "",
                "probe_gflops": probe.get("gflops_per_s"),
                "probe_drift": probe.get("drift"),
            }
        )
    notes = {}
    delays = {c["id"]: (c.get("latency") or {}).get("test_ort_delay_ms") for c in run["configs"]}
    if any(delays.values()):
        notes["test_ort_delay_ms"] = {k: v for k, v in delays.items() if v}
    record = {
        "run_id": run_dir.name,
        "commit": env.get("git_commit") or _git_head(),
        "date": _date(run, run_dir),
        "preset": run["run"].get("preset") or "?",
        "machine": machine,
        "machine_id": machine_id(machine),
        "configs": configs,
        "metrics": metrics_of(run),
        "notes": notes,
    }
    if not record["metrics"]:
        raise HistoryError(f"{run_dir}: no gated metric recorded (no finished stage); nothing to add")
    # The key is the recorded content, not the folder's name: a copy of a run is the same run.
    content = {k: v for k, v in record.items() if k != "run_id"}
    record["run_key"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return record


# ------------------------------------------------------------------------------------------------ the store

_TABLES = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_key TEXT NOT NULL UNIQUE,
    run_id TEXT NOT NULL,
    run_dir TEXT,
    commit_sha TEXT,
    date TEXT,
    preset TEXT NOT NULL,
    machine_id TEXT NOT NULL,
    machine TEXT NOT NULL,
    added TEXT NOT NULL,
    notes TEXT
);
CREATE TABLE IF NOT EXISTS configs (
    run_seq INTEGER NOT NULL REFERENCES runs(seq),
    config_id TEXT NOT NULL,
    label TEXT,
    probe_gflops REAL,
    probe_drift REAL,
    PRIMARY KEY (run_seq, config_id)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_seq INTEGER NOT NULL REFERENCES runs(seq),
    config_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    kind TEXT NOT NULL,
    value REAL NOT NULL,
    stable INTEGER,
    reason TEXT,
    rounds INTEGER,
    spread REAL,
    round_values TEXT,
    PRIMARY KEY (run_seq, config_id, metric)
);
CREATE INDEX IF NOT EXISTS runs_by_machine ON runs (preset, machine_id, seq);
"""


def _open(path: Path, *, readonly: bool) -> sqlite3.Connection:
    try:
        return open_store(path, readonly=readonly)
    except HistoryReadError as e:
        raise HistoryError(str(e)) from e


def _begin(con: sqlite3.Connection, path: Path) -> None:
    """WAL (readers never block the writer) and an immediate write transaction, waiting for another adder."""
    deadline = time.monotonic() + 120
    while True:
        try:
            if con.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            con.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e) or time.monotonic() > deadline:
                raise HistoryError(f"{path}: cannot write the history ({e})") from e
            time.sleep(0.05)


def add_record(history: Path, record: dict) -> bool:
    """Add one summarized run in one transaction; False when it is there already (same run_key)."""
    history = Path(history)
    history.parent.mkdir(parents=True, exist_ok=True)
    con = _open(history, readonly=False)
    try:
        _begin(con, history)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "schema_version" not in tables:
                # A new store, checked again inside the transaction: a concurrent adder may have made it.
                con.execute(f"PRAGMA application_id={APPLICATION_ID}")
                for statement in filter(str.strip, _TABLES.split(";")):  # not executescript: it would commit
                    con.execute(statement)
                con.execute("INSERT INTO schema_version VALUES (?)", (HISTORY_SCHEMA,))
            if con.execute("SELECT 1 FROM runs WHERE run_key = ?", (record["run_key"],)).fetchone():
                con.execute("ROLLBACK")
                return False
            cur = con.execute(
                "INSERT INTO runs (run_key, run_id, run_dir, commit_sha, date, preset, machine_id, machine, added, "
                "notes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record["run_key"],
                    record["run_id"],
                    record.get("run_dir"),
                    record["commit"],
                    record["date"],
                    record["preset"],
                    record["machine_id"],
                    json.dumps(record["machine"], sort_keys=True),
                    datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S%z"),
                    json.dumps(record.get("notes") or {}, sort_keys=True),
                ),
            )
            seq = cur.lastrowid
            con.executemany(
                "INSERT INTO configs VALUES (?, ?, ?, ?, ?)",
                [
                    (seq, c["config"], c["label"], c["probe_gflops"], c["probe_drift"])
                    for c in record["configs"]
                ],
            )
            con.executemany(
                "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        seq,
                        m["config"],
                        m["metric"],
                        m["kind"],
                        m["value"],
                        None if m["stable"] is None else int(bool(m["stable"])),
                        m["reason"],
                        m["rounds"],
                        m["spread"],
                        json.dumps(m["round_values"]),
                    )  # fmt: skip
                    for m in record["metrics"]
                ],
            )
            con.execute("COMMIT")
            return True
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
    except sqlite3.DatabaseError as e:
        raise HistoryError(f"{history}: cannot write the history ({e}); the file is left as it is") from e
    finally:
        con.close()


@dataclass(frozen=True)
class Added:
    added: bool  # False: the same run was in the history already
    run_key: str
    run_id: str
    commit: str | None
    preset: str
    machine_id: str
    configs: int
    metrics: int


def add_run(run_dir: Path, history: Path) -> Added:
    """Record a finished run in the history at `history` (created when absent). Idempotent: the same run (same
    recorded content) twice changes nothing. Raises HistoryError (one line, exit 2) for a run with a failed stage
    or a swapped model, and for a store that is corrupt, of a newer schema or not a capsbench history (never
    overwritten)."""
    record = summarize(Path(run_dir))
    record["run_dir"] = str(Path(run_dir).resolve())
    added = add_record(Path(history), record)
    return Added(
        added,
        record["run_key"],
        record["run_id"],
        record["commit"],
        record["preset"],
        record["machine_id"],
        len(record["configs"]),
        len(record["metrics"]),
    )


# ------------------------------------------------------------------------------------------------ judging


@dataclass(frozen=True)
class HistoryTolerances:
    accuracy_drop: float = 0.01
    inactive_rise: int = 0
    speedup_drop: float = 0.20
    latency_rise: float = 0.25
    machine_shift: float = 0.15
    gate_absolute: bool = False
    window: int = DEFAULT_WINDOW

    def of(self, kind: str) -> float | None:
        return {
            "accuracy": self.accuracy_drop,
            "count": float(self.inactive_rise),
            "speedup": self.speedup_drop,
            "p50": self.latency_rise,
            "probe": self.machine_shift,
        }.get(kind)


def _fmt(v: float) -> float:
    return round(float(v), 4)


def check_history(run_dir: Path, history: Path, tol: HistoryTolerances | None = None) -> dict[str, Any]:
    """Judge every gated metric of a run against the last `tol.window` comparable runs of the history (same
    preset, config, machine fingerprint; stable measurements from undisturbed runs only; this run itself left
    out). Returns checks in `capsbench check`'s shape (config, metric, baseline: the history's median,
    current, tolerance, status, noise, gate)."""
    tol = tol or HistoryTolerances()
    record = summarize(Path(run_dir))
    history = Path(history)
    series, own = ({}, set()) if not history.exists() else _read(history, record["run_key"])
    preset, mid = record["preset"], record["machine_id"]
    limit = 1 + tol.machine_shift
    probes = {c["config"]: c for c in record["configs"]}
    checks: list[dict[str, Any]] = []
    for m in record["metrics"]:
        kind, cid = m["kind"], m["config"]
        if kind == "fraction":
            continue  # recorded for the trend; the count is the gate
        s = series.get((preset, mid, cid, m["metric"]))
        entries = [] if s is None else [e for e in s.entries if e.seq not in own]
        latency = kind in ("speedup", "p50", "probe")
        usable = [
            e
            for e in entries
            if e.stable is not False and not (latency and e.probe_drift is not None and e.probe_drift > limit)
        ][-tol.window :]
        values = [e.value for e in usable]
        tolerance = tol.of(kind)
        base = {
            "config": cid,
            "metric": m["metric"],
            "current": _fmt(m["value"]),
            "baseline": _fmt(float(np.median(values))) if values else None,
            "history_runs": len(values),
        }
        if kind == "parity":
            ok = m["value"] == 1.0
            checks.append({**base, "baseline": True, "current": ok, "tolerance": "must pass",
                           "status": CheckStatus.OK if ok else CheckStatus.REGRESSED})  # fmt: skip
            continue
        sign = "-" if KINDS[kind]["higher_is_better"] else "+"
        tol_text = f"{sign}{tolerance:.0%}" if KINDS[kind]["scale"] == "log" else f"{sign}{tolerance:g}"
        gate = (
            f"against the last {len(values)} of {tol.window} comparable runs (same preset, config, machine)"
        )
        if kind == "probe":
            gate = "the machine probe: the speed the machine ran at (context, not gated)"
        if m["stable"] is False and kind != "probe":  # the probe is context: reported as info either way
            off = str(m["reason"]).startswith(OFF_DEVICE)
            checks.append({**base, "tolerance": tol_text,
                           "status": CheckStatus.NOT_GATED if off else CheckStatus.UNSTABLE, "gate": gate,
                           "noise": f"{m['reason']}, not gated" if off else
                           f"unstable measurement, not gated ({m['reason']})"})  # fmt: skip
            continue
        verdict = judge(values, m["value"], kind, tolerance, m["round_values"])
        if latency:
            why = _disturbed(probes.get(cid) or {}, series.get((preset, mid, cid, "machine_probe.gflops_per_s")),
                             own, tol.window, limit)  # fmt: skip
            judged = (CheckStatus.OK, CheckStatus.REGRESSED, CheckStatus.NOISY)
            if kind == "probe":
                verdict = {**verdict, "status": CheckStatus.INFO}
            elif why and verdict["status"] in (*judged, CheckStatus.NO_HISTORY):
                verdict = {
                    **verdict,
                    "status": CheckStatus.DISTURBED,
                    "noise": f"{why}, not gated; {verdict['noise']}",
                }
            if kind == "p50" and not tol.gate_absolute and verdict["status"] in judged:
                verdict = {**verdict, "status": CheckStatus.INFO}
                gate += ", absolute p50: not gated (--gate-absolute)"
        cps = _recent_change(values + [m["value"]], usable, kind, tol.window)
        if cps:
            verdict = {**verdict, "noise": f"{verdict['noise']}; {cps}"}
        checks.append({**base, "tolerance": tol_text, "gate": gate, **verdict})
    seen = {m["config"] for m in record["metrics"]}
    last = _last_configs(history, preset, mid, record["run_key"]) if history.exists() else set()
    missing = sorted(last - seen)
    regressions = [c for c in checks if c["status"] == CheckStatus.REGRESSED]
    return {
        "run": str(run_dir),
        "history": str(history),
        "preset": preset,
        "machine_id": mid,
        "machine": record["machine"],
        "window": tol.window,
        "tolerances": tol.__dict__,
        "checks": checks,
        "regressions": regressions,
        "not_gated": [c for c in checks if c["status"] in UNGATED],
        "no_history": sorted({c["config"] for c in checks if c["status"] == CheckStatus.NO_HISTORY}),
        "missing_configs": missing,
        "ok": not regressions and not missing,
    }


def _read(history: Path, run_key: str) -> tuple[dict, set[int]]:
    """The store's series, and the seq of this very run when it is in the history already (left out)."""
    try:
        con = open_store(history, readonly=True)
        try:
            series = read_series(history, con)
            own: set[int] = set()
            if {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")} >= {"runs"}:
                own = {r[0] for r in con.execute("SELECT seq FROM runs WHERE run_key = ?", (run_key,))}
            return series, own
        finally:
            con.close()
    except HistoryReadError as e:
        raise HistoryError(str(e)) from e
    except sqlite3.DatabaseError as e:
        raise HistoryError(f"{history}: corrupt history ({e}); refused, left as it is") from e


def _disturbed(probe: dict, hist, own: set[int], window: int, limit: float) -> str | None:
    drift = probe.get("probe_drift")
    if drift is not None and drift > limit:
        return f"the machine's speed changed during this run (GEMM probe varied {drift:.2f}x)"
    if hist is None or not probe.get("probe_gflops"):
        return None
    past = [e.value for e in hist.entries if e.seq not in own][-window:]
    if len(past) < 1:
        return None
    ratio = probe["probe_gflops"] / float(np.median(past))
    if not 1 / limit <= ratio <= limit:
        return (
            f"the machine ran at a different speed than in the history (GEMM probe {probe['probe_gflops']:.0f} "
            f"GFLOP/s, {ratio:.2f}x the history's median)"
        )
    return None


def _recent_change(values: list[float], usable: list, kind: str, window: int) -> str | None:
    """The latest change point of the window and this run, when it made the metric worse."""
    if kind in ("parity", "probe") or len(values) < 5:
        return None
    spec = KINDS[kind]
    cps = change_points(values, spec["scale"], spec["floor"])
    worse = [cp for cp in cps if worse_sign(kind) * cp["change"] > 0]
    if not worse:
        return None
    cp = worse[-1]
    at = usable[cp["index"]].commit if cp["index"] < len(usable) else "this run"
    change = f"{100 * cp['change']:+.1f}%" if spec["scale"] == "log" else f"{cp['change']:+.4g}"
    return f"change point at commit {(at or '?')[:12]} ({change}, p={cp['p']:.1g})"


def _last_configs(history: Path, preset: str, mid: str, run_key: str) -> set[str]:
    con = _open(history, readonly=True)
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "runs" not in tables:
            return set()
        row = con.execute(
            "SELECT seq FROM runs WHERE preset = ? AND machine_id = ? AND run_key != ? ORDER BY seq DESC LIMIT 1",
            (preset, mid, run_key),
        ).fetchone()
        if row is None:
            return set()
        return {r[0] for r in con.execute("SELECT config_id FROM configs WHERE run_seq = ?", (row[0],))}
    finally:
        con.close()


# ------------------------------------------------------------------------------------------------ --confirm


def latency_flagged(result: dict) -> list[str]:
    """The configs with a latency figure judged REGRESSED (what a confirming rerun re-times)."""
    return sorted(
        {c["config"] for c in result["checks"] if c["status"] == CheckStatus.REGRESSED and "[" in c["metric"]}
    )


def retime(run_dir: Path, configs: list[str], work: Path, data_dir: Path | None = None) -> Path:
    """Time `configs` of a run again, once, in fresh processes (`capsbench time --force` with the settings their
    latency.json records) on a copy of their folders under `work`: the run itself is left untouched. Returns
    the copy's run folder."""
    run_dir = Path(run_dir)
    copy = Path(work) / run_dir.name
    copy.mkdir(parents=True, exist_ok=True)
    shutil.copy2(run_dir / "run.json", copy / "run.json")
    preset = json.loads((run_dir / "run.json").read_text())["preset"]
    for cid in configs:
        shutil.copytree(
            run_dir / cid, copy / cid, ignore=shutil.ignore_patterns(".locks"), dirs_exist_ok=True
        )
        lat = json.loads((run_dir / cid / "latency.json").read_text())
        cfg = json.loads((run_dir / cid / "config.json").read_text())["config"]
        s = lat["settings"]
        cmd = [sys.executable, "-m", "capsbench.suite.cli", "time", "--force", "--runs-dir", str(copy.parent)]
        cmd += ["--run-id", copy.name, "--preset", preset, "--configs", cid]
        for opt, key in (("--dataset", "dataset"), ("--epochs", "epochs"), ("--train-subset", "train_subset"),
                         ("--eval-subset", "eval_subset"), ("--seed", "seed")):  # fmt: skip
            if cfg.get(key) is not None:
                cmd += [opt, str(cfg[key])]
        cmd += ["--batch-sizes", *map(str, s["batch_sizes"]), "--iters", str(s["iters"])]
        cmd += ["--warmup", str(s["warmup"]), "--rounds", str(s["rounds"]), "--provider", str(s["provider"])]
        if s.get("max_seconds") is not None:
            cmd += ["--max-seconds", str(s["max_seconds"])]
        if s.get("min_rounds") is not None:
            cmd += ["--min-rounds", str(s["min_rounds"])]
        if s.get("threads") is not None:
            cmd += ["--threads", str(s["threads"])]
        if s.get("compile"):
            cmd += ["--compile"]
        if s.get("ort_delay_ms"):  # the test hook is a setting: timed again as it was timed
            cmd += ["--ort-delay-ms", str(s["ort_delay_ms"])]
        if data_dir is not None:
            cmd += ["--data-dir", str(data_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise HistoryError(f"--confirm: timing {cid} again failed: {tail[0]}")
    return copy


def confirm(
    run_dir: Path, history: Path, result: dict, tol: HistoryTolerances, data_dir: Path | None
) -> dict:
    """Re-time the configs `result` flags on latency and keep a latency regression only where the rerun, judged
    against the same history, regresses too; the others become NOISY ('not confirmed by a rerun')."""
    flagged = latency_flagged(result)
    if not flagged:
        return {**result, "confirm": {"retimed": [], "confirmed": [], "withdrawn": []}}
    with tempfile.TemporaryDirectory(prefix="capsbench-confirm-") as work:
        copy = retime(Path(run_dir), flagged, Path(work), data_dir)
        again = check_history(copy, history, tol)
    rerun = {(c["config"], c["metric"]): c for c in again["checks"]}
    confirmed, withdrawn, checks = [], [], []
    for c in result["checks"]:
        if c["status"] == CheckStatus.REGRESSED and c["config"] in flagged and "[" in c["metric"]:
            r = rerun.get((c["config"], c["metric"]))
            if r is not None and r["status"] == CheckStatus.REGRESSED:
                c = {**c, "noise": f"{c['noise']}; confirmed by a rerun ({r['current']})"}
                confirmed.append(f"{c['config']} {c['metric']}")
            else:
                shown = "missing" if r is None else f"{r['status']}, {r['current']}"
                c = {
                    **c,
                    "status": CheckStatus.NOISY,
                    "noise": f"not confirmed by a rerun ({shown}); {c['noise']}",
                }
                withdrawn.append(f"{c['config']} {c['metric']}")
        checks.append(c)
    regressions = [c for c in checks if c["status"] == CheckStatus.REGRESSED]
    return {
        **result,
        "checks": checks,
        "regressions": regressions,
        "not_gated": [c for c in checks if c["status"] in UNGATED],
        "ok": not regressions and not result["missing_configs"],
        "confirm": {"retimed": flagged, "confirmed": confirmed, "withdrawn": withdrawn},
    }


def summary_counts(checks: list[dict]) -> Counter:
    return Counter(c["status"] for c in checks)
