"""The command line's shared options (suite/cli/options.py): every registry entry is complete and reachable from
the command line (stages, execution providers, pruning criteria, dataset formats), and bad numbers are refused
while parsing, in one line."""

import pytest

from capsbench.export.sessions import CPU, EXECUTION_PROVIDERS, PROVIDERS, execution_provider
from capsbench.models.pruning import CRITERIA
from capsbench.suite import data, stages
from capsbench.suite.cli import build_parser


def _choices(command: str, option: str) -> tuple:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


@pytest.mark.parametrize("name", stages.MODULES)
def test_every_stage_module_defines_its_stage(name):
    stage = stages.get(name)
    assert stage.name == name and stage.writes and callable(stage.run) and callable(stage.done)


def test_all_offers_every_stage_in_run_order():
    assert _choices("all", "--only") == stages.NAMES == stages.MODULES
    assert [s.name for s in stages.select(["report", "train", "time"])] == ["train", "time", "report"]


@pytest.mark.parametrize("name", EXECUTION_PROVIDERS)
def test_every_execution_provider_is_complete_and_offered(name):
    ep = EXECUTION_PROVIDERS[name]
    assert ep.name == name and ep.ort_name.endswith("ExecutionProvider") and ep.device and ep.runner_flag
    assert execution_provider(ep.ort_name) is ep
    assert name in _choices("all", "--provider") and name in _choices("time", "--provider")
    assert PROVIDERS[0] == "auto" and EXECUTION_PROVIDERS["cpu"].ort_name == CPU


@pytest.mark.parametrize("criterion", CRITERIA)
def test_every_pruning_criterion_is_offered_by_prune_and_all(criterion):
    assert criterion in _choices("prune", "--criterion") and criterion in _choices("all", "--criterion")


@pytest.mark.parametrize("name", data.DATASETS)
def test_every_dataset_has_a_parser_and_its_split_files(name):
    spec = data.DATASETS[name]
    assert spec.format in data.FORMATS and name in _choices("train", "--dataset")
    assert set(spec.splits) == set(data.SPLITS)
    for files in spec.splits.values():
        for f in files:
            spec.file(f)  # KeyError for a split naming a file the spec does not list


@pytest.mark.parametrize(
    "argv",
    [
        ["time", "--batch-sizes", "1", "0"],
        ["time", "--batch-sizes", "-1"],
        ["time", "--iters", "0"],
        ["time", "--warmup", "-1"],
        ["time", "--max-seconds", "nan"],
        ["time", "--threads", "0"],
        ["all", "--train-subset", "0"],
        ["all", "--epochs", "0"],
        ["all", "--seeds", "0"],
        ["all", "--criterion", "bogus"],
        ["all", "--prune", "1.0,0.5"],
        ["prune", "--backbone", "1"],
        ["prune", "--caps", "-0.1"],
        ["prune", "--score-images", "0"],
        ["export", "--parity-images", "0"],
        ["check", "runs/x", "--baseline", "runs/y", "--accuracy-drop", "-1"],
    ],
)
def test_bad_numbers_are_refused_while_parsing_with_one_line(argv, cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"capsbench {argv[0]}: error: argument")
