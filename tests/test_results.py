"""The results contract (capsbench/results.py): torch-free and free of the suite, atomic writes (unique temp file,
0644, nothing left on failure), results refused from an unknown schema or kind, every file a real run writes
named by it, and the reports reading through it alone."""

import json
import os
import stat
import subprocess
import sys

import pytest

from capsbench import results as rundir
from capsbench.results import ResultError


@pytest.mark.slow
def test_the_contract_and_the_reports_import_neither_torch_nor_the_suite():
    """reports/ reads result files only: importing every report module (and `check`'s completeness test) pulls
    in neither torch nor any module of capsbench.suite."""
    code = (
        "import sys, capsbench.results, capsbench.reports.load, capsbench.reports.completeness, "
        "capsbench.reports.compare, capsbench.reports.render, capsbench.reports.charts; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('capsbench.suite')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_results_are_written_world_readable_with_schema_version_and_no_temp_file(tmp_path):
    path = rundir.write_json(tmp_path / "a" / "metrics.json", "metrics", {"status": "complete"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert json.loads(path.read_text())["schema_version"] == rundir.SCHEMA_VERSION
    assert rundir.read_result(path, "metrics")["status"] == "complete"
    assert os.listdir(path.parent) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = rundir.write_json(tmp_path / "metrics.json", "metrics", {"status": "complete"})

    def half_then_fail(f):
        f.write('{"half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        rundir.atomic_write(path, half_then_fail)
    assert rundir.read_result(path, "metrics")["status"] == "complete"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_unknown_kind_newer_schema_and_broken_json_are_refused(tmp_path):
    path = rundir.write_json(tmp_path / "x.json", "metrics", {})
    with pytest.raises(ResultError, match="expected a 'health' result"):
        rundir.read_result(path, "health")
    path.write_text(json.dumps({"kind": "metrics", "schema_version": rundir.SCHEMA_VERSION + 1}))
    with pytest.raises(ResultError, match="newer than this capsbench"):
        rundir.read_result(path, "metrics")
    path.write_text("{")
    assert rundir.read_if_valid(path, "metrics") is None
    assert not rundir.is_trained(tmp_path)


def test_variants_are_the_trained_net_then_one_per_pruning_folder(tmp_path):
    (tmp_path / rundir.CHECKPOINT_FILE).write_bytes(b"")
    sub = tmp_path / rundir.prune_dir_name("chip", 0.5, 0.25)
    sub.mkdir()
    (sub / rundir.PRUNED_FILE).write_bytes(b"")
    (tmp_path / rundir.PRUNED_FILE).write_bytes(b"")  # a config-level pruned.pt is not a variant (any more)
    variants = rundir.present_variants(tmp_path)
    assert [v.name for v in variants] == ["model", "prune_chip_b0.50_c0.25"]
    assert variants[1].onnx == "prune_chip_b0.50_c0.25/model.onnx"
    assert rundir.exported_variants(tmp_path) == []


def test_every_file_a_real_run_writes_is_named_by_the_contract(smoke_all_run):
    """A stage that writes a file the contract does not name (or names it differently) would leave it out of
    pipeline.json's hashes and of the reports: every file of a real `capsbench all` run matches a pattern of
    the contract, and every stage's required files are there."""
    patterns = {p for files in rundir.STAGE_FILES.values() for p in files.writes + files.required}
    patterns |= {
        rundir.RUN_FILE,  # the runner's own record of the run
        rundir.PIPELINE_FILE,
        rundir.SWEEP_GLOB,
        rundir.in_pruned(rundir.FINETUNE_METRICS),
        f"{rundir.LOCKS_DIR}/*",
    }
    configs = rundir.config_dirs(smoke_all_run)
    assert configs, "the smoke run has no config folders"
    unnamed = []
    for path in sorted(p for p in smoke_all_run.rglob("*") if p.is_file()):
        rel = path.relative_to(smoke_all_run)
        inside = rel.relative_to(rel.parts[0]) if rel.parts[0] in configs else rel
        if not any(inside.match(p) for p in patterns):
            unnamed.append(str(rel))
    assert unnamed == []
    for cid, folder in configs.items():
        for stage in ("train", "health", "export"):
            for pattern in rundir.STAGE_FILES[stage].required:
                assert list(folder.glob(pattern)), f"{cid}: {stage} left no {pattern}"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2]", "expected a JSON object"),
        (b'{"schema_version": 1, "kind": "metrics", "x": "\xff"}', "not UTF-8"),
        (b"7", "expected a JSON object"),
    ],
)
def test_result_files_that_are_not_utf8_objects_are_refused_cleanly(tmp_path, content, message):
    path = tmp_path / "metrics.json"
    path.write_bytes(content)
    with pytest.raises(ResultError, match=message):
        rundir.read_result(path, "metrics")
    assert rundir.read_if_valid(path, "metrics") is None


def test_statuses_are_the_strings_old_files_hold():
    """Each status vocabulary is a str enum whose members are the words in the files: written, they are those
    words byte for byte; read back (plain strings, or from files written before the enums), they compare equal."""
    from capsbench.claims import VERDICTS, Verdict

    payload = {
        "status": rundir.Status.PARITY_FAILED,
        "rows": [{"status": rundir.RowStatus.ERROR}],
        rundir.CheckStatus.NO_HISTORY: [
            rundir.PipelineStatus.RUNNING,
            rundir.StageStatus.OK,
            Verdict.DID_NOT_HOLD,
        ],
    }
    text = json.dumps(payload)
    assert text == (
        '{"status": "parity failed", "rows": [{"status": "error"}], '
        '"no_history": ["running", "ok", "did not hold"]}'
    )
    back = json.loads(text)
    assert back["status"] == rundir.Status.PARITY_FAILED
    assert back["rows"][0]["status"] == rundir.RowStatus.ERROR
    assert f"{rundir.Status.COMPLETE}|{rundir.CheckStatus.NOT_GATED:<10}|" == "complete|not_gated |"
    assert str(Verdict.HELD) == "held" and {rundir.StageStatus.FAILED: 1}["failed"] == 1
    assert VERDICTS == ("held", "did not hold", "inconclusive", "not testable")
