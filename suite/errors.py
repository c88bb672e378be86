"""Exception classes the CLI turns into one clear line and a non-zero exit.

Every message says what went wrong and what to do next.
"""

from capsbench.errors import CapsbenchError  # noqa: F401 (every suite error derives from the one root)


class DatasetError(CapsbenchError):
    """A dataset is missing, corrupt or cannot be fetched."""


class ChecksumError(DatasetError):
    """A dataset file does not match its known checksum."""


class ConfigError(CapsbenchError):
    """A preset or config name is unknown, or a config is invalid."""


class CheckpointError(CapsbenchError):
    """A checkpoint or result file is missing, corrupt or belongs to another config."""


class DivergenceError(CapsbenchError):
    """Training produced a non-finite loss or collapsed; that config is stopped."""

    exit_code = 1  # a recorded outcome of that config, like any failed stage


class StageError(CapsbenchError):
    """A stage's measurement failed (e.g. the C++ runner's outputs differ from Python ORT's)."""


def os_error_message(e: OSError) -> str:
    """One line naming the path and the cause of an operating-system error, e.g.
    'runs/smoke/report.html: Read-only file system'."""
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    cause = e.strerror or type(e).__name__
    return f"{' -> '.join(paths)}: {cause}" if paths else f"{cause} ({' '.join(str(e).split())})"
