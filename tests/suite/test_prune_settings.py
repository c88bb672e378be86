"""Pruning options declared once: PruneSettings -> typed PruneVariants (folder names and the settings prune.json
records, which decide whether a finished variant is reused), invalid settings refused when made, and `prune`
and `all` reading the same flags into the same settings."""

import pytest

from capsbench.suite.cli import build_parser
from capsbench.suite.cli.options import prune_settings
from capsbench.suite.errors import ConfigError
from capsbench.suite.presets import get_preset
from capsbench.suite.prune_settings import PruneSettings


def test_the_depth_preset_expands_into_its_pruned_net_and_three_controls_with_their_epoch_budgets():
    preset = get_preset("depth")
    cfg = preset.configs()[0]
    variants = preset.prune.variants(cfg.epochs)
    assert [v.folder for v in variants] == [
        "prune_chip_b0.50_c0.50",
        "prune_scratch_b0.50_c0.50",
        "prune_random_b0.50_c0.50",
        "prune_extra_training_b0.00_c0.00",
    ]
    # Every variant ends after the same training budget; scratch trains all of it itself.
    assert {v.total_epochs for v in variants} == {cfg.epochs + 1}
    assert [v.train_epochs for v in variants] == [1, cfg.epochs + 1, 1, 1]
    # The settings recorded in prune.json: the same keys and values as runs made before the variants were typed
    # (their prune.json stays "done").
    assert variants[0].to_dict() == {
        "criterion": "chip",
        "backbone_ratio": 0.5,
        "caps_ratio": 0.5,
        "intermediate_ratio": 0.5,
        "capsule_criterion": "chip",
        "procedure": "finetune",
        "reinit_caps_layers": False,
        "control": None,
        "finetune_epochs": 1,
        "train_epochs": 1,
        "total_epochs": cfg.epochs + 1,
        "score_images": 640,
    }


def test_the_authors_procedure_names_its_folders_records_its_base_depth_and_prunes_no_intermediate_layer():
    p = PruneSettings(pairs=((0.5, 0.25),), procedure="authors", base_depth=1, intermediate_ratio=0.1)
    p = p.replace(controls=("scratch", "extra_training"))
    pruned, scratch, extra = p.variants(base_epochs=3)
    assert [v.folder for v in (pruned, scratch, extra)] == [
        "prune_chip_b0.50_c0.25_authors_base1",
        "prune_scratch_b0.50_c0.25_authors_base1",
        "prune_extra_training_b0.00_c0.00_authors_base1",
    ]
    assert pruned.intermediate_ratio == 0.0 and pruned.reinit_caps_layers and extra.reinit_caps_layers
    assert pruned.to_dict()["base_depth"] == 1 and scratch.train_epochs == 3 + p.finetune_epochs
    # The finetune procedure's settings carry no base depth (finished runs' prune.json stay "done").
    assert "base_depth" not in PruneSettings(base_depth=1).variants(3)[0].to_dict()
    assert PruneSettings(procedure="authors").variants(3)[0].folder == "prune_chip_b0.50_c0.50_authors"


def test_reinit_caps_under_finetune_names_an_intermediate_ratio_and_spares_scratch():
    p = PruneSettings(
        pairs=((0.5, 0.25),), reinit_caps_layers=True, intermediate_ratio=0.1, controls=("scratch",)
    )
    pruned, scratch = p.variants(base_epochs=3)
    assert pruned.folder == "prune_chip_b0.50_c0.25_i0.10_reinit" and pruned.reinit_caps_layers
    assert scratch.folder == "prune_scratch_b0.50_c0.25_i0.10"  # fresh weights everywhere: no _reinit


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"criterion": "l2"}, "unknown pruning criterion 'l2'"),
        ({"controls": ("bogus",)}, "unknown control 'bogus'"),
        ({"procedure": "magic"}, "unknown pruning procedure"),
        ({"pairs": ((1.0, 0.5),)}, "backbone ratio must lie in"),
        ({"intermediate_ratio": -0.1}, "intermediate ratio must lie in"),
        ({"finetune_epochs": -1}, "finetune epochs must be >= 0"),
    ],
)
def test_invalid_settings_are_refused_when_made(fields, message):
    with pytest.raises(ConfigError, match=message):
        PruneSettings(**fields)


def _settings(argv: list[str], defaults: PruneSettings) -> PruneSettings:
    return prune_settings(build_parser().parse_args(argv), defaults)


def test_prune_and_all_take_the_same_pruning_flags_into_the_same_settings():
    flags = ["--criterion", "l1", "--finetune-epochs", "0", "--score-images", "64", "--intermediate", "0.1"]
    flags += [
        "--capsule-criterion",
        "length",
        "--procedure",
        "authors",
        "--controls",
        "random",
        "--reinit-caps",
    ]
    base = PruneSettings()
    from_prune = _settings(["prune", "--preset", "smoke", *flags], base)
    from_all = _settings(["all", "--preset", "smoke", *flags], base)
    assert (
        from_prune
        == from_all
        == PruneSettings(
            criterion="l1",
            finetune_epochs=0,
            score_images=64,
            intermediate_ratio=0.1,
            capsule_criterion="length",
            procedure="authors",
            controls=("random",),
            reinit_caps_layers=True,
        )
    )


def test_flags_left_out_keep_the_preset_s_settings_and_an_empty_controls_clears_them():
    depth = get_preset("depth").prune
    assert _settings(["all", "--preset", "depth"], depth) == depth
    cleared = _settings(["all", "--preset", "depth", "--controls"], depth)
    assert cleared.controls == () and cleared.pairs == depth.pairs and cleared.finetune_epochs == 1
