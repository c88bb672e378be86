"""The verdict logic on synthetic result sets (shaped as reports.load reads a run): each of the four outcomes,
pruning judged against the equal-epoch control, inactive capsules compared as fractions, and the file the
report reads."""

import json

from capsbench.reports.render import claims
from capsbench.suite.verdicts import bootstrap_interval, sign_test, verdicts, write_verdicts


def _config(count, dim, depth, seed, acc, inactive, prunes=()):
    model = {"primary_types": count, "primary_dim": dim, "intermediate": [[count, dim]] * depth}
    return {
        "id": f"c{count}x{dim}d{depth}s{seed}",
        "label": f"sahu prim {count}x{dim} | inter {depth} | seed {seed}",
        "config": {"dataset": "fashion-mnist", "seed": seed, "epochs": 1, "model": model},
        "metrics": {"status": "complete", "test_accuracy": acc},
        "health": {"routed_inactive_fraction": inactive, "layers": []},
        "prunes": list(prunes),
    }


def _prune(acc, inactive, control=None, b=0.5, c=0.5):
    return {
        "status": "complete",
        "control": control,
        "folder": f"prune_{control or 'chip'}_b{b:.2f}_c{c:.2f}",
        "settings": {"backbone_ratio": b, "caps_ratio": c},
        "summary": {
            "test_accuracy": {"after_finetune": acc},
            "routed_inactive_fraction": {"after_finetune": inactive},
        },
    }


def _by_claim(result):
    return {v["claim"]: v for v in result["verdicts"]}


def test_a_deep_side_full_of_dead_capsules_holds_and_a_deeper_gain_in_accuracy_does_not():
    configs = []
    for seed in range(3):
        for count in (8, 16):
            configs.append(_config(count, 8, 2, seed, 0.70 + 0.01 * seed, 0.0))
            configs.append(_config(count, 8, 4, seed, 0.75 + 0.01 * seed + 0.002 * count, 0.6 + 0.01 * seed))
    v = _by_claim(verdicts(configs))
    inactive = v["deeper_more_inactive"]
    assert inactive["verdict"] == "held" and inactive["n"] == 6
    assert inactive["interval"][0] > 0 and abs(inactive["effect"] - 0.61) < 1e-9
    # Deeper nets are more accurate here, beyond seed noise: the claim that depth does not help fails.
    accuracy = v["deeper_loses_accuracy"]
    assert accuracy["verdict"] == "did not hold" and accuracy["interval"][0] > 0


def test_differences_of_both_signs_are_inconclusive_and_name_their_test():
    configs = []
    for seed, delta in enumerate((0.02, -0.02, 0.01, -0.015)):
        configs.append(_config(8, 8, 2, seed, 0.80, 0.0))
        configs.append(_config(8, 8, 4, seed, 0.80 + delta, 0.0))
    acc = _by_claim(verdicts(configs))["deeper_loses_accuracy"]
    assert acc["verdict"] == "inconclusive" and acc["n"] == 4
    lo, hi = acc["interval"]
    assert lo < 0 < hi and acc["interval_level"] == 0.95
    assert "bootstrap" in acc["test"] and "sign test" in acc["test"] and acc["p_value"] == 1.0


def test_a_run_without_inactive_capsules_or_with_too_few_units_is_not_testable():
    configs = [
        _config(8, 8, 2, seed, 0.8, 0.0, [_prune(0.8, 0.0), _prune(0.8, 0.0, "extra_training", 0, 0)])
        for seed in range(3)
    ]
    v = _by_claim(verdicts(configs))
    assert v["pruning_fewer_inactive"]["verdict"] == "not testable"
    assert "no reference net had an inactive capsule" in v["pruning_fewer_inactive"]["note"]
    assert v["deeper_more_inactive"]["verdict"] == "not testable"  # one depth only
    two = [_config(8, 8, d, s, 0.8, 0.5 * d) for s in range(2) for d in (2, 4)]
    small = _by_claim(verdicts(two))["deeper_more_inactive"]
    assert small["verdict"] == "not testable" and small["n"] == 2 and "fewer than 3" in small["note"]


def test_pruning_is_judged_against_extra_training_at_equal_epochs_not_against_its_parent():
    """Pruned nets beat their parents only as much as the parents gain from the same extra epochs: with the
    control the accuracy claim is inconclusive; the same numbers without it would read 'held'."""
    extra_deltas = (0.01, -0.01, 0.012, -0.008)
    with_control, without = [], []
    for seed, d in enumerate(extra_deltas):
        pruned = _prune(0.85, 0.2)
        extra = _prune(0.85 + d, 0.5, "extra_training", 0, 0)
        with_control.append(_config(8, 8, 4, seed, 0.80, 0.6, [pruned, extra]))
        without.append(_config(8, 8, 4, seed, 0.80, 0.6, [pruned]))
    v = _by_claim(verdicts(with_control))
    assert v["pruning_better_accuracy"]["verdict"] == "inconclusive"
    assert "extra_training" in v["pruning_better_accuracy"]["test"]
    assert _by_claim(verdicts(without))["pruning_better_accuracy"]["verdict"] == "held"
    # Fewer inactive capsules than the extra-trained net (0.2 vs 0.5 of the routed capsules): held.
    fewer = v["pruning_fewer_inactive"]
    assert fewer["verdict"] == "held" and abs(fewer["effect"] + 0.3) < 1e-9


def test_controls_beside_the_pruned_net_are_not_taken_for_it():
    """A random control with larger ratios must not be read as the pruning under test."""
    configs = [
        _config(
            8,
            8,
            4,
            seed,
            0.80,
            0.6,
            [
                _prune(0.70, 0.6, "random", 0.75, 0.75),
                _prune(0.82, 0.1),
                _prune(0.81, 0.4, "extra_training", 0, 0),
            ],
        )
        for seed in range(3)
    ]
    fewer = _by_claim(verdicts(configs))["pruning_fewer_inactive"]
    assert abs(fewer["effect"] + 0.3) < 1e-9 and "pruned - random" not in fewer["note"]  # other ratios


def test_interval_and_sign_test_by_hand():
    assert bootstrap_interval([0.5, 0.5, 0.5]) == [0.5, 0.5]
    assert sign_test([1, 1, 1, 1, 1]) == 2 / 32 and sign_test([1, -1]) == 1.0 and sign_test([0, 0]) == 1.0


def test_the_report_shows_the_written_verdicts(tmp_path):
    """write_verdicts reads the run folder as the report does and the report's claims section shows them."""
    from capsbench.suite.rundir import write_json

    for seed in range(3):
        for depth, inactive in ((2, 0.0), (4, 0.7)):
            folder = tmp_path / f"d{depth}s{seed}"
            model = {"primary_types": 8, "primary_dim": 8, "intermediate": [[8, 8]] * depth}
            cfg = {"dataset": "fashion-mnist", "seed": seed, "model": model}
            label = f"prim 8x8 | inter {depth} | seed {seed}"
            write_json(
                folder / "config.json", "config", {"config_id": folder.name, "label": label, "config": cfg}
            )
            write_json(folder / "metrics.json", "metrics", {"status": "complete", "test_accuracy": 0.8})
            write_json(folder / "health.json", "health", {"routed_inactive_fraction": inactive, "layers": []})
    path = write_verdicts(tmp_path)
    data = json.loads(path.read_text())
    assert data["kind"] == "verdicts" and data["schema_version"] == 1
    from capsbench.reports.load import load_run

    shown = {c["claim"][:25]: c for c in claims(load_run(tmp_path), load_run(tmp_path)["configs"])}
    deeper = next(c for k, c in shown.items() if k.startswith("Deeper capsule layers"))
    assert deeper["verdict"] == "held" and deeper["n"] == 3
