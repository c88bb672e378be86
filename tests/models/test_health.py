"""Activation health: the inactive-capsule rule and the probes on real models."""

import torch

from capsbench.models import CapsNetConfig, build_capsnet
from capsbench.models.health import capsule_health, layer_health


def test_layer_health_counts_capsules_with_low_mean_and_std_as_inactive():
    lengths = torch.full((100, 4), 0.5)
    lengths[:, 1] = 0.001  # dead: mean and std tiny
    lengths[:, 2] = torch.tensor([0.0] * 99 + [0.5])  # mean 0.005 but std 0.05: not dead, but mean-only dead
    lengths[:, 3] = torch.linspace(0, 0.9, 100)
    stats = layer_health(lengths, threshold=0.01)
    assert stats["inactive"] == 1
    assert stats["inactive_mean_only"] == 2
    assert stats["inactive_fraction"] == 0.25
    assert stats["per_capsule_mean"][1] == 0.001
    assert sum(stats["histogram"]["counts"]) == 400
    assert stats["percentiles"]["p50"] <= stats["percentiles"]["p99"]


def test_threshold_is_configurable():
    lengths = torch.full((10, 3), 0.03)
    assert layer_health(lengths, threshold=0.01)["inactive"] == 0
    assert layer_health(lengths, threshold=0.05)["inactive"] == 3


def test_capsules_forced_to_zero_are_counted_inactive():
    torch.manual_seed(0)
    cfg = CapsNetConfig(
        backbone_channels=(8, 8, 16), primary_types=4, primary_dim=4, intermediate=((6, 5),) * 2
    )
    net = build_capsnet(cfg)
    with torch.no_grad():
        net.caps_layers[
            1
        ].weight.zero_()  # second intermediate layer predicts nothing: all its capsules are 0
    health = capsule_health(net, [torch.rand(16, 1, 28, 28), torch.rand(16, 1, 28, 28)])
    names = [layer["name"] for layer in health["layers"]]
    assert names == ["primary", "intermediate1", "intermediate2", "class"]
    by_name = {layer["name"]: layer for layer in health["layers"]}
    assert by_name["intermediate2"]["inactive"] == 6 and by_name["intermediate2"]["inactive_fraction"] == 1.0
    assert by_name["class"]["inactive"] == 10  # nothing to route from zero capsules
    assert by_name["primary"]["samples"] == 32
    assert health["routed_inactive"] >= 16


def test_probe_removes_its_hooks_and_restores_training_mode():
    net = build_capsnet(CapsNetConfig(backbone_channels=(8, 8, 16), primary_types=4, primary_dim=4))
    net.train()
    capsule_health(net, [torch.rand(4, 1, 28, 28)])
    assert net.training
    assert not net.primary._forward_hooks and not net.caps_layers[0]._forward_hooks


def test_init_health_uses_batch_statistics_and_leaves_the_net_as_it_was():
    """Untrained BatchNorm running stats (0, 1) shrink the backbone in eval mode: at init the primary capsules
    look near-dead there, not with batch statistics. The running stats, counters and modes stay untouched."""
    from capsbench.models.health import init_health

    torch.manual_seed(0)
    net = build_capsnet(CapsNetConfig(backbone_channels=(8, 16, 32), primary_types=4, primary_dim=8))
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = [torch.rand(32, 1, 28, 28), torch.rand(32, 1, 28, 28)]
    train_view = init_health(net, x)
    eval_view = capsule_health(net, x)
    assert net.training and all(m.training for m in net.modules())
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    prim_train = train_view["layers"][0]["mean_length"]
    prim_eval = eval_view["layers"][0]["mean_length"]
    assert train_view["batchnorm"] == "batch statistics" and eval_view["batchnorm"] == "running statistics"
    assert prim_train > 2 * prim_eval, (prim_train, prim_eval)
    # Batch statistics are exactly what a training-mode forward computes (no dropout in the net).
    with torch.no_grad():
        probe_len = net.primary(net.features(x[0])).norm(dim=-1).mean().item()
    net.load_state_dict(before)
    one = init_health(net, [x[0]])["layers"][0]["mean_length"]
    assert abs(one - probe_len) < 1e-5
