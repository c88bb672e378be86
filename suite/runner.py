"""The one runner: the selected stages for every config into runs/<run-id>/<config-id>/, then the run-level
stages (the report). Every `capsbench` command that works on a preset is a selection of stages of this runner.

It is also the one error boundary: any exception of a stage is recorded for that config (its message in
pipeline.json, its traceback in error.txt beside it) and the run goes on with the next config. Finished work is
skipped by the stages themselves, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsbench.files import atomic_write
from capsbench.results import (
    ERROR_FILE,
    PIPELINE_FILE,
    RUN_FILE,
    PipelineStatus,
    StageStatus,
    read_if_valid,
    write_json,
)
from capsbench.suite import rundir, stages
from capsbench.suite.env import environment, pick_device
from capsbench.suite.errors import CapsbenchError, os_error_message
from capsbench.suite.presets import RunConfig
from capsbench.suite.rundir import config_dir
from capsbench.suite.stages import Context, Settings, Stage
from capsbench.suite.stages.base import (
    isolated_torch_state,
    provenance,
    refuse_newer_results,
    stale_reasons,
)


@dataclass(frozen=True)
class Failure:
    config_id: str | None  # None: a run-level stage
    stage: str
    error: BaseException

    @property
    def message(self) -> str:
        return f"{self.config_id + ' ' if self.config_id else ''}{self.stage}: {message_of(self.error)}"

    @property
    def exit_code(self) -> int:
        """2 when the user must fix something (a missing or corrupt file, a bad option, an unavailable
        provider), 1 when the config itself failed (diverged, a runtime error): see suite/errors.py."""
        from capsbench.export import ExportError
        from capsbench.reports.load import ReportError

        if isinstance(self.error, CapsbenchError):
            return self.error.exit_code
        # OSError: the machine refused (read-only folder, full disk, permissions): the user's to fix
        return 2 if isinstance(self.error, (ExportError, ReportError, OSError)) else 1


@dataclass
class RunResult:
    run_dir: Path
    records: list[dict] = field(default_factory=list)  # one pipeline record per config
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # config id -> stage -> what it returned
    failures: list[Failure] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return max((f.exit_code for f in self.failures), default=0)


def message_of(e: BaseException) -> str:
    """The one line a user sees: the project's errors speak for themselves, the OS's name path and cause,
    others say their type."""
    if isinstance(e, OSError) and e.strerror:
        return f"{type(e).__name__}: {os_error_message(e)}"
    text = " ".join(str(e).split())
    return text if isinstance(e, CapsbenchError) else f"{type(e).__name__}: {text}"


def _update_run_file(run_dir: Path, result: RunResult, info: dict, device) -> None:
    """run.json: written by the first invocation that finished some work on this run folder, then extended by
    later ones with the configs and stages they finished. A failing invocation (nothing finished) leaves it as it
    was, --configs X never narrows it, and what was measured on (`environment`, `started`) is kept from the
    first write."""
    finished = {cid: list(values) for cid, values in result.results.items() if cid and values}
    if not finished:
        return
    old = read_if_valid(run_dir / RUN_FILE, "run") or {}
    old.pop("schema_version", None), old.pop("kind", None)
    known = {c["config_id"]: c for c in old.get("configs", [])}
    labels = {r["config_id"]: r["label"] for r in result.records}
    known.update({cid: {"config_id": cid, "label": labels[cid]} for cid in finished})
    done_stages = {n for names in finished.values() for n in names} | set(old.get("stages", []))
    write_json(
        run_dir / RUN_FILE,
        "run",
        {
            **info,
            **old,
            "configs": list(known.values()),
            "stages": [n for n in stages.MODULES if n in done_stages],
            "started": old.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": old.get("environment") or environment(device),
            # A resumed run keeps its start time (resume keeps history); 'updated' is the last command's.
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def _run_stage(stage: Stage, ctx: Context, record: dict, tracebacks: list[str]) -> tuple[bool, Any]:
    t0 = time.perf_counter()
    stale = [] if stage.per_run else stale_reasons(stage, ctx.out, record.get(stage.name))
    if stale and not ctx.settings.force:
        ctx.log(f"    {stage.name}: redoing: {'; '.join(stale)} since it last ran")
        ctx = dataclasses.replace(ctx, settings=dataclasses.replace(ctx.settings, force=True))
    try:
        if not stage.per_run:
            refuse_newer_results(ctx.out, stage.writes)
        with isolated_torch_state():
            up_to_date = not stale and stage.done(ctx)
            result = stage.run(ctx)
        entry = {} if stage.per_run else provenance(stage, ctx.out)
        if not ctx.settings.keep_intermediate:
            _remove_intermediate(stage, ctx.out)
    except Exception as e:  # the error boundary: any failure of a stage is this config's, not the run's
        record[stage.name] = {
            "status": StageStatus.FAILED,
            "error": message_of(e),
            "error_type": type(e).__name__,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        tracebacks.append(f"stage {stage.name}:\n{traceback.format_exc()}")
        ctx.log(f"    {stage.name}: FAILED: {message_of(e)}")
        return False, e
    before = record.get(stage.name)
    if up_to_date and isinstance(before, dict) and before.get("status") == StageStatus.OK:
        # Resume keeps history: the stage's original record (its seconds) stays, marked cached.
        record[stage.name] = {**before, **entry, "up_to_date": True, "cached": True}
        ctx.log(f"    {stage.name}: cached")
        return True, result
    record[stage.name] = {
        "status": StageStatus.OK,
        "up_to_date": up_to_date,  # nothing was left to do: the stage's results were already there
        "seconds": round(time.perf_counter() - t0, 2),
        **({"redone_because": stale} if stale else {}),
        **entry,  # the content hashes of what it read and wrote (stages/base.py: provenance)
    }
    note = "cached" if up_to_date else f"{record[stage.name]['seconds']:.1f} s"
    ctx.log(f"    {stage.name}: ok ({note})")
    return True, result


@dataclass
class Outcome:
    """What one config's stages left: its pipeline record, what each stage returned, and its failures."""

    record: dict
    outputs: dict[str, Any] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


class SplitsCache:
    """The data splits of the last dataset used (one in memory at a time); never pickled with its data."""

    def __init__(self, data_dir: str | Path | None = None):
        self.data_dir = data_dir
        self.cache: dict[tuple, Any] = {}

    def __call__(self, cfg: RunConfig):
        from capsbench.suite import train as training

        key = (cfg.dataset, cfg.train_subset, cfg.eval_subset, cfg.seed)
        if key not in self.cache:
            self.cache.clear()
            self.cache[key] = training.load_splits(cfg, self.data_dir)
        return self.cache[key]

    def __getstate__(self):
        return {"data_dir": self.data_dir, "cache": {}}


def run_config(
    cfg: RunConfig,
    names: list[str] | tuple[str, ...],
    *,
    run_dir: Path,
    settings: Settings,
    data_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    shared: dict | None = None,
    splits: SplitsCache | None = None,
) -> Outcome:
    """The per-config stages among `names` for one config, recorded in its pipeline.json (merged with what
    earlier commands recorded there) and error.txt. Every executor runs configs through this function."""
    try:
        with rundir.folder_lock(run_dir, cfg.id):  # one writer per config folder
            return _run_config_locked(cfg, names, run_dir, settings, data_dir, log, shared, splits)
    except rundir.RunFolderBusy as e:  # another process is on it: nothing here is touched
        log(f"    {cfg.id}: {e}")
        return Outcome({"config_id": cfg.id, "label": cfg.label}, failures=[Failure(cfg.id, "lock", e)])


def _run_config_locked(cfg, names, run_dir, settings, data_dir, log, shared, splits) -> Outcome:
    selected = [s for s in stages.select(names) if not s.per_run]
    splits = splits or SplitsCache(data_dir)
    out = config_dir(run_dir, cfg)
    device = pick_device(settings.device)
    ctx = Context(
        cfg, out, run_dir, settings, lambda: splits(cfg), device, log, {} if shared is None else shared
    )
    old = read_if_valid(out / PIPELINE_FILE, "pipeline") or {}
    kept = {k: v for k, v in old.items() if isinstance(v, dict)}
    record: dict[str, Any] = {"config_id": cfg.id, "label": cfg.label, **kept}
    tracebacks: list[str] = []
    outcome = Outcome(record)

    def save(status: PipelineStatus = PipelineStatus.COMPLETE) -> list[str]:
        """pipeline.json as it stands: written after every stage, so a stage's record is on disk before the
        next stage starts and a run killed anywhere after it resumes it as cached (a kill between a stage's
        files and this record finds the files, complete since every write is atomic, and records them anew)."""
        failed = [
            k for k, v in record.items() if isinstance(v, dict) and v.get("status") == StageStatus.FAILED
        ]
        record["status"] = PipelineStatus.FAILED if failed else status
        if out.is_dir() or any(s.gate for s in selected):
            write_json(out / PIPELINE_FILE, "pipeline", record)
        return failed

    for stage in selected:
        ok, value = _run_stage(stage, ctx, record, tracebacks)
        if ok:
            outcome.outputs[stage.name] = value
        else:
            outcome.failures.append(Failure(cfg.id, stage.name, value))
        if not ok and stage.gate:
            break  # every later stage reads what this one writes
        if stage is not selected[-1]:
            save(PipelineStatus.RUNNING)
    failed = save()
    if tracebacks:
        _write_tracebacks(out / ERROR_FILE, tracebacks)
    elif not failed:
        (out / ERROR_FILE).unlink(missing_ok=True)
    return outcome


def _remove_intermediate(stage: Stage, out: Path) -> None:
    """The files a stage needed only while it ran (surgery.pt, finetune.pt), once it is done."""
    for pattern in stage.intermediate:
        for path in Path(out).glob(pattern):
            path.unlink(missing_ok=True)


def run(
    configs: list[RunConfig],
    run_dir: Path,
    names: list[str] | tuple[str, ...],
    settings: Settings | None = None,
    *,
    data_dir: str | Path | None = None,
    run_info: dict | None = None,
    log: Callable[[str], None] = print,
    executor: Callable | None = None,
) -> RunResult:
    """The stages `names` for every config, then the run-level ones; returns records, results and failures.
    `executor` runs the configs (suite/executors/: in this process one after another by default, or on Ray).
    One writer at a time: a config another process is working on is refused (recorded as that config's
    failure, rundir.RunFolderBusy), and run.json and the run-level stages are written under the run's lock."""
    from capsbench.suite.executors import local

    run_dir, settings = Path(run_dir), settings or Settings()
    selected = stages.select(names)
    device = pick_device(settings.device)
    result, shared = RunResult(run_dir), dict[str, Any]()
    per_config = [s.name for s in selected if not s.per_run]
    # Absolute paths: an executor may run configs in processes with another working directory (Ray workers).
    data_dir = Path(data_dir).absolute() if data_dir is not None else None
    run_one = functools.partial(
        run_config,
        run_dir=run_dir.absolute(),
        settings=settings,
        data_dir=data_dir,
        log=log,
        shared=shared,
        splits=SplitsCache(data_dir),
    )
    outcomes = (executor or local.execute)(configs, per_config, run_one, log)
    for cfg, outcome in zip(configs, outcomes, strict=True):
        result.records.append(outcome.record)
        result.results.setdefault(cfg.id, {}).update(outcome.outputs)
        result.failures.extend(outcome.failures)
    with rundir.folder_lock(run_dir, "run", wait=True):  # other processes' configs finish meanwhile
        _run_level(run_dir, result, selected, settings, run_info, device, log, shared)
    return result


def _run_level(run_dir, result, selected, settings, run_info, device, log, shared) -> None:
    """run.json, then the run-level stages (verdicts, report), under the run's lock."""
    _update_run_file(run_dir, result, run_info or {}, device)  # before the report, which reads it
    for stage in (s for s in selected if s.per_run):
        ctx = Context(None, run_dir, run_dir, settings, lambda: None, device, log, shared)  # type: ignore[arg-type]
        tb: list[str] = []
        ok, value = _run_stage(stage, ctx, {}, tb)
        if ok:
            result.results.setdefault("", {})[stage.name] = value
        else:
            result.failures.append(Failure(None, stage.name, value))
            _write_tracebacks(run_dir / ERROR_FILE, tb)


def _write_tracebacks(path: Path, tracebacks: list[str]) -> None:
    text = "\n".join(tracebacks)
    atomic_write(path, lambda f: f.write(text))
