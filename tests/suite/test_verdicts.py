"""The verdict rules (capsbench/claims.py RULE) on synthetic result sets shaped as reports.load reads a run: one
test per rule (ties, too few non-tied units, an interval touching 0 on the wrong side, equivalence, Holm), the
strata, pruning judged against the equal-epoch control on per-layer fractions, claim (b), and the file the report
reads."""

import json

from capsbench.claims import BY_KEY, CLAIMS
from capsbench.reports.render import claims
from capsbench.suite.verdicts import bca_interval, decide, holm, sign_test, verdicts, write_verdicts


def _health(fractions, class_length=0.5):
    """Routed layers with these inactive fractions; the class layer dead too when every layer before it is."""
    dead = bool(fractions) and all(f == 1.0 for f in fractions)
    layers = [{"name": "primary", "num_capsules": 64, "inactive": 0, "inactive_fraction": 0.0}]
    layers += [
        {"name": f"intermediate{i + 1}", "num_capsules": 8, "inactive": round(8 * f), "inactive_fraction": f}
        for i, f in enumerate(fractions)
    ]
    layers.append(
        {
            "name": "class",
            "num_capsules": 10,
            "inactive": 10 if dead else 0,
            "inactive_fraction": 1.0 if dead else 0.0,
            "mean_length": class_length,
        }
    )
    return {"layers": layers, "routed_inactive_fraction": None}


def _config(count, dim, depth, seed, acc, fractions=None, prunes=(), class_length=0.5, init="fan_in"):
    model = {
        "primary_types": count,
        "primary_dim": dim,
        "intermediate": [[count, dim]] * depth,
        "caps_init": init,
    }
    return {
        "id": f"c{count}x{dim}d{depth}s{seed}",
        "label": f"sahu prim {count}x{dim} | inter {depth} | seed {seed}",
        "config": {"dataset": "fashion-mnist", "seed": seed, "epochs": 1, "model": model},
        "metrics": {"status": "complete", "test_accuracy": acc},
        "health": _health(fractions if fractions is not None else [0.0] * depth, class_length),
        "prunes": list(prunes),
    }


def _prune(acc, fractions, control=None, b=0.5, c=0.5):
    return {
        "status": "complete",
        "control": control,
        "procedure": "finetune",
        "folder": f"prune_{control or 'chip'}_b{b:.2f}_c{c:.2f}",
        "settings": {"backbone_ratio": b, "caps_ratio": c},
        "summary": {"test_accuracy": {"after_finetune": acc}},
        "after_finetune": {"health": _health(fractions)},
    }


def _entries(result, claim):
    return [v for v in result["verdicts"] if v["claim"] == claim]


def _one(result, claim):
    (entry,) = _entries(result, claim)
    return entry


# ------------------------------------------------------------------------------------- one test per rule


def test_all_ties_are_not_testable():
    """The depth-4 case of the first depth run: every net dead from initialisation, pruned or not, scores the
    same; 17 zero differences and one tiny one are no evidence either way."""
    units = []
    for seed in range(18):
        pruned = _prune(0.107, [1.0, 1.0, 1.0, 1.0 if seed else 17 / 18])
        extra = _prune(0.107, [1.0] * 4, "extra_training", 0, 0)
        units.append(_config(8, 8, 4, seed, 0.107, [1.0] * 4, [pruned, extra]))
    result = verdicts(units)
    for claim in ("pruning_fewer_inactive", "pruning_better_accuracy"):
        entry = _one(result, claim)
        assert entry["verdict"] == "not testable", entry
        assert entry["non_tied"] <= 1 and entry["n"] == 18
    assert "partly alive" in _one(result, "pruning_fewer_inactive")["note"]


def test_fewer_than_six_non_tied_units_are_not_testable_even_when_all_agree():
    """Five units all on the claim's side: a sign test's smallest p is 2/32 = 0.0625."""
    configs = [_config(8, 8, d, s, 0.8 - 0.1 * (d == 3), [0.5] * d) for s in range(5) for d in (2, 3)]
    entry = _one(verdicts(configs), "deeper_loses_accuracy")
    assert entry["verdict"] == "not testable" and entry["non_tied"] == 5
    assert "fewer than 6" in entry["note"]


def test_an_interval_touching_zero_on_the_wrong_side_is_inconclusive_not_did_not_hold():
    # Deeper nets predicted less accurate; here they are a little more accurate, mostly: the BCa interval
    # reaches 0 (or below), so the data do not say the claim failed.
    deltas = [0.06, 0.05, -0.04, 0.07, 0.0, 0.08, -0.03, 0.05]
    configs = []
    for seed, d in enumerate(deltas):
        configs += [_config(8, 8, 2, seed, 0.70), _config(8, 8, 3, seed, 0.70 + d)]
    entry = _one(verdicts(configs), "deeper_loses_accuracy")
    lo, hi = entry["interval"]
    assert lo <= 0 < hi, entry["interval"]
    assert entry["verdict"] == "inconclusive" and entry["non_tied"] == 7


def test_an_interval_inside_the_equivalence_margin_did_not_hold():
    # Pruning predicted to raise accuracy; every difference within ±0.5 points: no effect worth the name.
    deltas = [0.004, -0.003, 0.002, -0.004, 0.003, -0.002, 0.001, -0.001]
    configs = []
    for seed, d in enumerate(deltas):
        prunes = [_prune(0.8 + d, [0.2, 0.4]), _prune(0.8, [0.3, 0.5], "extra_training", 0, 0)]
        configs.append(_config(8, 8, 2, seed, 0.79, [0.3, 0.5], prunes))
    entry = _one(verdicts(configs), "pruning_better_accuracy")
    lo, hi = entry["interval"]
    assert lo > -0.02 and hi < 0.02
    assert entry["verdict"] == "did not hold"


def test_holm_changes_a_borderline_p_value():
    assert holm([0.03, None, 0.04]) == [0.06, None, 0.06]
    assert holm([0.01, 0.04, 0.5]) == [0.03, 0.08, 0.5]
    claim = BY_KEY["deeper_more_inactive"]
    # The same interval, strictly on the claim's side: held at p 0.03, inconclusive once Holm makes it 0.06.
    assert decide(claim, [0.1, 0.3], 0.03) == "held"
    assert decide(claim, [0.1, 0.3], holm([0.03, 0.03])[0]) == "inconclusive"


def test_sign_test_and_bca_by_hand():
    assert sign_test([1, 1, 1, 1, 1, 1]) == 2 / 64 and sign_test([1, -1]) == 1.0 and sign_test([0, 0]) == 1.0
    assert bca_interval([0.5, 0.5, 0.5]) == [0.5, 0.5]
    lo, hi = bca_interval([0.1, 0.2, 0.3, 0.25, 0.15, 0.22, 0.18])
    assert 0.1 < lo < 0.2 < hi < 0.3
    assert bca_interval([0.1, 0.2, 0.3]) == bca_interval([0.1, 0.2, 0.3])  # seeded


# ------------------------------------------------------------------------------------- strata and claims


def test_each_depth_step_is_its_own_stratum_and_a_clear_effect_holds():
    configs = []
    for seed in range(7):
        configs += [
            _config(8, 8, 1, seed, 0.80, [0.0]),
            _config(8, 8, 2, seed, 0.79 + 0.001 * seed, [0.0, 0.0]),
            _config(8, 8, 3, seed, 0.40 - 0.01 * seed, [0.0, 0.3, 0.6 + 0.01 * seed]),
        ]
    result = verdicts(configs)
    inactive = {e["stratum"]: e for e in _entries(result, "deeper_more_inactive")}
    assert set(inactive) == {"depth 1 -> 2", "depth 2 -> 3"}
    assert inactive["depth 1 -> 2"]["verdict"] == "not testable"  # all ties
    step = inactive["depth 2 -> 3"]
    assert step["verdict"] == "held" and step["non_tied"] == 7 and step["p_holm"] < 0.05
    assert len(step["differences"]) == 7 and step["interval"][0] > 0
    assert _entries(result, "deeper_loses_accuracy")[1]["verdict"] == "held"


def test_pruning_inactive_is_compared_per_layer_over_the_layers_both_nets_share_against_extra_training():
    """A pruned net with the same dead layer as its reference but fewer capsules per layer shows no change on
    per-layer fractions (pooled counts would say it changed); a revived layer shows as fewer inactive."""
    same, revived = [], []
    for seed in range(6):
        extra = _prune(0.8, [0.0, 1.0, 0.5], "extra_training", 0, 0)
        same.append(_config(8, 8, 3, seed, 0.8, [0.0, 1.0, 0.5], [_prune(0.8, [0.0, 1.0, 0.5]), extra]))
        pruned = _prune(0.8, [0.0, 0.5 - 0.05 * seed, 0.5])
        revived.append(_config(8, 8, 3, seed, 0.8, [0.0, 1.0, 0.5], [pruned, extra]))
    assert _one(verdicts(same), "pruning_fewer_inactive")["non_tied"] == 0
    entry = _one(verdicts(revived), "pruning_fewer_inactive")
    assert entry["verdict"] == "held" and "extra_training" in entry["test"]
    # mean over the 4 shared routed layers (3 intermediate + class) of the per-layer change; only layer 2 moved
    assert abs(entry["effect"] - (-(0.5 + 0.05 * 2.5) / 4)) < 1e-9
    assert entry["stratum"] == "depth 3, b0.50 c0.50, finetune"


def test_claim_b_reads_a_config_without_caps_init_as_the_legacy_fan_in():
    """to_dict leaves caps_init out at its legacy value fan_in (the depth preset's init): still fan_in."""
    configs = []
    for seed in range(6):
        for dim, length in ((8, 0.001), (16, 0.01)):
            c = _config(8, dim, 2, seed, 0.5, [0.0, 0.0], class_length=length)
            del c["config"]["model"]["caps_init"]
            configs.append(c)
    entry = _one(verdicts(configs), "larger_dims_train_deeper")
    assert entry["stratum"] == "init fan_in" and "cancels out" in entry["note"]


def test_claim_b_pairs_dimension_16_with_8_at_the_same_count_depth_and_seed():
    configs = []
    for seed in range(6):
        configs += [
            _config(8, 8, 3, seed, 0.2, [0.0, 0.5, 1.0], class_length=0.001),
            _config(8, 16, 3, seed, 0.5, [0.0, 0.0, 0.5], class_length=0.1 * (1 + seed / 10)),
            _config(16, 8, 3, seed, 0.5, [0.0, 0.0, 0.0], class_length=0.3),  # no d = 16 partner: not a unit
        ]
    entry = _one(verdicts(configs), "larger_dims_train_deeper")
    assert entry["n"] == 6 and entry["verdict"] == "held" and entry["stratum"] == "init fan_in"
    assert abs(entry["differences"][0] - 2.0) < 1e-9  # log10(0.1 / 0.001)
    assert "first dead layer" in entry["note"] and "fan_in" in entry["note"] and "3: +2.0" in entry["note"]


def test_every_claim_of_the_registry_gets_a_verdict_and_the_report_shows_them(tmp_path):
    """write_verdicts reads the run folder as the report does; the report shows one row per claim and stratum
    with its non-tied count, the registry's words and the paper's claims apart from the suite's."""
    from capsbench.reports.load import load_run
    from capsbench.results import write_json

    for seed in range(6):
        for depth, fractions in ((2, [0.0, 0.0]), (3, [0.0, 0.2 + 0.01 * seed, 0.7])):
            folder = tmp_path / f"d{depth}s{seed}"
            model = {"primary_types": 8, "primary_dim": 8, "intermediate": [[8, 8]] * depth}
            cfg = {"dataset": "fashion-mnist", "seed": seed, "model": model}
            label = f"prim 8x8 | inter {depth} | seed {seed}"
            write_json(
                folder / "config.json", "config", {"config_id": folder.name, "label": label, "config": cfg}
            )
            write_json(folder / "metrics.json", "metrics", {"status": "complete", "test_accuracy": 0.8})
            write_json(folder / "health.json", "health", _health(fractions))
    data = json.loads(write_verdicts(tmp_path).read_text())
    assert data["kind"] == "verdicts" and {v["claim"] for v in data["verdicts"]} == {c.key for c in CLAIMS}
    run = load_run(tmp_path)
    rows = claims(run, run["configs"])
    deeper = next(r for r in rows if r["key"] == "deeper_more_inactive")
    assert deeper["verdict"] == "held" and deeper["non_tied"] == 6 and deeper["stratum"] == "depth 2 -> 3"
    assert deeper["claim"] == BY_KEY["deeper_more_inactive"].text
    assert {r["key"] for r in rows} == {c.key for c in CLAIMS}
