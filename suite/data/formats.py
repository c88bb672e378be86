"""Parsers of the datasets' original file formats into uint8 images and int64 labels, one per format."""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from capsbench.suite.data.registry import DatasetSpec, get_spec, resolve_data_dir
from capsbench.suite.data.verify import _open_content, verify_file
from capsbench.suite.errors import ConfigError, DatasetError

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
                    reader = tar.extractfile(member)
                    assert reader is not None, "extractfile gives a reader for every regular file"
                    found[base] = reader.read()
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


# format name (DatasetSpec.format) -> parser of a split's verified files into (images, labels)
FORMATS: dict[str, Callable[[DatasetSpec, str, list[Path]], tuple[np.ndarray, np.ndarray]]] = {
    "idx": lambda spec, split, paths: _load_idx(spec, paths),
    "cifar-python": lambda spec, split, paths: _load_cifar(spec, split, paths[0]),
    "svhn-mat": lambda spec, split, paths: _load_svhn(spec, paths[0]),
}


def load_split(
    name: str, split: str, data_dir: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images uint8 (N, C, H, W) and labels int64 (N,) in 0..9 of one split, after verifying the files."""
    spec = get_spec(name)
    if split not in spec.splits:
        raise ConfigError(f"unknown split '{split}' of {name}; known splits: {', '.join(spec.splits)}")
    folder = resolve_data_dir(data_dir) / spec.name
    paths = [verify_file(folder, spec, spec.file(n)) for n in spec.splits[split]]
    parse = FORMATS.get(spec.format)
    if parse is None:
        raise ConfigError(
            f"dataset {name} has unknown format '{spec.format}'; known formats: {', '.join(FORMATS)}"
        )
    images, labels = parse(spec, split, paths)
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= len(spec.classes)):
        raise DatasetError(
            f"{paths[-1]}: labels range {labels.min()}..{labels.max()}, expected 0..{len(spec.classes) - 1}"
        )
    return torch.from_numpy(images), torch.from_numpy(labels)
