"""`capsbench train` (and `capsbench health`) on real Fashion-MNIST: accuracy, health, resume after a kill,
failures, and progress output that stays one line per epoch, stage-labelled, when stderr is a log file."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from capsbench.results import read_result
from capsbench.suite import train as training
from capsbench.suite.cli import main
from capsbench.suite.presets import get_preset

SMOKE = get_preset("smoke").configs()
SHALLOW = next(c for c in SMOKE if c.model.depth == 0)
DEEP = next(c for c in SMOKE if c.model.depth >= 3)


@pytest.fixture(scope="module")
def smoke_run(smoke_all_run, tmp_path_factory, fashion_data_dir, argv):
    """The smoke preset's nets as the session trained them once (`capsbench all --preset smoke`, the same
    train stage), copied, then `capsbench train --preset smoke` over the copy: the run folder and its exit code.
    Training them a second time here cost CI minutes and tested the same code on the same configs."""
    runs = tmp_path_factory.mktemp("runs")
    shutil.copytree(smoke_all_run, runs / "smoke")
    code = main(
        [
            "train",
            *argv.smoke(runs, fashion_data_dir),
            "--no-progress",
        ]
    )
    return runs / "smoke", code


def test_smoke_preset_trains_every_config_and_writes_its_files(smoke_run):
    run_dir, code = smoke_run
    assert code == 0
    assert read_result(run_dir / "run.json", "run")["preset"] == "smoke"
    for cfg in SMOKE:
        folder = run_dir / cfg.id
        for name in ("config.json", "checkpoint.pt", "metrics.json", "health.json"):
            assert (folder / name).is_file(), name
        assert read_result(folder / "config.json", "config")["config"] == json.loads(
            json.dumps(cfg.to_dict())
        )


def test_shallow_smoke_net_reaches_80_percent_on_real_fashion_mnist(smoke_run):
    run_dir, _ = smoke_run
    metrics = read_result(run_dir / SHALLOW.id / "metrics.json", "metrics")
    assert metrics["status"] == "complete"
    assert metrics["eval_images"] == 2000 and metrics["train_images"] == 12000
    assert metrics["test_accuracy"] >= 0.80, metrics["test_accuracy"]
    assert len(metrics["history"]) == SHALLOW.epochs
    assert metrics["environment"]["torch"] == torch.__version__


def test_deep_smoke_net_learns_well_above_chance(smoke_run):
    run_dir, _ = smoke_run
    assert read_result(run_dir / DEEP.id / "metrics.json", "metrics")["test_accuracy"] >= 0.5


def test_trained_shallow_net_has_active_class_capsules(smoke_run):
    run_dir, _ = smoke_run
    health = read_result(run_dir / SHALLOW.id / "health.json", "health")
    layers = {layer["name"]: layer for layer in health["layers"]}
    assert list(layers) == ["primary", "class"]
    assert layers["class"]["inactive"] == 0 and layers["class"]["num_capsules"] == 10
    assert layers["class"]["samples"] == 2000
    assert health["threshold"] == 0.01


def test_deep_net_health_reports_every_routed_layer(smoke_run):
    run_dir, _ = smoke_run
    health = read_result(run_dir / DEEP.id / "health.json", "health")
    assert [layer["name"] for layer in health["layers"]] == [
        "primary",
        "intermediate1",
        "intermediate2",
        "intermediate3",
        "class",
    ]
    for layer in health["layers"]:
        assert 0 <= layer["inactive"] <= layer["inactive_mean_only"] <= layer["num_capsules"]
        assert len(layer["per_capsule_mean"]) == layer["num_capsules"]


def test_rerun_skips_finished_configs(smoke_run, fashion_data_dir, cli, argv):
    run_dir, _ = smoke_run
    before = (run_dir / SHALLOW.id / "checkpoint.pt").stat().st_mtime_ns
    rerun = cli(
        [
            "train",
            *argv.smoke(run_dir.parent, fashion_data_dir),
            "--no-progress",
            "--configs",
            SHALLOW.id,
        ]
    )
    assert rerun.code == 0
    assert (run_dir / SHALLOW.id / "checkpoint.pt").stat().st_mtime_ns == before  # no training happened
    out = rerun.out
    assert SHALLOW.id in out and "train: cached" in out, out


def test_health_command_remeasures_at_another_threshold(smoke_run, fashion_data_dir, cli):
    run_dir, _ = smoke_run
    assert (
        cli(
            [
                "health",
                str(run_dir),
                "--threshold",
                "0.5",
                "--output",
                "health_t05.json",
                "--data-dir",
                str(fashion_data_dir),
            ]
        ).code
        == 0
    )
    loose = read_result(run_dir / DEEP.id / "health_t05.json", "health")
    strict = read_result(run_dir / DEEP.id / "health.json", "health")
    assert loose["threshold"] == 0.5
    for a, b in zip(loose["layers"], strict["layers"], strict=True):
        assert a["inactive"] >= b["inactive"]


def _train_cmd(runs: Path, data_dir: Path, epochs: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "capsbench.suite.cli",
        "train",
        "--preset",
        "smoke",
        "--configs",
        SHALLOW.id,
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(data_dir),
        "--epochs",
        str(epochs),
        "--train-subset",
        "2000",
        "--eval-subset",
        "300",
        "--no-progress",
    ]


@pytest.mark.timing
@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_from_last_checkpoint(tmp_path, fashion_data_dir):
    cfg = SHALLOW.replace(epochs=3, train_subset=2000, eval_subset=300)
    killed_runs, clean_runs = tmp_path / "killed", tmp_path / "clean"
    ckpt = killed_runs / "smoke" / cfg.id / "checkpoint.pt"
    proc = subprocess.Popen(
        _train_cmd(killed_runs, fashion_data_dir, 3), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 900  # generous: CI machines can be loaded
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ckpt.exists(), proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)  # epoch 1 is saved, epoch 2 has begun
    proc.wait()
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] < 3, "the kill came too late to test resuming"
    assert not (ckpt.parent / "metrics.json").exists()
    # A kill can leave a temp file behind, but never one that looks like a result: hidden, ending in .tmp.
    # (health_init.json is finished before training starts: health at initialisation, a result of its own.)
    finished = ("config.json", "checkpoint.pt", "health_init.json")
    leftovers = [p.name for p in ckpt.parent.iterdir() if p.name not in finished]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers

    done = subprocess.run(_train_cmd(killed_runs, fashion_data_dir, 3), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = read_result(ckpt.parent / "metrics.json", "metrics")
    assert resumed["resumed_from_epoch"] == state["epoch"] + 1
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][: state["epoch"]] == state["history"]

    # Resuming gives exactly the result of an uninterrupted run (seeded, per-epoch shuffles).
    clean = subprocess.run(_train_cmd(clean_runs, fashion_data_dir, 3), capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    uninterrupted = read_result(clean_runs / "smoke" / cfg.id / "metrics.json", "metrics")
    assert [h["test_acc"] for h in uninterrupted["history"]] == [h["test_acc"] for h in resumed["history"]]


@pytest.mark.slow
def test_diverging_config_is_recorded_and_the_run_goes_on(tmp_path, fashion_data_dir, monkeypatch, cli, argv):
    real_loss = training.margin_loss
    calls = {"n": 0}

    def exploding_loss(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss  # the first config blows up at step 3

    monkeypatch.setattr(training, "margin_loss", exploding_loss)
    train = cli(
        [
            "train",
            *argv.smoke(tmp_path, fashion_data_dir),
            *argv.one_epoch(600, 200),
            "--no-progress",
        ]
    )
    assert train.code == 1
    cfgs = [c.replace(epochs=1, train_subset=600, eval_subset=200) for c in SMOKE]
    first = read_result(tmp_path / "smoke" / cfgs[0].id / "metrics.json", "metrics")
    assert first["status"] == "diverged" and "nan" in first["error"] and "step 3" in first["error"]
    assert read_result(tmp_path / "smoke" / cfgs[1].id / "metrics.json", "metrics")["status"] == "complete"
    assert "diverged" in train.out


def test_corrupt_checkpoint_gives_one_clear_line(tmp_path, fashion_data_dir, cli, argv):
    cfg = SHALLOW.replace(epochs=1, train_subset=300, eval_subset=100)
    folder = tmp_path / "smoke" / cfg.id
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"not a checkpoint")
    train = cli(
        [
            "train",
            "--preset",
            "smoke",
            "--configs",
            cfg.id,
            "--runs-dir",
            str(tmp_path),
            "--data-dir",
            str(fashion_data_dir),
            *argv.one_epoch(300, 100),
            "--no-progress",
        ]
    )
    err = train.err
    assert train.code == 2
    assert "checkpoint.pt: corrupt or unreadable checkpoint" in err and "--force" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--preset", "nope"],
            "unknown preset 'nope'; known presets: smoke, depth, quick, paper, sabour",
        ),
        (["train", "--configs", "zzzz"], "no config of preset 'smoke' matches"),
        (["health", "/nonexistent/run"], "no trained configs here"),
    ],
)
def test_bad_input_gives_a_clear_error_and_exit_2(argv, message, cli):
    refused = cli(argv)
    assert refused.code == 2
    assert message in refused.err


@pytest.mark.slow
def test_progress_in_a_log_is_one_labelled_line_per_epoch(tmp_path, fashion_data_dir, capfd, cli):
    """Training and fine-tuning with progress on, stderr captured (not a terminal): no carriage-return bar
    updates, one line per epoch, each naming its stage."""
    deep = next(c for c in get_preset("smoke").configs() if c.model.depth >= 3)
    cfg = deep.replace(train_subset=500, eval_subset=200, epochs=1)
    common = ["--preset", "smoke", "--configs", cfg.id, "--runs-dir", str(tmp_path), "--data-dir"]
    common += [str(fashion_data_dir), "--train-subset", "500", "--eval-subset", "200", "--epochs", "1"]
    train = cli(["train", *common])
    assert train.code == 0
    out, err = train.out, train.err
    assert "\r" not in err and len(err.splitlines()) <= 2, err[-2000:]
    epoch_lines = [line for line in out.splitlines() if "epoch 1/1" in line]
    assert len(epoch_lines) == 1 and epoch_lines[0].split()[:2] == ["train", cfg.id], out

    prune = ["--backbone", "0.25", "--caps", "0.25", "--score-images", "128", "--finetune-epochs", "2"]
    pruned = cli(["prune", *common, *prune])
    assert pruned.code == 0
    out, err = pruned.out, pruned.err
    assert "\r" not in err and len(err.splitlines()) <= 2, err[-2000:]
    epoch_lines = [line for line in out.splitlines() if " epoch " in line]
    assert [line.split()[:4] for line in epoch_lines] == [
        ["finetune", cfg.id, "epoch", "1/2:"],
        ["finetune", cfg.id, "epoch", "2/2:"],
    ], out
