"""RunConfig ids and JSON round trips, preset grids."""

import json

from capsbench.suite.presets import PRESETS, RunConfig, get_preset


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
