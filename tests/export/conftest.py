"""Small CapsNets briefly trained on real Fashion-MNIST and exported once per session, for the export tests.

A few Adam steps make the capsule lengths meaningful (random nets give near-zero lengths), so parity compares
real predictions. Three shapes: shallow, deep (3 intermediate layers) and a pruned-shaped net.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from capsbench.export import export_onnx
from capsbench.models import CapsNet, CapsNetConfig, build_capsnet, margin_loss
from capsbench.suite import data

# caps_init pinned to the scheme these parity tolerances were set with (the models' default is now "coupled").
SMALL = dict(
    backbone="sahu", backbone_channels=(8, 16, 32), primary_types=8, primary_dim=8, caps_init="fan_in"
)
CONFIGS = {
    "shallow": CapsNetConfig(**SMALL),
    "deep": CapsNetConfig(**SMALL, intermediate=((8, 8),) * 3),
    # What channel pruning leaves: uneven conv widths and fewer capsule types than the config it came from.
    "pruned": CapsNetConfig(backbone="sahu", backbone_channels=(6, 13, 27), primary_types=5, primary_dim=8),
}
TRAIN_STEPS, TRAIN_BATCH = 10, 32


@dataclass
class Exported:
    name: str
    model: CapsNet
    path: Path
    info: dict


@pytest.fixture(scope="session")
def fashion(fashion_data_dir) -> dict[str, torch.Tensor]:
    """Real images as float in [0, 1]: 2048 training and 256 test images, with their labels."""
    train_x, train_y = data.load_split("fashion-mnist", "train", fashion_data_dir)
    test_x, test_y = data.load_split("fashion-mnist", "test", fashion_data_dir)
    n = TRAIN_STEPS * TRAIN_BATCH
    return {
        "train_x": train_x[:n].float() / 255,
        "train_y": train_y[:n],
        "test_x": test_x[:256].float() / 255,
        "test_y": test_y[:256],
    }


def briefly_trained(cfg: CapsNetConfig, fashion: dict, steps: int = TRAIN_STEPS) -> CapsNet:
    torch.manual_seed(0)
    model = build_capsnet(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for i in range(steps):
        x = fashion["train_x"][i * TRAIN_BATCH : (i + 1) * TRAIN_BATCH]
        y = fashion["train_y"][i * TRAIN_BATCH : (i + 1) * TRAIN_BATCH]
        loss = margin_loss(CapsNet.lengths(model(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def exported(tmp_path_factory, fashion) -> dict[str, Exported]:
    """name -> the briefly trained net and its ONNX export (each in its own folder)."""
    out = {}
    for name, cfg in CONFIGS.items():
        model = briefly_trained(cfg, fashion)
        path = tmp_path_factory.mktemp(name) / "model.onnx"
        info = export_onnx(model, path, fashion["test_x"][:2])
        out[name] = Exported(name, model, path, info)
    return out
