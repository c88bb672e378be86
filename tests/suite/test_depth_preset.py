"""The depth preset crosses the cliff: a reduced grid (one seed, one capsule shape, one depth on each side) trained
through the suite shows inactive capsules on the deep side and none on the shallow side; a net with six
intermediate layers trains to the end through the runner instead of stopping as diverged."""

import math

import pytest

from capsbench.suite import runner
from capsbench.suite.presets import get_preset
from capsbench.suite.rundir import HEALTH_FILE, HEALTH_INIT_FILE, METRICS_FILE, config_dir, read_result
from capsbench.suite.stages import Settings

# 16 capsules x 8 dims, fan_in: the cliff lies at depth 3 (scripts/measure_cliff.json).
PAIR = [
    c
    for c in get_preset("depth").configs()
    if c.seed == 0 and (c.model.primary_types, c.model.primary_dim) == (16, 8)
]


def test_the_depth_grid_crosses_the_cliff():
    depths = {c.model.depth for c in get_preset("depth").configs()}
    assert min(depths) < 3 and max(depths) >= 4  # either side for 16 capsules (3) and 8 capsules (4)
    assert {c.seed for c in get_preset("depth").configs()} == {0, 1, 2}
    assert get_preset("depth").prune.controls == ("extra_training", "scratch", "random")


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
