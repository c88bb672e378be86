"""The interface every stage implements, and what the runner hands each stage of each config.

A stage says what it reads and writes in a config folder (names from suite/rundir.py), whether its work is done
for the current settings, and does it. It raises the project's errors (suite/errors.py); the runner records
any failure and goes on with the next config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from capsbench.suite.presets import RunConfig
    from capsbench.suite.stages.export import TimeSettings
    from capsbench.suite.train import Splits


@dataclass(frozen=True)
class PruneSettings:
    # (backbone ratio, capsule ratio): the capsule ratio removes that share of PrimaryCaps types and, unless
    # intermediate_ratio says otherwise, of every intermediate capsule layer's capsules.
    pairs: tuple[tuple[float, float], ...] = ((0.5, 0.5),)
    criterion: str = "chip"
    finetune_epochs: int = 2
    intermediate_ratio: float | None = None  # None: the pair's capsule ratio
    capsule_criterion: str = "chip"  # how intermediate capsules are scored (models.pruning.CAPSULE_CRITERIA)
    procedure: str = "finetune"  # or "authors": re-initialise the capsule layers after surgery and retrain
    controls: tuple[
        str, ...
    ] = ()  # beside every pair: "extra_training", "scratch", "random" (presets.CONTROLS)
    reinit_caps_layers: bool = False  # implied by procedure "authors"
    score_images: int = 640
    write_sweep: bool = False  # prune_sweep_<criterion>.json (what `capsbench prune` writes for its plot)


@dataclass(frozen=True)
class Settings:
    """Everything any stage may be told; each stage reads its own part."""

    prune: PruneSettings = field(default_factory=PruneSettings)
    time: TimeSettings | None = None
    opset: int | None = None
    parity_images: int = 1000
    health_threshold: float | None = None
    health_output: str | None = None  # None: health.json, measured when older than the checkpoint
    baseline: Path | None = None  # the report's baseline run folder
    device: str | None = None
    force: bool = False
    progress: bool = True


@dataclass
class Context:
    """One config of a run, as a stage sees it."""

    cfg: RunConfig
    out: Path  # the config's folder
    run_dir: Path
    settings: Settings
    splits: Callable[[], Splits]  # loaded on first use, shared by the configs of one dataset
    device: torch.device
    log: Callable[[str], None]
    shared: dict[str, Any]  # what the stages of one run share (e.g. the GEMM rate per device)


@dataclass(frozen=True)
class Stage:
    """One step of the benchmark. `run` does the work (skipping what is done) and returns what it measured;
    `done` says whether there is nothing left to do for these settings; `gate` stages (training) are needed by
    every later stage, so when one fails the config's other stages are skipped."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    run: Callable[[Context], Any]
    done: Callable[[Context], bool]
    help: str = ""
    gate: bool = False
    per_run: bool = False  # runs once for the run folder after every config (the report)
