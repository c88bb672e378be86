"""Where a net stands before it is trained: its capsule-length profile at initialisation (measured, and predicted
from each routed layer's gain), and the gradient each routed layer gets from the margin loss on one batch.

The prediction: at initialisation routing couples every input to every parent with c = 1/n_out, so each parent's
pre-squash vector is s_j = sum_i u_hat_j|i / n_out and E|s|^2 = g^2 E|u|^2 with g^2 = n_in * d_out * std^2 / n_out^2
(std: the layer's weight init, `caps_init_std`). Squash maps a length s to s^2 / (1 + s^2), which is about s^2 for
small s: with g^2 < 4 the map has no non-zero fixed point and lengths collapse doubly exponentially with depth.
"""

from __future__ import annotations

import math

import torch

from capsbench.models.capsnet import CapsNet
from capsbench.models.health import batch_statistics
from capsbench.models.layers import caps_init_std, capsule_length
from capsbench.models.losses import margin_loss


def layer_gains(model: CapsNet) -> list[float]:
    """g of every routed layer (intermediate layers, then the class capsules) at initialisation."""
    cfg, gains = model.cfg, []
    shapes = cfg.caps_shapes
    for (n_in, d_in), (n_out, d_out) in zip(shapes[:-1], shapes[1:], strict=True):
        std = caps_init_std(cfg.caps_init, n_in, d_in, n_out, d_out)
        gains.append(math.sqrt(n_in * d_out) * std / n_out)
    return gains


def predicted_lengths(model: CapsNet, primary_rms_length: float) -> list[float]:
    """The RMS capsule length of every routed layer the gain recursion predicts from PrimaryCaps' RMS length."""
    out, u = [], primary_rms_length
    for g in layer_gains(model):
        s = g * u
        u = s * s / (1.0 + s * s)
        out.append(u)
    return out


def gradient_rms(model: CapsNet, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """RMS of the margin loss's gradient for every routed layer's transformation weights, on one batch, as the
    first training step sees the net (BatchNorm on batch statistics, running statistics left untouched)."""
    model.zero_grad(set_to_none=True)
    with batch_statistics(model), torch.enable_grad():
        loss = margin_loss(capsule_length(model(x)), y)
        grads = torch.autograd.grad(loss, [layer.weight for layer in model.caps_layers], allow_unused=True)
    return [0.0 if g is None else float(g.double().pow(2).mean().sqrt()) for g in grads]
