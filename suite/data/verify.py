"""Checksums of stored dataset files, and the status of every dataset in a data folder."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from capsbench.results import StrEnum
from capsbench.suite.data.registry import (
    _CHUNK,
    _GZIP_MAGIC,
    DATASETS,
    DatasetSpec,
    FileSpec,
    _fetch_advice,
    _locate,
    resolve_data_dir,
)
from capsbench.suite.errors import ChecksumError, DatasetError

# ---------------------------------------------------------------------------------------------- checksums


def _split_checksum(checksum: str) -> tuple[str, str]:
    algo, _, digest = checksum.partition(":")
    if algo not in ("sha256", "md5") or not digest:
        raise ValueError(f"bad checksum {checksum!r}: expected 'sha256:<hex>' or 'md5:<hex>'")
    return algo, digest.lower()


@contextlib.contextmanager
def _open_content(path: Path, unwrap_gzip: bool) -> Iterator[io.BufferedIOBase]:
    """Open a file for reading its content: through gunzip when it is gzip-wrapped and that is allowed.

    The stream is a buffered binary reader either way (the open file, or a GzipFile over it), which is
    what the common type says: GzipFile is no `IO[bytes]`.
    """
    with open(path, "rb") as raw:
        if unwrap_gzip and raw.read(2) == _GZIP_MAGIC:
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz
        else:
            raw.seek(0)
            yield raw


def _digest_stream(stream: io.BufferedIOBase, algo: str) -> tuple[str, int]:
    h = hashlib.new(algo)
    n = 0
    while chunk := stream.read(_CHUNK):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


# (path, mtime_ns, size, algo, unwrap_gzip) -> (hex digest of the content, content size). Hashing 50-600 MB
# costs 0.1-2 s, and training code loads the same files again and again, so a file is hashed once per change.
_DIGEST_CACHE: dict[tuple[str, int, int, str, bool], tuple[str, int]] = {}


def _content_digest(path: Path, f: FileSpec) -> tuple[str, int]:
    """Digest and size of a stored file's content (cached per path, mtime and size)."""
    algo, _ = _split_checksum(f.checksum)
    st = path.stat()
    key = (str(path), st.st_mtime_ns, st.st_size, algo, f.unwrap_gzip)
    if key not in _DIGEST_CACHE:
        try:
            with _open_content(path, f.unwrap_gzip) as stream:
                _DIGEST_CACHE[key] = _digest_stream(stream, algo)
        except (OSError, EOFError, gzip.BadGzipFile) as e:
            # A truncated or damaged gzip wrapper: nothing cached, so a repaired file is hashed again.
            raise ChecksumError(f"{path} is unreadable ({type(e).__name__}: {e})") from e
    return _DIGEST_CACHE[key]


def _problem(path: Path, f: FileSpec) -> str | None:
    """Why a stored file fails verification, or None when it matches its checksum."""
    algo, want = _split_checksum(f.checksum)
    try:
        got, size = _content_digest(path, f)
    except ChecksumError as e:
        return str(e).removeprefix(f"{path} is ")
    if f.size is not None and size != f.size:
        return f"truncated or padded: {size} bytes of content, expected {f.size}"
    if got != want:
        return f"{algo} {got} does not match the known {want}"
    return None


def verify_file(folder: Path, spec: DatasetSpec, f: FileSpec) -> Path:
    """The path of a present, verified file; DatasetError (missing) or ChecksumError (corrupt) naming it."""
    path = _locate(folder, f)
    if path is None:
        raise DatasetError(f"{folder / f.name} is missing: {_fetch_advice(spec)}")
    problem = _problem(path, f)
    if problem is not None:
        raise ChecksumError(
            f"{path} is corrupt ({problem}): delete it and run `capsbench data fetch {spec.name}`"
        )
    return path


# ---------------------------------------------------------------------------------------------- status


class DatasetState(StrEnum):
    """A dataset's `state` in a data folder (`data list`, `doctor`)."""

    VERIFIED = "verified"  # every file there and matching its checksum
    MISSING = "missing"  # no file there
    INCOMPLETE = "incomplete"  # some files missing, the rest fine
    CORRUPT = "corrupt"  # a file fails its checksum


def status(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Per dataset: name, path, present, verified, state and the files with problems.

    state is "verified" (all files match), "missing" (none there), "incomplete" (some missing, the rest
    fine) or "corrupt" (a file fails its checksum); problems maps file name -> what is wrong.
    """
    root = resolve_data_dir(data_dir)
    rows = []
    for spec in DATASETS.values():
        folder = root / spec.name
        problems: dict[str, str] = {}
        n_present = 0
        corrupt = False
        for f in spec.files:
            path = _locate(folder, f)
            if path is None:
                problems[f.name] = "missing"
                continue
            n_present += 1
            problem = _problem(path, f)
            if problem is not None:
                problems[path.name] = f"corrupt: {problem}"
                corrupt = True
        present = n_present == len(spec.files)
        if not problems:
            state = DatasetState.VERIFIED
        elif corrupt:
            state = DatasetState.CORRUPT
        elif n_present == 0:
            state = DatasetState.MISSING
        else:
            state = DatasetState.INCOMPLETE
        rows.append(
            {
                "name": spec.name,
                "path": str(folder),
                "present": present,
                "verified": not problems,
                "state": state,
                "problems": problems,
            }
        )
    return rows
