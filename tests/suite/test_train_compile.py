"""`capsbench train --compile`: a compiled training run learns what the eager one does and checkpoints alike."""

import pytest

from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_model
from capsbench.suite.presets import get_preset

SHALLOW = next(c for c in get_preset("smoke").configs() if c.model.depth == 0).replace(
    train_subset=512, eval_subset=500, epochs=1, batch_size=64
)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_checkpoints_the_plain_module(tmp_path, fashion_data_dir):
    splits = training.load_splits(SHALLOW, fashion_data_dir)
    runs = {
        mode: training.train(
            SHALLOW, tmp_path / str(mode), splits, device="cpu", progress=False, compile_mode=mode
        )
        for mode in (None, "default")
    }
    eager, compiled = runs[None]["history"][0], runs["default"]["history"][0]
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert abs(compiled["test_acc"] - eager["test_acc"]) <= 0.01
    # The checkpoint must hold the eager module's keys (no "_orig_mod." prefix) so every later stage loads it.
    model = load_model(SHALLOW, tmp_path / "default" / "checkpoint.pt")
    assert not any(k.startswith("_orig_mod.") for k in model.state_dict())
