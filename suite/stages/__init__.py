"""The stages of the benchmark, in the order the runner runs them. A new stage is one module here with a
`STAGE` (see base.Stage) and one entry in MODULES."""

from __future__ import annotations

import importlib

from capsbench.suite.stages.base import (
    Context,
    ExportSettings,
    HealthSettings,
    PruneSettings,
    ReportSettings,
    Settings,
    Stage,
    TrainSettings,
)

MODULES = ("train", "health", "prune", "export", "time", "cpp", "verdicts", "report")
NAMES = MODULES  # what `capsbench all --only/--skip` offers


def get(name: str) -> Stage:
    """A stage by name (its module is imported on first use: torch-heavy stages load only when needed)."""
    return importlib.import_module(f"capsbench.suite.stages.{name}").STAGE


def select(names: tuple[str, ...] | list[str]) -> list[Stage]:
    """The named stages in run order."""
    return [get(n) for n in MODULES if n in names]


__all__ = [
    "Context",
    "ExportSettings",
    "HealthSettings",
    "MODULES",
    "NAMES",
    "PruneSettings",
    "ReportSettings",
    "Settings",
    "Stage",
    "TrainSettings",
    "get",
    "select",
]
