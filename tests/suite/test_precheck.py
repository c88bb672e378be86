"""The pre-check on real Fashion-MNIST images: a known dead config (8x8, depth 4, fan_in) is placed past the cliff
and a shallow one (depth 1) before it; the gain recursion predicts the measured collapse; `capsbench precheck`
writes precheck.json and the report shows it."""

import math

import pytest
import torch

from capsbench.models import build_capsnet
from capsbench.models.precheck import layer_gains
from capsbench.reports.render import render_report
from capsbench.results import PRECHECK_FILE, read_result
from capsbench.suite import precheck
from capsbench.suite import train as training
from capsbench.suite.presets import get_preset

DEPTH = get_preset("depth").configs()[0]  # sahu 16/32/64, fan_in, 8x8 PrimaryCaps


@pytest.fixture(scope="module")
def splits(fashion_data_dir):
    return training.load_splits(DEPTH, fashion_data_dir)


def _at(depth: int):
    return DEPTH.replace(primary_types=8, primary_dim=8, intermediate=((8, 8),) * depth)


def test_a_dead_config_is_past_the_cliff_and_a_shallow_one_before_it(splits):
    device = torch.device("cpu")
    shallow, dead = (precheck.precheck_config(_at(d), splits, device) for d in (1, 4))
    assert shallow["placement"] == "healthy" and dead["placement"] == "past"
    assert shallow["max_grad_rms"] > 100 * precheck.ADAM_EPS > 1e6 * dead["max_grad_rms"]
    # The class capsules at depth 4 start shorter than 1e-10: the doubly exponential collapse, measured and
    # predicted alike. On a collapse that fast the comparison is of exponents: the prediction's within 30 % of
    # the measured one (it ignores routing's later iterations, which concentrate the couplings and undershoots).
    last = dead["layers"][-1]
    assert last["measured_rms_length"] < 1e-10 and last["predicted_rms_length"] < 1e-10
    assert 0.7 < math.log10(last["predicted_rms_length"]) / math.log10(last["measured_rms_length"]) < 1.3


def test_the_gain_of_a_layer_is_sqrt_n_in_d_out_times_its_init_std_over_n_out():
    net = build_capsnet(_at(1).model)
    (n_in, d_in), (n_out, d_out) = net.cfg.caps_shapes[0], net.cfg.caps_shapes[1]
    # fan_in: std = 1/sqrt(d_in)
    assert layer_gains(net)[0] == pytest.approx(math.sqrt(n_in * d_out / d_in) / n_out)


def test_the_placement_rule_reads_the_largest_gradient_against_adam_eps():
    eps = precheck.ADAM_EPS
    assert precheck.placement([1e-9, 2e-6]) == "healthy"
    assert precheck.placement([1e-13, 1e-11]) == "edge"
    assert precheck.placement([1e-20, 1e-13]) == "past"
    assert precheck.placement([]) == "past" and precheck.placement([100 * eps]) == "healthy"


@pytest.mark.slow
def test_capsbench_precheck_writes_its_file_and_the_report_shows_it(tmp_path, fashion_data_dir, cli):
    runs = tmp_path / "runs"
    args = ["precheck", "--preset", "depth", "--configs", _at(4).id, "--runs-dir", str(runs)]
    precheck_run = cli([*args, "--data-dir", str(fashion_data_dir)])
    assert precheck_run.code == 0
    out = precheck_run.out
    assert _at(4).id in out and "past" in out
    data = read_result(runs / "depth" / PRECHECK_FILE, "precheck")
    (row,) = data["configs"]
    assert row["config_id"] == _at(4).id and row["placement"] == "past" and len(row["layers"]) == 5
    # A report of that run folder (one trained config is enough) carries the pre-check's table.
    assert (
        cli(
            [
                "all",
                "--preset",
                "smoke",
                "--configs",
                get_preset("smoke").configs()[0].id,
                "--runs-dir",
                str(runs),
                "--run-id",
                "depth",
                "--data-dir",
                str(fashion_data_dir),
                "--only",
                "train",
                "report",
                "--train-subset",
                "256",
                "--eval-subset",
                "100",
                "--epochs",
                "1",
                "--no-progress",
            ]
        ).code
        == 0
    )
    html = render_report(runs / "depth").read_text()
    assert 'id="precheck-table"' in html and f'data-config="{_at(4).id}"' in html
