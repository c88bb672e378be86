"""`capsbench all`: every stage end to end on real data, resume after kills, failures recorded per config."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsbench.suite import train as training
from capsbench.suite.presets import get_preset

SMOKE = get_preset("smoke").configs()
SHALLOW = next(c for c in SMOKE if c.model.depth == 0)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.slow
def test_all_runs_every_stage_for_every_config(smoke_all_run):
    assert _json(smoke_all_run / "run.json")["preset"] == "smoke"
    for cfg in SMOKE:
        folder = smoke_all_run / cfg.id
        record = _json(folder / "pipeline.json")
        assert record["status"] == "complete"
        assert {k: v["status"] for k, v in record.items() if isinstance(v, dict)} == {
            "train": "ok",
            "health": "ok",
            "prune": "ok",
            "export": "ok",
            "time": "ok",
            "cpp": "ok",
        }
        for name in (
            "checkpoint.pt",
            "metrics.json",
            "health.json",
            "model.onnx",
            "export.json",
            "parity.json",
            "latency.json",
            "latency_cpp.json",
        ):
            assert (folder / name).is_file(), name
        prune_dir = next(folder.glob("prune_chip_b0.25_c0.25"))
        assert (prune_dir / "health_pruned.json").is_file() and (prune_dir / "pruned.pt").is_file()
        assert _json(folder / "parity.json")["passed"] is True
        assert not (folder / "error.txt").exists()
        backends = {r["backend"] for r in _json(folder / "latency.json")["rows"]}
        assert {"torch_eager", "ort_cpu"} <= backends
        cpp = _json(folder / "latency_cpp.json")
        assert all(p["passed"] for p in cpp["parity"].values())
        # The runner's own placement check reaches the result: every exported net's compute ran on the CPU EP.
        assert cpp["runner"] and all(
            r["placement"]["all_compute_on_provider"] for r in cpp["runner"].values()
        )
        assert {r["variant"] for r in cpp["rows"]} == {
            r["variant"] for r in _json(folder / "latency.json")["rows"]
        }
        for lat in (_json(folder / "latency.json"), cpp):  # every row kept each fresh process's calls
            ok = [r for r in lat["rows"] if r["status"] == "ok"]
            assert lat["settings"]["min_rounds"] == 2 and lat["settings"]["rounds"] == 3  # smoke's budget
            assert ok and all(len(r["round_samples_ms"]) == r["rounds"] <= lat["rounds"] for r in ok)
            assert 2 <= lat["rounds"] <= 3
            # Two rounds only when they agreed: every measurement stable in both (and their gated figures
            # within 10 %: tests/export/test_timing.py); three otherwise.
            for r in ok:
                if r["rounds"] == 2:
                    assert all(r["round_stable"]), r
        python = _json(folder / "latency.json")
        assert python["rounds_agreed_early"] is (python["rounds"] == 2)
        assert python["precision"]["torch_tf32"] is False  # one precision policy: fp32 on both sides
    assert (smoke_all_run / "report.html").is_file()


def _all_cmd(runs: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "capsbench.suite.cli",
        "all",
        *["--preset", "smoke", "--runs-dir", str(runs), "--data-dir", str(data_dir)],  # fmt: skip
        "--batch-sizes",
        "1",
        "8",
        "--iters",
        "5",
        "--no-progress",
        *extra,
    ]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.mark.timing
@pytest.mark.slow
def test_all_killed_during_training_resumes_from_the_last_epoch(tmp_path, fashion_data_dir):
    extra = [
        "--configs",
        SHALLOW.id,
        "--epochs",
        "2",
        "--train-subset",
        "1500",
        "--eval-subset",
        "300",
        "--only",
        "train",
    ]
    cfg = SHALLOW.replace(epochs=2, train_subset=1500, eval_subset=300)
    ckpt = tmp_path / "smoke" / cfg.id / training.CHECKPOINT_FILE
    proc = _start(_all_cmd(tmp_path, fashion_data_dir, *extra))
    deadline = time.time() + 900
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists(), proc.stdout.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (ckpt.parent / "metrics.json").exists(), "the kill came too late"
    done = subprocess.run(_all_cmd(tmp_path, fashion_data_dir, *extra), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    metrics = _json(ckpt.parent / "metrics.json")
    assert metrics["status"] == "complete" and metrics["resumed_from_epoch"] == 2


@pytest.mark.slow
def test_all_killed_during_timing_resumes_without_redoing_finished_stages(
    smoke_all_run, tmp_path, fashion_data_dir
):
    runs = tmp_path / "runs"
    shutil.copytree(smoke_all_run, runs / "smoke")
    target = runs / "smoke" / SMOKE[-1].id
    for name in ("latency.json", "latency_cpp.json", "pipeline.json"):
        (target / name).unlink()
    kept = {
        p: p.stat().st_mtime_ns
        for p in [
            target / "checkpoint.pt",
            target / "model.onnx",
            *target.glob("prune_*/prune.json"),
            *target.glob("prune_*/pruned.pt"),
        ]
    }
    proc = _start(_all_cmd(runs, fashion_data_dir))
    deadline = time.time() + 900  # the Python timing stage of the last config is done: the C++ one starts now
    while not (target / "latency.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (target / "latency.json").exists(), proc.stdout.read()[-3000:]
    assert not (target / "latency_cpp.json").exists(), "the kill came too late"
    kept[target / "latency.json"] = (target / "latency.json").stat().st_mtime_ns
    done = subprocess.run(_all_cmd(runs, fashion_data_dir), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # nothing finished was redone
    assert (target / "latency.json").is_file() and (target / "latency_cpp.json").is_file()
    record = _json(target / "pipeline.json")
    assert record["status"] == "complete"
    assert {k for k, v in record.items() if isinstance(v, dict) and v["up_to_date"]} == {
        "train",
        "health",
        "prune",
        "export",
        "time",
    }  # the killed run had finished all of these; only the C++ timing was left
    assert "report: " in done.stdout


@pytest.mark.slow
def test_a_failing_config_is_recorded_and_the_run_goes_on(tmp_path, fashion_data_dir, monkeypatch, cli, argv):
    real_loss = training.margin_loss
    calls = {"n": 0}

    def exploding_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(training, "margin_loss", exploding_loss)
    run = cli(
        [
            "all",
            *argv.smoke(tmp_path, fashion_data_dir),
            *argv.one_epoch(400, 200),
            "--only",
            "train",
            "report",
            "--no-progress",
        ]
    )
    assert run.code == 1
    cfgs = [c.replace(epochs=1, train_subset=400, eval_subset=200) for c in SMOKE]
    first = _json(tmp_path / "smoke" / cfgs[0].id / "pipeline.json")
    assert first["status"] == "failed" and first["train"]["status"] == "failed"
    assert first["train"]["error_type"] == "DivergenceError" and "loss became nan" in first["train"]["error"]
    assert "health" not in first  # a failed training skips the stages that read its checkpoint
    assert "DivergenceError" in (tmp_path / "smoke" / cfgs[0].id / "error.txt").read_text()
    assert _json(tmp_path / "smoke" / cfgs[0].id / "metrics.json")["status"] == "diverged"
    assert _json(tmp_path / "smoke" / cfgs[1].id / "pipeline.json")["status"] == "complete"
    assert "FAILED" in run.out and "report: " in run.out
    assert "plan: " not in run.out  # one config step (the run-level step aside): nothing to explain
    assert "diverged" in (tmp_path / "smoke" / "report.html").read_text()


@pytest.mark.slow
def test_seeds_option_trains_each_config_with_n_seeds(tmp_path, fashion_data_dir, cli, argv):
    run = cli(
        [
            "all",
            "--preset",
            "smoke",
            "--configs",
            SHALLOW.id,
            "--runs-dir",
            str(tmp_path),
            "--data-dir",
            str(fashion_data_dir),
            *argv.one_epoch(300, 100),
            "--seeds",
            "2",
            "--only",
            "train",
            "report",
            "--no-progress",
        ]
    )
    assert run.code == 0
    seeds = sorted(_json(p)["config"]["seed"] for p in (tmp_path / "smoke").glob("*/config.json"))
    assert seeds == [0, 1]
    assert "Mean ± std over seeds" in (tmp_path / "smoke" / "report.html").read_text()


@pytest.mark.slow
def test_an_unavailable_provider_fails_each_config_without_a_traceback(tmp_path, fashion_data_dir, cli):
    """`all --provider cuda` on a machine without CUDA: every config's timing stages are recorded as failed
    (message in pipeline.json, traceback in error.txt), no config stops the others, one line per failure."""
    common = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--data-dir", str(fashion_data_dir)]
    tiny = ["--epochs", "1", "--train-subset", "64", "--eval-subset", "32", "--no-progress"]
    assert cli(["all", *common, *tiny, "--only", "train", "export"]).code == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the provider is available")
    timing = ["--batch-sizes", "1", "--iters", "2"]
    captured = cli(["all", *common, *tiny, *timing, "--only", "time", "cpp", "--provider", "cuda"])
    assert captured.code == 2 and "Traceback" not in captured.err
    cfgs = [c.replace(epochs=1, train_subset=64, eval_subset=32) for c in SMOKE]
    assert captured.err.count("\n") == 2 * len(cfgs)  # time and cpp of every config
    for cfg in cfgs:
        record = _json(tmp_path / "smoke" / cfg.id / "pipeline.json")
        assert record["status"] == "failed"
        assert record["time"]["status"] == "failed" and "cuda" in record["time"]["error"].lower()
        assert record["export"]["status"] == "ok"  # the earlier command's record is kept
        assert "Traceback" in (tmp_path / "smoke" / cfg.id / "error.txt").read_text()
