"""Shared fixtures: the real Fashion-MNIST files, fetched once per test session into the default data dir.

CI fetches them the same way (.ci/run); a missing source fails with the dataset module's own message.
"""

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import SimpleNamespace

import pytest

from capsbench.suite import data


@pytest.fixture(scope="session")
def fashion_data_dir() -> Path:
    data_dir = data.resolve_data_dir(None)
    data.fetch("fashion-mnist", data_dir, progress=False)
    return data_dir


@dataclass(frozen=True)
class CliResult:
    """One `capsbench` command run in this process: its exit code and what it printed."""

    code: int
    out: str
    err: str


@pytest.fixture
def cli(request) -> Callable[[Sequence[str | PathLike]], CliResult]:
    """`cli(argv)` runs `capsbench ARGV` in this process (capsbench.suite.cli.main, as the console script does)
    and returns CliResult(code, out, err): the exit code and that command's own stdout and stderr (through
    capsys, or capfd when the test asks for it: what subprocesses and C code write too). An exit of argparse's
    (--help, a bad option) raises SystemExit, as it does from main. Everything printed is printed again, so a
    failing test's report still shows it. Session fixtures, which cannot use a test's capture, call main."""
    from capsbench.suite.cli import main

    capture = request.getfixturevalue("capfd" if "capfd" in request.fixturenames else "capsys")

    def run(argv: Sequence[str | PathLike]) -> CliResult:
        before = capture.readouterr()  # what came earlier is not this command's
        try:
            code = main([str(a) for a in argv])
        finally:
            out, err = capture.readouterr()
            sys.stdout.write(before.out + out)
            sys.stderr.write(before.err + err)
        return CliResult(code, out, err)

    return run


# Fixtures that train, export or build (a benchmark run end to end, a trained and exported net, the C++ runner):
# every test using one is `slow`, left out of the fast loop `pytest -m "not slow"` (CI runs everything).
HEAVY_FIXTURES = {
    "smoke_all_run",  # capsbench all --preset smoke (tests/conftest.py)
    "smoke_run",  # a copy of it (tests/suite/cli/test_train.py)
    "tiny_run",  # a trained, pruned and exported run (tests/suite/test_runner.py)
    "trained",  # a trained base to prune (tests/suite/stages/test_prune.py)
    "exported_run",  # a trained, pruned and exported run (tests/suite/stages/test_export.py)
    "pruned_run",  # a run pruned with every control (tests/suite/test_pruning.py)
    "exported",  # trained and exported nets (tests/export/conftest.py)
    "capsnet_onnx",  # an exported net (tests/export/test_cpp_runner.py)
    "runner",  # the C++ runner, built with CMake (cached by its sources' hash)
    "asan_runner",  # the same, under AddressSanitizer
}


def pytest_report_header(config):
    """The machine the figures of this test run come from: CPU, ISA extensions and its fp32 GEMM rate now
    (the tests assert nothing about speed; the rate says what kind of machine a slow run was on)."""
    from capsbench.export.latency import machine_line

    return f"machine: {machine_line()}"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


SMOKE_ALL_ARGS = ["--batch-sizes", "1", "8", "--iters", "10", "--no-progress"]


@pytest.fixture(scope="session")
def smoke_all_args() -> list[str]:
    """The options smoke_all_run was made with: a command given them again finds every stage done."""
    return list(SMOKE_ALL_ARGS)


def smoke_argv(runs: Path | str, data_dir: Path | str, *extra: str) -> list[str]:
    """The options a test's command on the smoke preset starts with: where the run goes and the real data."""
    return ["--preset", "smoke", "--runs-dir", str(runs), "--data-dir", str(data_dir), *extra]


def one_epoch_argv(train_images: int, eval_images: int) -> list[str]:
    """One epoch on a few real images: training short enough for a test, long enough to learn something."""
    return ["--epochs", "1", "--train-subset", str(train_images), "--eval-subset", str(eval_images)]


@pytest.fixture(scope="session")
def argv() -> SimpleNamespace:
    """The argument builders above for tests (which cannot import conftest): argv.smoke(runs, data_dir, ...),
    argv.one_epoch(train_images, eval_images)."""
    return SimpleNamespace(smoke=smoke_argv, one_epoch=one_epoch_argv)


@pytest.fixture(scope="session")
def smoke_all_run(tmp_path_factory, fashion_data_dir) -> Path:
    """`capsbench all --preset smoke` once per session on the real data (short timing settings)."""
    from capsbench.suite.cli import main

    runs = tmp_path_factory.mktemp("all")
    code = main(["all", *smoke_argv(runs, fashion_data_dir, *SMOKE_ALL_ARGS)])
    assert code == 0, "capsbench all --preset smoke failed; see its output above"
    return runs / "smoke"
