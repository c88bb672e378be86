"""`capsbench export` and `capsbench time` on a briefly trained smoke config: files, resume, pruned variant,
clear errors for an untrained config or a corrupt model."""

import dataclasses

import pytest
import torch

from capsbench import results as R
from capsbench.models import CapsNetConfig, build_capsnet
from capsbench.models.config import BACKBONES, PRIMARY_LAYOUTS
from capsbench.results import read_result
from capsbench.suite import rundir, runner
from capsbench.suite import train as training
from capsbench.suite.checkpoints import save_torch
from capsbench.suite.cli import main
from capsbench.suite.presets import get_preset
from capsbench.suite.stages import ExportSettings, Settings

CFG = next(c for c in get_preset("smoke").configs() if c.model.depth == 0)
TINY = ["--train-subset", "64", "--eval-subset", "32", "--epochs", "1"]
PRUNE_DIR = "prune_chip_b0.50_c0.25"
PRUNED = CapsNetConfig(**{**CFG.model.__dict__, "backbone_channels": (12, 24, 48), "primary_types": 6})


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, fashion_data_dir):
    """A trained smoke config plus a pruned-shaped checkpoint beside it, then export and time."""
    runs = tmp_path_factory.mktemp("runs")
    common = [
        "--preset",
        "smoke",
        "--configs",
        CFG.id,
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(fashion_data_dir),
        *TINY,
    ]
    assert main(["train", *common, "--no-progress"]) == 0
    (folder,) = [p for p in (runs / "smoke").iterdir() if (p / "config.json").is_file()]  # not .locks/
    cfg_id = folder.name
    state = training.read_checkpoint(
        CFG.replace(train_subset=64, eval_subset=32, epochs=1), folder / "checkpoint.pt"
    )
    save_torch(  # where the pruning stage writes its final net: one sub-folder per pruning setting
        folder / PRUNE_DIR / "pruned.pt",
        {"config_id": cfg_id, "model_config": PRUNED.to_dict(), "model": build_capsnet(PRUNED).state_dict()},
    )
    assert state["config_id"] == cfg_id
    export_code = main(["export", *common])
    time_code = main(["time", *common, "--batch-sizes", "1", "2", "--iters", "2", "--warmup", "1"])
    return folder, common, export_code, time_code


@pytest.mark.slow
def test_export_writes_onnx_export_and_parity_for_the_model_and_its_pruned_version(exported_run):
    folder, _, code, _ = exported_run
    assert code == 0
    for onnx_name, export_name, parity_name in [
        ("model.onnx", "export.json", "parity.json"),
        (f"{PRUNE_DIR}/model.onnx", f"{PRUNE_DIR}/export.json", f"{PRUNE_DIR}/parity.json"),
    ]:
        assert (folder / onnx_name).is_file()
        info = read_result(folder / export_name, "export")
        assert info["exporter"] == "dynamo" and "Loop" not in info["op_census"]
        par = read_result(folder / parity_name, "parity")
        assert par["passed"] and par["images"] == 32
    assert (
        read_result(folder / PRUNE_DIR / "export.json", "export")["parameters"]
        == build_capsnet(PRUNED).num_parameters()
    )


def test_time_writes_latency_with_environment_and_both_backends_per_batch(exported_run, capsys):
    folder, _, _, code = exported_run
    assert code == 0
    lat = read_result(folder / "latency.json", "latency")
    rows = lat["rows"]
    assert {(r["variant"], r["backend"], r["batch"]) for r in rows} == {
        (v, b, n) for v in ("model", PRUNE_DIR) for b in ("ort_cpu", "torch_eager") for n in (1, 2)
    }
    assert all(r["status"] == "ok" and r["p50_ms"] > 0 for r in rows)
    assert all(r["speedup_vs_torch_eager"] > 0 and r["gemm_fraction"] > 0 for r in rows)
    assert lat["sessions"]["model"]["provider"] == "CPUExecutionProvider"
    assert (
        lat["gemm"]["gflops_per_s"] > 0
        and lat["flops_per_image"][PRUNE_DIR] < lat["flops_per_image"]["model"]
    )
    for key in ("cpu", "torch", "onnxruntime", "git_commit"):
        assert key in lat["environment"]


@pytest.mark.slow
def test_finished_stages_are_skipped_and_force_redoes_them(exported_run, cli):
    folder, common, _, _ = exported_run
    mtime = (folder / "model.onnx").stat().st_mtime_ns
    first = read_result(folder / "pipeline.json", "pipeline")["export"]
    started = read_result(folder.parent / "run.json", "run")["started"]
    export = cli(["export", *common])
    assert export.code == 0
    assert "done" in export.out
    assert (folder / "model.onnx").stat().st_mtime_ns == mtime
    # resume keeps history: the export's original seconds and the run's start time
    again = read_result(folder / "pipeline.json", "pipeline")["export"]
    assert again["cached"] and again["seconds"] == first["seconds"]
    assert read_result(folder.parent / "run.json", "run")["started"] == started
    timed = cli(["time", *common, "--batch-sizes", "1", "2", "--iters", "2", "--warmup", "1"])
    assert timed.code == 0
    assert "cached" in timed.out
    # other settings are a different measurement: timed again
    assert cli(["time", *common, "--batch-sizes", "1", "--iters", "2", "--warmup", "1"]).code == 0
    assert [r["batch"] for r in read_result(folder / "latency.json", "latency")["rows"]] == [1] * 4


def test_a_config_not_trained_yet_is_a_clear_error(tmp_path, fashion_data_dir, cli):
    args = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--data-dir", str(fashion_data_dir)]
    export = cli(["export", *args])
    assert export.code == 2
    err = export.err
    assert "none of the 2 selected configs is trained yet" in err and "capsbench train" in err
    timed = cli(["time", *args])
    assert timed.code == 2
    assert "not trained yet" in timed.err


def test_a_corrupt_model_file_is_one_clear_line(exported_run, tmp_path, cli):
    import shutil

    folder, common, _, _ = exported_run
    copy = tmp_path / "smoke" / folder.name
    shutil.copytree(folder, copy)
    (copy / "model.onnx").write_bytes(b"\x00garbage")
    args = [
        *common[: common.index("--runs-dir")],
        "--runs-dir",
        str(tmp_path),
        *common[common.index("--runs-dir") + 2 :],
    ]
    timed = cli(["time", *args, "--batch-sizes", "1", "--iters", "2", "--force"])
    assert timed.code == 2
    err = timed.err
    # The hash recorded at export catches it before ONNX Runtime parses the file.
    assert "model.onnx" in err and "capsbench export --force" in err and err.count("\n") == 1


@pytest.mark.parametrize("layout", PRIMARY_LAYOUTS)
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.slow
def test_the_export_stage_exports_every_backbone_and_primary_layout(
    backbone, layout, tmp_path, fashion_data_dir
):
    """Through the runner as `capsbench export` runs it: an ONNX file that passes parity on real images, for
    each entry of the models' backbone and layout registries (weights need no training for this)."""
    channels = (8, 16, 32) if backbone == "sahu" else (32,)
    model_cfg = CapsNetConfig(
        backbone=backbone, backbone_channels=channels, primary_types=4, primary_dim=8, primary_layout=layout
    )
    cfg = dataclasses.replace(CFG, model=model_cfg, train_subset=64, eval_subset=32, epochs=1)
    out = rundir.config_dir(tmp_path, cfg)
    torch.manual_seed(0)
    net = build_capsnet(model_cfg)
    save_torch(
        out / R.CHECKPOINT_FILE,
        {"config_id": cfg.id, "model_config": model_cfg.to_dict(), "model": net.state_dict()},
    )
    R.write_json(out / R.METRICS_FILE, "metrics", {"config_id": cfg.id, "status": "complete"})
    result = runner.run(
        [cfg],
        tmp_path,
        ["export"],
        Settings(export=ExportSettings(parity_images=32)),
        data_dir=fashion_data_dir,
        log=lambda _: None,
    )
    assert [f.message for f in result.failures] == []
    info = read_result(out / R.EXPORT_FILE, "export")
    assert info["exporter"] == "dynamo" and "Loop" not in info["op_census"]
    par = read_result(out / R.PARITY_FILE, "parity")
    assert par["passed"] and par["images"] == 32
    assert read_result(out / R.PIPELINE_FILE, "pipeline")["export"]["status"] == "ok"
