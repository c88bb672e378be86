"""The run plan: what `capsbench all` asks of the runner, decided in one place from the preset and the command line.

A plan is a list of steps, each a set of configs with the stages to run for them and its pruning settings; the
runner runs them in order and the results are merged. Three things shape it:

- implied stages: `train` brings `health` (health.json stays in step with the weights) and `report` brings
  `verdicts` (the report's claims from the run's results as they are now), unless skipped;
- strata: a preset may split its study into parts with their own configs, seeds, stages and pruning (presets.Stratum);
- the timed subset: timing every config would cost more than the study, so a preset may export and time only
  its first N configs. The run-level stages (verdicts, report) come once, after every config's stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from capsbench.suite import stages
from capsbench.suite.presets import RunConfig, Stratum
from capsbench.suite.prune_settings import PruneSettings
from capsbench.suite.runner import RunResult
from capsbench.suite.stages import Settings

TIMING_STAGES = ("export", "time", "cpp")
RUN_LEVEL = tuple(s.name for s in stages.select(stages.NAMES) if s.per_run)


@dataclass(frozen=True)
class Step:
    name: str
    configs: tuple[RunConfig, ...]
    stages: tuple[str, ...]
    prune: PruneSettings | None = None  # None: the settings' own


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]

    def configs(self) -> list[RunConfig]:
        return list(dict.fromkeys(c for s in self.steps for c in s.configs))

    def describe(self) -> list[str]:
        return [f"{s.name}: {len(s.configs)} config(s): {' '.join(s.stages)}" for s in self.steps]


def with_implied(names: Sequence[str], skip: Sequence[str] = ()) -> list[str]:
    """The selected stages with those they imply, in the stages' order."""
    chosen = [n for n in names if n not in skip]
    if "train" in chosen and "health" not in skip:
        chosen.append("health")
    if "report" in chosen and "verdicts" not in skip:
        chosen.append("verdicts")
    return [n for n in stages.NAMES if n in chosen]


def make_plan(
    strata: Sequence[tuple[Stratum, Sequence[RunConfig]]],
    names: Sequence[str],
    timed: int | None,
    prune_for: Callable[[Stratum], PruneSettings | None] = lambda st: st.prune,
) -> Plan:
    """The steps for these strata (each with its selected configs) and stages. `timed`: export and time only
    the first N configs (None or 0: every config's stratum decides); `prune_for`: a stratum's pruning settings
    (the command line's overrides applied)."""
    per_config = [n for n in names if n not in RUN_LEVEL]
    everything = list(dict.fromkeys(c for _, cs in strata for c in cs))
    split_timing = (
        timed is not None and 0 < timed < len(everything) and any(n in TIMING_STAGES for n in per_config)
    )
    steps = []
    for stratum, configs in strata:
        wanted = [n for n in per_config if stratum.stages is None or n in stratum.stages]
        if split_timing:
            wanted = [n for n in wanted if n not in TIMING_STAGES]
        if configs and wanted:
            steps.append(Step(stratum.name, tuple(configs), tuple(wanted), prune_for(stratum)))
    if split_timing:
        timing = tuple(n for n in per_config if n in TIMING_STAGES)
        steps.append(Step(f"timed (first {timed})", tuple(everything[:timed]), timing))
    run_level = tuple(n for n in names if n in RUN_LEVEL)
    if run_level:
        steps.append(Step("run", (), run_level))
    return Plan(tuple(steps))


def execute(
    plan: Plan,
    settings: Settings,
    run: Callable[[list[RunConfig], list[str], Settings], RunResult],
) -> RunResult:
    """Run every step through `run` (the runner with the command's folder, data and executor) and merge what they
    return: one pipeline record per config (the last), every result and every failure."""
    merged: RunResult | None = None
    records: dict[str, dict] = {}
    for step in plan.steps:
        step_settings = settings if step.prune is None else replace(settings, prune=step.prune)
        result = run(list(step.configs), list(step.stages), step_settings)
        records.update({r["config_id"]: r for r in result.records})
        if merged is None:
            merged = result
        else:
            for cid, values in result.results.items():
                merged.results.setdefault(cid, {}).update(values)
            merged.failures.extend(result.failures)
    if merged is None:
        merged = RunResult(Path("."))
    merged.records = list(records.values())
    return merged
