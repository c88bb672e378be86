"""The CapsNet builder: conv backbone -> PrimaryCaps -> any number of IntermediateCaps -> class capsules.

`CapsNet.forward` returns the class capsules only (what is exported and timed); the decoder is separate.
"""

from __future__ import annotations

import torch
from torch import nn

from capsbench.models.config import BACKBONE_SPECS, CapsNetConfig, ConvSpec
from capsbench.models.layers import CapsLayer, PrimaryCaps, capsule_length


def conv_block(in_ch: int, out_ch: int, spec: ConvSpec) -> nn.Sequential:
    """Conv (+ BatchNorm, without the conv's bias) + ReLU, as the backbone's spec says."""
    conv = nn.Conv2d(
        in_ch, out_ch, spec.kernel, stride=spec.stride, padding=spec.padding, bias=not spec.batchnorm
    )
    if spec.batchnorm:
        return nn.Sequential(conv, nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))
    return nn.Sequential(conv, nn.ReLU(inplace=True))


def build_backbone(cfg: CapsNetConfig) -> tuple[nn.Sequential, PrimaryCaps]:
    """The conv layers and the PrimaryCaps conv for the config's backbone (see `BACKBONE_SPECS`)."""
    spec = BACKBONE_SPECS[cfg.backbone]
    layers, prev = [], cfg.in_channels
    for ch, conv in zip(cfg.conv_channels, spec.convs, strict=True):
        layers.append(conv_block(prev, ch, conv))
        prev = ch
    p = spec.primary
    primary = PrimaryCaps(prev, cfg.primary_types, cfg.primary_dim, p.kernel, p.stride, cfg.primary_layout)
    return nn.Sequential(*layers), primary


class Decoder(nn.Module):
    """Sabour's reconstruction decoder (512-1024-pixels, sigmoid) on the masked class capsules."""

    def __init__(self, num_classes: int, class_dim: int, out_shape: tuple[int, int, int]):
        super().__init__()
        self.out_shape = out_shape
        pixels = out_shape[0] * out_shape[1] * out_shape[2]
        self.net = nn.Sequential(
            nn.Linear(num_classes * class_dim, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 1024),
            nn.ReLU(inplace=True),
            nn.Linear(1024, pixels),
            nn.Sigmoid(),
        )

    def forward(self, v: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct from the true class's capsule (training) or the longest one (inference)."""
        if labels is None:
            labels = capsule_length(v).argmax(dim=1)
        mask = nn.functional.one_hot(labels, v.shape[1]).to(v.dtype)  # (batch, classes)
        return self.net((v * mask.unsqueeze(-1)).flatten(1)).view(-1, *self.out_shape)


class CapsNet(nn.Module):
    """A (possibly deep) CapsNet built from a CapsNetConfig.

    `caps_layers` holds the routed layers: the intermediate capsule layers followed by the class capsules,
    so a net with k intermediate layers has k + 1 routed layers.
    """

    def __init__(self, cfg: CapsNetConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone, self.primary = build_backbone(cfg)
        shapes = cfg.caps_shapes
        self.caps_layers = nn.ModuleList(
            CapsLayer(n_in, d_in, n_out, d_out, cfg.routing_iters, cfg.caps_init)
            for (n_in, d_in), (n_out, d_out) in zip(shapes[:-1], shapes[1:], strict=True)
        )
        out_shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
        self.decoder = Decoder(cfg.num_classes, cfg.class_dim, out_shape) if cfg.decoder else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, C, H, W) in [0, 1] -> class capsules (batch, num_classes, class_dim)."""
        caps = self.primary(self.features(x))  # (batch, primary caps, primary dim)
        for layer in self.caps_layers:
            caps = layer(caps)
        return caps

    @staticmethod
    def lengths(v: torch.Tensor) -> torch.Tensor:
        """Capsule lengths (batch, caps): the class scores of a CapsNet (finite gradient at vanished capsules)."""
        return capsule_length(v)

    def capsule_modules(self) -> list[tuple[str, nn.Module]]:
        """(layer name, module) of every capsule layer in forward order, for the health probes."""
        names = ["primary"] + [f"intermediate{i + 1}" for i in range(self.cfg.depth)] + ["class"]
        return list(zip(names, [self.primary, *self.caps_layers], strict=True))

    def num_parameters(self, include_decoder: bool = False) -> int:
        return sum(
            p.numel()
            for name, p in self.named_parameters()
            if include_decoder or not name.startswith("decoder.")
        )


def build_capsnet(cfg: CapsNetConfig) -> CapsNet:
    return CapsNet(cfg)
