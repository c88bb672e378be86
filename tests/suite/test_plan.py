"""The run plan `capsbench all` hands the runner: implied stages, a preset's strata with their own stages and
pruning, the timed subset and the run-level stages once at the end; and a stratified preset run for real."""

import json

import pytest

from capsbench.suite import plan
from capsbench.suite.cli import build_parser
from capsbench.suite.cli.options import select_strata
from capsbench.suite.presets import get_preset
from capsbench.suite.stages import NAMES


def _plan(argv):
    args = build_parser().parse_args(["all", *argv])
    preset = get_preset(args.preset)
    names = plan.with_implied(args.only or NAMES, args.skip)
    timed = preset.timed_configs if args.timed_configs is None else args.timed_configs
    return plan.make_plan(select_strata(args), names, timed, prune_for=lambda st: st.prune or preset.prune)


def test_a_plain_preset_is_one_step_then_the_run_level_stages():
    p = _plan(["--preset", "smoke"])
    assert [(s.name, len(s.configs), s.stages) for s in p.steps] == [
        ("all", 2, ("train", "health", "prune", "export", "time", "cpp")),
        ("run", 0, ("verdicts", "report")),
    ]
    assert p.steps[0].prune == get_preset("smoke").prune


def test_implied_stages_come_along_unless_skipped():
    assert plan.with_implied(["train"]) == ["train", "health"]
    assert plan.with_implied(["report"]) == ["verdicts", "report"]
    assert plan.with_implied(["train", "report"], skip=["health", "verdicts"]) == ["train", "report"]
    assert [s.stages for s in _plan(["--preset", "smoke", "--only", "train"]).steps] == [("train", "health")]


def test_the_depth_preset_runs_each_stratum_with_its_stages_and_pruning_then_times_its_first_config():
    p = _plan(["--preset", "depth"])
    grid, edge, base, authors = get_preset("depth").stratum_list()
    assert [(s.name, len(s.configs), s.stages) for s in p.steps] == [
        (grid.name, 36, ("train", "health")),
        (edge.name, 10, ("train", "health", "prune")),
        (base.name, 3, ("train", "health")),
        (authors.name, 3, ("train", "health", "prune")),
        ("timed (first 1)", 1, ("export", "time", "cpp")),
        ("run", 0, ("verdicts", "report")),
    ]
    assert p.steps[1].prune == edge.prune and p.steps[3].prune.procedure == "authors"
    assert p.steps[4].configs == (grid.configs()[0],)
    assert len(p.configs()) == 43  # each config once, whatever strata it is in


@pytest.mark.slow
def test_a_stratified_run_prunes_only_its_strata_s_configs_and_the_authors_build_on_depth_0(
    tmp_path, fashion_data_dir, cli
):
    grid, edge, base, authors = get_preset("depth").stratum_list()
    picked = [edge.configs(1)[0], base.configs(1)[0], authors.configs(1)[0]]
    runs = tmp_path / "runs"
    args = ["all", "--preset", "depth", "--configs", *(c.id for c in picked), "--runs-dir", str(runs)]
    args += [
        "--data-dir",
        str(fashion_data_dir),
        "--seeds",
        "1",
        "--train-subset",
        "256",
        "--eval-subset",
        "100",
    ]
    args += ["--score-images", "32", "--no-progress", "--skip", "export", "time", "cpp"]
    run = cli(args)
    assert run.code == 0
    out = run.out
    assert "plan: " in out and edge.name in out
    run_dir = runs / "depth"
    folders = {d.name: d for d in run_dir.iterdir() if (d / "config.json").is_file()}
    assert len(folders) == 3
    by_depth = {
        json.loads((d / "config.json").read_text())["config"]["model"]["intermediate"].__len__(): d
        for d in folders.values()
    }
    prunes = {k: sorted(p.name for p in d.glob("prune_*") if p.is_dir()) for k, d in by_depth.items()}
    assert prunes[0] == []  # the authors' base: trained, not pruned
    edge_folder = next(
        d for d in folders.values() if "16x8" in json.loads((d / "config.json").read_text())["label"]
    )
    assert sorted(p.name for p in edge_folder.glob("prune_*") if p.is_dir()) == sorted(
        v.folder for v in edge.prune.variants(1)
    )
    eight = next(d for d in folders.values() if d is not edge_folder and d is not by_depth[0])
    assert sorted(p.name for p in eight.glob("prune_*") if p.is_dir()) == sorted(
        v.folder for v in authors.prune.variants(1)
    )
    verdicts = json.loads((run_dir / "verdicts.json").read_text())
    assert {v["claim"] for v in verdicts["verdicts"]} >= {
        "pruning_fewer_inactive",
        "larger_dims_train_deeper",
    }
    assert (run_dir / "report.html").is_file()
