"""The results store: atomic writes of JSON results and torch artifacts, each JSON with a schema version.

Readers (reports, CI checks) go through `read_result`, which refuses files from an unknown schema.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from capsbench.suite.errors import CheckpointError

SCHEMA_VERSION = 1


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    """Write through a temp file in the same folder, fsync, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, kind: str, data: dict[str, Any]) -> Path:
    """Write a result file `{schema_version, kind, ...data}` atomically."""
    payload = {"schema_version": SCHEMA_VERSION, "kind": kind, **data}
    _atomic_write(Path(path), lambda f: f.write(json.dumps(payload, indent=2, sort_keys=False) + "\n"), "w")
    return Path(path)


def read_result(path: Path, kind: str) -> dict[str, Any]:
    """Read a result file written by `write_json`, checking its kind and schema version."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: result file not found; run the stage that writes it first")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: not valid JSON ({e}); delete it and rerun the stage (or use --force)"
        ) from e
    if data.get("kind") != kind:
        raise CheckpointError(f"{path}: expected a '{kind}' result, found '{data.get('kind')}'")
    version = data.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{path}: schema_version {version!r} is newer than this capsbench understands ({SCHEMA_VERSION}); "
            "upgrade capsbench"
        )
    return data


def save_torch(path: Path, obj: Any) -> Path:
    """torch.save through a temp file and rename, so a killed run never leaves a truncated checkpoint."""
    import torch

    _atomic_write(Path(path), lambda f: torch.save(obj, f), "wb")
    return Path(path)


def load_torch(path: Path) -> Any:
    """torch.load with a clear error for a missing or corrupt file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a corrupt zip/pickle
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: {e}); delete it or rerun with --force"
        ) from e
