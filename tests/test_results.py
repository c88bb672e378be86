"""The results contract (capsbench/results.py): torch-free and free of the suite, atomic writes (unique temp file,
0644, nothing left on failure), results refused from an unknown schema or kind, every file a real run writes
named by it, and the reports reading through it alone."""

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from capsbench import results as R
from capsbench.files import atomic_write
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
    path = R.write_json(tmp_path / "a" / "metrics.json", "metrics", {"status": "complete"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert json.loads(path.read_text())["schema_version"] == R.SCHEMA_VERSION
    assert R.read_result(path, "metrics")["status"] == "complete"
    assert os.listdir(path.parent) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    path = R.write_json(tmp_path / "metrics.json", "metrics", {"status": "complete"})

    def half_then_fail(f):
        f.write('{"half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half_then_fail)
    assert R.read_result(path, "metrics")["status"] == "complete"
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_unknown_kind_newer_schema_and_broken_json_are_refused(tmp_path):
    path = R.write_json(tmp_path / "x.json", "metrics", {})
    with pytest.raises(ResultError, match="expected a 'health' result"):
        R.read_result(path, "health")
    path.write_text(json.dumps({"kind": "metrics", "schema_version": R.SCHEMA_VERSION + 1}))
    with pytest.raises(ResultError, match="newer than this capsbench"):
        R.read_result(path, "metrics")
    path.write_text("{")
    assert R.read_if_valid(path, "metrics") is None
    assert not R.is_trained(tmp_path)


def test_variants_are_the_trained_net_then_one_per_pruning_folder(tmp_path):
    (tmp_path / R.CHECKPOINT_FILE).write_bytes(b"")
    sub = tmp_path / R.prune_dir_name("chip", 0.5, 0.25)
    sub.mkdir()
    (sub / R.PRUNED_FILE).write_bytes(b"")
    (tmp_path / R.PRUNED_FILE).write_bytes(b"")  # a config-level pruned.pt is not a variant (any more)
    variants = R.present_variants(tmp_path)
    assert [v.name for v in variants] == ["model", "prune_chip_b0.50_c0.25"]
    assert variants[1].onnx == "prune_chip_b0.50_c0.25/model.onnx"
    assert R.exported_variants(tmp_path) == []


def test_every_file_a_real_run_writes_is_named_by_the_contract(smoke_all_run):
    """A stage that writes a file the contract does not name (or names it differently) would leave it out of
    pipeline.json's hashes and of the reports: every file of a real `capsbench all` run matches a pattern of
    the contract, and every stage's required files are there."""
    patterns = {p for files in R.STAGE_FILES.values() for p in files.writes + files.required}
    patterns |= {
        R.RUN_FILE,  # the runner's own record of the run
        R.PIPELINE_FILE,
        R.SWEEP_GLOB,
        R.in_pruned(R.FINETUNE_METRICS),
        f"{R.LOCKS_DIR}/*",
    }
    configs = R.config_dirs(smoke_all_run)
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
            for pattern in R.STAGE_FILES[stage].required:
                assert list(folder.glob(pattern)), f"{cid}: {stage} left no {pattern}"


# Where keys are data, not field names: the end of a key's path (its parents' keys, then "*" for any key). A
# variant's or pruning folder's name, a provider, an ONNX op type or domain, a file read, a torch setting's name.
# The values under such keys are still checked (a variant's session has documented fields).
DATA_KEYS = [
    ("onnx_sha256", "*"),  # per variant (the timing files)
    ("flops_per_image", "*"),
    ("sessions", "*"),
    ("node_placement", "*"),  # per variant, and nodes per provider inside each
    ("torch_device", "*"),
    ("latency_cpp.json", "runner", "*"),  # per variant
    ("latency_cpp.json", "parity", "*"),  # per variant
    ("session", "placement", "*"),  # the runner's kernels per provider ...
    ("session", "placement", "*", "*"),  # ... and op type
    ("ops_off_provider", "*"),
    ("ops_off_cuda", "*"),
    ("op_census", "*"),  # per ONNX op type
    ("opset_imports", "*"),  # per ONNX domain
    ("torch_settings", "*"),  # torch's precision settings by name
    ("pipeline.json", "*", "inputs", "*"),  # a stage's record: per file read and written
    ("pipeline.json", "*", "outputs", "*"),
]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def _is_data(path: tuple[str, ...]) -> bool:
    return any(
        len(path) >= len(p) and all(want in ("*", got) for want, got in zip(p, path[-len(p) :], strict=True))
        for p in DATA_KEYS
    )


def _undocumented(obj, documented: set[str], path: tuple[str, ...], found: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key not in documented and not _is_data((*path, key)):
                found.setdefault(key, ".".join(path))
            _undocumented(value, documented, (*path, key), found)
    elif isinstance(obj, list):
        for item in obj:
            _undocumented(item, documented, (*path, "[]"), found)


def test_every_field_of_a_real_run_is_documented_in_the_results_schema(smoke_all_run):
    """docs/results.md is the schema other tools rely on: every field name (at any depth) of every JSON file a real
    `capsbench all` run writes appears there in backticks, so a field added without a word in the schema fails
    here. Keys that are data (variant, stage, file or op names) are left out, and a pipeline record's stage
    entries are named by the stages' list."""
    from capsbench.suite import stages

    documented = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", DOCS.read_text()))
    documented |= set(stages.NAMES)  # pipeline.json: one entry per stage, by name
    found: dict[str, str] = {}
    files = sorted(smoke_all_run.rglob("*.json"))
    assert len(files) > 20, "the smoke run wrote fewer result files than its two configs and pruned nets make"
    for path in files:
        _undocumented(json.loads(path.read_text()), documented, (path.name,), found)
    assert found == {}, "fields missing from docs/results.md (name: first place seen)"


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
        R.read_result(path, "metrics")
    assert R.read_if_valid(path, "metrics") is None


def test_statuses_are_the_strings_old_files_hold():
    """Each status vocabulary is a str enum whose members are the words in the files: written, they are those
    words byte for byte; read back (plain strings, or from files written before the enums), they compare equal."""
    from capsbench.claims import VERDICTS, Verdict

    payload = {
        "status": R.Status.PARITY_FAILED,
        "rows": [{"status": R.RowStatus.ERROR}],
        R.CheckStatus.NO_HISTORY: [
            R.PipelineStatus.RUNNING,
            R.StageStatus.OK,
            Verdict.DID_NOT_HOLD,
        ],
    }
    text = json.dumps(payload)
    assert text == (
        '{"status": "parity failed", "rows": [{"status": "error"}], '
        '"no_history": ["running", "ok", "did not hold"]}'
    )
    back = json.loads(text)
    assert back["status"] == R.Status.PARITY_FAILED
    assert back["rows"][0]["status"] == R.RowStatus.ERROR
    assert f"{R.Status.COMPLETE}|{R.CheckStatus.NOT_GATED:<10}|" == "complete|not_gated |"
    assert str(Verdict.HELD) == "held" and {R.StageStatus.FAILED: 1}["failed"] == 1
    assert VERDICTS == ("held", "did not hold", "inconclusive", "not testable")
