"""Channel pruning: CHIP and L1 scores, the CCM loss, exact structural surgery on real Fashion-MNIST images,
parameter and FLOP counts, and a pruned deep net that trains, saves, reloads and passes the health probes."""

import dataclasses

import pytest
import torch
from torch import nn

from capsbench.models import CapsNet, CapsNetConfig, build_capsnet, margin_loss
from capsbench.models.health import capsule_health
from capsbench.models.losses import ccm_loss
from capsbench.models.pruning import (
    FeatureMaps,
    PrimaryUnits,
    backbone_blocks,
    chip_scores,
    chip_scores_svd,
    count_flops,
    flop_breakdown,
    graft_capsule_layers,
    l1_scores,
    prune_capsnet,
    score_capsnet,
)
from capsbench.suite import data
from capsbench.suite.checkpoints import save_torch
from capsbench.suite.presets import RunConfig
from capsbench.suite.train import load_model, model_from_state

# fan_in: the scale `_lively` was tuned for (the surgery tests compare outputs at float32 tolerances).
SMALL = CapsNetConfig(
    backbone_channels=(8, 16, 32),
    primary_types=8,
    primary_dim=8,
    intermediate=((6, 6),) * 2,
    caps_init="fan_in",
)


@pytest.fixture(scope="module")
def fashion_test_images(fashion_data_dir) -> tuple[torch.Tensor, torch.Tensor]:
    """96 real Fashion-MNIST test images as float in [0, 1], and their labels."""
    x, y = data.load_split("fashion-mnist", "test", fashion_data_dir)
    return x[:96].float() / 255.0, y[:96]


def _lively(cfg: CapsNetConfig, seed: int = 0) -> CapsNet:
    """A random net whose capsules are not vanishingly short (a plain random deep net's class capsules are
    ~1e-17 long, which would make any output comparison trivially true): random BN statistics and affine
    parameters, scaled-up capsule weights. Eval mode."""
    torch.manual_seed(seed)
    net = build_capsnet(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) * 0.1 + 0.02)
        for layer in net.caps_layers:
            layer.weight.mul_(3.0)
    return net


def _zeroed_outputs(net: CapsNet, plan: dict, x: torch.Tensor) -> torch.Tensor:
    """The unpruned net's class capsules with the plan's removed channels zeroed (post-ReLU backbone
    activations; PrimaryCaps conv outputs, bias included)."""
    by_name = {layer["name"]: layer for layer in plan["layers"]}

    def zero(channels):
        def hook(_m, _i, out):
            out = out.clone()
            out[:, channels] = 0.0
            return out

        return hook

    handles = [
        block.register_forward_hook(zero(by_name[name]["removed"])) for name, block in backbone_blocks(net)
    ]
    handles.append(net.primary.conv.register_forward_hook(zero(by_name["primary"]["removed_channels"])))
    try:
        with torch.no_grad():
            return net(x)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------- CHIP


def test_chip_gram_form_equals_naive_svd_form_in_both_modes_and_shapes():
    torch.manual_seed(0)
    for shape in [(6, 12, 5, 5), (6, 20, 3, 3)]:  # fewer channels than positions, and more
        maps = torch.relu(torch.randn(*shape))
        for mode in ("per_image", "batch_mean"):
            fast, slow = chip_scores(maps, mode), chip_scores_svd(maps, mode)
            assert fast.shape == (shape[1],)
            torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-6 * float(slow.abs().max()))


def test_chip_scores_a_copied_or_combined_channel_lowest():
    torch.manual_seed(0)
    maps = torch.randn(4, 8, 8, 8)
    maps[:, 5] = maps[:, 2]  # an exact copy: channels 2 and 5 carry one direction between them
    assert set(chip_scores(maps).argsort()[:2].tolist()) == {2, 5}
    maps = torch.randn(4, 8, 8, 8)
    maps[:, 6] = 0.5 * maps[:, 1] - 0.3 * maps[:, 3]  # a linear combination of channels 1 and 3
    scores = chip_scores(maps)
    assert scores.argmin().item() == 6
    assert set(scores.argsort()[:3].tolist()) == {1, 3, 6}


def test_l1_scores_are_the_filter_l1_norms():
    w = torch.zeros(3, 2, 3, 3)
    w[0, 0, 0, 0], w[1] = -2.0, 0.5
    assert l1_scores(w).tolist() == [2.0, 9.0, 0.0]


@pytest.mark.slow
def test_score_capsnet_gives_one_score_per_channel_of_each_conv(fashion_test_images):
    x, _ = fashion_test_images
    net = _lively(SMALL)
    batches = [x[:32], x[32:64]]
    for criterion in ("chip", "chip-mean", "l1"):
        scores = score_capsnet(net, batches, criterion, capsules=True)
        assert [scores[f"backbone.{i}"].shape[0] for i in range(3)] == [8, 16, 32]
        assert scores["primary"].shape == (64,)
        assert scores["intermediate1"].shape == (6,) and (scores["intermediate1"] > 0).all()
    # per_image CHIP of the streamed batches equals CHIP of all maps at once
    with FeatureMaps(backbone_blocks(net)[:1]) as rec:
        net(x[:64])
        whole = chip_scores(rec.maps["backbone.0"])
    torch.testing.assert_close(score_capsnet(net, batches, "chip")["backbone.0"], whole)


# ---------------------------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("layout", ["sabour", "flat"])
def test_pruned_net_equals_unpruned_net_with_removed_channels_zeroed(layout, fashion_test_images):
    x, _ = fashion_test_images
    net = _lively(dataclasses.replace(SMALL, primary_layout=layout))
    scores = score_capsnet(net, [x[:48], x[48:]], "chip")
    pruned, plan = prune_capsnet(net, 0.5, 0.5, scores)
    assert pruned.cfg.conv_channels == (4, 8, 16) and pruned.cfg.primary_types == 4
    with torch.no_grad():
        got = pruned.eval()(x)
    want = _zeroed_outputs(net, plan, x)
    assert CapsNet.lengths(want).mean() > 0.05  # outputs worth comparing
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert not torch.allclose(net(x), got, atol=1e-3)  # and pruning did change something


def test_lowest_scoring_channels_and_types_are_removed():
    net = _lively(SMALL)
    scores = {f"backbone.{i}": torch.arange(c, 0, -1).float() for i, c in enumerate((8, 16, 32))}
    primary = torch.ones(64)
    primary[8:16] = 0.0  # type 1 lowest, then type 6
    primary[48:56] = 0.5
    scores["primary"] = primary
    _, plan = prune_capsnet(net, 0.25, 0.25, scores)
    layers = {layer["name"]: layer for layer in plan["layers"]}
    assert layers["backbone.0"]["removed"] == [6, 7]
    assert layers["backbone.2"]["removed"] == list(range(24, 32))
    assert layers["primary"]["removed_units"] == [1, 6]
    assert layers["primary"]["removed_channels"] == [*range(8, 16), *range(48, 56)]


def test_flat_layout_units_keep_capsules_whole():
    # 6x6 grid: dim 12 divides 36 (1 channel per unit), dim 8 does not (aligned pairs of channels)
    flat12 = CapsNetConfig(primary_types=4, primary_dim=12, primary_layout="flat")
    flat8 = CapsNetConfig(primary_types=4, primary_dim=8, primary_layout="flat")
    assert PrimaryUnits.of(flat12) == PrimaryUnits(channels=1, caps=3, count=48)
    assert PrimaryUnits.of(flat8) == PrimaryUnits(channels=2, caps=9, count=16)
    assert PrimaryUnits.of(CapsNetConfig(primary_types=4, primary_dim=8)) == PrimaryUnits(8, 36, 4)


def test_ratio_zero_is_the_identity(fashion_test_images):
    x, _ = fashion_test_images
    net = _lively(SMALL)
    same, plan = prune_capsnet(net, 0.0, 0.0, score_capsnet(net, None, "l1"))
    assert same.cfg == net.cfg and same.num_parameters() == net.num_parameters()
    assert plan["parameters_before"] == plan["parameters_after"]
    with torch.no_grad():
        assert torch.equal(same.eval()(x), net(x))


def test_every_layer_keeps_at_least_one_channel_and_type():
    net = _lively(SMALL)
    pruned, _ = prune_capsnet(net, 0.99, 0.99, score_capsnet(net, None, "l1"))
    assert pruned.cfg.conv_channels == (1, 1, 1) and pruned.cfg.primary_types == 1
    assert pruned(torch.rand(2, 1, 28, 28)).shape == (2, 10, 16)


def test_parameter_and_flop_counts_fall_by_the_hand_computed_amounts():
    net = _lively(SMALL)
    pruned, plan = prune_capsnet(net, 0.5, 0.5, score_capsnet(net, None, "l1"))

    def params(c1, c2, c3, types):
        convs = 9 * (1 * c1 + c1 * c2 + c2 * c3) + 2 * (c1 + c2 + c3)  # no conv bias; BN gamma, beta
        primary = types * 8 * c3 * 9 + types * 8
        caps = types * 36 * 8 * 36 + 6 * 6 * 36 + 6 * 6 * 160
        return convs + primary + caps

    def flops(c1, c2, c3, types):
        convs = 28 * 28 * c1 * 1 * 9 + 14 * 14 * c2 * c1 * 9 + 14 * 14 * c3 * c2 * 9
        primary = 36 * types * 8 * c3 * 9
        # (in caps, in dim, out caps, out dim) per routed layer; routing: 3 weighted sums + 2 agreements
        layers = [(types * 36, 8, 6, 6), (6, 6, 6, 6), (6, 6, 10, 16)]
        caps = sum(n_in * n_out * d_out * (d_in + 5) for n_in, d_in, n_out, d_out in layers)
        return convs + primary + caps

    assert net.num_parameters() == plan["parameters_before"] == params(8, 16, 32, 8)
    assert pruned.num_parameters() == plan["parameters_after"] == params(4, 8, 16, 4)
    assert count_flops(net, (1, 28, 28)) == flops(8, 16, 32, 8)
    assert count_flops(pruned, (1, 28, 28)) == flops(4, 8, 16, 4)
    parts = flop_breakdown(net, (1, 1, 28, 28))
    assert parts["routing"] == 5 * (288 * 6 * 6 + 6 * 6 * 6 + 6 * 10 * 16)


def test_capsule_pruning_removes_intermediate_capsules_and_reinit_replaces_caps_weights():
    net = _lively(SMALL)
    scores = score_capsnet(net, [torch.rand(8, 1, 28, 28)], "chip", capsules=True)
    scores["intermediate1"] = torch.tensor([5.0, 0.0, 5.0, 5.0, 5.0, 5.0])
    scores["intermediate2"] = torch.tensor([0.0, 5.0, 5.0, 5.0, 5.0, 5.0])
    pruned, plan = prune_capsnet(net, 0.0, 0.0, scores, intermediate_ratio=0.2)
    assert pruned.cfg.intermediate == ((5, 6), (5, 6))
    assert {layer["name"]: layer for layer in plan["layers"]}["intermediate1"]["removed"] == [1]
    w0 = net.caps_layers[0].weight.view(288, 8, 6, 6)
    keep = [0, 2, 3, 4, 5]
    assert torch.equal(pruned.caps_layers[0].weight.view(288, 8, 5, 6), w0[:, :, keep])
    w1 = net.caps_layers[1].weight.view(6, 6, 6, 6)
    assert torch.equal(pruned.caps_layers[1].weight.view(5, 6, 5, 6), w1[keep][:, :, 1:])
    w2 = net.caps_layers[2].weight
    assert torch.equal(pruned.caps_layers[2].weight, w2[1:])  # class capsules all kept
    fresh, _ = prune_capsnet(net, 0.0, 0.0, scores, reinit_caps_layers=True)
    assert not torch.equal(fresh.caps_layers[0].weight, net.caps_layers[0].weight)
    assert torch.equal(fresh.primary.conv.weight, net.primary.conv.weight)


# ---------------------------------------------------------------------------------------------- CCM


def test_ccm_is_zero_for_decorrelated_channels_and_large_for_correlated_ones():
    torch.manual_seed(0)
    a = torch.randn(64, 8)
    q, _ = torch.linalg.qr(a - a.mean(dim=0))  # 8 centred, orthonormal columns: correlation exactly 0
    decorrelated = q.T.reshape(1, 8, 8, 8).repeat(4, 1, 1, 1)  # (batch, C, H, W)
    base = torch.randn(1, 1, 8, 8)
    correlated = base + 0.05 * torch.randn(4, 8, 8, 8)
    low = ccm_loss([decorrelated], off_diagonal=True).item()
    assert low < 0.05
    assert ccm_loss([correlated], off_diagonal=True).item() > 0.9
    # the code's form includes the diagonal: 1/C more for decorrelated channels; layers add up
    assert abs(ccm_loss([decorrelated]).item() - (1 / 8 + low * 56 / 64)) < 1e-4
    two = ccm_loss([decorrelated, correlated]).item()
    assert abs(two - ccm_loss([decorrelated]).item() - ccm_loss([correlated]).item()) < 1e-5


def test_ccm_gradients_flow_unless_detached():
    maps = torch.randn(4, 6, 5, 5, requires_grad=True)
    ccm_loss([maps]).backward()
    assert maps.grad is not None and maps.grad.abs().sum() > 0 and torch.isfinite(maps.grad).all()
    dead = torch.zeros(4, 6, 5, 5)
    dead[:, :3] = torch.randn(4, 3, 5, 5)
    dead.requires_grad_(True)
    ccm_loss([dead]).backward()  # a constant channel gives 0 correlation, not NaN
    assert torch.isfinite(dead.grad).all()
    detached = ccm_loss([torch.randn(4, 6, 5, 5, requires_grad=True)], detach=True)
    assert not detached.requires_grad


def test_ccm_blocks_cover_the_primary_caps_conv_output_as_the_papers_code(fashion_test_images):
    """ccm_blocks adds the PrimaryCaps conv (types*dim channels, pre-squash) to the backbone blocks: the CCM
    term then has a gradient on the PrimaryCaps conv weights; over the backbone alone it has none there."""
    from capsbench.models.pruning import ccm_blocks

    x, _ = fashion_test_images
    net = _lively(SMALL).train()
    assert [n for n, _ in ccm_blocks(net)] == ["backbone.0", "backbone.1", "backbone.2", "primary"]
    assert [n for n, _ in ccm_blocks(net, primary=False)] == [n for n, _ in backbone_blocks(net)]
    for primary in (True, False):
        net.zero_grad()
        with FeatureMaps(ccm_blocks(net, primary), detach=False) as rec:
            net(x[:16])
            maps = list(rec.maps.values())
        assert maps[-1].shape[1] == (64 if primary else 32)
        ccm_loss(maps).backward()
        grad = net.primary.conv.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == primary


# ---------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_pruned_deep_net_trains_saves_reloads_and_passes_health(tmp_path, fashion_data_dir):
    x, y = data.load_split("fashion-mnist", "train", fashion_data_dir)
    x, y = x[:256].float() / 255.0, y[:256]
    torch.manual_seed(0)
    net = build_capsnet(SMALL)
    scores = score_capsnet(net, [x[:64], x[64:128]], "chip")
    pruned, _ = prune_capsnet(net, 0.5, 0.25, scores, reinit_caps_layers=True)
    opt = torch.optim.Adam(pruned.parameters(), lr=1e-3)
    pruned.train()
    losses = []
    for step in range(4):
        xb, yb = x[step * 64 : (step + 1) * 64], y[step * 64 : (step + 1) * 64]
        with FeatureMaps(backbone_blocks(pruned), detach=False) as rec:
            lengths = CapsNet.lengths(pruned(xb))
            loss = margin_loss(lengths, yb) - 0.01 * ccm_loss(list(rec.maps.values()))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    run_cfg = RunConfig(model=SMALL)
    path = save_torch(
        tmp_path / "pruned.pt",
        {"config_id": run_cfg.id, "model_config": pruned.cfg.to_dict(), "model": pruned.state_dict()},
    )
    reloaded = load_model(run_cfg, path).eval()
    assert reloaded.cfg == pruned.cfg and reloaded.cfg.primary_types == 6
    pruned.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x[:16]), pruned(x[:16]))
    assert model_from_state(torch.load(path, weights_only=False), SMALL).cfg == pruned.cfg
    health = capsule_health(reloaded, [x[:64], x[64:128]])
    assert [layer["num_capsules"] for layer in health["layers"]] == [6 * 36, 6, 6, 10]


# ---------------------------------------------------------------------------------------------- capsule layers


def test_removing_a_capsule_that_is_always_zero_changes_no_output_of_the_next_layer(fashion_test_images):
    """Capsule 2 of intermediate1 has zero incoming weights, so its pose is 0 on every image. Surgery drops its
    weight columns in layer 1 and its input slot in layer 2: layer 2 and everything after it compute exactly
    what they computed before from the surviving capsules. (Layer 1 itself re-normalises its couplings over
    one parent fewer, softmax over parents; that change is the point of pruning, not a surgery error.)"""
    x, _ = fashion_test_images
    cfg = dataclasses.replace(SMALL, intermediate=((6, 6),))  # the ratio applies to every intermediate layer
    net = _lively(cfg)
    with torch.no_grad():
        w = net.caps_layers[0].weight.view(288, 8, 6, 6)
        w[:, :, 2].zero_()
    scores = score_capsnet(net, [x[:32]], "chip", capsules=True)
    assert int(scores["intermediate1"].argmin()) == 2  # a zero pose has CHIP score 0
    pruned, plan = prune_capsnet(net, 0.0, 0.0, scores, intermediate_ratio=0.1)  # int(6 * 0.1) = 0
    assert pruned.cfg.intermediate == cfg.intermediate
    pruned, plan = prune_capsnet(net, 0.0, 0.0, scores, intermediate_ratio=0.2)  # one of 6
    assert {la["name"]: la for la in plan["layers"]}["intermediate1"]["removed"] == [2]
    with torch.no_grad():
        u1 = net.caps_layers[0](net.primary(net.features(x)))  # (N, 6, 6)
        assert torch.count_nonzero(u1[:, 2]) == 0
        keep = [0, 1, 3, 4, 5]
        after_old = net.caps_layers[1](u1)
        after_new = pruned.caps_layers[1](u1[:, keep])
    assert after_old.abs().max() > 0.05  # not trivially equal
    torch.testing.assert_close(after_new, after_old, rtol=0, atol=1e-6)
    # The parameters fall as counted by hand: layer 1 loses 288 inputs x 8 dims x 6 dims of capsule 2's
    # columns; the class layer loses capsule 2's row of 6 dims x (10 classes x 16 dims).
    assert plan["parameters_before"] - plan["parameters_after"] == 288 * 8 * 6 + 6 * 10 * 16
    assert net.num_parameters() - pruned.num_parameters() == 14784


def test_capsule_scores_do_not_simply_rank_by_length(fashion_test_images):
    """CHIP on unit-normalised poses is blind to length: scaling one capsule's incoming weights (its length,
    not its direction) leaves its CHIP score; the 'length' criterion moves it. Random and weight_norm give
    one finite score per capsule, random reproducibly per seed."""
    x, _ = fashion_test_images
    net = _lively(SMALL)
    base = score_capsnet(net, [x[:32]], "l1", capsules=True)["intermediate1"]
    base_len = score_capsnet(net, [x[:32]], "l1", capsules=True, capsule_criterion="length")["intermediate1"]
    with torch.no_grad():
        net.caps_layers[0].weight.view(288, 8, 6, 6)[:, :, 3].mul_(0.2)
    lens = score_capsnet(net, [x[:32]], "l1", capsules=True, capsule_criterion="length")["intermediate1"]
    assert lens[3] < 0.9 * base_len[3]
    # The other capsules' poses change too (routing is shared), so compare capsule 3's rank, not its value.
    moved = score_capsnet(net, [x[:32]], "l1", capsules=True)["intermediate1"]
    assert torch.isfinite(moved).all() and (moved > 0).all() and base.shape == (6,)
    r1 = score_capsnet(net, None, "l1", capsules=True, capsule_criterion="random", seed=1)
    r1b = score_capsnet(net, None, "l1", capsules=True, capsule_criterion="random", seed=1)
    r2 = score_capsnet(net, None, "l1", capsules=True, capsule_criterion="random", seed=2)
    assert torch.equal(r1["intermediate2"], r1b["intermediate2"])
    assert not torch.equal(r1["intermediate1"], r2["intermediate1"])
    wn = score_capsnet(net, None, "l1", capsules=True, capsule_criterion="weight_norm")["intermediate1"]
    w_in = net.caps_layers[0].weight.view(288, 8, 6, 6)[:, :, 3].double().norm()
    w_out = net.caps_layers[1].weight.view(6, -1)[3].double().norm()
    assert wn[3].item() == pytest.approx((w_in * w_out).item())


def test_pruning_primary_types_of_a_backbone_that_follows_p_keeps_the_surviving_widths(fashion_test_images):
    """With backbone_width='follow_p' the default widths move with primary_types: the pruned config must write
    the surviving widths out, not fall back to a default computed from the smaller P."""
    x, _ = fashion_test_images
    cfg = CapsNetConfig(primary_types=8, primary_dim=8, backbone_width="follow_p", intermediate=((6, 6),))
    net = _lively(cfg)
    scores = score_capsnet(net, [x[:16]], "l1")
    pruned, _ = prune_capsnet(net, 0.0, 0.5, scores)
    assert pruned.cfg.primary_types == 4 and pruned.cfg.conv_channels == (16, 32, 64)
    assert [b[0].out_channels for b in pruned.backbone] == [16, 32, 64]
    with torch.no_grad():
        assert pruned(x[:4]).shape == (4, 10, 16)


# ---------------------------------------------------------------------------------------------- the authors' build


def test_grafting_keeps_the_pruned_backbone_and_draws_the_deeper_capsule_layers_afresh(fashion_test_images):
    """The authors' procedure: the deeper net's backbone and PrimaryCaps are the pruned base's, weights and
    BatchNorm statistics; its capsule layers are exactly a fresh seeded init of the deeper shape; ratio 0 keeps the
    whole backbone."""
    x, _ = fashion_test_images
    base_cfg = dataclasses.replace(SMALL, intermediate=())
    base = _lively(base_cfg)
    deeper = dataclasses.replace(SMALL, intermediate=((6, 6),) * 3)
    for ratio in (0.5, 0.0):
        scores = score_capsnet(base, [x[:32]], "l1")
        pruned, _ = prune_capsnet(base, ratio, ratio, scores)
        torch.manual_seed(11)
        net = graft_capsule_layers(pruned, deeper)
        torch.manual_seed(11)
        fresh = build_capsnet(net.cfg)
        assert (
            net.cfg.intermediate == deeper.intermediate and net.cfg.primary_types == pruned.cfg.primary_types
        )
        assert net.cfg.conv_channels == pruned.cfg.conv_channels
        state, src, init = net.state_dict(), pruned.state_dict(), fresh.state_dict()
        for k, v in state.items():
            expected = src[k] if k.startswith(("backbone.", "primary.")) else init[k]
            assert torch.equal(v, expected), k
        if ratio == 0.0:  # nothing pruned: the whole trained backbone, every channel
            assert pruned.cfg.conv_channels == base_cfg.conv_channels
            for k, v in base.state_dict().items():
                if k.startswith(("backbone.", "primary.")):
                    assert torch.equal(state[k], v), k
        with (
            torch.no_grad()
        ):  # the built net runs on real images and its class capsules are the deeper shape's
            assert net.eval()(x[:4]).shape == (4, deeper.num_classes, deeper.class_dim)


def test_grafting_refuses_nets_of_another_capsule_dimension():
    base = build_capsnet(dataclasses.replace(SMALL, intermediate=()))
    with pytest.raises(ValueError, match="primary_dim"):
        graft_capsule_layers(base, dataclasses.replace(SMALL, primary_dim=16))
