"""The runner takes nothing wrong as right (issue 13): stale and swapped artifacts, history-dependent results,
incomplete or failed runs passing `check`, run.json rewritten by failures, unreadable or newer results, leftover
files, two writers on one config, kills and signals, a full or read-only disk. One test per defect, on a tiny real
run (Fashion-MNIST, 256 images, one epoch). (A crafted checkpoint: test_checkpoints.py; numbers refused while
parsing: cli/test_options.py; result files that are not UTF-8 objects: tests/test_results.py.)"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsbench import results as R
from capsbench.reports.compare import machine_fingerprint
from capsbench.suite.checkpoints import read_checkpoint
from capsbench.suite.cli import main
from capsbench.suite.env import environment
from capsbench.suite.presets import get_preset

SHALLOW = get_preset("smoke").configs()[0]
TINY = ["--train-subset", "256", "--eval-subset", "128", "--epochs", "1"]
CFG = SHALLOW.replace(train_subset=256, eval_subset=128, epochs=1)
PRUNE = "prune_chip_b0.25_c0.25"


def _all(runs: Path, data_dir: Path, *extra: str) -> list[str]:
    """`capsbench all` of the tiny config in `runs`, with `extra` options."""
    args = ["all", "--runs-dir", str(runs), "--data-dir", str(data_dir), "--configs", SHALLOW.id, *TINY]
    return [*args, "--finetune-epochs", "1", "--no-progress", *extra]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fashion_data_dir) -> Path:
    """One config trained, pruned (one fine-tune epoch) and exported: the folder every test copies."""
    runs = tmp_path_factory.mktemp("integrity")
    assert main(_all(runs, fashion_data_dir, "--only", "train", "prune", "export")) == 0
    return runs / "smoke"


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "runs" / "smoke"
    shutil.copytree(tiny_run, dst)
    return dst


# -------------------------------------------------------------------------------------------- 2. provenance


def test_retraining_a_base_redoes_its_pruned_children(run_copy, fashion_data_dir, cli):
    runs, folder = run_copy.parent, run_copy / CFG.id
    old_pruned = R.sha256(folder / PRUNE / R.PRUNED_FILE)
    # Another base under the same config, as `train --force` with other code gives (the same code retrains the
    # same bytes): new weights, recorded by the train stage as its output.
    state = torch.load(folder / R.CHECKPOINT_FILE, weights_only=True)
    state["model"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, folder / R.CHECKPOINT_FILE)
    pipeline = _json(folder / R.PIPELINE_FILE)
    pipeline["train"]["outputs"][R.CHECKPOINT_FILE] = R.sha256(folder / R.CHECKPOINT_FILE)
    (folder / R.PIPELINE_FILE).write_text(json.dumps(pipeline))
    again = cli(_all(runs, fashion_data_dir, "--only", "train", "prune", "export"))
    assert again.code == 0
    out = again.out
    assert "train: cached" in out, out
    assert "prune: redoing: checkpoint.pt (which it read) changed" in out, out
    assert "export: redoing: checkpoint.pt (which it read) changed" in out, out
    assert any("checkpoint.pt" in r for r in _json(folder / R.PIPELINE_FILE)["prune"]["redone_because"])
    assert R.sha256(folder / PRUNE / R.PRUNED_FILE) != old_pruned
    assert not (folder / PRUNE / R.SURGERY_FILE).exists()


def test_a_swapped_onnx_file_is_refused_by_time_cpp_and_check_and_reexported_by_all(
    run_copy, tiny_run, fashion_data_dir, cli
):
    runs = run_copy.parent
    folder = run_copy / CFG.id
    shutil.copy(folder / PRUNE / R.ONNX_FILE, folder / R.ONNX_FILE)  # another model in its place
    run_json = (run_copy / R.RUN_FILE).read_bytes()
    common = ["--runs-dir", str(runs), "--data-dir", str(fashion_data_dir), "--configs", SHALLOW.id, *TINY]
    timing = ["--batch-sizes", "1", "--iters", "1", "--warmup", "0"]
    check = cli(["check", str(run_copy), "--baseline", str(tiny_run)])
    assert check.code == 2
    err = check.err.strip()
    assert "cannot compare" in err and "model.onnx: not the file its export recorded" in err
    assert len(err.splitlines()) == 1
    timed = cli(["time", *common, *timing])
    assert timed.code == 2
    assert "not the file export wrote" in timed.err
    cpp = cli(["all", *common, *timing, "--only", "cpp", "--no-progress"])
    assert cpp.code == 2
    assert "not the file export wrote" in cpp.err
    assert not (folder / R.LATENCY_FILE).exists()
    # A failing invocation leaves run.json as it was.
    assert (run_copy / R.RUN_FILE).read_bytes() == run_json
    # The runner sees that export's output changed and exports again.
    exported = cli(_all(runs, fashion_data_dir, "--only", "export"))
    assert exported.code == 0
    assert "export: redoing: model.onnx (which it wrote) changed" in exported.out
    assert R.sha256(folder / R.ONNX_FILE) == _json(folder / R.EXPORT_FILE)["onnx_sha256"]
    assert R.sha256(folder / R.ONNX_FILE) == R.sha256(tiny_run / CFG.id / R.ONNX_FILE)


# ------------------------------------------------------------------------------- 3. history-free global state


def test_a_stage_s_thread_count_and_grad_mode_do_not_leak_into_the_next_stage(
    run_copy, fashion_data_dir, cli
):
    """The runner isolates torch's process-wide state per stage: a stage that changes the thread count (as
    timing with --threads once did in this process) or grad mode leaves the next stage, and the caller, as
    they were. The spy changes them inside a real stage; without the runner's isolation this fails."""
    from capsbench.suite import stages

    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    health, export = stages.get("health"), stages.get("export")
    seen = {}
    originals = health.run, export.run

    def leaky(ctx):
        torch.set_num_threads(other)
        torch.set_grad_enabled(False)
        return originals[0](ctx)

    def observe(ctx):
        seen.update(threads=torch.get_num_threads(), grad=torch.is_grad_enabled())
        return originals[1](ctx)

    object.__setattr__(health, "run", leaky)
    object.__setattr__(export, "run", observe)
    try:
        assert cli(_all(run_copy.parent, fashion_data_dir, "--only", "health", "export", "--force")).code == 0
    finally:
        object.__setattr__(health, "run", originals[0])
        object.__setattr__(export, "run", originals[1])
    assert seen == {"threads": before, "grad": True}
    assert torch.get_num_threads() == before and torch.is_grad_enabled()


def _recorded(folder: Path, stage: str) -> bool:
    """The runner's own 'finished' record of a stage: pipeline.json, written after every stage."""
    try:
        return _json(folder / R.PIPELINE_FILE)[stage]["status"] == "ok"
    except (OSError, ValueError, KeyError, TypeError):
        return False  # not written yet (every write is atomic: never half a file)


@pytest.mark.timing
def test_timing_runs_its_rounds_at_the_threads_asked_for_and_leaves_this_process_s_count_as_it_was(
    run_copy, fashion_data_dir, cli, monkeypatch
):
    """`time --threads 1` times each round in a fresh worker process on one thread, and the process that ran it
    keeps its own torch thread count, without the runner's restore (taken out here): the count a later
    training in this process runs with (a count leaked from timing once made a resumed run's accuracies and
    ONNX bytes differ from an uninterrupted one's). Fails if the stage sets the count in this process and
    leaves it, or if the rounds do not run at the count asked for."""
    from capsbench.suite import runner

    monkeypatch.setattr(runner, "isolated_torch_state", contextlib.nullcontext)
    before = torch.get_num_threads()
    ours = 2 if before == 1 else before  # not the 1 the rounds are asked for
    timing = ["--only", "time", "--threads", "1", "--batch-sizes", "1", "--iters", "2", "--warmup", "0"]
    torch.set_num_threads(ours)
    try:
        assert cli(_all(run_copy.parent, fashion_data_dir, *timing, "--rounds", "1")).code == 0
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    latency = _json(run_copy / CFG.id / R.LATENCY_FILE)
    assert latency["machine_probe"]["threads"] == latency["gemm"]["threads"] == 1  # measured in the rounds
    assert after == ours


@pytest.mark.timing
def test_a_finished_file_whose_record_a_kill_lost_is_reused_and_recorded_again(
    run_copy, fashion_data_dir, cli
):
    """The other kill point: after a stage's file was renamed into place but before the runner recorded it.
    The file is whole (atomic writes) and of these settings, so the resumed run keeps it ('ok (cached)'), not
    a second measurement, and records the stage again with its hashes."""
    folder = run_copy / CFG.id
    timing = ["--only", "time", "--batch-sizes", "1", "--iters", "2", "--warmup", "0", "--rounds", "1"]
    assert cli(_all(run_copy.parent, fashion_data_dir, *timing)).code == 0
    latency = (folder / R.LATENCY_FILE).read_bytes()
    pipeline = _json(folder / R.PIPELINE_FILE)
    del pipeline["time"]
    (folder / R.PIPELINE_FILE).write_text(json.dumps(pipeline))
    resumed = cli(_all(run_copy.parent, fashion_data_dir, *timing))
    assert resumed.code == 0
    assert "time: ok (cached)" in resumed.out
    assert (folder / R.LATENCY_FILE).read_bytes() == latency
    assert _recorded(folder, "time")
    assert _json(folder / R.PIPELINE_FILE)["time"]["outputs"][R.LATENCY_FILE] == R.sha256(
        folder / R.LATENCY_FILE
    )


@pytest.mark.timing
def test_pipeline_json_records_each_stage_as_it_finishes(run_copy, fashion_data_dir, cli):
    """A stage's record is written before the next stage starts: while 'time' runs, export is already on disk
    as finished, and the whole record reads 'running' until the last stage is done."""
    folder = run_copy / CFG.id
    seen = {}
    from capsbench.suite import stages

    time_stage = stages.get("time")
    original = time_stage.run

    def spy(ctx):
        seen.update(_json(folder / R.PIPELINE_FILE))
        return original(ctx)

    object.__setattr__(time_stage, "run", spy)
    try:
        args = ["--only", "export", "time", "--force", "--batch-sizes", "1", "--iters", "2", "--rounds", "1"]
        assert cli(_all(run_copy.parent, fashion_data_dir, *args)).code == 0
    finally:
        object.__setattr__(time_stage, "run", original)
    assert seen["status"] == "running" and seen["export"]["status"] == "ok" and "time" not in seen
    final = _json(folder / R.PIPELINE_FILE)
    assert final["status"] == "complete" and final["time"]["status"] == "ok"


# ---------------------------------------------------------------------------------------- 4. check refuses


def test_check_refuses_a_run_with_missing_results(run_copy, tiny_run, cli):
    (run_copy / CFG.id / R.PARITY_FILE).unlink()
    check = cli(["check", str(run_copy), "--baseline", str(tiny_run)])
    assert check.code == 2
    err = check.err.strip()
    assert f"config {CFG.id} lacks parity.json (the baseline has them)" in err and len(err.splitlines()) == 1


def test_check_refuses_a_run_with_a_failed_stage(run_copy, tiny_run, cli):
    path = run_copy / CFG.id / R.PIPELINE_FILE
    pipeline = _json(path)
    pipeline["export"]["status"] = "failed"
    path.write_text(json.dumps(pipeline))
    check = cli(["check", str(run_copy), "--baseline", str(tiny_run)])
    assert check.code == 2
    assert "stage export failed (pipeline.json)" in check.err
    assert cli(["check", str(tiny_run), "--baseline", str(tiny_run)]).code == 0  # the untouched run passes


# ------------------------------------------------------------------------------------------------ 5. run.json


def test_run_json_is_not_narrowed_and_the_fingerprint_ignores_thread_settings(
    run_copy, fashion_data_dir, cli
):
    run_file = run_copy / R.RUN_FILE
    first = _json(run_file)
    assert [c["config_id"] for c in first["configs"]] == [CFG.id]
    # Another config of the preset, run alone: the first one stays listed, and `started` and the environment
    # are the first invocation's.
    deep = get_preset("smoke").configs()[1]
    args = ["all", "--runs-dir", str(run_copy.parent), "--data-dir", str(fashion_data_dir), *TINY]
    assert cli([*args, "--configs", deep.id, "--only", "train", "--no-progress"]).code == 0
    second = _json(run_file)
    assert {c["config_id"] for c in second["configs"]} == {CFG.id, deep.replace(**_tiny()).id}
    assert second["started"] == first["started"] and second["environment"] == first["environment"]
    threads = torch.get_num_threads()
    try:
        a = machine_fingerprint(environment())
        torch.set_num_threads(1 if threads != 1 else 2)
        assert machine_fingerprint(environment()) == a
    finally:
        torch.set_num_threads(threads)
    assert a[1] == os.cpu_count()


def _tiny() -> dict:
    return {"train_subset": 256, "eval_subset": 128, "epochs": 1}


# --------------------------------------------------------------------------------- 6. validation and reading


def test_a_corrupt_or_deleted_checkpoint_is_trained_again(run_copy, fashion_data_dir, cli):
    ckpt = run_copy / CFG.id / R.CHECKPOINT_FILE
    good = _json(ckpt.parent / R.METRICS_FILE)["test_accuracy"]
    ckpt.write_bytes(b"garbage")
    again = cli(_all(run_copy.parent, fashion_data_dir, "--only", "train", "export"))
    assert again.code == 0
    assert "train: redoing: checkpoint.pt (which it wrote) changed" in again.out
    assert read_checkpoint(CFG, ckpt)["config_id"] == CFG.id
    assert _json(ckpt.parent / R.METRICS_FILE)["test_accuracy"] == good  # the same training again
    ckpt.unlink()  # what the corrupt-checkpoint message advises
    assert cli(_all(run_copy.parent, fashion_data_dir, "--only", "train", "health", "export")).code == 0
    assert _json(ckpt.parent / R.METRICS_FILE)["test_accuracy"] == good


def test_a_newer_schema_is_refused_and_never_overwritten(run_copy, fashion_data_dir, cli):
    path = run_copy / CFG.id / R.METRICS_FILE
    newer = {**_json(path), "schema_version": R.SCHEMA_VERSION + 1}
    path.write_text(json.dumps(newer))
    before = path.read_bytes()
    refused = cli(_all(run_copy.parent, fashion_data_dir, "--only", "train", "--force"))
    assert refused.code == 2
    assert "newer than this capsbench understands" in refused.err
    assert path.read_bytes() == before


def test_a_tampered_label_shows_as_invalid_in_the_report(run_copy, cli):
    path = run_copy / CFG.id / R.CONFIG_FILE
    path.write_text(json.dumps({**_json(path), "label": 7}))
    assert cli(["report", str(run_copy)]).code == 0
    assert "(invalid label: 7)" in (run_copy / R.REPORT_FILE).read_text()


# ------------------------------------------------------------------------------------ 7. files and processes


def test_intermediate_checkpoints_are_removed_once_pruning_is_done(tiny_run):
    sub = tiny_run / CFG.id / PRUNE
    assert (sub / R.PRUNED_FILE).is_file()
    assert not (sub / R.SURGERY_FILE).exists() and not (sub / R.FINETUNE_CHECKPOINT).exists()


# ------------------------------------------------------------------------------- one writer per run folder


def _hold(run_dir: Path, name: str) -> subprocess.Popen:
    """Another process holding the run folder's lock `name` (a config id, or "run") until killed."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from capsbench.suite.rundir import folder_lock\n"
            "with folder_lock(sys.argv[1], sys.argv[2]):\n    print('locked', flush=True); time.sleep(600)",
            str(run_dir),
            name,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_config_another_command_is_working_on_is_refused_and_a_killed_holder_does_not_block(
    run_copy, fashion_data_dir, cli
):
    holder = _hold(run_copy, CFG.id)
    try:

        def results():  # every file of the run but the locks themselves
            return {
                p: p.stat().st_mtime_ns
                for p in run_copy.rglob("*")
                if p.is_file() and ".locks" not in p.parts
            }

        before = results()
        refused = cli(_all(run_copy.parent, fashion_data_dir, "--only", "train", "export", "--force"))
        assert refused.code == 2
        err = refused.err.strip()
        assert f"another capsbench is working on config {CFG.id}" in err and f"pid {holder.pid}" in err, err
        assert "Traceback" not in err
        assert results() == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder killed without a chance to clean up
        holder.wait()
    assert (
        cli(_all(run_copy.parent, fashion_data_dir, "--only", "train", "export")).code == 0
    )  # the kernel freed it


def test_work_on_other_configs_of_the_run_goes_on_beside_it(run_copy, fashion_data_dir, cli):
    """The sharded workflow of docs/gpu-docker-ray.md: processes on different configs of one run folder."""
    holder = _hold(run_copy, "some-other-config")
    try:
        assert cli(_all(run_copy.parent, fashion_data_dir, "--only", "train", "export")).code == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.timing
def test_sigterm_during_a_timing_round_stops_its_worker_at_once(run_copy):
    """The round's worker process would time for ten minutes (100 000 calls, max 600 s); SIGTERM to capsbench
    ends both: exit 130 with the interrupt's message, the worker killed, not waited for."""
    timing = [
        "--batch-sizes",
        "1",
        "--iters",
        "100000",
        "--max-seconds",
        "600",
        "--warmup",
        "0",
        "--rounds",
        "1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "capsbench.suite.cli", "time", "--runs-dir", str(run_copy.parent)]
        + ["--configs", SHALLOW.id, *TINY, *timing],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for line in proc.stdout:  # the round's own progress: its worker is timing now
            if "batch" in line or "threads" in line:
                break
        # the round's worker, not multiprocessing's resource tracker (which leaves on its own once its parent
        # has gone, in its own time)
        workers = [p for p in _children(proc.pid) if _alive(p) and b"spawn_main" in _cmdline(p)]
        assert workers, "no worker process found"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=300) == 130  # a hang here is the bug: 300 s is half the worker's timing
    finally:
        proc.kill()
        proc.wait()
    assert "interrupted" in proc.stderr.read()
    deadline = time.time() + 60  # killed, it is gone at once; a slow machine may take a moment to reap it
    while any(_alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)
    assert not (run_copy / CFG.id / R.LATENCY_FILE).exists()


def test_health_refuses_a_config_json_edited_by_hand_and_creates_nothing(run_copy, fashion_data_dir, cli):
    path = run_copy / CFG.id / R.CONFIG_FILE
    config = _json(path)
    config["config"]["epochs"] += 1
    path.write_text(json.dumps(config))
    before = sorted(p.name for p in run_copy.iterdir())
    health = cli(["health", str(run_copy), "--data-dir", str(fashion_data_dir)])
    assert health.code == 2
    err = health.err.strip()
    assert len(err.splitlines()) == 1 and f"not {CFG.id} (the folder it is in)" in err, err
    assert sorted(p.name for p in run_copy.iterdir()) == before


# ------------------------------------------------------------------------- the operating system says no


@pytest.fixture
def small_fs(tmp_path):
    """A real, small filesystem (tmpfs) of its own, to fill up or make read-only; root mounts it (CI runs as
    root; where mounting is refused the test says so)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_during_training_is_one_line_and_leaves_nothing_that_looks_finished(
    small_fs, fashion_data_dir, cli
):
    train = cli(
        ["train", "--runs-dir", str(small_fs), "--data-dir", str(fashion_data_dir), "--configs", SHALLOW.id]
        + [*TINY, "--no-progress"]
    )
    err = train.err.strip()
    assert train.code == 2 and "No space left on device" in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    folder = small_fs / "smoke" / CFG.id
    assert not (folder / R.CHECKPOINT_FILE).exists() and not (folder / R.METRICS_FILE).exists()
    assert [p.name for p in small_fs.rglob("*.tmp")] == []


@pytest.mark.slow
def test_a_read_only_run_folder_is_one_line_for_report_health_and_all(tmp_path, fashion_data_dir, cli):
    """The checked-in real smoke run on a read-only mount: every command that would write says so in one line
    (exit 2) and changes nothing."""
    src = Path(__file__).parents[1] / "reports" / "data" / "smoke"
    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        shutil.copytree(src, mnt / "smoke")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        before = {p: p.read_bytes() for p in (mnt / "smoke").rglob("*") if p.is_file()}
        commands = [
            ["report", str(mnt / "smoke")],
            ["health", str(mnt / "smoke"), "--data-dir", str(fashion_data_dir)],
            ["all", "--runs-dir", str(mnt), "--only", "report", "--no-progress"],
        ]
        for argv in commands:
            refused = cli(argv)
            assert refused.code == 2, argv
            err = refused.err.strip()
            assert "Read-only file system" in err and "Traceback" not in err, (argv, err)
            assert len(err.splitlines()) == 1, (argv, err)
        assert {p: p.read_bytes() for p in (mnt / "smoke").rglob("*") if p.is_file()} == before
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
