"""Losses: Sabour's margin loss on class-capsule lengths and the decoder's reconstruction loss.

Pure functions of tensors; the weights are the caller's (training config).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_loss(
    lengths: torch.Tensor,
    labels: torch.Tensor,
    m_pos: float = 0.9,
    m_neg: float = 0.1,
    lam: float = 0.5,
) -> torch.Tensor:
    """Sum over classes of T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2, batch mean.

    `lengths` must come from `capsule_length` (e.g. `CapsNet.lengths`): finite gradients at vanished capsules.
    """
    t = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)  # (batch, classes)
    pos = t * F.relu(m_pos - lengths).pow(2)
    neg = lam * (1.0 - t) * F.relu(lengths - m_neg).pow(2)
    return (pos + neg).sum(dim=1).mean()


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, batch mean (weighted 0.0005 in Sabour et al.)."""
    return (recon - images).pow(2).flatten(1).sum(dim=1).mean()


def ccm_loss(
    feature_maps: list[torch.Tensor], detach: bool = False, off_diagonal: bool = False, eps: float = 1e-6
) -> torch.Tensor:
    """Correlation-coefficient-matrix (CCM) term of the paper's code, summed over layers.

    Per layer: the maps (batch, C, H, W) averaged over the batch, flattened to (C, H*W); the channel-by-channel
    Pearson correlation matrix (C, C); the mean of its absolute values. Like the code (torch.corrcoef, then
    abs().mean()) the mean includes the diagonal of ones, a constant 1/C; `off_diagonal` averages the
    C(C-1) off-diagonal entries only, so decorrelated channels give 0. A constant channel (e.g. dead after
    ReLU) has no correlation: its row is 0, not NaN. The paper's code detached the maps, so the term had no
    gradient; `detach=True` reproduces that bug. Training subtracts a weight (0.01) times this value.
    """
    if not feature_maps:
        raise ValueError("ccm_loss needs at least one feature map")
    total = feature_maps[0].new_zeros((), dtype=torch.float32)
    for fmap in feature_maps:
        if detach:
            fmap = fmap.detach()
        m = fmap.float().mean(dim=0).flatten(1)  # (C, H*W)
        m = m - m.mean(dim=1, keepdim=True)
        z = m * torch.rsqrt((m * m).sum(dim=1, keepdim=True) + eps)  # unit rows
        corr = (z @ z.T).abs()  # (C, C)
        c = corr.shape[0]
        if off_diagonal:
            total = total + (corr.sum() - corr.diagonal().sum()) / max(c * (c - 1), 1)
        else:
            total = total + corr.mean()
    return total
