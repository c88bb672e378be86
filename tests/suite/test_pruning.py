"""The pruning controls through `capsbench all` on a tiny grid of real Fashion-MNIST: each control runs, is
labelled in its prune.json and in the report, and gets the training budget it must (base + fine-tune epochs in
all); the capsule ratio reaches the intermediate layers; the authors' procedure re-initialises them."""

import json

import pytest
import torch

from capsbench.models import CapsNetConfig, build_capsnet
from capsbench.results import CHECKPOINT_FILE, SURGERY_FILE, VERDICTS_FILE, read_result
from capsbench.suite.cli import main
from capsbench.suite.presets import get_preset

TINY = ["--train-subset", "300", "--eval-subset", "100", "--seeds", "1", "--no-progress"]
SHALLOW = next(c for c in get_preset("depth").configs() if c.model.depth == 2 and c.model.primary_types == 8)


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, fashion_data_dir):
    """The depth preset's smallest config on 300 images: train, prune with its three controls, report."""
    runs = tmp_path_factory.mktemp("controls")
    where = [
        "--preset",
        "depth",
        "--configs",
        SHALLOW.id,
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(fashion_data_dir),
    ]
    assert main(["all", *where, *TINY, "--only", "train"]) == 0
    # The depth preset prunes only its edge stratum: its depth-2 config is pruned here by `capsbench prune`, with
    # the preset's pair and fine-tuning and the three controls.
    prune = ["prune", *where, *TINY[:4], "--no-progress", "--backbone", "0.5", "--caps", "0.5"]
    prune += ["--finetune-epochs", "1", "--controls", "extra_training", "scratch", "random"]
    assert main([*prune, "--keep-intermediate"]) == 0  # the tests below read surgery.pt
    assert main(["all", *where, *TINY, "--only", "report"]) == 0
    run_dir = runs / "depth"
    (folder,) = [d for d in run_dir.iterdir() if (d / "config.json").is_file()]  # not .locks/
    prunes = {p.parent.name: read_result(p, "prune") for p in folder.glob("prune_*/prune.json")}
    return runs, run_dir, folder, prunes


@pytest.mark.slow
def test_every_control_runs_beside_the_pruned_net_and_is_labelled(pruned_run):
    _, run_dir, _, prunes = pruned_run
    by_control = {p["control"]: p for p in prunes.values()}
    assert set(by_control) == {None, "extra_training", "scratch", "random"}
    assert set(prunes) == {
        "prune_chip_b0.50_c0.50",
        "prune_scratch_b0.50_c0.50",
        "prune_random_b0.50_c0.50",
        "prune_extra_training_b0.00_c0.00",
    }
    # Equal training budgets: base (1 epoch) + fine-tune (1) for all; scratch trains both from fresh weights.
    assert {p["total_epochs"] for p in prunes.values()} == {2}
    assert [h["epoch"] for h in by_control["extra_training"]["finetune_history"]] == [2]  # resumed the base
    assert len(by_control["scratch"]["finetune_history"]) == 2
    assert len(by_control[None]["finetune_history"]) == len(by_control["random"]["finetune_history"]) == 1
    html = (run_dir / "report.html").read_text()
    assert all(name in html for name in ("extra_training", "scratch", "random"))
    verdicts = json.loads((run_dir / VERDICTS_FILE).read_text())
    assert [v["claim"] for v in verdicts["verdicts"]][:2] == ["deeper_loses_accuracy", "deeper_more_inactive"]


def test_the_capsule_ratio_prunes_primary_types_and_intermediate_capsules_and_fractions_are_kept(pruned_run):
    _, _, _, prunes = pruned_run
    pruned = prunes["prune_chip_b0.50_c0.50"]
    after = pruned["model_config_after"]
    assert after["primary_types"] == 4 and after["intermediate"] == [[4, 8], [4, 8]]
    assert prunes["prune_scratch_b0.50_c0.50"]["model_config_after"] == after
    assert prunes["prune_random_b0.50_c0.50"]["model_config_after"] == after
    unpruned = prunes["prune_extra_training_b0.00_c0.00"]
    assert unpruned["model_config_after"] == unpruned["model_config_before"]
    assert unpruned["summary"]["parameters"]["after"] == unpruned["summary"]["parameters"]["before"]
    # Random selection is not the CHIP selection (64 channels, 32 removed: equal by chance ~1e-18).
    removed = {
        name: next(x["removed"] for x in p["plan"]["layers"] if x["name"] == "backbone.2")
        for name, p in prunes.items()
        if p["control"] in (None, "random")
    }
    assert removed["prune_chip_b0.50_c0.50"] != removed["prune_random_b0.50_c0.50"]
    for layer in pruned["after_finetune"]["health"]["layers"]:
        assert layer["inactive_fraction"] == layer["inactive"] / layer["num_capsules"]
        assert "inactive_mean_only_fraction" in layer and "mean_length" in layer
    fraction = pruned["summary"]["routed_inactive_fraction"]
    assert set(fraction) == {"before", "after_surgery", "after_finetune"}


def test_the_scratch_control_starts_from_fresh_weights(pruned_run):
    _, _, folder, _ = pruned_run
    scratch = torch.load(folder / "prune_scratch_b0.50_c0.50" / SURGERY_FILE, weights_only=True)
    pruned = torch.load(folder / "prune_chip_b0.50_c0.50" / SURGERY_FILE, weights_only=True)
    key = "backbone.0.0.weight"
    assert scratch["model"][key].shape == pruned["model"][key].shape
    assert not torch.equal(scratch["model"][key], pruned["model"][key])


@pytest.mark.slow
def test_the_authors_procedure_builds_fresh_capsule_layers_on_the_pruned_backbone(
    pruned_run, fashion_data_dir, cli
):
    """finetune keeps the trained capsule weights; the authors' procedure prunes the backbone and PrimaryCaps of
    the net at the base depth and draws every capsule layer afresh (seeded by the config's seed); its
    extra_training control builds on the whole unpruned backbone; a base depth whose net is not trained is
    refused in one line naming that config."""
    runs, _, folder, _ = pruned_run
    args = ["prune", "--preset", "depth", "--configs", SHALLOW.id, "--runs-dir", str(runs), "--no-progress"]
    args += ["--data-dir", str(fashion_data_dir), "--train-subset", "300", "--eval-subset", "100"]
    args += [
        "--epochs",
        "1",
        "--backbone",
        "0.5",
        "--caps",
        "0.25",
        "--intermediate",
        "0",
        "--finetune-epochs",
        "0",
    ]
    args += ["--score-images", "64", "--keep-intermediate"]
    base = torch.load(folder / CHECKPOINT_FILE, weights_only=True)["model"]

    assert cli([*args, "--procedure", "finetune"]).code == 0
    surgery = torch.load(folder / "prune_chip_b0.50_c0.25_i0.00" / SURGERY_FILE, weights_only=True)["model"]
    assert all(
        torch.equal(surgery[f"caps_layers.{i}.weight"], base[f"caps_layers.{i}.weight"]) for i in (1, 2)
    )

    assert (
        cli([*args, "--procedure", "authors", "--base-depth", "2", "--controls", "extra_training"]).code == 0
    )
    for name in ("prune_chip_b0.50_c0.25_authors_base2", "prune_extra_training_b0.00_c0.00_authors_base2"):
        state = torch.load(folder / name / SURGERY_FILE, weights_only=True)
        result = read_result(folder / name / "prune.json", "prune")
        assert result["procedure"] == "authors" and result["settings"]["base_depth"] == 2
        assert result["plan"]["base_config_id"] == folder.name  # its own net (base depth = its depth)
        assert True  # its own net (base depth = its depth)
        torch.manual_seed(SHALLOW.seed)
        fresh = build_capsnet(CapsNetConfig.from_dict(state["model_config"])).state_dict()
        caps = [k for k in state["model"] if k.startswith("caps_layers.")]
        assert caps and all(torch.equal(state["model"][k], fresh[k]) for k in caps)
        kept = [k for k in state["model"] if k.startswith(("backbone.", "primary."))]
        if "extra_training" in name:  # the whole trained backbone, every channel
            assert all(torch.equal(state["model"][k], base[k]) for k in kept)
        else:  # half of every backbone conv's channels, a quarter of the capsule types gone
            key = "backbone.0.0.weight"
            assert state["model"][key].shape[0] == base[key].shape[0] - base[key].shape[0] // 2
            assert state["model_config"]["primary_types"] == SHALLOW.model.primary_types - 2

    refused = cli([*args, "--procedure", "authors", "--base-depth", "1"])
    assert refused.code != 0
    err = refused.err
    trained = SHALLOW.replace(train_subset=300, eval_subset=100, epochs=1)
    assert trained.id == folder.name
    depth1 = trained.replace(intermediate=SHALLOW.model.intermediate[:1])
    assert "not trained" in err and depth1.id in err and "Traceback" not in err
