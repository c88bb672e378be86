"""`capsbench bench train`: the training-step benchmark's FLOP count, its step, and its result file."""

import pytest
import torch
from torch import nn

from capsbench.models import build_capsnet
from capsbench.models.pruning import count_flops
from capsbench.results import read_result
from capsbench.suite import trainbench
from capsbench.suite.presets import get_preset

SABOUR = get_preset("sabour").configs()[0]
SMOKE = get_preset("smoke").configs()


def test_train_gflop_counts_three_forwards_and_the_decoder():
    model = build_capsnet(SABOUR.model)
    m = SABOUR.model
    forward = count_flops(model, (m.in_channels, m.image_size, m.image_size))
    decoder = 16 * 10 * 512 + 512 * 1024 + 1024 * 28 * 28
    assert trainbench.forward_macs(model)["decoder"] == decoder
    assert trainbench.train_gflop_per_image(model) == pytest.approx(3 * 2 * (forward + decoder) / 1e9)


def test_the_benchmarked_step_updates_every_parameter(fashion_data_dir):
    cfg = SABOUR.replace(batch_size=4)
    torch.manual_seed(0)
    model = build_capsnet(cfg.model).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = trainbench.preloaded_batch(cfg, torch.device("cpu"), fashion_data_dir)
    assert x.dtype == torch.float32 and float(x.min()) >= 0 and float(x.max()) <= 1 and x.shape[0] == 4
    trainbench.make_step(model, cfg)(x, y)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"the step left these parameters alone: {unchanged}"
    assert any(isinstance(m, nn.Linear) for m in model.decoder.modules())


@pytest.mark.slow
def test_bench_train_cli_writes_a_train_bench_result(tmp_path, fashion_data_dir, cli):
    out = tmp_path / "train_bench.json"
    args = ["bench", "train", "--preset", "smoke", "--backend", "eager", "--steps", "2", "--warmup", "0"]
    bench = cli([*args, "--device", "cpu", "--data-dir", str(fashion_data_dir), "--out", str(out)])
    assert bench.code == 0
    result = read_result(out, "train_bench")
    assert result["schema_version"] >= 1 and result["gemm"]["gflops_per_s"] > 0
    (row,) = result["rows"]
    assert row["status"] == "ok" and row["backend"] == "eager" and row["batch"] == SMOKE[0].batch_size
    assert row["config_id"] == trainbench.heaviest_config("smoke").id
    assert row["gflops_per_s"] == pytest.approx(row["images_per_s"] * row["train_gflop_per_image"])
    assert row["gemm_fraction"] == pytest.approx(row["gflops_per_s"] / result["gemm"]["gflops_per_s"])
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s_p50"])


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_one(fashion_data_dir):
    cfg = next(c for c in SMOKE if c.model.depth == 0).replace(batch_size=32)
    x, y = trainbench.preloaded_batch(cfg, torch.device("cpu"), fashion_data_dir)
    rows = {
        backend: trainbench.bench_config(
            cfg, x, y, backend=backend, device=torch.device("cpu"), warmup=1, steps=2
        )
        for backend in trainbench.BACKENDS
    }
    assert rows["compiled"]["status"] == "ok", rows["compiled"].get("error")
    assert rows["compiled"]["final_loss"] == pytest.approx(rows["eager"]["final_loss"], rel=1e-3)


def test_a_channels_last_step_trains_like_the_contiguous_one(fashion_data_dir):
    cfg = next(c for c in SMOKE if c.model.depth == 0).replace(batch_size=32)
    x, y = trainbench.preloaded_batch(cfg, torch.device("cpu"), fashion_data_dir)
    rows = [
        trainbench.bench_config(
            cfg, x, y, backend="eager", device=torch.device("cpu"), warmup=1, steps=2, channels_last=cl
        )
        for cl in (False, True)
    ]
    assert [r["memory_format"] for r in rows] == ["contiguous", "channels_last"]
    assert rows[1]["status"] == "ok", rows[1].get("error")
    assert rows[1]["final_loss"] == pytest.approx(rows[0]["final_loss"], rel=1e-4)


@pytest.mark.slow
def test_the_benchmark_runs_under_the_timing_harness_precision_policy(fashion_data_dir):
    """fp32 is IEEE fp32 while the steps (and the GEMM rate) are timed, as in the timing harness, recorded in the
    result and restored afterwards; TF32 only when asked for, and then recorded as such."""
    from capsbench.export.latency import _tf32_knobs

    knobs = _tf32_knobs()
    before = [getattr(o, a) for o, a, _, _ in knobs]
    seen = []

    def progress(line):  # called inside the sweep, after each row
        if "img/s" in line or "error" in line:
            seen.append([getattr(o, a) for o, a, _, _ in knobs])

    kw = dict(backends=("eager",), warmup=0, steps=1, data_dir=fashion_data_dir, progress=progress)
    result = trainbench.run_train_bench(["smoke"], **kw)
    assert seen == [[v for _, _, v, _ in knobs]]  # IEEE while the step ran
    assert [getattr(o, a) for o, a, _, _ in knobs] == before
    assert result["precision_policy"]["torch_tf32"] is False and result["precision_policy"]["fp32"] == "ieee"
    assert set(result["precision_policy"]["torch_settings"]) == {name for *_, name in knobs}

    seen.clear()
    result = trainbench.run_train_bench(["smoke"], tf32=True, **kw)
    assert seen == [["tf32" if a == "fp32_precision" else True for _, a, _, _ in knobs]]
    assert result["precision_policy"]["torch_tf32"] is True and result["precision_policy"]["fp32"] == "tf32"
    assert [getattr(o, a) for o, a, _, _ in knobs] == before
