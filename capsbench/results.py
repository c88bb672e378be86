"""The results contract, defined once: every file name and folder pattern of a run folder, what each stage
writes there, and how result files are written and read (atomically, each JSON object carrying its `kind` and a
`schema_version`). Torch-free and layer-neutral: the suite writes through it, the reports and `check` read
through it, and other tools can rely on it (docs/results.md describes every file and field).

    runs/<run-id>/run.json, verdicts.json, precheck.json, report.html, trend.html, .locks/
    runs/<run-id>/<config-id>/config.json, checkpoint.pt, metrics.json, health_init.json, health.json,
        pipeline.json, error.txt,
        model.onnx, export.json, parity.json, latency.json, latency_cpp.json, prune_sweep_<criterion>.json
    runs/<run-id>/<config-id>/prune_<criterion or control>_b<B>_c<C>[_i<I>][_reinit]/surgery.pt, finetune.pt,
        finetune_metrics.json, pruned.pt, prune.json, health_pruned.json, model.onnx, export.json, parity.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from capsbench.errors import CapsbenchError
from capsbench.files import atomic_write

__all__ = [
    "BASE",
    "LEGACY_MODEL_VALUES",
    "model_value",
    "CHECKPOINT_FILE",
    "COMPARED",
    "CheckStatus",
    "CONFIG_FILE",
    "ERROR_FILE",
    "EXPORT_FILE",
    "FINETUNE_CHECKPOINT",
    "FINETUNE_METRICS",
    "HEALTH_FILE",
    "HEALTH_INIT_FILE",
    "HEALTH_PRUNED_FILE",
    "LATENCY_CPP_FILE",
    "LATENCY_FILE",
    "LOCKS_DIR",
    "METRICS_FILE",
    "NewerSchemaError",
    "ONNX_FILE",
    "PARITY_FILE",
    "PIPELINE_FILE",
    "PipelineStatus",
    "PRUNED_FILE",
    "PRECHECK_FILE",
    "PRUNE_FILE",
    "PRUNE_GLOB",
    "PRUNE_PREFIX",
    "REPORT_FILE",
    "RUN_FILE",
    "ResultError",
    "RowStatus",
    "SCHEMA_VERSION",
    "STAGE_FILES",
    "Status",
    "StageStatus",
    "StrEnum",
    "SURGERY_FILE",
    "SWEEP_FILE",
    "SWEEP_GLOB",
    "TREND_FILE",
    "UNGATED",
    "StageFiles",
    "VARIANT_FILES",
    "VERDICTS_FILE",
    "Variant",
    "config_dirs",
    "exported_variants",
    "in_pruned",
    "is_trained",
    "present_variants",
    "prune_dir_name",
    "prune_dirs",
    "read_if_valid",
    "read_result",
    "sha256",
    "write_json",
]

SCHEMA_VERSION = 1

# The fields of a config's `model` dict (config.json, metrics.json, ...) added after the first results were
# written, with the value that reproduces the network before they existed: a dict leaves a field out while it
# holds that value (so earlier config ids stay valid), and a missing field reads as that value, never as today's
# default (an old result means the old network). models.config's to_dict and from_dict follow it.
LEGACY_MODEL_VALUES: dict[str, Any] = {"caps_init": "fan_in", "backbone_width": "fixed"}


def model_value(model: dict[str, Any], name: str) -> Any:
    """A field of a results file's `model` dict, read as LEGACY_MODEL_VALUES says when the dict leaves it out."""
    return model.get(name, LEGACY_MODEL_VALUES.get(name))


# run level
RUN_FILE = "run.json"
REPORT_FILE = "report.html"
TREND_FILE = "trend.html"  # the history's trend page beside the report (`capsbench all --history`)
VERDICTS_FILE = "verdicts.json"  # the paper's claims tested on the run's results
PRECHECK_FILE = "precheck.json"  # every config's standing before training (`capsbench precheck`)
LOCKS_DIR = ".locks"  # runs/<run-id>/.locks/<config-id>.lock and run.lock
# config level
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
HEALTH_INIT_FILE = "health_init.json"  # the config's net at initialisation, BatchNorm on batch statistics
HEALTH_FILE = "health.json"
PIPELINE_FILE = "pipeline.json"
ERROR_FILE = "error.txt"  # the tracebacks of a config's failed stages
LATENCY_FILE = "latency.json"
LATENCY_CPP_FILE = "latency_cpp.json"
SWEEP_FILE = "prune_sweep_{criterion}.json"
SWEEP_GLOB = "prune_sweep_*.json"
# variant level: the trained net in the config folder, every pruned net in its prune_* folder
ONNX_FILE = "model.onnx"
EXPORT_FILE = "export.json"
PARITY_FILE = "parity.json"
# pruning folder
PRUNE_PREFIX = "prune_"
PRUNE_GLOB = PRUNE_PREFIX + "*"
SURGERY_FILE = "surgery.pt"  # the net right after surgery, with the plan and the measurements so far
FINETUNE_CHECKPOINT = "finetune.pt"
FINETUNE_METRICS = "finetune_metrics.json"
PRUNED_FILE = "pruned.pt"  # the final (fine-tuned) pruned net: a smaller CapsNet with its own model_config
PRUNE_FILE = "prune.json"
HEALTH_PRUNED_FILE = "health_pruned.json"


def in_pruned(name: str) -> str:
    """The glob of a file in every pruning folder of a config, e.g. prune_*/model.onnx."""
    return f"{PRUNE_GLOB}/{name}"


@dataclass(frozen=True)
class StageFiles:
    """What a stage reads and writes, as globs relative to a config folder (the run folder for a run-level
    stage): `writes` are its results (hashed into pipeline.json), `required` what a finished stage always leaves
    (the report's "missing"), `intermediate` what it deletes when done unless --keep-intermediate."""

    reads: tuple[str, ...]
    writes: tuple[str, ...]
    required: tuple[str, ...]
    intermediate: tuple[str, ...] = field(default=())


_VARIANT_OUTPUTS = (ONNX_FILE, EXPORT_FILE, PARITY_FILE)
_EXPORTED = (ONNX_FILE, EXPORT_FILE, in_pruned(ONNX_FILE), in_pruned(EXPORT_FILE))

STAGE_FILES: dict[str, StageFiles] = {
    "train": StageFiles(
        reads=(),
        writes=(CONFIG_FILE, HEALTH_INIT_FILE, CHECKPOINT_FILE, METRICS_FILE),
        required=(METRICS_FILE,),
    ),
    "health": StageFiles(
        reads=(CHECKPOINT_FILE, METRICS_FILE), writes=(HEALTH_FILE,), required=(HEALTH_FILE,)
    ),
    "prune": StageFiles(
        reads=(CHECKPOINT_FILE, METRICS_FILE),
        writes=(in_pruned(PRUNED_FILE), in_pruned(PRUNE_FILE), in_pruned(HEALTH_PRUNED_FILE)),
        required=(in_pruned(PRUNE_FILE), in_pruned(HEALTH_PRUNED_FILE)),
        intermediate=(in_pruned(SURGERY_FILE), in_pruned(FINETUNE_CHECKPOINT)),
    ),
    "export": StageFiles(
        reads=(CHECKPOINT_FILE, in_pruned(PRUNED_FILE)),
        writes=(*_VARIANT_OUTPUTS, *(in_pruned(n) for n in _VARIANT_OUTPUTS)),
        required=(EXPORT_FILE, PARITY_FILE),
    ),
    "time": StageFiles(reads=(CHECKPOINT_FILE, *_EXPORTED), writes=(LATENCY_FILE,), required=(LATENCY_FILE,)),
    "cpp": StageFiles(reads=_EXPORTED, writes=(LATENCY_CPP_FILE,), required=(LATENCY_CPP_FILE,)),
    # run level
    "verdicts": StageFiles(
        reads=(RUN_FILE, "*/*.json", f"*/{PRUNE_GLOB}/*.json"),
        writes=(VERDICTS_FILE,),
        required=(VERDICTS_FILE,),
    ),
    "report": StageFiles(reads=(RUN_FILE, "*/*.json"), writes=(REPORT_FILE,), required=(REPORT_FILE,)),
}

# The result files of a config folder that `check` compares, and the files of each exported variant (the trained
# net and every prune_* folder) whose parity and timing it compares: present in one run and not in the other,
# a comparison would silently skip them.
COMPARED = (METRICS_FILE, HEALTH_FILE, PARITY_FILE, LATENCY_FILE, LATENCY_CPP_FILE)
VARIANT_FILES = _VARIANT_OUTPUTS


# ------------------------------------------------------------------------------------------- statuses
# Every `status` word a result file (or `check`'s JSON) holds, one enum per vocabulary. A member is a str equal to
# its value: json.dumps writes the value, str() and f-strings give it, and `==` / `in` against a string read from
# an older file hold, so the files read and write exactly as before. Never rename a value: old run folders hold it.

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10: the same behaviour as 3.11's enum.StrEnum for what this project does with it

    class StrEnum(str, Enum):
        def __str__(self) -> str:
            return str(self.value)


class Status(StrEnum):
    """The `status` of a stage's result file: metrics.json and finetune_metrics.json (train, fine-tuning),
    prune.json, latency.json, latency_cpp.json. Only `complete` counts as a result."""

    COMPLETE = "complete"
    DIVERGED = "diverged"  # metrics.json: the loss diverged (suite/train.py write_failure)
    PARITY_FAILED = "parity failed"  # latency_cpp.json: the C++ runner's outputs differ from PyTorch's


class PipelineStatus(StrEnum):
    """pipeline.json's `status`: a config's stages as they stand."""

    COMPLETE = "complete"
    RUNNING = "running"  # written between two stages of one command
    FAILED = "failed"  # a stage's record says failed


class StageStatus(StrEnum):
    """One stage's record in pipeline.json (and a Ray worker's record in it)."""

    OK = "ok"
    FAILED = "failed"


class RowStatus(StrEnum):
    """A measured row: a timing row of latency.json / latency_cpp.json, a training-step row of `bench train`.
    A row without a status is ok (timed by older code)."""

    OK = "ok"
    ERROR = "error"


class CheckStatus(StrEnum):
    """One metric's outcome in `check` (against a baseline run or the history, its --json) and on the trend
    page. Only `regressed` fails a check; UNGATED ones are reported, not gated."""

    OK = "ok"
    REGRESSED = "regressed"
    NOISY = "noisy"  # the interval crosses the tolerance: noise too large to gate
    UNSTABLE = "unstable"  # a measurement marked unstable
    NOT_GATED = "not_gated"  # e.g. no raw samples (timed by older code), or timed off the device asked for
    DISTURBED = "disturbed"  # the machine probe moved: the machine did not run at one speed
    INFO = "info"  # shown, never gated (the machine probe; absolute p50 without --gate-absolute)
    NO_HISTORY = "no_history"  # nothing comparable to judge against yet


UNGATED = (CheckStatus.UNSTABLE, CheckStatus.NOT_GATED, CheckStatus.NOISY, CheckStatus.DISTURBED)


class ResultError(CapsbenchError):
    """A result file is missing, unreadable, not a JSON object of its kind, or without a valid schema version."""


class NewerSchemaError(ResultError):
    """A result file written by a newer capsbench: refused, and never overwritten by this one."""


# ------------------------------------------------------------------------------------------- folders


def config_dirs(run_dir: Path) -> dict[str, Path]:
    """{config id: folder} of a run: the folders holding a config.json (not .locks/ or stray folders)."""
    run_dir = Path(run_dir)
    return {d.name: d for d in sorted(run_dir.iterdir()) if d.is_dir() and (d / CONFIG_FILE).is_file()}


def prune_dirs(config_folder: Path) -> list[Path]:
    """The pruning folders of a config (prune_<...>/), sorted."""
    return sorted(p for p in Path(config_folder).glob(PRUNE_GLOB + "/") if p.is_dir())


def prune_dir_name(
    criterion: str,
    backbone_ratio: float,
    caps_ratio: float,
    intermediate_ratio: float | None = None,
    reinit_caps_layers: bool = False,
) -> str:
    """The sub-folder of one pruning setting, e.g. prune_chip_b0.50_c0.30: every setting of a sweep is kept.
    The capsule ratio c applies to PrimaryCaps and the intermediate layers; _i<r> marks an intermediate
    ratio that differs from it. `criterion` is a control's name for a control (prune_random_..., ...)."""
    name = f"{PRUNE_PREFIX}{criterion}_b{backbone_ratio:.2f}_c{caps_ratio:.2f}"
    if intermediate_ratio is not None and intermediate_ratio != caps_ratio:
        name += f"_i{intermediate_ratio:.2f}"
    return name + ("_reinit" if reinit_caps_layers else "")


@dataclass(frozen=True)
class Variant:
    """One exportable model of a config and the files it produces (paths relative to the config folder)."""

    name: str
    checkpoint: str
    onnx: str
    export: str
    parity: str


BASE = Variant("model", CHECKPOINT_FILE, ONNX_FILE, EXPORT_FILE, PARITY_FILE)


def present_variants(out_dir: Path) -> list[Variant]:
    """The trained net, then every pruned net (prune_*/pruned.pt), whose ONNX files go into its sub-folder."""
    out = Path(out_dir)
    found = [BASE] if (out / BASE.checkpoint).is_file() else []
    for ckpt in sorted(out.glob(in_pruned(PRUNED_FILE))):
        d = ckpt.parent.name
        found.append(
            Variant(d, f"{d}/{PRUNED_FILE}", f"{d}/{ONNX_FILE}", f"{d}/{EXPORT_FILE}", f"{d}/{PARITY_FILE}")
        )
    return found


def exported_variants(out_dir: Path) -> list[Variant]:
    """The variants of a config folder that the export stage has exported (what the timing stages time)."""
    out = Path(out_dir)
    return [v for v in present_variants(out) if (out / v.onnx).is_file() and (out / v.export).is_file()]


# ------------------------------------------------------------------------------------------- files


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, kind: str, data: dict[str, Any]) -> Path:
    """Write a result file `{schema_version, kind, ...data}` atomically."""
    payload = {"schema_version": SCHEMA_VERSION, "kind": kind, **data}
    return atomic_write(Path(path), lambda f: f.write(json.dumps(payload, indent=2, sort_keys=False) + "\n"))


def read_result(path: Path, kind: str | None) -> dict[str, Any]:
    """Read a result file written by `write_json`: UTF-8 JSON holding an object of this kind and a schema
    version this capsbench understands. Every result file is read through here."""
    path = Path(path)
    if not path.is_file():
        raise ResultError(f"{path}: result file not found; run the stage that writes it first")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ResultError(f"{path}: not UTF-8 text ({e.reason}); delete it and rerun the stage") from e
    except json.JSONDecodeError as e:
        raise ResultError(
            f"{path}: not valid JSON ({e}); delete it and rerun the stage (or use --force)"
        ) from e
    if not isinstance(data, dict):
        raise ResultError(
            f"{path}: expected a JSON object, found {type(data).__name__}; delete it and rerun the stage"
        )
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"{path}: schema_version {version} is newer than this capsbench understands ({SCHEMA_VERSION}); "
            "upgrade capsbench (the file is left as it is)"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ResultError(f"{path}: no valid schema_version ({version!r}); delete it and rerun the stage")
    if kind is not None and data.get("kind") != kind:
        raise ResultError(f"{path}: expected a '{kind}' result, found '{data.get('kind')}'")
    return data


def read_if_valid(path: Path, kind: str) -> dict[str, Any] | None:
    """A result file's contents, or None when it is missing or unreadable (a stage's "is it done?" test). A file
    of a newer schema raises NewerSchemaError: redoing the stage would overwrite it with an older schema."""
    try:
        return read_result(path, kind)
    except NewerSchemaError:
        raise
    except ResultError:
        return None


def is_trained(out_dir: Path, metrics: str = METRICS_FILE, checkpoint: str | None = None) -> bool:
    """Whether a config folder (or a fine-tuning's metrics file in it) holds a finished training: its metrics say
    complete and its checkpoint is there (a deleted corrupt checkpoint means training again, not a crash later).
    `checkpoint` defaults to checkpoint.pt for the trained net's metrics.json."""
    done = read_if_valid(Path(out_dir) / metrics, "metrics")
    if checkpoint is None and metrics == METRICS_FILE:
        checkpoint = CHECKPOINT_FILE
    ckpt_ok = checkpoint is None or (Path(out_dir) / checkpoint).is_file()
    return done is not None and done.get("status") == Status.COMPLETE and ckpt_ok
