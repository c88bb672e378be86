"""The interface every stage implements, and what the runner hands each stage of each config.

A stage says what it reads and writes in a config folder (the results contract, capsbench/results.py), whether its work is done
for the current settings, and does it. It raises the project's errors (suite/errors.py); the runner records
any failure and goes on with the next config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsbench import results
from capsbench.suite.prune_settings import PruneSettings

if TYPE_CHECKING:
    import torch

    from capsbench.export.timing import TimeSettings
    from capsbench.suite.presets import RunConfig
    from capsbench.suite.train import Splits

# ------------------------------------------------------------------------------------------------ settings
# What a stage is told, one typed part per stage, each with its defaults (those of the CLI's flags left out).


@dataclass(frozen=True)
class TrainSettings:
    # torch.compile for training, in one encoding from the command line to train(): "off" trains eager, "auto"
    # compiles when it pays (suite/train.py: compile_pays), a torch.compile mode always compiles with it.
    compile: str = "auto"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast); recorded in metrics.json, part of "done"


@dataclass(frozen=True)
class HealthSettings:
    threshold: float | None = None  # None: each config's own inactivity threshold
    output: str | None = None  # None: health.json, measured when older than the checkpoint


@dataclass(frozen=True)
class ExportSettings:
    opset: int | None = None  # None: the exporter's default
    parity_images: int = 1000  # test images the ONNX model is checked on against PyTorch


@dataclass(frozen=True)
class ReportSettings:
    baseline: Path | None = None  # another run folder to show regressions against


def _time_settings() -> TimeSettings:
    from capsbench.export.timing import TimeSettings  # imported when needed: it loads torch

    return TimeSettings()


@dataclass(frozen=True)
class Settings:
    """Everything any stage may be told: each stage's own part (time: the time and cpp stages'), and what every
    stage obeys."""

    train: TrainSettings = field(default_factory=TrainSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    prune: PruneSettings = field(default_factory=PruneSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    time: TimeSettings = field(default_factory=_time_settings)
    report: ReportSettings = field(default_factory=ReportSettings)
    device: str | None = None  # None: auto (CUDA when present)
    force: bool = False  # redo what is done
    progress: bool = True
    keep_intermediate: bool = False  # keep what a stage removes once done (surgery.pt, finetune.pt)


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
    every later stage, so when one fails the config's other stages are skipped. What it reads and writes is the
    results contract's entry of its name (capsbench/results.py STAGE_FILES)."""

    name: str
    run: Callable[[Context], Any]
    done: Callable[[Context], bool]
    help: str = ""
    gate: bool = False
    per_run: bool = False  # runs once for the run folder after every config (the report)

    @property
    def files(self) -> results.StageFiles:
        return results.STAGE_FILES[self.name]

    @property
    def reads(self) -> tuple[str, ...]:
        return self.files.reads

    @property
    def writes(self) -> tuple[str, ...]:
        return self.files.writes

    @property
    def intermediate(self) -> tuple[str, ...]:  # written along the way, removed once the stage is done
        return self.files.intermediate


# ------------------------------------------------------------------------------------------------ provenance
# The one place where "done" is checked against content: after a stage succeeds, the runner records the SHA-256
# of every file it read and wrote (its `reads` and `writes` patterns in the config folder) in pipeline.json. Next
# time, a recorded file whose content changed or that is gone means the stage is not done, whatever its own
# done() says, and the runner redoes it (with force) and says which file changed. So retraining a base redoes the
# pruned nets made from it, and a swapped model.onnx is exported (and timed) again.


def file_hashes(out: Path, patterns: tuple[str, ...]) -> dict[str, str]:
    """{path relative to `out`: sha256} of the files matching `patterns` in `out`."""
    paths = {p for pattern in patterns for p in Path(out).glob(pattern) if p.is_file()}
    return {str(p.relative_to(out)): results.sha256(p) for p in sorted(paths)}


def provenance(stage: Stage, out: Path) -> dict[str, dict[str, str]]:
    return {"inputs": file_hashes(out, stage.reads), "outputs": file_hashes(out, stage.writes)}


def refuse_newer_results(out: Path, patterns: tuple[str, ...]) -> None:
    """Raise NewerSchemaError when a result file the stage would write holds a newer schema: redoing the stage
    (even with --force) would overwrite it with an older one."""
    for pattern in patterns:
        for path in Path(out).glob(pattern):
            if path.suffix == ".json" and path.is_file():
                try:
                    results.read_result(path, None)
                except results.NewerSchemaError:
                    raise
                except Exception:  # an unreadable file is the stage's to redo
                    pass


def stale_reasons(stage: Stage, out: Path, recorded: dict | None) -> list[str]:
    """Why a stage's recorded work no longer holds: files it read or wrote that changed or went since then.
    Files that are new since then are the stage's own done() to judge (e.g. another pruning folder)."""
    if not recorded or recorded.get("status") != results.StageStatus.OK:
        return []
    reasons = []
    for part, verb in (("inputs", "read"), ("outputs", "wrote")):
        for name, digest in (recorded.get(part) or {}).items():
            path = Path(out) / name
            if not path.is_file():
                reasons.append(f"{name} (which it {verb}) is gone")
            elif file_hashes(out, (name,)).get(name) != digest:
                reasons.append(f"{name} (which it {verb}) changed")
    return reasons


# --------------------------------------------------------------------------------------- global torch state


@contextlib.contextmanager
def isolated_torch_state() -> Iterator[None]:
    """Run a stage with the process's torch globals as they were before it and restore them after, so no
    stage's settings (the time stage's thread count, training's deterministic algorithms, the RNG) leak into the
    next stage or the next config: a run's numbers do not depend on which stages ran before in this process
    (a resumed run equals an uninterrupted one)."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng = torch.get_rng_state()
    grad = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_rng_state(rng)
