"""The run folder's locks and config folders. Its contract (file names, each stage's files, reading and writing
results) is capsbench/results.py, which every module imports from directly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capsbench.results import LOCKS_DIR
from capsbench.suite.errors import CheckpointError


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
