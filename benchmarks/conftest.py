"""Regression benchmarks of the exported model (pytest-benchmark), outside tests/ so the normal suite skips them.

    .venv/bin/pytest benchmarks --benchmark-only [--benchmark-json out.json] [--benchmark-compare-fail median:10%]

Without --capsbench-run-dir (or $CAPSBENCH_BENCH_RUN_DIR) an untrained net of --capsbench-model (smoke, sabour)
is exported on the fly; latency does not depend on the weights. Compare only runs from the same machine (or
the ORT/torch ratio within one run): absolute latency is noisy across machines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from capsbench.export import export_onnx, make_session
from capsbench.export.sessions import PROVIDERS, OrtSession, default_threads
from capsbench.models import CapsNet, build_capsnet
from capsbench.suite import data, rundir
from capsbench.suite.checkpoints import load_model
from capsbench.suite.presets import RunConfig, get_preset

MODELS = {
    "smoke": lambda: get_preset("smoke").configs()[0],
    "sabour": lambda: get_preset("sabour").configs()[0],
}


def pytest_addoption(parser):
    group = parser.getgroup("capsbench")
    group.addoption(
        "--capsbench-run-dir",
        default=os.environ.get("CAPSBENCH_BENCH_RUN_DIR"),
        help="time the exported model of this run (runs/<run-id>; the first config with a model.onnx, or "
        "--capsbench-config); default: export an untrained net on the fly ($CAPSBENCH_BENCH_RUN_DIR)",
    )
    group.addoption("--capsbench-config", default=None, help="config id prefix within the run dir")
    group.addoption(
        "--capsbench-model",
        default=os.environ.get("CAPSBENCH_BENCH_MODEL", "smoke"),
        choices=sorted(MODELS),
        help="the net to export when no run dir is given (default: smoke; sabour is the performance reference)",
    )
    group.addoption(
        "--capsbench-batch-sizes",
        default=os.environ.get("CAPSBENCH_BENCH_BATCH_SIZES", "1,8,32,128"),
        help="comma-separated batch sizes (default: 1,8,32,128)",
    )
    group.addoption("--capsbench-threads", type=int, default=None, help="CPU threads for ORT and torch")
    group.addoption("--capsbench-provider", default="auto", choices=PROVIDERS)


def pytest_generate_tests(metafunc):
    if "batch" in metafunc.fixturenames:
        sizes = [int(b) for b in metafunc.config.getoption("--capsbench-batch-sizes").split(",") if b.strip()]
        metafunc.parametrize("batch", sizes, ids=[f"batch{b}" for b in sizes])


@dataclass
class Bench:
    model: CapsNet
    session: OrtSession
    images: np.ndarray  # float32 (N, C, H, W) in [0, 1]
    label: str


def _images(cfg: RunConfig, count: int = 128) -> np.ndarray:
    """Real test images when the dataset is on disk, else uniform noise of the right shape."""
    try:
        x, _ = data.load_split(cfg.dataset, "test")
        return (x[:count].float() / 255).numpy()
    except Exception:  # noqa: BLE001 - latency does not depend on the pixel values
        m = cfg.model
        return torch.rand(count, m.in_channels, m.image_size, m.image_size).numpy()


def _from_run_dir(run_dir: Path, prefix: str | None) -> tuple[CapsNet, Path, RunConfig]:
    dirs = sorted(
        d
        for d in run_dir.iterdir()
        if (d / rundir.ONNX_FILE).is_file() and (d / rundir.CONFIG_FILE).is_file()
    )
    dirs = [d for d in dirs if prefix is None or d.name.startswith(prefix)]
    if not dirs:
        pytest.exit(f"{run_dir}: no exported config here; run 'capsbench export' first", returncode=2)
    cfg = RunConfig.from_dict(rundir.read_result(dirs[0] / rundir.CONFIG_FILE, "config")["config"])
    return load_model(cfg, dirs[0] / rundir.CHECKPOINT_FILE), dirs[0] / rundir.ONNX_FILE, cfg


@pytest.fixture(scope="session")
def bench(request, tmp_path_factory) -> Bench:
    opt = request.config.getoption
    threads = opt("--capsbench-threads") or default_threads()
    torch.set_num_threads(threads)
    if opt("--capsbench-run-dir"):
        model, path, cfg = _from_run_dir(Path(opt("--capsbench-run-dir")), opt("--capsbench-config"))
        label = f"{cfg.id} ({cfg.label})"
    else:
        cfg = MODELS[opt("--capsbench-model")]()
        torch.manual_seed(cfg.seed)
        model = build_capsnet(cfg.model).eval()
        path = tmp_path_factory.mktemp("bench") / "model.onnx"
        export_onnx(
            model, path, torch.rand(2, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
        )
        label = f"untrained {opt('--capsbench-model')} ({cfg.label})"
    session = make_session(path, opt("--capsbench-provider"), threads)
    return Bench(model.eval(), session, _images(cfg), label)
