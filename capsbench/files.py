"""The one atomic file writer of every layer (models/ aside, which writes no files)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "w") -> Path:
    """Write through a uniquely named temp file in the same folder, fsync, then rename (mode 0644): a reader
    never sees half a file, two writers never share a temp file, and on any failure (an exception of `write`
    included) the temp file goes and an older file at `path` stays untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; results and datasets are often shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
