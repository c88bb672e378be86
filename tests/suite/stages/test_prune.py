"""The pruning stage end to end on a deep smoke net trained on real Fashion-MNIST: `capsbench prune` writes a
loadable pruned net, prune.json and health_pruned.json, skips finished settings, and sweeps ratios."""

import pytest

from capsbench.results import HEALTH_PRUNED_FILE, PRUNE_FILE, PRUNED_FILE, prune_dir_name, read_result
from capsbench.suite import train as training
from capsbench.suite.presets import get_preset
from capsbench.suite.rundir import config_dir

OVERRIDES = {"train_subset": 2000, "eval_subset": 250, "epochs": 1}
DEEP = next(c for c in get_preset("smoke").configs() if c.model.depth >= 3).replace(**OVERRIDES)


def _prune(runs, data_dir, *extra: str) -> list[str]:
    """`capsbench prune` of the deep smoke config as `trained` trained it."""
    return [
        "prune",
        "--preset",
        "smoke",
        "--configs",
        DEEP.id,
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(data_dir),
        "--train-subset",
        "2000",
        "--eval-subset",
        "250",
        "--epochs",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, fashion_data_dir):
    """The deep smoke config (3 intermediate layers) trained 1 epoch on 2000 real images: (runs dir, folder)."""
    runs = tmp_path_factory.mktemp("runs")
    out = config_dir(runs / "smoke", DEEP)
    splits = training.load_splits(DEEP, fashion_data_dir)
    training.train(DEEP, out, splits, progress=False)
    return runs, out


def test_prune_writes_a_smaller_loadable_net_its_plan_and_its_health(trained, fashion_data_dir, cli):
    runs, out = trained
    settings = ["--backbone", "0.5", "--caps", "0.25", "--score-images", "128"]
    first = cli(_prune(runs, fashion_data_dir, *settings, "--finetune-epochs", "1"))
    assert first.code == 0
    sub = out / prune_dir_name("chip", 0.5, 0.25)
    result = read_result(sub / PRUNE_FILE, "prune")
    assert result["status"] == "complete" and result["config_id"] == DEEP.id
    after = result["model_config_after"]
    assert after["backbone_channels"] == [8, 16, 32] and after["primary_types"] == 6
    layers = {layer["name"]: layer for layer in result["plan"]["layers"]}
    assert len(layers["backbone.2"]["removed"]) == 32 and len(layers["backbone.2"]["scores"]) == 64
    assert len(layers["primary"]["removed_units"]) == 2 and len(layers["primary"]["removed_channels"]) == 16
    s = result["summary"]
    assert s["parameters"]["after"] < s["parameters"]["before"] and s["flops"]["after"] < s["flops"]["before"]
    for stage in ("before", "after_surgery", "after_finetune"):
        assert 0.0 <= s["test_accuracy"][stage] <= 1.0
    assert s["test_accuracy"]["before"] == read_result(out / "metrics.json", "metrics")["test_accuracy"]
    assert result["finetune_epochs"] == 1 and len(result["finetune_history"]) == 1
    model = training.load_model(DEEP, sub / PRUNED_FILE)
    assert model.cfg.primary_types == 6 and model.num_parameters() == s["parameters"]["after"]
    health = read_result(sub / HEALTH_PRUNED_FILE, "health")
    # the capsule ratio reaches the intermediate layers too: int(8 * 0.25) = 2 of each go
    assert [layer["num_capsules"] for layer in health["layers"]] == [6 * 36, 6, 6, 6, 10]
    assert DEEP.id in first.out

    # a finished setting is skipped on rerun
    before = (sub / PRUNE_FILE).stat().st_mtime_ns
    assert cli(_prune(runs, fashion_data_dir, *settings, "--finetune-epochs", "1")).code == 0
    assert (sub / PRUNE_FILE).stat().st_mtime_ns == before
    # other fine-tuning settings for the same folder need --force
    refused = cli(_prune(runs, fashion_data_dir, *settings, "--finetune-epochs", "2"))
    assert refused.code == 2
    assert "--force" in refused.err


def test_sweep_keeps_every_ratio_and_ratio_zero_keeps_accuracy(trained, fashion_data_dir, cli):
    runs, out = trained
    args = ["--sweep", "0,0.5", "--criterion", "chip-mean", "--finetune-epochs", "0"]
    assert cli(_prune(runs, fashion_data_dir, *args)).code == 0
    rows = read_result(out / "prune_sweep_chip-mean.json", "prune_sweep")["rows"]
    assert [(r["backbone_ratio"], r["caps_ratio"]) for r in rows] == [(0.0, 0.0), (0.5, 0.5)]
    zero, half = rows
    assert zero["acc_after_surgery"] == zero["acc_before"] == zero["acc_after_finetune"]
    assert zero["parameters_after"] == zero["parameters_before"]
    assert half["flops_after"] < half["flops_before"] / 2
    assert (out / prune_dir_name("chip-mean", 0.5, 0.5) / PRUNED_FILE).is_file()


def test_prune_refuses_an_untrained_config_and_says_to_train_first(tmp_path, fashion_data_dir, cli):
    refused = cli(_prune(tmp_path, fashion_data_dir))
    assert refused.code == 2
    assert "run 'capsbench train --preset smoke' first" in refused.err
