"""The CUDA paths on a real GPU: ONNX Runtime's CUDA provider against torch, IOBinding on the device, CUDA graphs
with every node on the CUDA provider, and training on CUDA. `scripts/gpu-check.sh` runs them (pytest -m cuda).

Without a GPU that both torch and ONNX Runtime's CUDA provider can use, every test here skips with one reason.
The C++ runner's CUDA tests (`--io-binding`, `--cuda-graph`) are in test_cpp_runner.py, cuda-marked and skipped
with the same reason.
"""

import copy

import numpy as np
import pytest
import torch

from capsbench.export import make_session, parity
from capsbench.export.latency import fp32_torch
from capsbench.export.sessions import CUDA
from capsbench.models import CapsNet, CapsNetConfig, build_capsnet, margin_loss
from capsbench.suite import data
from capsbench.suite.doctor import cuda_missing
from capsbench.suite.gpucheck import placement_by_op, placement_summary

MISSING = cuda_missing()
SMALL_NET = CapsNetConfig(backbone="sahu", backbone_channels=(8, 16, 32), primary_types=8, primary_dim=8)
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(MISSING is not None, reason=f"needs CUDA: {MISSING}")]


def test_ort_cuda_session_matches_torch_on_the_gpu(exported, fashion):
    e = exported["deep"]
    s = make_session(e.path, "cuda")
    assert s.provider == CUDA and s.info["fallback"] is None
    model = copy.deepcopy(e.model).cuda()  # torch on the GPU too (TF32 off, as in ORT's session)
    with fp32_torch():
        result = parity(e.path, model, fashion["test_x"], session=s)  # raises ParityError on a mismatch
    assert result["provider"] == CUDA and result["argmax_agreement"] == 1.0


def test_iobinding_keeps_inputs_and_outputs_on_the_gpu(exported, fashion):
    s = make_session(exported["shallow"].path, "cuda")
    images = fashion["test_x"][:8].numpy()
    run, sync = s.runner(images)  # IOBinding is the default on CUDA
    assert sync is not None
    outs = run()
    sync()
    assert run.inputs.device_name().lower() == "cuda"
    assert [o.device_name().lower() for o in outs] == ["cuda"] * len(s.output_names)
    np.testing.assert_allclose(outs[0].numpy(), s.run(images), atol=1e-5)


def test_cuda_graph_runs_every_node_on_cuda_and_replays_new_inputs(exported, fashion):
    path = exported["deep"].path
    x, y = fashion["test_x"][:4].numpy(), fashion["test_x"][4:8].numpy()
    placement = placement_summary(placement_by_op(path, x[:1], provider="cuda"))
    # Shape arithmetic (ints read from host memory) may stay on CPU; no tensor may cross between devices.
    assert placement["all_compute_on_cuda"], f"off the CUDA provider: {placement}"

    reference = make_session(path, "cuda")
    assert not np.allclose(reference.run(x), reference.run(y))  # so a stale replay cannot pass
    s = make_session(path, "cuda", cuda_graph=True)
    assert s.info["cuda_graph"] is True
    run, sync = s.runner(x)
    for _ in range(3):  # ORT runs, captures, then replays
        outs = run()
    sync()
    np.testing.assert_allclose(outs[0].numpy(), reference.run(x), atol=1e-5)
    run.inputs.update_inplace(np.ascontiguousarray(y))  # same device buffer, new contents
    outs = run()
    sync()
    np.testing.assert_allclose(outs[0].numpy(), reference.run(y), atol=1e-5)


def train_steps(device: str, data_dir, steps: int = 100, batch: int = 64) -> tuple[CapsNet, float]:
    """A small CapsNet trained with Adam on real Fashion-MNIST; its accuracy on 1000 test images."""
    train_x, train_y = data.load_split("fashion-mnist", "train", data_dir)
    test_x, test_y = data.load_split("fashion-mnist", "test", data_dir)
    torch.manual_seed(0)
    model = build_capsnet(SMALL_NET).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(steps):
        x = train_x[i * batch : (i + 1) * batch].to(device).float() / 255
        loss = margin_loss(CapsNet.lengths(model(x)), train_y[i * batch : (i + 1) * batch].to(device))
        assert torch.isfinite(loss), f"loss {loss.item()} at step {i}"
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = CapsNet.lengths(model(test_x[:1000].to(device).float() / 255)).argmax(1).cpu()
    return model, float((pred == test_y[:1000]).float().mean())


def test_training_on_cuda_beats_chance(fashion_data_dir):
    model, accuracy = train_steps("cuda", fashion_data_dir)
    assert all(p.is_cuda for p in model.parameters())
    assert accuracy > 0.5, f"test accuracy {accuracy:.3f} after 100 steps (chance: 0.1)"
