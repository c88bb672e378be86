"""The run folder, defined once: its file names, its config and variant folders, and how results are written and
read (atomically, each JSON with a schema version). Free of torch, so reports, checks and benchmarks can use it.

    runs/<run-id>/run.json, verdicts.json, report.html
    runs/<run-id>/<config-id>/config.json, checkpoint.pt, metrics.json, health_init.json, health.json,
        pipeline.json, error.txt,
        model.onnx, export.json, parity.json, latency.json, latency_cpp.json, prune_sweep_<criterion>.json
    runs/<run-id>/<config-id>/prune_<criterion or control>_b<B>_c<C>/surgery.pt, finetune.pt, finetune_metrics.json,
        pruned.pt, prune.json, health_pruned.json, model.onnx, export.json, parity.json
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from capsbench.files import atomic_write
from capsbench.suite.errors import CheckpointError

__all__ = ["atomic_write"]  # the writer of every result file, from the one definition in capsbench/files.py

SCHEMA_VERSION = 1

# run level
RUN_FILE = "run.json"
REPORT_FILE = "report.html"
# config level
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
HEALTH_FILE = "health.json"
PIPELINE_FILE = "pipeline.json"
ERROR_FILE = "error.txt"  # the tracebacks of a config's failed stages
LATENCY_FILE = "latency.json"
LATENCY_CPP_FILE = "latency_cpp.json"
SWEEP_FILE = "prune_sweep_{criterion}.json"
# variant level: the trained net in the config folder, every pruned net in its prune_* folder
ONNX_FILE = "model.onnx"
EXPORT_FILE = "export.json"
PARITY_FILE = "parity.json"
# pruning folder
SURGERY_FILE = "surgery.pt"  # the net right after surgery, with the plan and the measurements so far
FINETUNE_CHECKPOINT = "finetune.pt"
FINETUNE_METRICS = "finetune_metrics.json"
PRUNED_FILE = "pruned.pt"  # the final (fine-tuned) pruned net: a smaller CapsNet with its own model_config
PRUNE_FILE = "prune.json"
HEALTH_PRUNED_FILE = "health_pruned.json"
HEALTH_INIT_FILE = "health_init.json"  # the config's net at initialisation, BatchNorm on batch statistics
VERDICTS_FILE = "verdicts.json"  # run level: the paper's claims tested on the run's results
LOCKS_DIR = ".locks"  # run level: runs/<run-id>/.locks/<config-id>.lock and run.lock


class RunFolderBusy(CheckpointError):
    """Another capsbench process is working on this config (or on the run's own files)."""


@contextlib.contextmanager
def folder_lock(run_dir: Path, name: str, *, wait: bool = False) -> Iterator[None]:
    """One writer at a time: an exclusive flock on runs/<run-id>/.locks/<name>.lock, `name` a config id (held
    while a command works on that config's folder) or "run" (held while run.json, verdicts.json or the report
    are written). Without `wait` a lock held by another process raises RunFolderBusy at once. The kernel drops
    a lock when its holder exits however it exits (SIGKILL included), so a killed run never blocks the next.
    The file holds the holder's pid and start time, for the other command's message."""
    locks = Path(run_dir) / LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    fd = os.open(locks / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            what = "the run's own files" if name == "run" else f"config {name}"
            raise RunFolderBusy(
                f"{run_dir}: another capsbench is working on {what} ({holder}); wait for it to finish, or "
                "give this command other --configs or another --run-id"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def config_dir(run_dir: Path, cfg: Any) -> Path:
    """A config's folder: runs/<run-id>/<config-id> (`cfg` is a RunConfig or its id)."""
    return Path(run_dir) / (cfg if isinstance(cfg, str) else cfg.id)


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
    name = f"prune_{criterion}_b{backbone_ratio:.2f}_c{caps_ratio:.2f}"
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
    for ckpt in sorted(out.glob(f"*/{PRUNED_FILE}")):
        d = ckpt.parent.name
        found.append(
            Variant(d, f"{d}/{PRUNED_FILE}", f"{d}/{ONNX_FILE}", f"{d}/{EXPORT_FILE}", f"{d}/{PARITY_FILE}")
        )
    return found


def exported_variants(out_dir: Path) -> list[Variant]:
    """The variants of a config folder that the export stage has exported (what the timing stages time)."""
    out = Path(out_dir)
    return [v for v in present_variants(out) if (out / v.onnx).is_file() and (out / v.export).is_file()]


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


class NewerSchemaError(CheckpointError):
    """A result file written by a newer capsbench: refused, and never overwritten by this one."""


def read_result(path: Path, kind: str | None) -> dict[str, Any]:
    """Read a result file written by `write_json`: UTF-8 JSON holding an object of this kind and a schema
    version this capsbench understands. Every result file of the suite is read through here."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: result file not found; run the stage that writes it first")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason}); delete it and rerun the stage") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e}); delete it and rerun the stage (or use --force)"
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: expected a JSON object, found {type(data).__name__}; delete it and rerun the stage"
        )
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise NewerSchemaError(
            f"{path}: schema_version {version} is newer than this capsbench understands ({SCHEMA_VERSION}); "
            "upgrade capsbench (the file is left as it is)"
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: no valid schema_version ({version!r}); delete it and rerun the stage")
    if kind is not None and data.get("kind") != kind:
        raise CheckpointError(f"{path}: expected a '{kind}' result, found '{data.get('kind')}'")
    return data


def read_if_valid(path: Path, kind: str) -> dict[str, Any] | None:
    """A result file's contents, or None when it is missing or unreadable (a stage's "is it done?" test). A file
    of a newer schema raises NewerSchemaError: redoing the stage would overwrite it with an older schema."""
    try:
        return read_result(path, kind)
    except NewerSchemaError:
        raise
    except CheckpointError:
        return None


def is_trained(out_dir: Path, metrics: str = METRICS_FILE, checkpoint: str | None = None) -> bool:
    """Whether a config folder (or a fine-tuning's metrics file in it) holds a finished training: its metrics say
    complete and its checkpoint is there (a deleted corrupt checkpoint means training again, not a crash later).
    `checkpoint` defaults to checkpoint.pt for the trained net's metrics.json."""
    done = read_if_valid(Path(out_dir) / metrics, "metrics")
    if checkpoint is None and metrics == METRICS_FILE:
        checkpoint = CHECKPOINT_FILE
    ckpt_ok = checkpoint is None or (Path(out_dir) / checkpoint).is_file()
    return done is not None and done.get("status") == "complete" and ckpt_ok
