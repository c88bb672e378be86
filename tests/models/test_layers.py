"""Capsule building blocks: squash, routing, PrimaryCaps layouts, the CapsNet builder's shapes."""

import torch

from capsbench.models import (
    CapsLayer,
    CapsNet,
    CapsNetConfig,
    PrimaryCaps,
    build_capsnet,
    dynamic_routing,
    squash,
)


def test_squash_lengths_lie_in_unit_interval_and_keep_direction():
    s = torch.randn(64, 10, 16, dtype=torch.float64) * torch.logspace(-4, 3, 64, dtype=torch.float64).view(
        64, 1, 1
    )
    v = squash(s)
    lengths = v.norm(dim=-1)
    assert (lengths >= 0).all() and (lengths < 1).all()
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    # |v| = |s|^2 / (1 + |s|^2)
    n = s.norm(dim=-1)
    assert torch.allclose(lengths, n**2 / (1 + n**2), rtol=1e-4, atol=1e-7)
    # float32 rounds |v| of a huge |s| to 1.0 but never above it
    assert (squash(s.float() * 1e3).norm(dim=-1) <= 1.0 + 1e-6).all()


def test_squash_of_zero_is_zero_without_nan():
    v = squash(torch.zeros(3, 4, 8))
    assert torch.equal(v, torch.zeros_like(v))


def test_routing_coefficients_sum_to_one_over_parent_capsules():
    u_hat = torch.randn(5, 32, 10, 16)
    for iters in (1, 3, 5):
        v, c = dynamic_routing(u_hat, iters)
        assert v.shape == (5, 10, 16) and c.shape == (5, 32, 10)
        assert torch.allclose(c.sum(dim=2), torch.ones(5, 32), atol=1e-6)


def test_routing_with_one_iteration_is_uniform_average():
    u_hat = torch.randn(2, 6, 3, 4)
    v, c = dynamic_routing(u_hat, 1)
    assert torch.allclose(c, torch.full_like(c, 1 / 3))
    assert torch.allclose(v, squash(u_hat.mean(dim=1) * 6 / 3))


def test_routing_agreement_raises_coupling_to_the_agreeing_parent():
    # Every input capsule predicts the same large vector for parent 0 and random noise for parent 1.
    torch.manual_seed(0)
    u_hat = torch.randn(1, 50, 2, 8) * 0.1
    u_hat[:, :, 0] = torch.ones(8)
    _, c = dynamic_routing(u_hat, 3)
    assert (c[0, :, 0] > 0.5).all()


def test_capsule_layer_matches_the_per_pair_matrix_definition():
    torch.manual_seed(0)
    layer = CapsLayer(in_caps=7, in_dim=4, out_caps=3, out_dim=5)
    u = torch.randn(2, 7, 4)
    w = layer.weight.view(7, 4, 3, 5)  # W_ij as (in_dim, out_dim) per pair
    expected = torch.stack([torch.stack([u[:, i] @ w[i, :, j] for j in range(3)], 1) for i in range(7)], 1)
    assert torch.allclose(layer.predictions(u), expected, atol=1e-6)


def test_capsule_layer_gradcheck_float64():
    torch.manual_seed(0)
    layer = CapsLayer(in_caps=4, in_dim=3, out_caps=2, out_dim=3, routing_iters=3).double()
    u = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (u,), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradcheck(
        lambda w: layer.__class__.forward(layer, u), (layer.weight,), eps=1e-6, atol=1e-5
    )


def test_primary_caps_sabour_layout_groups_channels_of_one_position():
    prim = PrimaryCaps(in_channels=2, types=3, dim=4, kernel_size=3, stride=2, layout="sabour")
    x = torch.randn(1, 2, 9, 9)
    raw = prim.conv(x)  # (1, 12, 4, 4)
    caps = prim(x)
    assert caps.shape == (1, 3 * 4 * 4, 4)
    # capsule of type 1 at position (2, 3) = channels 4..7 at (2, 3), squashed
    idx = 1 * 16 + 2 * 4 + 3
    assert torch.allclose(caps[0, idx], squash(raw[0, 4:8, 2, 3]), atol=1e-6)


def test_primary_caps_flat_layout_reads_neighbouring_values_of_one_channel():
    prim = PrimaryCaps(in_channels=2, types=3, dim=4, kernel_size=3, stride=2, layout="flat")
    x = torch.randn(1, 2, 9, 9)
    raw = prim.conv(x)
    assert torch.allclose(prim(x)[0, 0], squash(raw[0, 0, 0, :4]), atol=1e-6)


def test_net_with_k_intermediate_layers_has_k_plus_one_routed_layers():
    for k in range(0, 6):
        cfg = CapsNetConfig(
            backbone_channels=(8, 8, 16), primary_types=4, primary_dim=4, intermediate=((6, 5),) * k
        )
        net = build_capsnet(cfg)
        assert len(net.caps_layers) == k + 1
        assert len(net.capsule_modules()) == k + 2
        out = net(torch.rand(3, 1, 28, 28))
        assert out.shape == (3, 10, 16)
        assert (CapsNet.lengths(out) < 1).all()


def test_sahu_grid_is_6x6_and_sabour_net_has_sabour_parameter_count():
    sahu = CapsNetConfig()
    assert sahu.primary_grid == 6 and sahu.num_primary_caps == 16 * 36
    sabour = CapsNetConfig(backbone="sabour", primary_types=32, primary_dim=8)
    assert sabour.num_primary_caps == 1152
    # Sabour et al. report ~6.8M parameters without the decoder, ~8.2M with it.
    assert abs(build_capsnet(sabour).num_parameters() - 6.8e6) < 0.05e6
    with_decoder = build_capsnet(
        CapsNetConfig(backbone="sabour", primary_types=32, primary_dim=8, decoder=True)
    )
    assert abs(with_decoder.num_parameters(include_decoder=True) - 8.2e6) < 0.1e6


def test_cifar_sized_input_builds_the_right_grid():
    cfg = CapsNetConfig(
        in_channels=3, image_size=32, backbone_channels=(8, 8, 16), primary_types=4, primary_dim=4
    )
    assert build_capsnet(cfg)(torch.rand(2, 3, 32, 32)).shape == (2, 10, 16)
    assert cfg.primary_grid == 7


def test_decoder_reconstructs_image_shape_from_masked_capsules():
    cfg = CapsNetConfig(backbone_channels=(8, 8, 16), primary_types=4, primary_dim=4, decoder=True)
    net = build_capsnet(cfg)
    v = net(torch.rand(2, 1, 28, 28))
    assert net.decoder(v, torch.tensor([1, 2])).shape == (2, 1, 28, 28)
    assert net.decoder(v).shape == (2, 1, 28, 28)


def test_squash_and_lengths_of_bf16_capsules_are_computed_in_fp32():
    # Under bf16 autocast the matmuls hand squash bf16 capsules; squashing in bf16 would keep 8 significant bits.
    s = torch.randn(4, 10, 16) * 3
    s16 = s.bfloat16()
    v = squash(s16)
    assert v.dtype == torch.float32 and torch.equal(v, squash(s16.float()))
    lengths = CapsNet.lengths(s16)
    assert lengths.dtype == torch.float32 and torch.equal(lengths, CapsNet.lengths(s16.float()))
    # An fp32 capsule passes through untouched: no cast, so the fp32 net (and its ONNX graph) is unchanged.
    assert squash(s).dtype == torch.float32 and squash(s.double()).dtype == torch.float64


def test_routing_under_bf16_autocast_keeps_fp32_logits_and_finite_gradients_at_vanished_capsules():
    torch.manual_seed(0)
    layer = CapsLayer(in_caps=32, in_dim=8, out_caps=10, out_dim=16)
    u = torch.randn(4, 32, 8)
    u[0] = 0  # one image whose capsules all vanished: the safe norms must not turn its gradient into NaN
    u.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u_hat = layer.predictions(u)
        v, c = dynamic_routing(u_hat, 3)
        loss = CapsNet.lengths(v).sum()
    assert u_hat.dtype == torch.bfloat16  # autocast did reach the matmuls
    assert v.dtype == c.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(u.grad).all() and torch.isfinite(layer.weight.grad).all()
    v32, _ = dynamic_routing(layer.predictions(u.detach()), 3)
    assert torch.allclose(v, v32, atol=2e-2)


def _routing_on_the_transposed_view(u_hat, iters):
    """dynamic_routing as it was before its predictions were made contiguous: the same maths on a strided view."""
    u = u_hat.transpose(1, 2)
    b = torch.zeros(u.shape[:3], dtype=u.dtype)
    for i in range(iters):
        c = torch.softmax(b, dim=1)
        v = squash(torch.matmul(c.unsqueeze(2), u).squeeze(2))
        if i < iters - 1:
            b = b + torch.matmul(u, v.unsqueeze(-1)).squeeze(-1)
    return v, c.transpose(1, 2)


def test_contiguous_routing_layout_gives_the_same_outputs_and_gradients_as_the_strided_view():
    torch.manual_seed(0)
    u_hat = torch.randn(6, 40, 10, 16, requires_grad=True)
    grads = []
    outputs = []
    for routing in (dynamic_routing, _routing_on_the_transposed_view):
        v, c = routing(u_hat, 3)
        (g,) = torch.autograd.grad((v * torch.linspace(-1, 1, 16)).sum() + c.pow(2).sum(), u_hat)
        outputs.append((v, c))
        grads.append(g)
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-6)
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
