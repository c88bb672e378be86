"""Faults at the edges of `check` and `report` (issue 26), on copies of the checked-in real smoke run: a NaN,
an Infinity or a value of the wrong type in a result file is refused with one line (exit 2), never judged 'ok'
and never drawn; the operating system's refusals are one line too; the report is written by the project's one
writer, so a link planted at any name is never followed and no temporary file is left behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from capsbench.suite.cli import main

DATA = Path(__file__).parent / "data" / "smoke"


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """(current, baseline): two copies of the real smoke run."""
    cur, base = tmp_path / "cur" / "smoke", tmp_path / "base" / "smoke"
    shutil.copytree(DATA, cur)
    shutil.copytree(DATA, base)
    return cur, base


def _config(run: Path) -> Path:
    return sorted(d for d in run.iterdir() if (d / "metrics.json").is_file())[0]


def _edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))  # json writes NaN and Infinity as the bare literals Python reads back


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _set_p50(value):
    def change(d):
        next(r for r in d["rows"] if r["status"] == "ok")["p50_ms"] = value

    return change


def _set_accuracy(value):
    def change(d):
        d["test_accuracy"] = value

    return change


def _set_inactive(value):
    def change(d):
        d["routed_inactive"] = value

    return change


CASES = {
    "nan accuracy": ("metrics.json", _set_accuracy(float("nan")), "test_accuracy is nan"),
    "infinite accuracy": ("metrics.json", _set_accuracy(float("inf")), "test_accuracy is inf"),
    "accuracy as a string": ("metrics.json", _set_accuracy("0.88"), "test_accuracy is '0.88'"),
    "accuracy above 1": ("metrics.json", _set_accuracy(88.0), "not an accuracy in [0, 1]"),
    "inactive count as a float": ("health.json", _set_inactive(0.5), "routed_inactive is 0.5"),
    "nan p50": ("latency.json", _set_p50(float("nan")), "p50_ms is nan"),
    "infinite p50": ("latency.json", _set_p50(float("inf")), "p50_ms is inf"),
}


@pytest.mark.parametrize("side", ["current", "baseline"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_check_refuses_a_non_finite_or_mistyped_figure_on_either_side(runs, case, side, capsys):
    name, change, said = CASES[case]
    cur, base = runs
    target = _config(cur if side == "current" else base) / name
    _edit(target, change)
    assert main(["check", str(cur), "--baseline", str(base)]) == 2
    err = _one_line_error(capsys)
    assert str(target) in err and said in err, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_refuses_a_non_finite_or_mistyped_figure_and_writes_nothing(runs, case, capsys):
    name, change, said = CASES[case]
    cur, _ = runs
    (cur / "report.html").unlink(missing_ok=True)
    _edit(_config(cur) / name, change)
    assert main(["report", str(cur)]) == 2
    assert said in _one_line_error(capsys)
    assert not (cur / "report.html").exists()


@pytest.mark.slow
def test_an_untouched_copy_still_passes_check_and_renders(runs, capsys):
    cur, base = runs
    assert main(["check", str(cur), "--baseline", str(base)]) == 0
    assert main(["report", str(cur)]) == 0


@pytest.mark.slow
def test_the_report_never_follows_a_link_planted_at_its_names(runs, tmp_path):
    cur, _ = runs
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    # at the name the old writer used for its temporary, and at the output itself
    for name in (".report.html.tmp", "report.html"):
        link = cur / name
        link.unlink(missing_ok=True)
        link.symlink_to(outside)
    assert main(["report", str(cur)]) == 0
    assert outside.read_text() == "not yours"
    report = cur / "report.html"
    assert report.is_file() and not report.is_symlink() and "<html" in report.read_text()[:500].lower()
    leftovers = [p.name for p in cur.iterdir() if p.name.endswith(".tmp") and p.name != ".report.html.tmp"]
    assert leftovers == []


@pytest.mark.slow
def test_a_failed_report_write_leaves_no_temporary_behind(runs, tmp_path, capsys):
    cur, _ = runs
    target = tmp_path / "elsewhere" / "report.html"
    target.mkdir(parents=True)  # a folder where the file should go: the rename fails
    assert main(["report", str(cur), "--output", str(target)]) == 2
    err = _one_line_error(capsys)
    assert str(target) in err and "directory" in err.lower(), err
    assert os.listdir(target.parent) == ["report.html"] and os.listdir(target) == []


def test_check_json_naming_a_folder_is_one_line(runs, tmp_path, capsys):
    cur, base = runs
    folder = tmp_path / "out.json"
    folder.mkdir()
    assert main(["check", str(cur), "--baseline", str(base), "--json", str(folder)]) == 2
    err = _one_line_error(capsys)
    assert str(folder) in err, err
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_runs_dir_naming_a_file_is_one_line(tmp_path, capsys):
    afile = tmp_path / "not-a-folder"
    afile.write_text("")
    assert main(["train", "--preset", "smoke", "--runs-dir", str(afile), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert str(afile) in err, err
