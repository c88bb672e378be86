"""Margin and reconstruction losses against hand-computed values."""

import torch

from capsbench.models import margin_loss, reconstruction_loss


def test_margin_loss_is_zero_for_perfect_lengths():
    lengths = torch.tensor([[0.95, 0.05, 0.0], [0.0, 0.1, 0.9]])
    assert margin_loss(lengths, torch.tensor([0, 2])).item() == 0.0


def test_margin_loss_hand_computed():
    lengths = torch.tensor([[0.5, 0.6]])
    # true class 0: (0.9-0.5)^2 = 0.16; other: 0.5 * (0.6-0.1)^2 = 0.125
    assert abs(margin_loss(lengths, torch.tensor([0])).item() - 0.285) < 1e-6
    # with custom margins and lambda
    got = margin_loss(lengths, torch.tensor([0]), m_pos=1.0, m_neg=0.0, lam=1.0).item()
    assert abs(got - (0.25 + 0.36)) < 1e-6


def test_reconstruction_loss_sums_pixels_and_averages_batch():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.ones(2, 1, 2, 2)
    assert reconstruction_loss(a, b).item() == 4.0
