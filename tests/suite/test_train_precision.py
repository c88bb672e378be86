"""`capsbench train --precision bf16`: a bf16 run learns like the fp32 one at equal steps, and neither precision's
training is ever taken for the other's."""

import pytest
import torch

from capsbench.export.latency import cpu_isa
from capsbench.suite import rundir
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_torch
from capsbench.suite.cli import main
from capsbench.suite.presets import get_preset
from capsbench.suite.stages import Context, Settings
from capsbench.suite.stages import train as train_stage

# 32 steps of batch 64 on real Fashion-MNIST: measured 0.734 (fp32) and 0.736 (bf16) test accuracy, chance 0.1.
SHALLOW = next(c for c in get_preset("smoke").configs() if c.model.depth == 0).replace(
    train_subset=2048, eval_subset=1000, epochs=1, batch_size=64
)
ACCURACY_TOLERANCE = 0.03  # |bf16 - fp32| test accuracy after the same 32 seeded steps


def _context(cfg, out, precision):
    return Context(
        cfg, out, out.parent, Settings(precision=precision), lambda: None, torch.device("cpu"), print, {}
    )


def test_bf16_learns_like_fp32_at_equal_steps_and_never_reuses_an_fp32_training(
    tmp_path, fashion_data_dir, capsys
):
    splits = training.load_splits(SHALLOW, fashion_data_dir)
    run = {
        p: training.train(SHALLOW, tmp_path / p, splits, device="cpu", progress=False, precision=p)
        for p in ("fp32", "bf16")
    }
    # On a CPU without bf16 instructions (the slower machines of this kind) bf16 is emulated: said and recorded.
    native = bool({"avx512_bf16", "amx_bf16"} & set(cpu_isa()))
    assert run["bf16"]["bf16_emulated"] is (not native) and run["fp32"]["bf16_emulated"] is False
    assert ("bf16 is emulated" in capsys.readouterr().out) is (not native)
    fp32, bf16 = run["fp32"]["history"][0], run["bf16"]["history"][0]
    assert run["bf16"]["precision"] == "bf16" and run["fp32"]["precision"] == "fp32"
    assert bf16["test_acc"] > 0.5, "bf16 training did not learn"
    assert abs(bf16["test_acc"] - fp32["test_acc"]) <= ACCURACY_TOLERANCE
    assert bf16["train_loss"] != fp32["train_loss"]  # autocast did change the arithmetic

    # The fp32 folder asked for bf16: the stage is not done, and training starts afresh (not skipped, not
    # resumed from the fp32 checkpoint), giving exactly the fresh bf16 run.
    out = tmp_path / "fp32"
    assert train_stage.done(_context(SHALLOW, out, "fp32"))
    assert not train_stage.done(_context(SHALLOW, out, "bf16"))
    again = training.train(SHALLOW, out, splits, device="cpu", progress=False, precision="bf16")
    assert again["precision"] == "bf16" and again["resumed_from_epoch"] is None
    assert again["history"][0]["train_loss"] == bf16["train_loss"]
    assert load_torch(out / rundir.CHECKPOINT_FILE)["precision"] == "bf16"
    assert train_stage.done(_context(SHALLOW, out, "bf16"))


def test_a_half_done_training_is_not_resumed_in_the_other_precision(tmp_path, fashion_data_dir):
    cfg = SHALLOW.replace(train_subset=128, eval_subset=100, epochs=2)
    splits = training.load_splits(cfg, fashion_data_dir)
    first = training.train(cfg, tmp_path, splits, device="cpu", progress=False, epochs=1)
    rundir.write_json(tmp_path / rundir.METRICS_FILE, "metrics", {**first, "status": "interrupted"})
    resumed = training.train(cfg, tmp_path, splits, device="cpu", progress=False, precision="fp32")
    assert resumed["resumed_from_epoch"] == 2  # the same precision resumes
    rundir.write_json(tmp_path / rundir.METRICS_FILE, "metrics", {**first, "status": "interrupted"})
    other = training.train(cfg, tmp_path, splits, device="cpu", progress=False, precision="bf16")
    assert other["resumed_from_epoch"] is None and len(other["history"]) == 2


def test_an_unknown_precision_is_refused_before_anything_is_written(tmp_path, fashion_data_dir):
    from capsbench.suite.errors import ConfigError

    with pytest.raises(ConfigError, match="fp32, bf16"):
        training.train(SHALLOW, tmp_path, None, device="cpu", precision="fp16")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_bench_train_labels_its_rows_with_the_precision(tmp_path, fashion_data_dir):
    out = tmp_path / "train_bench.json"
    args = ["bench", "train", "--preset", "smoke", "--backend", "eager", "--steps", "1", "--warmup", "0"]
    args += [
        "--precision",
        "fp32",
        "--precision",
        "bf16",
        "--device",
        "cpu",
        "--data-dir",
        str(fashion_data_dir),
    ]
    assert main([*args, "--out", str(out)]) == 0
    rows = rundir.read_result(out, "train_bench")["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["final_loss"] != rows[1]["final_loss"]


def test_all_trains_in_the_precision_and_compile_policy_it_is_given(tmp_path, fashion_data_dir, capsys):
    first = next(c for c in get_preset("smoke").configs() if c.model.depth == 0).id
    args = ["all", "--preset", "smoke", "--configs", first, "--only", "train", "--runs-dir", str(tmp_path)]
    args += ["--epochs", "1", "--train-subset", "256", "--eval-subset", "200", "--no-progress"]
    args += ["--data-dir", str(fashion_data_dir)]
    assert main([*args, "--precision", "bf16", "--train-compile", "off"]) == 0
    (folder,) = [d for d in (tmp_path / "smoke").iterdir() if (d / rundir.METRICS_FILE).is_file()]
    metrics = rundir.read_result(folder / rundir.METRICS_FILE, "metrics")
    assert metrics["precision"] == "bf16" and metrics["compile"] == {"policy": "off", "compiled": False}
