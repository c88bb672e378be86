"""Activation health: forward hooks that record every capsule's length, and the inactive-capsule statistics.

A capsule is inactive when both the mean and the std of its length over the evaluation set are below a
threshold (Mitterreiter et al. 2023's dead-capsule rule, 0.01 by default); the mean-only count is kept beside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from capsbench.models.hooks import ForwardHooks
from capsbench.models.layers import capsule_length

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
HIST_BINS = 50  # capsule lengths lie in [0, 1): 50 equal bins of width 0.02


class CapsuleProbe(ForwardHooks):
    """Context manager: records the capsule lengths (batch, caps) that each named capsule module outputs."""

    def __init__(self, modules: list[tuple[str, nn.Module]]):
        super().__init__(modules)
        self.lengths: dict[str, list[torch.Tensor]] = {name: [] for name, _ in modules}

    def record(self, name: str, output: torch.Tensor) -> None:
        self.lengths[name].append(capsule_length(output.detach()).float().cpu())  # (batch, caps)

    def stacked(self) -> dict[str, torch.Tensor]:
        """Lengths per layer over everything seen: (samples, caps)."""
        return {name: torch.cat(chunks) for name, chunks in self.lengths.items() if chunks}


def layer_health(lengths: torch.Tensor, threshold: float = 0.01) -> dict:
    """Statistics of one capsule layer from its lengths (samples, caps)."""
    lengths = lengths.double()
    per_mean = lengths.mean(dim=0)
    per_std = lengths.std(dim=0, unbiased=False)
    inactive = (per_mean < threshold) & (per_std < threshold)
    inactive_mean_only = per_mean < threshold
    flat = lengths.flatten().numpy()
    counts, edges = np.histogram(flat, bins=HIST_BINS, range=(0.0, 1.0))
    n = lengths.shape[1]
    return {
        "num_capsules": n,
        "samples": lengths.shape[0],
        "mean_length": float(flat.mean()),
        "std_length": float(flat.std()),
        "percentiles": {
            f"p{p}": float(v) for p, v in zip(PERCENTILES, np.percentile(flat, PERCENTILES), strict=True)
        },
        "inactive": int(inactive.sum()),
        "inactive_fraction": float(inactive.sum()) / n,
        "inactive_mean_only": int(inactive_mean_only.sum()),
        "inactive_mean_only_fraction": float(inactive_mean_only.sum()) / n,
        "per_capsule_mean": [round(float(v), 6) for v in per_mean],
        "per_capsule_std": [round(float(v), 6) for v in per_std],
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
    }


@contextlib.contextmanager
def batch_statistics(model: nn.Module):
    """Within: the model in eval mode except its BatchNorm layers, which normalise with the batch's statistics
    as in training, while their running statistics (and num_batches_tracked) are left exactly as they were.
    Dropout stays off. On exit the model's modes and buffers are restored."""
    modes = {m: m.training for m in model.modules()}
    bns: list[nn.Module] = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in bns]
    model.eval()
    for m in bns:
        m.train()
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, bufs in zip(bns, saved, strict=True):
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)
        for m, mode in modes.items():
            m.training = mode


@torch.no_grad()
def capsule_health(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    threshold: float = 0.01,
    device: torch.device | str = "cpu",
    *,
    batch_stats: bool = False,
) -> dict:
    """Run `model` over `batches` of inputs and return per-layer health, in forward order.

    The model must offer `capsule_modules()` -> [(name, module)], each module outputting (batch, caps, dim).
    `batch_stats`: BatchNorm normalises with each batch's statistics, as training sees the net (see
    `batch_statistics`; running stats untouched, no dropout). Use it for an untrained net, whose running
    statistics (0 and 1) make every capsule look dead in eval mode; use `init_health` for that.
    """
    was_training = model.training
    modules = model.capsule_modules()  # type: ignore[operator]  # a CapsNet (any module offering it)
    ctx = batch_statistics(model) if batch_stats else contextlib.nullcontext()
    try:
        with ctx:
            if not batch_stats:
                model.eval()
            with CapsuleProbe(modules) as probe:
                for x in batches:
                    model(x.to(device))
    finally:
        model.train(was_training)
    lengths = probe.stacked()
    layers = []
    for name, module in modules:
        stats = layer_health(lengths[name], threshold)
        dim = getattr(module, "dim", None) or getattr(module, "out_dim", None)
        layers.append({"name": name, "dim": dim, **stats})
    total = sum(layer["num_capsules"] for layer in layers[1:])
    dead = sum(layer["inactive"] for layer in layers[1:])
    return {
        "threshold": threshold,
        "rule": "inactive: mean and std of the capsule's length over the evaluation set both below threshold",
        "layers": layers,
        # Routed layers only: PrimaryCaps has many more capsules and would swamp the totals.
        "routed_inactive": dead,
        "routed_capsules": total,
        "routed_inactive_fraction": dead / total if total else 0.0,
        "batchnorm": "batch statistics" if batch_stats else "running statistics",
    }


def init_health(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    threshold: float = 0.01,
    device: torch.device | str = "cpu",
) -> dict:
    """Health of a net at initialisation as training sees it: `capsule_health` with batch statistics."""
    return capsule_health(model, batches, threshold, device, batch_stats=True)
