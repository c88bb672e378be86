"""Capsule building blocks: squash, dynamic routing (a pure function), PrimaryCaps and a routed CapsLayer.

Routing runs a fixed number of iterations with no Python loop over capsules, so the exported graph is static.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQUASH_EPS = 1e-8
AUTHORS_INIT_STD = 0.1  # the paper's code: torch.randn(...) * 0.1
# "coupled" init: s_j's expected squared length at init is COUPLED_GAIN^2 x the mean squared input length under
# uniform coupling. With g = 1 the squash's length map l -> l^2 / (1 + l^2) (times routing's agreement boost)
# decays slowly with depth, a slope rather than a cliff at init. g = 2 (the map's fixed point 0.5, no decay by
# construction) measured worse: routing's agreement adds gain, the first intermediate layer starts at length
# ~0.9 and the sahu 16/32/64 8x8 depth-3 net stayed at chance after 80 steps, 81 % with g = 1 (Fashion-MNIST,
# batch 64, Adam 1e-3, seed 0); g = 0.5 vanished at init (class length 0.0).
COUPLED_GAIN = 1.0


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """x as float32 when it is a half-precision float (bf16/fp16 from autocast's matmuls), else x itself.

    Capsule lengths and squash are computed in fp32 under mixed precision: |s|^2 / (1 + |s|^2) and the margin
    loss's m+ - |v| lose most of their digits in bf16 (8 significant bits). A float32 (or float64) input is
    returned untouched, so the fp32 model and its exported graph are exactly as without this call.
    """
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _safe_norm(x: torch.Tensor, dim: int, keepdim: bool) -> torch.Tensor:
    x = full_precision(x)
    sq = (x * x).sum(dim=dim, keepdim=keepdim)
    positive = sq > 0
    # sqrt is only differentiated where sq > 0: the inner `where` feeds it 1 elsewhere, the outer one returns 0.
    return torch.where(
        positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq)
    )


def capsule_length(v: torch.Tensor, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """|v| along `dim`, with gradient v/|v| where v != 0 and exactly 0 where |v|^2 is 0 (or underflows to 0).

    The one norm for every capsule length that is differentiated or compared (class scores, margin loss,
    health, pruning scores). A plain sqrt(sum v^2) has the gradient inf * 0 = NaN at a capsule that has
    vanished, which deep nets reach. The value is the exact Euclidean norm (no eps offset), so lengths and
    thresholds (e.g. inactive < 0.01) keep their meaning. `squash` uses sqrt(max(|s|^2, SQUASH_EPS)) in a
    denominator instead: finite too, and the exported graph stays free of Where nodes.
    """
    return _safe_norm(v, dim, keepdim)


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """v = (|s|^2 / (1 + |s|^2)) * s / |s| (Sabour et al. 2017), so |v| lies in [0, 1).

    |s| is taken as sqrt(max(|s|^2, eps)) (eps = 1e-8) so that s = 0 gives v = 0 with a finite gradient. Not
    sqrt(|s|^2 + eps): the ONNX exporter's optimizer drops that addition (it is below fp32 resolution for any
    live capsule), and a vanished capsule then gives 0/0 = NaN in ONNX Runtime while torch gives 0.
    A bf16/fp16 `s` (autocast) is squashed in fp32 and v is returned in fp32.
    """
    s = full_precision(s)
    sq = (s * s).sum(dim=dim, keepdim=True)
    return s * (sq / (1.0 + sq) / torch.sqrt(sq.clamp(min=eps)))


def caps_init_std(scheme: str, in_caps: int, in_dim: int, out_caps: int, out_dim: int) -> float:
    """Std of the N(0, std^2) transformation weights W_ij (in_dim -> out_dim) of a routed capsule layer.

    - "authors": 0.1, as the paper's code (independent of the layer's shape).
    - "fan_in": 1 / sqrt(in_dim), keeps |u_hat_j|i| ~ |u_i| per prediction but ignores how many predictions
      are summed: the class layer of `sabour` (1152 inputs) starts with |s_j| ~ 5 and a saturated squash.
    - "coupled": COUPLED_GAIN * out_caps / sqrt(in_caps * out_dim). Derivation: at init the first routing
      iteration couples every input i to every parent j with c_ij = 1/out_caps, so s_j = sum_i u_hat_j|i /
      out_caps. Each component of u_hat_j|i = W_ij u_i has variance std^2 |u_i|^2, so E|u_hat_j|i|^2 =
      out_dim std^2 |u_i|^2, and the in_caps predictions are independent (independent W_ij, zero mean):
      E|s_j|^2 = in_caps / out_caps^2 * out_dim * std^2 * E|u|^2 =: g^2 E|u|^2. Setting g = COUPLED_GAIN gives
      the std above: s_j stays O(1) whatever in_caps is, and the layer's gain no longer depends on its shape
      (for `sabour`'s class layer, 1152 x 8 -> 10 x 16: std 0.074 instead of fan_in's 0.354).
    """
    if scheme == "authors":
        return AUTHORS_INIT_STD
    if scheme == "fan_in":
        return 1.0 / math.sqrt(in_dim)
    if scheme == "coupled":
        return COUPLED_GAIN * out_caps / math.sqrt(in_caps * out_dim)
    raise ValueError(f"unknown capsule-layer init {scheme!r}; choose authors, fan_in or coupled")


def dynamic_routing(u_hat: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing by agreement over `iters` iterations.

    u_hat: predictions (batch, in_caps, out_caps, out_dim). Returns the output capsules v
    (batch, out_caps, out_dim) and the final coupling coefficients c (batch, in_caps, out_caps), which sum
    to 1 over the parent (output) capsules. Logits start at 0.
    """
    # Routing runs in a (batch, out_caps, in_caps, ...) layout so both sums over capsules are batched matmuls:
    # faster than broadcast multiply-and-sum in torch and ONNX Runtime alike, and never an Einsum node.
    # Made contiguous once: each matmul below would otherwise copy the transposed view again (six times in
    # training with 3 iterations, forward and backward), measured 1.1 x the whole fp32 training step of the
    # quick and sabour nets and 1.3-1.8 x in bf16, where that strided copy took a third of the step.
    u = u_hat.transpose(1, 2).contiguous()  # (batch, out_caps, in_caps, out_dim)
    # The logits accumulate agreements over the iterations: in fp32 even when autocast makes u bf16.
    logit_dtype = torch.promote_types(u.dtype, torch.float32)
    b = torch.zeros(u.shape[:3], dtype=logit_dtype, device=u.device)  # (batch, out_caps, in_caps)
    for i in range(iters):
        c = F.softmax(b, dim=1)  # over the parent capsules
        s = torch.matmul(c.unsqueeze(2), u).squeeze(2)  # (batch, out_caps, out_dim)
        v = squash(s)
        if i < iters - 1:
            b = b + torch.matmul(u, v.unsqueeze(-1)).squeeze(-1)  # agreement (batch, out_caps, in_caps)
    return v, c.transpose(1, 2)


class PrimaryCaps(nn.Module):
    """A conv whose output channels are read as `types` capsule types of `dim` dimensions at every position."""

    def __init__(
        self, in_channels: int, types: int, dim: int, kernel_size: int, stride: int, layout: str = "sabour"
    ):
        super().__init__()
        self.types, self.dim, self.layout = types, dim, layout
        self.conv = nn.Conv2d(in_channels, types * dim, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)  # (batch, types*dim, H, W)
        n, _, h, w = out.shape
        if self.layout == "sabour":
            # Channel t*dim + k is component k of type t: capsule = `dim` channels at one position.
            out = out.reshape(n, self.types, self.dim, h, w).permute(0, 1, 3, 4, 2)
            out = out.reshape(n, self.types * h * w, self.dim)
        else:
            out = out.reshape(n, -1, self.dim)
        return squash(out)  # (batch, types*H*W, dim)


class CapsLayer(nn.Module):
    """A fully connected capsule layer: one transformation matrix per (input, output) capsule pair, routed."""

    def __init__(
        self,
        in_caps: int,
        in_dim: int,
        out_caps: int,
        out_dim: int,
        routing_iters: int = 3,
        init: str = "fan_in",
    ):
        super().__init__()
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.routing_iters = routing_iters
        std = caps_init_std(init, in_caps, in_dim, out_caps, out_dim)
        # Stored as (in_caps, in_dim, out_caps*out_dim) so predictions are one batched matmul over in_caps.
        self.weight = nn.Parameter(torch.randn(in_caps, in_dim, out_caps * out_dim) * std)

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """u (batch, in_caps, in_dim) -> u_hat (batch, in_caps, out_caps, out_dim)."""
        u_hat = torch.matmul(u.transpose(0, 1), self.weight)  # (in_caps, batch, out_caps*out_dim)
        return u_hat.transpose(0, 1).reshape(u.shape[0], self.in_caps, self.out_caps, self.out_dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        v, _ = dynamic_routing(self.predictions(u), self.routing_iters)
        return v  # (batch, out_caps, out_dim)

    def extra_repr(self) -> str:
        return f"{self.in_caps}x{self.in_dim} -> {self.out_caps}x{self.out_dim}, routing_iters={self.routing_iters}"
