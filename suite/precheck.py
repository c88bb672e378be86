"""The pre-check: where each config of a preset stands before any training (seconds per config), written to
precheck.json at the run's root and shown in the report.

For each config: the capsule-length profile at initialisation (measured on INIT_IMAGES training images as
training sees the net, beside the gain recursion's prediction, models/precheck.py) and the RMS of the margin
loss's gradient for every routed layer on one training batch. Adam divides a gradient by its RMS plus eps (1e-8):
a layer whose gradient is far below eps barely moves in a step. The placement reads the largest routed-layer
gradient against eps:

    healthy  >= HEALTHY_FACTOR x eps         training moves every layer
    edge     between                          some layers move, some may stay silent
    past     <  PAST_FACTOR x eps             no layer moves at the preset's budget: past the cliff

Calibrated on the `depth` preset's shapes (fan_in, 1 epoch on 6000 images; scripts/measure_cliff.json): depth 2
measures >= 3.6e-6 and trains, depth 3 1e-11 to 1e-8 and ends partly alive, depth 4 <= 2e-17 and stays dead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from capsbench import results as R
from capsbench.models import build_capsnet
from capsbench.models.health import init_health
from capsbench.models.precheck import gradient_rms, layer_gains, predicted_lengths
from capsbench.suite import train as training
from capsbench.suite.presets import RunConfig

ADAM_EPS = 1e-8  # torch.optim.Adam's default, which training uses
HEALTHY_FACTOR = 100.0
PAST_FACTOR = 1e-4
INIT_IMAGES = 512
GRAD_BATCH = 64
PLACEMENT_RULE = (
    f"largest routed-layer gradient RMS at initialisation (margin loss, one batch of {GRAD_BATCH}) against Adam's "
    f"eps {ADAM_EPS:g}: healthy >= {HEALTHY_FACTOR:g} x eps, past the cliff < {PAST_FACTOR:g} x eps, edge between"
)


def placement(grad_rms: list[float]) -> str:
    top = max(grad_rms, default=0.0)
    if top >= HEALTHY_FACTOR * ADAM_EPS:
        return "healthy"
    return "past" if top < PAST_FACTOR * ADAM_EPS else "edge"


def precheck_config(cfg: RunConfig, splits: training.Splits, device: torch.device) -> dict:
    """One config's profile, gradients and placement; the net is the one `train` would start from (seeded)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = build_capsnet(cfg.model).to(device)
    images = splits.train_x[:INIT_IMAGES]
    health = init_health(net, training.eval_batches(images, device, 128), cfg.inactive_threshold, device)
    primary = health["layers"][0]
    rms = math.hypot(primary["mean_length"], primary["std_length"])
    x = training.to_input(splits.train_x[:GRAD_BATCH], device)
    grads = gradient_rms(net, x, splits.train_y[:GRAD_BATCH].to(device))
    predicted = predicted_lengths(net, rms)
    layers = [
        {
            "name": layer["name"],
            "gain": g,
            "predicted_rms_length": p,
            "measured_mean_length": layer["mean_length"],
            "measured_rms_length": math.hypot(layer["mean_length"], layer["std_length"]),
            "inactive_fraction": layer["inactive_fraction"],
            "grad_rms": gr,
        }
        for layer, g, p, gr in zip(health["layers"][1:], layer_gains(net), predicted, grads, strict=True)
    ]
    return {
        "config_id": cfg.id,
        "label": cfg.label,
        "depth": cfg.model.depth,
        "shape": f"{cfg.model.primary_types}x{cfg.model.primary_dim}",
        "caps_init": cfg.model.caps_init,
        "primary_rms_length": rms,
        "layers": layers,
        "max_grad_rms": max(grads, default=0.0),
        "placement": placement(grads),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def write_precheck(run_dir: Path, rows: list[dict], preset: str | None) -> Path:
    return R.write_json(
        Path(run_dir) / R.PRECHECK_FILE,
        "precheck",
        {"preset": preset, "rule": PLACEMENT_RULE, "adam_eps": ADAM_EPS, "configs": rows},
    )
