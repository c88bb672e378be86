"""`capsbench all --executor ray` against a real Ray cluster on this machine, started and stopped by the tests:
the grid on 2 workers gives the serial run's results, a worker killed in the middle of a config is retried and
resumes from the config's last finished stage, a failing config is recorded while the others finish.

The cluster listens on loopback only (Ray resolves 127.0.0.1 to the machine's address unless
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) and requires a token made for it (token authentication, on by default for
local Ray clusters since Ray 2.59), so nothing else can submit work to it. It is stopped by the ids of its own
processes: `ray stop` would end every Ray process of the machine, another developer's too.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from capsbench.suite.presets import get_preset

TINY = ["--epochs", "1", "--train-subset", "300", "--eval-subset", "100", "--prune", "0.25,0.25"]
TINY += ["--finetune-epochs", "1", "--no-progress"]
CONFIGS = [c.replace(epochs=1, train_subset=300, eval_subset=100) for c in get_preset("smoke").configs()]
RAY = str(Path(sys.executable).with_name("ray"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(marker: str) -> list[int]:
    """The ids of the processes whose command line contains `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _with_children(pids: list[int]) -> list[int]:
    """`pids` and all their descendants (Ray's agents rename themselves, so only their parent shows the marker)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child, parent in parents.items() if parent == pid]
    return sorted(found)


def _stop(temp_dir: str) -> None:
    ours = _with_children(_processes_of(temp_dir))
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while any(Path(f"/proc/{pid}").exists() for pid in ours) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def ray_cluster():
    """A Ray head with 2 CPUs (2 workers) on loopback; yields (address, environment for its drivers)."""
    temp_dir = tempfile.mkdtemp(prefix="cbray", dir="/tmp")  # short: Ray's socket paths live under it
    token = Path(temp_dir) / "token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONUNBUFFERED": "1",
    }
    port = _free_port()
    start = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--num-cpus", "2"]
    start += ["--include-dashboard=false", "--disable-usage-stats", "--temp-dir", temp_dir]
    started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        yield f"127.0.0.1:{port}", env
    finally:
        _stop(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _all(runs: Path, data_dir: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "capsbench.suite.cli", "all", "--preset", "smoke", "--runs-dir", str(runs)]
    return [*cmd, "--data-dir", str(data_dir), *TINY, *extra]


def _results(run: Path) -> dict:
    """Per config: the accuracies and the bytes of every ONNX file, by path in the run folder."""
    out = {}
    for cfg in CONFIGS:
        folder = run / cfg.id
        prune = next(folder.glob("prune_*/prune.json"))
        out[cfg.id] = {
            "accuracy": _json(folder / "metrics.json")["test_accuracy"],
            "pruned": _json(prune)["summary"]["test_accuracy"],
            "onnx": {
                p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.onnx"))
            },
        }
    return out


@pytest.mark.slow
def test_ray_grid_on_two_workers_gives_the_serial_results(ray_cluster, tmp_path, fashion_data_dir):
    """Each Ray task trains with one thread (Ray's OMP_NUM_THREADS for a 1-CPU task), so the serial run gets one
    thread too: a float sum's order depends on the number of threads.

    The first config's results are byte for byte the serial run's. The second config's weights differ in the
    last bits (5e-6 here): in the serial run it trains in a process the first config already ran in, while its
    Ray task trains as if alone (the same bytes as `--configs <id>` run alone); its accuracies are the same."""
    address, env = ray_cluster
    timing = [
        "--batch-sizes",
        "1",
        "--iters",
        "3",
        "--rounds",
        "1",
    ]  # that the timing phase runs, not its figures
    ray_run = subprocess.run(
        _all(tmp_path / "ray", fashion_data_dir, *timing, "--executor", "ray", "--address", address),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert ray_run.returncode == 0, ray_run.stdout[-3000:] + ray_run.stderr[-3000:]
    serial = subprocess.run(
        # what the comparison reads (accuracies and ONNX bytes) comes from these stages: no timing here
        _all(tmp_path / "serial", fashion_data_dir, "--only", "train", "health", "prune", "export"),
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert serial.returncode == 0, serial.stdout[-3000:] + serial.stderr[-3000:]
    got, want = _results(tmp_path / "ray" / "smoke"), _results(tmp_path / "serial" / "smoke")
    for cfg in CONFIGS:
        assert got[cfg.id]["accuracy"] == want[cfg.id]["accuracy"]
        assert got[cfg.id]["pruned"] == want[cfg.id]["pruned"]
        assert (
            sorted(got[cfg.id]["onnx"])
            == sorted(want[cfg.id]["onnx"])
            == ["model.onnx", "prune_chip_b0.25_c0.25/model.onnx"]
        )
    assert got[CONFIGS[0].id]["onnx"] == want[CONFIGS[0].id]["onnx"]
    # The timing phase ran on the driver for every config, after the chains; the record holds every stage.
    for cfg in CONFIGS:
        folder = tmp_path / "ray" / "smoke" / cfg.id
        record = _json(folder / "pipeline.json")
        assert record["status"] == "complete"
        assert [k for k, v in record.items() if isinstance(v, dict)] == [
            "train",
            "health",
            "prune",
            "export",
            "time",
            "cpp",
        ]
        assert (folder / "latency.json").is_file() and (folder / "latency_cpp.json").is_file()
    assert _json(tmp_path / "ray" / "smoke" / "run.json")["preset"] == "smoke"
    assert (tmp_path / "ray" / "smoke" / "report.html").is_file()
    lines = ray_run.stdout.splitlines()
    done = [i for i, line in enumerate(lines) if line.startswith(("[1/2]", "[2/2]")) and "complete" in line]
    timing_phase = lines.index(next(line for line in lines if line.startswith("timing phase on the driver")))
    assert len(done) == 2 and max(done) < timing_phase  # progress per config; timing after every chain


@pytest.mark.slow
def test_ray_worker_killed_mid_config_is_retried_from_the_last_finished_stage(
    ray_cluster, tmp_path, fashion_data_dir
):
    address, env = ray_cluster
    target = tmp_path / "smoke" / CONFIGS[1].id
    chain = ["--only", "train", "health", "prune", "export"]
    proc = subprocess.Popen(
        _all(tmp_path, fashion_data_dir, *chain, "--executor", "ray", "--address", address),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 600
    while not (target / "metrics.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    workers = _processes_of(f"capsbench:{CONFIGS[1].id}")  # Ray names the worker's process after its task
    assert len(workers) == 1, (workers, proc.poll())
    os.kill(workers[0], signal.SIGKILL)
    # pipeline.json is written after every stage: the chain had not finished while export is unrecorded
    record = _json(target / "pipeline.json") if (target / "pipeline.json").exists() else {}
    assert "export" not in record and record.get("status") != "complete", "the kill came too late"
    trained = (target / "metrics.json").stat().st_mtime_ns
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    record = _json(target / "pipeline.json")
    assert record["status"] == "complete"
    assert record["train"]["up_to_date"] is True  # the retry found the training finished
    assert (target / "metrics.json").stat().st_mtime_ns == trained
    assert record["prune"]["status"] == record["export"]["status"] == "ok"
    assert (target / "model.onnx").is_file()
    assert _json(tmp_path / "smoke" / CONFIGS[0].id / "pipeline.json")["status"] == "complete"


@pytest.mark.slow
def test_ray_failing_config_is_recorded_and_the_others_finish(ray_cluster, tmp_path, fashion_data_dir):
    address, env = ray_cluster
    broken = tmp_path / "smoke" / CONFIGS[0].id
    broken.mkdir(parents=True)
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")  # its training cannot resume: CheckpointError
    chain = ["--only", "train", "health", "prune", "export"]
    done = subprocess.run(
        _all(tmp_path, fashion_data_dir, *chain, "--executor", "ray", "--address", address),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]  # a file the user must fix
    record = _json(broken / "pipeline.json")
    assert record["status"] == "failed" and record["train"]["status"] == "failed"
    assert record["train"]["error_type"] == "CheckpointError" and "corrupt" in record["train"]["error"]
    assert "health" not in record  # a failed training skips the stages that read its checkpoint
    assert "CheckpointError" in (broken / "error.txt").read_text()
    other = _json(tmp_path / "smoke" / CONFIGS[1].id / "pipeline.json")
    assert other["status"] == "complete" and (tmp_path / "smoke" / CONFIGS[1].id / "model.onnx").is_file()
    assert f"capsbench: error: {CONFIGS[0].id} train:" in done.stderr


def test_ray_executor_without_ray_says_how_to_install_it(tmp_path, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    refused = cli(["all", "--preset", "smoke", "--runs-dir", str(tmp_path), "--executor", "ray"])
    err = refused.err
    assert refused.code == 2 and err.count("\n") == 1
    assert "pip install 'capsbench[ray]'" in err
    assert not (tmp_path / "smoke").exists()  # nothing ran


def test_a_task_runs_every_thread_pool_on_the_cpus_it_reserved(tmp_path):
    """Ray reserves CPUs per task (a GPU task its GPU's share); inside the task torch and ONNX Runtime's CPU
    sessions (export's parity) use that many threads, not every core of the node, and the worker is restored."""
    import numpy as np
    import onnx
    import torch
    from onnx import TensorProto, helper

    from capsbench.export import sessions
    from capsbench.suite.executors.ray import _chain, cpus_per_task

    assert cpus_per_task(64, 8) == 8 and cpus_per_task(6, 4) == 1 and cpus_per_task(16, 0) == 1
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
        tmp_path / "m.onnx",
    )

    def run_one(cfg, names):  # what a chain's stages see
        s = sessions.make_session(tmp_path / "m.onnx", "cpu")  # as validate.parity makes it: no threads given
        s.run(np.ones((1, 2), np.float32))
        # a module that took default_threads by name (suite/timing.py does) sees the reservation too
        return (
            s.info["threads"],
            by_name(),
            torch.get_num_threads(),
            os.environ["OMP_NUM_THREADS"],
            cfg,
            names,
        )

    from capsbench.export.sessions import default_threads as by_name

    before, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    assert _chain(run_one, "cfg", ["train"], cpus=1) == (1, 1, 1, "1", "cfg", ["train"])
    assert torch.get_num_threads() == before and os.environ.get("OMP_NUM_THREADS") == omp
    assert sessions.make_session(tmp_path / "m.onnx", "cpu").info["threads"] == sessions.default_threads()
