"""Training of one config (suite/train.py) on real Fashion-MNIST: a checkpoint of another config refused, the CCM
term, `--compile` (a compiled run learns what the eager one does and checkpoints alike; the default `auto`
policy: eager where a compile cannot pay, and then exactly the eager run, compiled after the timed first steps
where it does) and `--precision bf16` (learns like fp32 at equal steps, and neither precision's training is ever
taken for the other's)."""

import os

import pytest
import torch

from capsbench import results as R
from capsbench.export.latency import cpu_isa
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_model, load_torch
from capsbench.suite.presets import get_preset
from capsbench.suite.stages import Context, Settings, TrainSettings
from capsbench.suite.stages import train as train_stage

SMOKE = get_preset("smoke").configs()
SHALLOW = next(c for c in SMOKE if c.model.depth == 0)
DEEP = next(c for c in SMOKE if c.model.depth >= 3).replace(train_subset=2000, eval_subset=250, epochs=1)
SHORT_RUN = SHALLOW.replace(train_subset=512, eval_subset=500, epochs=1, batch_size=64)  # 8 steps
# 32 steps of batch 64 on real Fashion-MNIST: measured 0.734 (fp32) and 0.736 (bf16) test accuracy, chance 0.1.
PRECISION_RUN = SHALLOW.replace(train_subset=2048, eval_subset=1000, epochs=1, batch_size=64)
ACCURACY_TOLERANCE = 0.03  # |bf16 - fp32| test accuracy after the same 32 seeded steps


@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused(tmp_path, fashion_data_dir):
    cfg = SHALLOW.replace(epochs=1, train_subset=300, eval_subset=100)
    splits = training.load_splits(cfg, fashion_data_dir)
    training.train(cfg, tmp_path / "a", splits, progress=False)
    other = cfg.replace(seed=1)
    (tmp_path / "b").mkdir()
    os.replace(tmp_path / "a" / "checkpoint.pt", tmp_path / "b" / "checkpoint.pt")
    with pytest.raises(training.CheckpointError, match="written for config"):
        training.train(other, tmp_path / "b", splits, progress=False)


@pytest.mark.slow
def test_ccm_weight_subtracts_the_ccm_term_while_training(tmp_path, fashion_data_dir):
    cfg = DEEP.replace(train_subset=256, eval_subset=100, ccm_weight=0.01)
    splits = training.load_splits(cfg, fashion_data_dir)
    metrics = training.train(cfg, tmp_path, splits, progress=False)
    assert 0.0 < metrics["history"][0]["train_ccm"] <= 3.0  # one mean |correlation| per backbone layer
    assert (
        "train_ccm"
        not in training.train(
            DEEP.replace(train_subset=256, eval_subset=100), tmp_path / "plain", splits, progress=False
        )["history"][0]
    )


# ------------------------------------------------------------------------------------------------ --compile


@pytest.mark.slow
def test_compiled_training_matches_eager_and_checkpoints_the_plain_module(tmp_path, fashion_data_dir):
    splits = training.load_splits(SHORT_RUN, fashion_data_dir)
    runs = {
        mode: training.train(
            SHORT_RUN, tmp_path / str(mode), splits, device="cpu", progress=False, compile_mode=mode
        )
        for mode in ("off", "default")
    }
    eager, compiled = runs["off"]["history"][0], runs["default"]["history"][0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert abs(compiled["test_acc"] - eager["test_acc"]) <= 0.01
    # The checkpoint must hold the eager module's keys (no "_orig_mod." prefix) so every later stage loads it.
    model = load_model(SHORT_RUN, tmp_path / "default" / "checkpoint.pt")
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())


def _train(tmp_path, name, splits, **kw):
    return training.train(SHORT_RUN, tmp_path / name, splits, device="cpu", progress=False, **kw)


@pytest.mark.slow
def test_auto_trains_a_short_run_eager_exactly_as_off_and_records_why(tmp_path, fashion_data_dir):
    splits = training.load_splits(SHORT_RUN, fashion_data_dir)
    off = _train(tmp_path, "off", splits, compile_mode="off")
    auto = _train(tmp_path, "auto", splits, compile_mode="auto")
    assert off["compile"] == {"policy": "off", "compiled": False}
    assert off["compile_mode"] is None  # metrics.json records eager as null, as it always has
    decision = auto["compile"]
    assert decision["policy"] == "auto" and decision["compiled"] is False
    assert decision["steps_left"] == 8 - (training.AUTO_TIMED_STEPS + 1) and decision["eager_step_s"] > 0
    assert decision["estimated_saving_s"] < training.AUTO_COMPILE_MARGIN * decision["compile_cost_s"]
    assert auto["history"][0]["train_loss"] == off["history"][0]["train_loss"]
    assert auto["history"][0]["test_acc"] == off["history"][0]["test_acc"]


def test_auto_records_a_run_too_short_to_time_as_eager(tmp_path, fashion_data_dir):
    cfg = SHORT_RUN.replace(train_subset=128)  # 2 steps: fewer than the policy times
    splits = training.load_splits(cfg, fashion_data_dir)
    metrics = training.train(cfg, tmp_path, splits, device="cpu", progress=False, compile_mode="auto")
    assert metrics["compile"] == {"policy": "auto", "compiled": False, "reason": "too few steps to time"}


def test_the_auto_rule_compiles_the_quick_grid_and_not_the_smoke_one():
    # Eager step times measured with `capsbench bench train` (2 CPU threads): quick ~1.0 s (batch 128),
    # smoke's heaviest net ~0.3 s. Steps: quick 469 x 5 epochs, smoke 94 x 2.
    assert training.compile_pays(469 * 5, 1.0)
    assert not training.compile_pays(94 * 2, 0.3)


@pytest.mark.slow
def test_auto_compiles_midway_when_it_pays_and_trains_like_eager(tmp_path, fashion_data_dir, monkeypatch):
    monkeypatch.setattr(training, "AUTO_COMPILE_COST_S", 0.0)  # any saving pays: the compiled branch runs
    splits = training.load_splits(SHORT_RUN, fashion_data_dir)
    off = _train(tmp_path, "off", splits, compile_mode="off")
    auto = _train(tmp_path, "auto", splits, compile_mode="auto")
    assert auto["compile"]["compiled"] is True
    assert auto["history"][0]["train_loss"] == pytest.approx(off["history"][0]["train_loss"], rel=1e-3)
    assert abs(auto["history"][0]["test_acc"] - off["history"][0]["test_acc"]) <= 0.01


def test_without_compilers_explicit_compile_is_refused_in_one_line_and_auto_trains_eager(monkeypatch, cli):
    """The container's final stage has no C/C++ compiler: torch.compile would fail at its first call, deep in a
    run. Asked for explicitly it is refused before anything runs; the auto policy records why it stays eager."""
    import shutil

    from capsbench.suite.env import compile_unavailable

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CC", raising=False)
    why = compile_unavailable()
    assert why is not None and "a C compiler" in why and "a C++ compiler" in why
    for argv in (
        ["train", "--preset", "smoke", "--compile", "default", "--runs-dir", "/nonexistent"],
        ["time", "--preset", "smoke", "--compile", "--runs-dir", "/nonexistent"],
    ):
        refused = cli(argv)
        assert refused.code == 2
        err = refused.err.strip()
        assert "torch.compile needs" in err and len(err.splitlines()) == 1, err
    decision = training.auto_compile([10.0] * 3, steps_left=10_000)  # a saving that would pay many times over
    assert decision["compiled"] is False and "torch.compile needs" in decision["unavailable"]


# ---------------------------------------------------------------------------------------------- --precision


def _context(cfg, out, precision):
    return Context(
        cfg,
        out,
        out.parent,
        Settings(train=TrainSettings(precision=precision)),
        lambda: None,
        torch.device("cpu"),
        print,
        {},
    )


@pytest.mark.slow
def test_bf16_learns_like_fp32_at_equal_steps_and_never_reuses_an_fp32_training(
    tmp_path, fashion_data_dir, capsys
):
    splits = training.load_splits(PRECISION_RUN, fashion_data_dir)
    run = {
        p: training.train(PRECISION_RUN, tmp_path / p, splits, device="cpu", progress=False, precision=p)
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
    assert train_stage.done(_context(PRECISION_RUN, out, "fp32"))
    assert not train_stage.done(_context(PRECISION_RUN, out, "bf16"))
    again = training.train(PRECISION_RUN, out, splits, device="cpu", progress=False, precision="bf16")
    assert again["precision"] == "bf16" and again["resumed_from_epoch"] is None
    assert again["history"][0]["train_loss"] == bf16["train_loss"]
    assert load_torch(out / R.CHECKPOINT_FILE)["precision"] == "bf16"
    assert train_stage.done(_context(PRECISION_RUN, out, "bf16"))


@pytest.mark.slow
def test_a_half_done_training_is_not_resumed_in_the_other_precision(tmp_path, fashion_data_dir):
    cfg = PRECISION_RUN.replace(train_subset=128, eval_subset=100, epochs=2)
    splits = training.load_splits(cfg, fashion_data_dir)
    first = training.train(cfg, tmp_path, splits, device="cpu", progress=False, epochs=1)
    R.write_json(tmp_path / R.METRICS_FILE, "metrics", {**first, "status": "interrupted"})
    resumed = training.train(cfg, tmp_path, splits, device="cpu", progress=False, precision="fp32")
    assert resumed["resumed_from_epoch"] == 2  # the same precision resumes
    R.write_json(tmp_path / R.METRICS_FILE, "metrics", {**first, "status": "interrupted"})
    other = training.train(cfg, tmp_path, splits, device="cpu", progress=False, precision="bf16")
    assert other["resumed_from_epoch"] is None and len(other["history"]) == 2


def test_an_unknown_precision_is_refused_before_anything_is_written(tmp_path, fashion_data_dir):
    from capsbench.suite.errors import ConfigError

    with pytest.raises(ConfigError, match="fp32, bf16"):
        training.train(PRECISION_RUN, tmp_path, None, device="cpu", precision="fp16")  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_bench_train_labels_its_rows_with_the_precision(tmp_path, fashion_data_dir, cli):
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
    assert cli([*args, "--out", str(out)]).code == 0
    rows = R.read_result(out, "train_bench")["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    assert all(r["status"] == "ok" for r in rows)
    assert rows[0]["final_loss"] != rows[1]["final_loss"]


@pytest.mark.slow
def test_all_trains_in_the_precision_and_compile_policy_it_is_given(tmp_path, fashion_data_dir, cli):
    first = next(c for c in get_preset("smoke").configs() if c.model.depth == 0).id
    args = ["all", "--preset", "smoke", "--configs", first, "--only", "train", "--runs-dir", str(tmp_path)]
    args += ["--epochs", "1", "--train-subset", "256", "--eval-subset", "200", "--no-progress"]
    args += ["--data-dir", str(fashion_data_dir)]
    assert cli([*args, "--precision", "bf16", "--train-compile", "off"]).code == 0
    (folder,) = [d for d in (tmp_path / "smoke").iterdir() if (d / R.METRICS_FILE).is_file()]
    metrics = R.read_result(folder / R.METRICS_FILE, "metrics")
    assert metrics["precision"] == "bf16" and metrics["compile"] == {"policy": "off", "compiled": False}
