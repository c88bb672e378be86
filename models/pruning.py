"""Structured channel pruning of CapsNets: CHIP and L1 channel scores, structural surgery, FLOP counts.

Scores are pure functions of feature maps or weights; `prune_capsnet` builds a new, smaller dense CapsNet.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from capsbench.models.capsnet import CapsNet, build_capsnet
from capsbench.models.config import CapsNetConfig
from capsbench.models.hooks import ForwardHooks
from capsbench.models.layers import capsule_length

# "chip": per-image CHIP on post-ReLU maps, averaged (Sui et al. 2021); "chip-mean": CHIP of the
# batch-averaged map (the paper's code); "l1": L1 norm of each filter (a data-free baseline).
CRITERIA = ("chip", "chip-mean", "l1")
CHIP_MODES = ("per_image", "batch_mean")
# Scores of the intermediate (routed) capsules, for `prune_capsnet(..., intermediate_ratio=...)`:
# "chip": CHIP on each image's (caps, dim) matrix of unit-normalised poses, averaged over images: a capsule whose
# direction the others' span already holds scores low, however long it is; "weight_norm": the Frobenius norm of
# its incoming transformation weights times that of its outgoing ones (data-free); "random": a seeded random
# order (the control); "length": its mean length, which removes the dead capsules first, so "fewer inactive
# capsules" follows by construction: kept only to reproduce earlier runs.
CAPSULE_CRITERIA = ("chip", "weight_norm", "random", "length")
# Elements of the batched (matrices, k, k) Gram tensor handed to one eigvalsh call: bounds memory (~128 MB).
_CHUNK_ELEMENTS = 1 << 24


# ---------------------------------------------------------------------------------------------- scores


def nuclear_norm_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """‖A‖_* from G = A Aᵀ (or Aᵀ A), batched over leading dims: the sum of sqrt of G's eigenvalues."""
    # Rounding leaves tiny negative eigenvalues on rank-deficient Grams: clamp before the sqrt.
    return torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt().sum(dim=-1)


def _chip_per_matrix(a: torch.Tensor) -> torch.Tensor:
    """a (n, C, P) -> (n, C): ‖A‖_* − ‖A with row i zeroed‖_* for every matrix and row, exactly.

    Uses the smaller Gram: for C <= P, zeroing row i of A zeroes row and column i of A Aᵀ (C x C); for
    C > P, it subtracts the rank-one a_i a_iᵀ from Aᵀ A (P x P). All C leave-one-out norms of a matrix are
    then one batched eigvalsh, chunked over matrices to bound memory.
    """
    n, c, p = a.shape
    k = min(c, p)
    per_call = max(1, _CHUNK_ELEMENTS // (c * k * k))
    if c <= p:
        keep = 1.0 - torch.eye(c, dtype=a.dtype, device=a.device)  # row i: the rows kept when i is zeroed
        mask = keep[:, :, None] * keep[:, None, :]  # (C, C, C)
    out = []
    for start in range(0, n, per_call):
        x = a[start : start + per_call]  # (m, C, P)
        if c <= p:
            gram = x @ x.transpose(1, 2)  # (m, C, C)
            loo = gram[:, None] * mask  # (m, C, C, C): Gram with row+column i zeroed
        else:
            gram = x.transpose(1, 2) @ x  # (m, P, P)
            loo = gram[:, None] - x[:, :, :, None] * x[:, :, None, :]  # (m, C, P, P)
        full = nuclear_norm_from_gram(gram)  # (m,)
        out.append(full[:, None] - nuclear_norm_from_gram(loo))  # (m, C)
    return torch.cat(out)


def chip_scores(
    feature_maps: torch.Tensor, mode: str = "per_image", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """CHIP channel-independence scores (C,) of one layer's feature maps (N, C, H, W) or (N, C, H*W).

    "per_image" (the original CHIP) scores each image's (C, H*W) matrix and averages over images;
    "batch_mean" (the paper's code) scores the batch-averaged map once. Low score = redundant channel.
    Computed in float64 by default: the score is a small difference of two large sums.
    """
    if mode not in CHIP_MODES:
        raise ValueError(f"unknown CHIP mode {mode!r}; choose one of {CHIP_MODES}")
    a = feature_maps.detach().flatten(2).to(dtype)  # (N, C, P)
    if mode == "batch_mean":
        a = a.mean(dim=0, keepdim=True)  # (1, C, P)
    return _chip_per_matrix(a).mean(dim=0)


def chip_scores_svd(feature_maps: torch.Tensor, mode: str = "per_image") -> torch.Tensor:
    """The naive CHIP: one SVD per (image, channel). A reference for `chip_scores`; C times slower or more."""
    if mode not in CHIP_MODES:
        raise ValueError(f"unknown CHIP mode {mode!r}; choose one of {CHIP_MODES}")
    a = feature_maps.detach().flatten(2).double()  # (N, C, P)
    if mode == "batch_mean":
        a = a.mean(dim=0, keepdim=True)
    full = torch.linalg.svdvals(a).sum(dim=-1)  # (N,)
    scores = []
    for i in range(a.shape[1]):
        zeroed = a.clone()
        zeroed[:, i] = 0.0
        scores.append(full - torch.linalg.svdvals(zeroed).sum(dim=-1))
    return torch.stack(scores, dim=1).mean(dim=0)  # (C,)


def l1_scores(conv_weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of every output filter: (C_out, C_in, kh, kw) -> (C_out,). The classic magnitude baseline."""
    return conv_weight.detach().abs().flatten(1).sum(dim=1)


def capsule_chip_scores(poses: torch.Tensor) -> torch.Tensor:
    """CHIP of capsules: poses (N, caps, dim) -> (caps,) mean over images of ‖A‖_* − ‖A without row j‖_*,
    A the image's (caps, dim) matrix of unit-normalised poses (a zero pose stays zero and scores 0).

    Normalising first makes the score independent of the lengths: a short capsule whose direction no other
    capsule spans scores as high as a long one, so the order is not simply "dead first"."""
    p = poses.detach().double()
    n = capsule_length(p, keepdim=True)
    unit = torch.where(n > 0, p / n.clamp_min(1e-300), torch.zeros_like(p))
    return chip_scores(unit, "per_image")


def capsule_scores_without_data(model: CapsNet, criterion: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """ "intermediate{k}" scores of the data-free capsule criteria: "weight_norm" (‖incoming W‖_F * ‖outgoing
    W‖_F of each capsule) and "random" (uniform, from a generator seeded with `seed`)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (layer, nxt) in enumerate(zip(model.caps_layers[:-1], model.caps_layers[1:], strict=True)):
        if criterion == "random":
            out[f"intermediate{k + 1}"] = torch.rand(layer.out_caps, generator=g, dtype=torch.float64)
        elif criterion == "weight_norm":
            w_in = layer.weight.detach().view(layer.in_caps, layer.in_dim, layer.out_caps, layer.out_dim)
            w_out = nxt.weight.detach().view(nxt.in_caps, -1)
            incoming = w_in.double().pow(2).sum(dim=(0, 1, 3)).sqrt()
            outgoing = w_out.double().pow(2).sum(dim=1).sqrt()
            out[f"intermediate{k + 1}"] = (incoming * outgoing).cpu()
        else:
            raise ValueError(f"capsule criterion {criterion!r} needs data")
    return out


# ---------------------------------------------------------------------------------------------- feature maps


class FeatureMaps(ForwardHooks):
    """Context manager: forward hooks keeping the latest output of each named module in `maps`.

    With detach=False the maps stay in the autograd graph (for a loss on them, e.g. CCM).
    """

    def __init__(self, modules: Sequence[tuple[str, nn.Module]], detach: bool = True):
        super().__init__(modules)
        self.detach = detach
        self.maps: dict[str, torch.Tensor] = {}

    def record(self, name: str, output: torch.Tensor) -> None:
        self.maps[name] = output.detach() if self.detach else output

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self.maps = {}


def backbone_blocks(model: CapsNet) -> list[tuple[str, nn.Module]]:
    """(name, block) of every backbone conv block: its output is the post-ReLU feature map."""
    return [(f"backbone.{i}", block) for i, block in enumerate(model.backbone)]


def ccm_blocks(model: CapsNet, primary: bool = True) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs the CCM loss covers: every backbone block (post-ReLU) and, with `primary`
    (as the paper's code, the default), the PrimaryCaps conv (pre-squash, types*dim channels). Hand them to
    `FeatureMaps(..., detach=False)` and the maps to `capsbench.models.losses.ccm_loss`."""
    return [*backbone_blocks(model), *([("primary", model.primary.conv)] if primary else [])]


def _block_conv_bn(block: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    conv = next(m for m in block.modules() if isinstance(m, nn.Conv2d))
    bn = next((m for m in block.modules() if isinstance(m, nn.BatchNorm2d)), None)
    return conv, bn


@dataclasses.dataclass(frozen=True)
class PrimaryUnits:
    """How PrimaryCaps splits into prunable units: unit u is conv channels [u*channels, (u+1)*channels) and
    input capsules [u*caps, (u+1)*caps) of the first routed layer.

    Sabour layout: a unit is a capsule type (`dim` channels, one capsule per grid position). Flat layout
    (capsule = `dim` consecutive values of the (C, H, W) memory): a unit is the smallest aligned channel
    block holding whole capsules, dim / gcd(H*W, dim) channels, so removing units never splits a capsule.
    """

    channels: int
    caps: int
    count: int

    @classmethod
    def of(cls, cfg: CapsNetConfig) -> PrimaryUnits:
        hw = cfg.primary_grid**2
        if cfg.primary_layout == "sabour":
            return cls(channels=cfg.primary_dim, caps=hw, count=cfg.primary_types)
        block = cfg.primary_dim // math.gcd(hw, cfg.primary_dim)
        return cls(channels=block, caps=block * hw // cfg.primary_dim, count=cfg.primary_channels // block)

    def unit_scores(self, channel_scores: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        """Channel scores (types*dim,) -> unit scores (count,): sum or mean of each unit's channels."""
        per_unit = channel_scores.reshape(self.count, self.channels)
        if reduce == "sum":
            return per_unit.sum(dim=1)
        if reduce == "mean":
            return per_unit.mean(dim=1)
        raise ValueError(f"unknown reduce {reduce!r}; choose sum or mean")


@torch.no_grad()
def score_capsnet(
    model: CapsNet,
    batches: Iterable[torch.Tensor] | None,
    criterion: str = "chip",
    *,
    capsules: bool = False,
    capsule_criterion: str = "chip",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-channel scores of every backbone conv ("backbone.i") and the PrimaryCaps conv ("primary").

    CHIP runs the model (eval mode) over `batches` with hooks on each backbone block (post-ReLU) and on the
    PrimaryCaps conv (pre-squash), accumulating as it goes so no maps are kept. With `capsules`, also
    "intermediate{k}": one score per capsule of each intermediate layer by `capsule_criterion` (see
    CAPSULE_CRITERIA; `seed` seeds "random"), for `prune_capsnet(..., intermediate_ratio=...)`.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {CRITERIA}")
    if capsule_criterion not in CAPSULE_CRITERIA:
        raise ValueError(
            f"unknown capsule criterion {capsule_criterion!r}; choose one of {', '.join(CAPSULE_CRITERIA)}"
        )
    blocks = [*backbone_blocks(model), ("primary", model.primary.conv)]
    caps = [(f"intermediate{k + 1}", layer) for k, layer in enumerate(model.caps_layers[:-1])]
    scores: dict[str, torch.Tensor] = {}
    if capsules and capsule_criterion in ("weight_norm", "random"):
        scores.update(capsule_scores_without_data(model, capsule_criterion, seed))
        capsules = False
    if criterion == "l1":
        scores.update({name: l1_scores(_block_conv_bn(m)[0].weight).cpu() for name, m in blocks})
        if not capsules:
            return scores
    watch = ([] if criterion == "l1" else blocks) + (caps if capsules else [])
    if batches is None:
        raise ValueError(f"criterion {criterion!r} (or capsule scores) needs input batches")
    sums: dict[str, torch.Tensor] = {}
    seen = 0
    was_training = model.training
    model.eval()
    try:
        with FeatureMaps(watch) as rec:
            for x in batches:
                model(x)
                for name, fmap in rec.maps.items():
                    if name.startswith("intermediate") and capsule_criterion == "length":
                        part = capsule_length(fmap).double().sum(dim=0)  # (caps,) summed lengths
                    elif name.startswith("intermediate"):
                        part = capsule_chip_scores(fmap) * len(fmap)
                    elif criterion == "chip":
                        part = chip_scores(fmap, "per_image") * len(fmap)
                    else:  # chip-mean: sum the maps now, score the mean once at the end
                        part = fmap.double().sum(dim=0)  # (C, H, W)
                    sums[name] = sums[name] + part if name in sums else part
                seen += len(x)
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("no input batches to score on")
    for name, total in sums.items():
        mean = (total / seen).cpu()
        scores[name] = chip_scores(mean[None], "batch_mean") if mean.dim() == 3 else mean
    return scores


# ---------------------------------------------------------------------------------------------- surgery


def _lowest(scores: torch.Tensor, count: int) -> tuple[list[int], list[int]]:
    """(removed, kept) indices, each ascending: the `count` lowest scores go (ties: lower index first)."""
    order = torch.argsort(scores.double().cpu(), stable=True).tolist()
    return sorted(order[:count]), sorted(order[count:])


def _removal_count(n: int, ratio: float) -> int:
    """int(n * ratio), at least one survivor; the epsilon keeps e.g. 100 * 0.29 from rounding down to 28."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must lie in [0, 1), got {ratio}")
    return min(int(n * ratio + 1e-9), n - 1)


def _expand(units: list[int], size: int) -> list[int]:
    return [u * size + j for u in units for j in range(size)]


def prune_capsnet(
    model: CapsNet,
    backbone_ratio: float | Sequence[float],
    caps_ratio: float,
    scores: dict[str, torch.Tensor],
    *,
    intermediate_ratio: float = 0.0,
    reinit_caps_layers: bool = False,
    unit_reduce: str = "sum",
) -> tuple[CapsNet, dict]:
    """Remove low-scoring channels and capsule types; return a new dense CapsNet and the plan of what went.

    Backbone conv i loses int(C_i * ratio_i) output channels (conv rows, BN affine and running stats, and the
    next conv's input channels). PrimaryCaps loses int(types * caps_ratio) capsule types' worth of units
    (see PrimaryUnits), i.e. their conv channels and bias and, in the first routed layer, the weight rows of
    their input capsules. Every layer keeps at least one channel/type. Without capsule pruning and
    reinitialisation the result computes exactly what `model` computes with those channels zeroed: a zero
    primary capsule predicts zero and adds nothing to routing.

    reinit_caps_layers: the routed layers keep the fresh initialisation of the new net (drawn from torch's
    global RNG) instead of the surviving weights, as the paper's code does after pruning PrimaryCaps.
    intermediate_ratio (needs scores "intermediate{k}", from `score_capsnet(..., capsules=True,
    capsule_criterion=...)`): also remove that share of every intermediate layer's capsules, its own ratio:
    capsule j of layer l loses its transformation weights in layer l (weight columns) and its input slot in
    layer l+1 (weight rows). For a capsule whose pose is always 0 layer l+1 and everything after it compute
    exactly what they did from the surviving capsules; layer l itself does not: routing's softmax runs over the
    parents, so removing a parent re-distributes every child's coupling among the others.
    """
    cfg = model.cfg
    blocks = backbone_blocks(model)
    ratios = (
        [float(backbone_ratio)] * len(blocks)
        if isinstance(backbone_ratio, int | float)
        else [float(r) for r in backbone_ratio]
    )
    if len(ratios) != len(blocks):
        raise ValueError(f"{len(blocks)} backbone convs but {len(ratios)} backbone ratios")
    layers: list[dict] = []
    kept_out: list[list[int]] = []
    for (name, block), ratio in zip(blocks, ratios, strict=True):
        channels = _block_conv_bn(block)[0].out_channels
        removed, kept = _lowest(scores[name], _removal_count(channels, ratio))
        kept_out.append(kept)
        layers.append(
            {
                "name": name,
                "kind": "conv",
                "ratio": ratio,
                "before": channels,
                "after": len(kept),
                "removed": removed,
                "scores": [float(s) for s in scores[name]],
            }
        )

    units = PrimaryUnits.of(cfg)
    types_removed = _removal_count(cfg.primary_types, caps_ratio)
    unit_scores = units.unit_scores(scores["primary"].double().cpu(), unit_reduce)
    removed_units, kept_units = _lowest(unit_scores, types_removed * cfg.primary_dim // units.channels)
    primary_kept = _expand(kept_units, units.channels)  # conv output channels
    caps_kept = _expand(kept_units, units.caps)  # input capsules of the first routed layer
    layers.append(
        {
            "name": "primary",
            "kind": "primary_caps",
            "ratio": caps_ratio,
            "layout": cfg.primary_layout,
            "before": cfg.primary_types,
            "after": cfg.primary_types - types_removed,
            "unit_channels": units.channels,
            "unit_capsules": units.caps,
            "removed_units": removed_units,
            "removed_channels": _expand(removed_units, units.channels),
            "unit_scores": [float(s) for s in unit_scores],
            "scores": [float(s) for s in scores["primary"]],
        }
    )

    inter_kept: list[list[int]] = []
    for k, (n, _dim) in enumerate(cfg.intermediate):
        name = f"intermediate{k + 1}"
        if intermediate_ratio > 0:
            removed, kept = _lowest(scores[name], _removal_count(n, intermediate_ratio))
            layers.append(
                {
                    "name": name,
                    "kind": "capsules",
                    "ratio": intermediate_ratio,
                    "before": n,
                    "after": len(kept),
                    "removed": removed,
                    "scores": [float(s) for s in scores[name]],
                }
            )
        else:
            kept = list(range(n))
        inter_kept.append(kept)

    kept_channels = tuple(len(k) for k in kept_out)
    new_cfg = dataclasses.replace(
        cfg,
        # A default-shaped backbone keeps `()` so that ratio 0 gives back the very same config.
        backbone_channels=cfg.backbone_channels if kept_channels == cfg.conv_channels else kept_channels,
        primary_types=cfg.primary_types - types_removed,
        intermediate=tuple((len(kept), d) for kept, (_, d) in zip(inter_kept, cfg.intermediate, strict=True)),
    )
    if new_cfg.conv_channels != kept_channels:  # a default that follows P moved with the pruned PrimaryCaps
        new_cfg = dataclasses.replace(new_cfg, backbone_channels=kept_channels)
    device = next(model.parameters()).device
    new = build_capsnet(new_cfg).to(device)
    with torch.no_grad():
        kept_in = list(range(cfg.in_channels))
        for (_, old_block), (_, new_block), kept in zip(blocks, backbone_blocks(new), kept_out, strict=True):
            _copy_conv_bn(old_block, new_block, kept, kept_in)
            kept_in = kept
        old_conv, new_conv = model.primary.conv, new.primary.conv
        new_conv.weight.copy_(old_conv.weight[primary_kept][:, kept_in])
        new_conv.bias.copy_(old_conv.bias[primary_kept])
        if not reinit_caps_layers:
            rows = caps_kept
            outs = [*inter_kept, list(range(cfg.num_classes))]
            for old, layer, cols in zip(model.caps_layers, new.caps_layers, outs, strict=True):
                w = old.weight.view(old.in_caps, old.in_dim, old.out_caps, old.out_dim)
                layer.weight.copy_(w[rows][:, :, cols].reshape(layer.weight.shape))
                rows = cols
        if model.decoder is not None:
            new.decoder.load_state_dict(model.decoder.state_dict())
    new.train(model.training)

    plan = {
        "criterion_scores_reduce": unit_reduce,
        "backbone_ratio": ratios,
        "caps_ratio": caps_ratio,
        "intermediate_ratio": intermediate_ratio,
        "reinit_caps_layers": reinit_caps_layers,
        "layers": layers,
        "model_config_before": cfg.to_dict(),
        "model_config_after": new_cfg.to_dict(),
        "parameters_before": model.num_parameters(),
        "parameters_after": new.num_parameters(),
    }
    return new, plan


def _copy_conv_bn(old: nn.Module, new: nn.Module, kept_out: list[int], kept_in: list[int]) -> None:
    old_conv, old_bn = _block_conv_bn(old)
    new_conv, new_bn = _block_conv_bn(new)
    new_conv.weight.copy_(old_conv.weight[kept_out][:, kept_in])
    if old_conv.bias is not None:
        assert new_conv.bias is not None  # the same block type
        new_conv.bias.copy_(old_conv.bias[kept_out])
    if old_bn is not None:
        assert new_bn is not None
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(new_bn, attr).copy_(getattr(old_bn, attr)[kept_out])
        tracked, old_tracked = new_bn.num_batches_tracked, old_bn.num_batches_tracked
        assert tracked is not None and old_tracked is not None  # both track: built by the same block type
        tracked.copy_(old_tracked)


# ---------------------------------------------------------------------------------------------- FLOPs


@torch.no_grad()
def flop_breakdown(model: CapsNet, input_shape: Sequence[int]) -> dict[str, int]:
    """Multiply-accumulates of one image's forward pass, per part.

    Counted: every conv (C_out * H_out * W_out * C_in/groups * kh * kw), the capsule predictions u_hat
    (in_caps * in_dim * out_caps * out_dim per routed layer) and routing's two contractions: the weighted sum
    s (in_caps * out_caps * out_dim, every iteration) and the agreement update (the same, every iteration but
    the last). Not counted: bias adds, BatchNorm (foldable into the conv), ReLU, squash, softmax (O(caps)
    elementwise work) and the decoder (not part of `forward`).
    """
    shape = tuple(input_shape)[-3:]
    convs: dict[str, int] = {}

    def hook(name: str):
        def count(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
            kh, kw = module.kernel_size
            per_out = module.in_channels // module.groups * kh * kw
            convs[name] = output[0].numel() * per_out

        return count

    named = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model(torch.zeros(1, *shape, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    parts = {
        "backbone": sum(v for n, v in convs.items() if n.startswith("backbone.")),
        "primary": sum(v for n, v in convs.items() if n.startswith("primary.")),
        "predictions": 0,
        "routing": 0,
    }
    for layer in model.caps_layers:
        pairs = layer.in_caps * layer.out_caps * layer.out_dim
        parts["predictions"] += pairs * layer.in_dim
        parts["routing"] += (2 * layer.routing_iters - 1) * pairs
    return parts


def count_flops(model: CapsNet, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one image's forward pass (see `flop_breakdown` for what is counted)."""
    return sum(flop_breakdown(model, input_shape).values())


def graft_capsule_layers(source: CapsNet, deeper: CapsNetConfig) -> CapsNet:
    """The authors' build of a deeper net: `deeper`'s routed capsule layers, freshly initialised from torch's global
    RNG (seed it first), on `source`'s backbone and PrimaryCaps with their weights and BatchNorm statistics copied.
    The new net has `source`'s (possibly pruned) conv widths and capsule types and `deeper`'s intermediate layers
    and class capsules; its first routed layer takes the pruned PrimaryCaps' capsules as input."""
    src = source.cfg
    fixed = ("backbone", "in_channels", "image_size", "primary_dim", "primary_layout")
    if differ := [f for f in fixed if getattr(src, f) != getattr(deeper, f)]:
        raise ValueError(f"cannot graft: the nets differ in {', '.join(differ)}")
    cfg = dataclasses.replace(deeper, primary_types=src.primary_types, backbone_channels=())
    if cfg.conv_channels != src.conv_channels:
        cfg = dataclasses.replace(cfg, backbone_channels=src.conv_channels)
    net = build_capsnet(cfg).to(next(source.parameters()).device)
    kept = {k: v for k, v in source.state_dict().items() if k.startswith(("backbone.", "primary."))}
    missing, unexpected = net.load_state_dict(kept, strict=False)
    if unexpected or any(k.startswith(("backbone.", "primary.")) for k in missing):
        raise ValueError(
            f"cannot graft: backbone or PrimaryCaps do not match ({(unexpected or missing)[:3]})"
        )
    return net
