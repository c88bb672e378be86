"""Capsule building blocks: squash, dynamic routing (a pure function), PrimaryCaps and a routed CapsLayer.

Routing runs a fixed number of iterations with no Python loop over capsules, so the exported graph is static.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SQUASH_EPS = 1e-8


def squash(s: torch.Tensor, dim: int = -1, eps: float = SQUASH_EPS) -> torch.Tensor:
    """v = (|s|^2 / (1 + |s|^2)) * s / |s| (Sabour et al. 2017), so |v| lies in [0, 1)."""
    sq = (s * s).sum(dim=dim, keepdim=True)
    return s * (sq / (1.0 + sq) / torch.sqrt(sq + eps))


def dynamic_routing(u_hat: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing by agreement over `iters` iterations.

    u_hat: predictions (batch, in_caps, out_caps, out_dim). Returns the output capsules v
    (batch, out_caps, out_dim) and the final coupling coefficients c (batch, in_caps, out_caps), which sum
    to 1 over the parent (output) capsules. Logits start at 0.
    """
    # Routing runs in a (batch, out_caps, in_caps, ...) layout so both sums over capsules are batched matmuls:
    # faster than broadcast multiply-and-sum in torch and ONNX Runtime alike, and never an Einsum node.
    u = u_hat.transpose(1, 2)  # (batch, out_caps, in_caps, out_dim)
    b = torch.zeros(u.shape[:3], dtype=u.dtype, device=u.device)  # (batch, out_caps, in_caps)
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

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int, routing_iters: int = 3):
        super().__init__()
        self.in_caps, self.in_dim, self.out_caps, self.out_dim = in_caps, in_dim, out_caps, out_dim
        self.routing_iters = routing_iters
        # Stored as (in_caps, in_dim, out_caps*out_dim) so predictions are one batched matmul over in_caps.
        self.weight = nn.Parameter(
            torch.randn(in_caps, in_dim, out_caps * out_dim) * (1.0 / math.sqrt(in_dim))
        )

    def predictions(self, u: torch.Tensor) -> torch.Tensor:
        """u (batch, in_caps, in_dim) -> u_hat (batch, in_caps, out_caps, out_dim)."""
        u_hat = torch.matmul(u.transpose(0, 1), self.weight)  # (in_caps, batch, out_caps*out_dim)
        return u_hat.transpose(0, 1).reshape(u.shape[0], self.in_caps, self.out_caps, self.out_dim)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        v, _ = dynamic_routing(self.predictions(u), self.routing_iters)
        return v  # (batch, out_caps, out_dim)

    def extra_repr(self) -> str:
        return f"{self.in_caps}x{self.in_dim} -> {self.out_caps}x{self.out_dim}, routing_iters={self.routing_iters}"
