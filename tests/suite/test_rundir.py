"""The run folder's one definition: torch-free, atomic writes (unique temp file, 0644, nothing left on failure),
results refused from an unknown schema or kind, and the runner's error boundary on a real but broken config."""

import json
import os
import stat
import subprocess
import sys

import pytest

from capsbench.suite import rundir
from capsbench.suite.errors import CheckpointError


def test_the_run_folder_definition_imports_without_torch():
    code = "import sys, capsbench.suite.rundir; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


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
    with pytest.raises(CheckpointError, match="expected a 'health' result"):
        rundir.read_result(path, "health")
    path.write_text(json.dumps({"kind": "metrics", "schema_version": rundir.SCHEMA_VERSION + 1}))
    with pytest.raises(CheckpointError, match="newer than this capsbench"):
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
