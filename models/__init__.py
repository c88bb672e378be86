"""CapsNet models in PyTorch only: capsule layers, the network builder, losses and activation-health probes.

Nothing here knows about ONNX, datasets on disk or reports.
"""

from capsbench.models.capsnet import CapsNet, build_capsnet
from capsbench.models.config import BACKBONES, CapsNetConfig
from capsbench.models.layers import CapsLayer, PrimaryCaps, capsule_length, dynamic_routing, squash
from capsbench.models.losses import margin_loss, reconstruction_loss

__all__ = [
    "BACKBONES",
    "CapsLayer",
    "CapsNet",
    "CapsNetConfig",
    "PrimaryCaps",
    "build_capsnet",
    "capsule_length",
    "dynamic_routing",
    "margin_loss",
    "reconstruction_loss",
    "squash",
]
