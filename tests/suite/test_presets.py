"""RunConfig ids and JSON round trips, preset grids; the depth preset crosses the cliff: a reduced grid (one seed,
one capsule shape, one depth on each side) trained through the suite shows inactive capsules on the deep side and
none on the shallow side; a net with six intermediate layers trains to the end through the runner instead of
stopping as diverged."""

import json
import math

import pytest

from capsbench.results import HEALTH_FILE, HEALTH_INIT_FILE, METRICS_FILE, read_result
from capsbench.suite import runner
from capsbench.suite.presets import PRESETS, RunConfig, get_preset
from capsbench.suite.rundir import config_dir
from capsbench.suite.stages import Settings

SMOKE_DEEP = next(c for c in get_preset("smoke").configs() if c.model.depth >= 3).replace(
    train_subset=2000, eval_subset=250, epochs=1
)
# 16 capsules x 8 dims, fan_in: the cliff lies at depth 3 (scripts/measure_cliff.json).
PAIR = [
    c
    for c in get_preset("depth").configs()
    if c.seed == 0 and (c.model.primary_types, c.model.primary_dim) == (16, 8) and c.model.depth in (2, 4)
]


def test_run_config_round_trips_and_ids_are_unique_within_presets():
    for preset in PRESETS.values():
        configs = preset.configs()
        assert len({c.id for c in configs}) == len(configs), preset.name
        for cfg in configs:
            assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_replace_reaches_into_the_model_config():
    cfg = get_preset("smoke").configs()[0]
    changed = cfg.replace(epochs=7, routing_iters=5)
    assert changed.epochs == 7 and changed.model.routing_iters == 5 and changed.id != cfg.id


def test_grids_vary_capsule_count_dimension_and_depth():
    paper = get_preset("paper").configs()
    assert {c.model.primary_types for c in paper} == {8, 16, 32}
    assert {c.model.primary_dim for c in paper} >= {8, 12, 16}
    assert all(
        c.model.intermediate == ((c.model.primary_types, c.model.primary_dim),) * c.model.depth for c in paper
    )


def test_ccm_fields_are_part_of_the_config_and_its_id():
    assert SMOKE_DEEP.to_dict()["ccm_weight"] == 0.0
    assert SMOKE_DEEP.replace(ccm_weight=0.01).id != SMOKE_DEEP.id
    assert SMOKE_DEEP.replace(ccm_detach=True).id != SMOKE_DEEP.id
    assert RunConfig.from_dict(SMOKE_DEEP.replace(ccm_weight=0.01, ccm_detach=True).to_dict()).ccm_detach


# ------------------------------------------------------------------------------------------- the depth preset


def test_the_depth_preset_s_strata_cross_the_cliff_and_prune_at_its_edge():
    grid, edge, base, authors = get_preset("depth").stratum_list()
    assert {c.model.depth for c in grid.configs()} == {1, 2, 3, 4} and {c.seed for c in grid.configs()} == {
        0,
        1,
        2,
    }
    assert grid.stages == ("train", "health")
    assert {c.model.depth for c in edge.configs()} == {3} and {c.seed for c in edge.configs()} == set(
        range(5)
    )
    assert edge.prune.pairs == ((0.5, 0.5), (0.5, 0.0), (0.0, 0.5)) and edge.prune.control_pairs == (
        (0.5, 0.5),
    )
    assert edge.prune.controls == ("extra_training", "scratch", "random")
    assert authors.prune.procedure == "authors" and {c.model.depth for c in base.configs()} == {0}
    # Every variant of the edge stratum: the pair with its three controls, and the two ablations alone.
    folders = [v.folder for v in edge.prune.variants(1)]
    assert folders == [
        "prune_chip_b0.50_c0.50",
        "prune_scratch_b0.50_c0.50",
        "prune_random_b0.50_c0.50",
        "prune_chip_b0.50_c0.00",
        "prune_chip_b0.00_c0.50",
        "prune_extra_training_b0.00_c0.00",
    ]


@pytest.mark.slow
def test_the_pre_check_places_the_edge_stratum_at_the_edge_and_the_grid_on_both_sides(fashion_data_dir):
    """The preset's strata were chosen from the pre-check (docs/presets-and-pruning.md): if a change to the nets
    or their init moved the cliff, this says so before a 30-minute run does."""
    import torch

    from capsbench.suite import precheck
    from capsbench.suite import train as training

    grid, edge, _, _ = get_preset("depth").stratum_list()
    splits = training.load_splits(grid.configs()[0], fashion_data_dir)
    place = {
        c.id: precheck.precheck_config(c, splits, torch.device("cpu"))["placement"] for c in grid.configs(1)
    }
    assert {place[c.id] for c in edge.configs(1)} == {"edge"}
    by_depth = {d: {place[c.id] for c in grid.configs(1) if c.model.depth == d} for d in (1, 2, 3, 4)}
    assert by_depth[1] == by_depth[2] == {"healthy"} and by_depth[4] == {"past"}


@pytest.mark.slow
def test_inactive_capsules_on_the_deep_side_of_the_cliff_and_none_on_the_shallow_side(
    tmp_path, fashion_data_dir
):
    configs = [c.replace(eval_subset=500) for c in PAIR]
    assert sorted(c.model.depth for c in configs) == [2, 4]
    result = runner.run(
        configs,
        tmp_path,
        ["train", "health"],
        Settings(progress=False),
        data_dir=fashion_data_dir,
        log=lambda _: None,
    )
    assert not result.failures
    health = {c.model.depth: read_result(config_dir(tmp_path, c) / HEALTH_FILE, "health") for c in configs}
    assert health[2]["routed_inactive"] == 0
    assert health[4]["routed_inactive"] > 0 and health[4]["layers"][-1]["inactive_fraction"] == 1.0
    # Measured as training sees the net at init (batch statistics), recorded beside the trained health.
    init = read_result(config_dir(tmp_path, configs[0]) / HEALTH_INIT_FILE, "health")
    assert init["batchnorm"] == "batch statistics" and init["layers"][0]["inactive"] == 0


@pytest.mark.slow
def test_a_net_with_six_intermediate_layers_trains_to_the_end(tmp_path, fashion_data_dir):
    """Under fan_in every layer past the cliff has vanished: lengths of exactly 0 must not end the run."""
    cfg = PAIR[0].replace(intermediate=((16, 8),) * 6, train_subset=640, eval_subset=200)
    result = runner.run(
        [cfg],
        tmp_path,
        ["train", "health"],
        Settings(progress=False),
        data_dir=fashion_data_dir,
        log=lambda _: None,
    )
    assert not result.failures
    metrics = read_result(config_dir(tmp_path, cfg) / METRICS_FILE, "metrics")
    assert metrics["status"] == "complete" and math.isfinite(metrics["history"][-1]["train_loss"])
    health = read_result(config_dir(tmp_path, cfg) / HEALTH_FILE, "health")
    assert len(health["layers"]) == 8  # primary, six intermediate, class
