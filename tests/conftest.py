"""Shared fixtures: the real Fashion-MNIST files, fetched once per test session into the default data dir.

CI fetches them the same way (.ci/run); a missing source fails with the dataset module's own message.
"""

from pathlib import Path

import pytest

from capsbench.suite import data


@pytest.fixture(scope="session")
def fashion_data_dir() -> Path:
    data_dir = data.resolve_data_dir(None)
    data.fetch("fashion-mnist", data_dir, progress=False)
    return data_dir
