"""Vanished capsules and learning: finite gradients where capsules are exactly zero, a 6-layer deep net that
trains to the end on real Fashion-MNIST, and every preset architecture beating chance after a short seeded run."""

import math

import pytest
import torch

from capsbench.models import CapsNet, CapsNetConfig, build_capsnet, capsule_length, margin_loss
from capsbench.models.layers import CapsLayer, caps_init_std, squash
from capsbench.suite import data


@pytest.fixture(scope="module")
def fashion_train(fashion_data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 6400 real Fashion-MNIST training images in [0, 1] and their labels."""
    x, y = data.load_split("fashion-mnist", "train", fashion_data_dir)
    return x[:6400].float() / 255.0, y[:6400]


@pytest.fixture(scope="module")
def fashion_test(fashion_data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.load_split("fashion-mnist", "test", fashion_data_dir)
    return x[:1000].float() / 255.0, y[:1000]


def _train(cfg: CapsNetConfig, x, y, steps: int, batch: int, seed: int = 0) -> tuple[CapsNet, list[float]]:
    torch.manual_seed(seed)
    net = build_capsnet(cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = margin_loss(CapsNet.lengths(net(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return net, losses


@torch.no_grad()
def _accuracy(net: CapsNet, x, y) -> float:
    net.eval()
    pred = torch.cat([CapsNet.lengths(net(x[i : i + 250])).argmax(1) for i in range(0, len(x), 250)])
    return (pred == y).float().mean().item()


def test_capsule_length_of_zero_capsules_has_zero_gradient():
    v = torch.zeros(3, 10, 16, requires_grad=True)
    capsule_length(v).sum().backward()
    assert torch.equal(v.grad, torch.zeros_like(v))
    # The plain norm this replaces: NaN gradient at zero (the bug this guards against).
    w = torch.zeros(3, 10, 16, requires_grad=True)
    torch.sqrt((w * w).sum(-1)).sum().backward()
    assert torch.isnan(w.grad).all()


def test_capsule_length_is_the_exact_norm_with_the_norms_gradient_elsewhere():
    v = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(capsule_length(v), v.norm(dim=-1))
    capsule_length(v).sum().backward()
    torch.testing.assert_close(v.grad, v.detach() / v.detach().norm(dim=-1, keepdim=True))
    # Underflowing squares (1e-30^2 = 0 in float32) count as zero: finite.
    tiny = torch.full((2, 8), 1e-30, requires_grad=True)
    capsule_length(tiny).sum().backward()
    assert torch.isfinite(tiny.grad).all()


def test_class_capsules_exactly_zero_give_finite_gradients():
    """A net whose class capsules are exactly 0 (zeroed class weights): the margin loss's gradient is finite
    everywhere; with the plain sqrt it was NaN and the suite called the run 'diverged'."""
    torch.manual_seed(0)
    net = build_capsnet(CapsNetConfig(backbone_channels=(8, 16, 32), primary_types=4, primary_dim=4))
    with torch.no_grad():
        net.caps_layers[-1].weight.zero_()
    x = torch.rand(4, 1, 28, 28)
    v = net(x)
    assert torch.count_nonzero(v) == 0
    loss = margin_loss(CapsNet.lengths(v), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert torch.isfinite(squash(torch.zeros(2, 3, 4))).all()


def test_coupled_init_keeps_the_pre_squash_length_order_one():
    """The derivation of caps_init_std("coupled") checked by sampling: unit inputs -> E|s_j|^2 = gain^2 under
    uniform coupling 1/out_caps, for a few shapes (1152 inputs included); fan_in is off by in_caps/out_caps^2."""
    from capsbench.models.layers import COUPLED_GAIN

    torch.manual_seed(0)
    for n_in, d_in, n_out, d_out in [(1152, 8, 10, 16), (16, 8, 16, 8), (288, 12, 8, 16)]:
        layer = CapsLayer(n_in, d_in, n_out, d_out, init="coupled")
        u = torch.nn.functional.normalize(torch.randn(64, n_in, d_in), dim=-1)
        s = layer.predictions(u).sum(dim=1) / n_out  # s_j = sum_i c_ij u_hat_j|i with c_ij = 1/out_caps
        msq = (s * s).sum(-1).mean().item()
        assert 0.7 * COUPLED_GAIN**2 < msq < 1.3 * COUPLED_GAIN**2, (n_in, msq)
    assert caps_init_std("fan_in", 1152, 8, 10, 16) == pytest.approx(1 / math.sqrt(8))
    assert caps_init_std("authors", 1152, 8, 10, 16) == 0.1


@pytest.mark.slow
def test_six_intermediate_layers_train_with_finite_loss_to_the_end(fashion_train):
    """6 intermediate capsule layers under the old fan_in init: the deep layers vanish, and with the plain norm
    training stopped at its second step. Trained 40 steps on real images, every loss is finite."""
    x, y = fashion_train
    for init in ("fan_in", "coupled"):
        cfg = CapsNetConfig(
            backbone_channels=(16, 32, 64),
            primary_types=8,
            primary_dim=8,
            intermediate=((16, 8),) * 6,
            caps_init=init,
        )
        net, losses = _train(cfg, x[:2000], y[:2000], steps=40, batch=64)
        assert len(losses) == 40 and all(math.isfinite(v) for v in losses), (init, losses)
        assert all(torch.isfinite(p).all() for p in net.parameters())


ARCHS = {
    "sahu-narrow-d0": CapsNetConfig(backbone_channels=(16, 32, 64), primary_types=8, primary_dim=8),
    "sahu-narrow-d3": CapsNetConfig(
        backbone_channels=(16, 32, 64), primary_types=8, primary_dim=8, intermediate=((16, 8),) * 3
    ),
    "sahu-p192": CapsNetConfig(primary_types=16, primary_dim=12),
    "sabour": CapsNetConfig(backbone="sabour", primary_types=32, primary_dim=8),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ARCHS))
def test_every_preset_architecture_learns(name, fashion_train, fashion_test):
    """80 seeded Adam steps (batch 64) on real Fashion-MNIST beat chance (10 %) by far under the default init:
    the `sabour` net sat at chance under fan_in (its 10x16 class capsules saturated the squash), the depth-3
    net under fan_in and authors (its class capsules vanished)."""
    x, y = fashion_train
    net, losses = _train(ARCHS[name], x, y, steps=80, batch=64)
    acc = _accuracy(net, *fashion_test)
    assert acc > 0.4, f"{name}: test accuracy {acc:.3f} after 80 steps (chance 0.1)"


@pytest.mark.slow
def test_the_cliff_under_fan_in_init_inactive_capsules_on_the_deep_side_only(fashion_train, fashion_test):
    """scripts/measure_cliff.py found the cliff of the fan_in init (16 x 8 capsules) between depth 2 and 3
    after one epoch on 6000 images: a reduced version (one depth each side, 60 steps) must show inactive
    capsules (mean and std of length < 0.01) in the deep net's last layers and none in the shallow net's."""
    from capsbench.models.health import capsule_health

    x, y = fashion_train
    xt, _ = fashion_test
    fractions = {}
    for depth in (1, 4):
        cfg = CapsNetConfig(
            backbone_channels=(16, 32, 64),
            primary_types=8,
            primary_dim=8,
            intermediate=((16, 8),) * depth,
            caps_init="fan_in",
        )
        net, losses = _train(cfg, x, y, steps=60, batch=64)
        assert all(math.isfinite(v) for v in losses)
        health = capsule_health(net, [xt[:500]])
        fractions[depth] = [layer["inactive_fraction"] for layer in health["layers"][1:]]
    assert fractions[1] == [0.0, 0.0], fractions
    assert fractions[4][-1] == 1.0 and fractions[4][-2] == 1.0, fractions
