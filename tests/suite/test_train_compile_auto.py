"""`capsbench train`'s default `--compile auto`: eager where a compile cannot pay (and then exactly the eager run),
compiled after the timed first steps where it does."""

import pytest

from capsbench.suite import train as training
from capsbench.suite.cli import main
from capsbench.suite.presets import get_preset

SHALLOW = next(c for c in get_preset("smoke").configs() if c.model.depth == 0).replace(
    train_subset=512, eval_subset=500, epochs=1, batch_size=64
)  # 8 steps


def _train(tmp_path, name, splits, **kw):
    return training.train(SHALLOW, tmp_path / name, splits, device="cpu", progress=False, **kw)


def test_auto_trains_a_short_run_eager_exactly_as_off_and_records_why(tmp_path, fashion_data_dir):
    splits = training.load_splits(SHALLOW, fashion_data_dir)
    off = _train(tmp_path, "off", splits, compile_mode=None)
    auto = _train(tmp_path, "auto", splits, compile_mode="auto")
    assert off["compile"] == {"policy": "off", "compiled": False}
    decision = auto["compile"]
    assert decision["policy"] == "auto" and decision["compiled"] is False
    assert decision["steps_left"] == 8 - (training.AUTO_TIMED_STEPS + 1) and decision["eager_step_s"] > 0
    assert decision["estimated_saving_s"] < training.AUTO_COMPILE_MARGIN * decision["compile_cost_s"]
    assert auto["history"][0]["train_loss"] == off["history"][0]["train_loss"]
    assert auto["history"][0]["test_acc"] == off["history"][0]["test_acc"]


def test_auto_records_a_run_too_short_to_time_as_eager(tmp_path, fashion_data_dir):
    cfg = SHALLOW.replace(train_subset=128)  # 2 steps: fewer than the policy times
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
    splits = training.load_splits(SHALLOW, fashion_data_dir)
    off = _train(tmp_path, "off", splits, compile_mode=None)
    auto = _train(tmp_path, "auto", splits, compile_mode="auto")
    assert auto["compile"]["compiled"] is True
    assert auto["history"][0]["train_loss"] == pytest.approx(off["history"][0]["train_loss"], rel=1e-3)
    assert abs(auto["history"][0]["test_acc"] - off["history"][0]["test_acc"]) <= 0.01


def test_without_compilers_explicit_compile_is_refused_in_one_line_and_auto_trains_eager(monkeypatch, capsys):
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
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "torch.compile needs" in err and len(err.splitlines()) == 1, err
    decision = training.auto_compile([10.0] * 3, steps_left=10_000)  # a saving that would pay many times over
    assert decision["compiled"] is False and "torch.compile needs" in decision["unavailable"]
