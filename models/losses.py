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
    """Sum over classes of T_k max(0, m+ - |v_k|)^2 + lam (1 - T_k) max(0, |v_k| - m-)^2, batch mean."""
    t = F.one_hot(labels, lengths.shape[1]).to(lengths.dtype)  # (batch, classes)
    pos = t * F.relu(m_pos - lengths).pow(2)
    neg = lam * (1.0 - t) * F.relu(lengths - m_neg).pow(2)
    return (pos + neg).sum(dim=1).mean()


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Sum of squared pixel errors per image, batch mean (weighted 0.0005 in Sabour et al.)."""
    return (recon - images).pow(2).flatten(1).sum(dim=1).mean()
