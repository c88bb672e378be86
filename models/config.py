"""The architecture of a CapsNet as one frozen dataclass: the single source of a model's shape.

Its `id` is a short hash of its fields, so a result always names exactly the network that produced it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from capsbench.results import LEGACY_MODEL_VALUES


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of a backbone (or the PrimaryCaps conv): kernel, stride, padding, BatchNorm or bias."""

    kernel: int
    stride: int = 1
    padding: int = 0
    batchnorm: bool = False

    def out_size(self, size: int) -> int:
        return (size + 2 * self.padding - self.kernel) // self.stride + 1


@dataclass(frozen=True)
class BackboneSpec:
    """A conv backbone in front of PrimaryCaps: its convs, its PrimaryCaps conv and its default widths.

    `follow_p` gives each conv's width as a fraction of P = primary_types x primary_dim (the paper's code).
    Adding a backbone is one entry in `BACKBONE_SPECS`; the builder, the grid size and the widths read it.
    """

    convs: tuple[ConvSpec, ...]
    primary: ConvSpec
    fixed_channels: tuple[int, ...]
    follow_p: tuple[float, ...]

    def channels_for(self, p: int) -> tuple[int, ...]:
        return tuple(max(int(p * f), 1) for f in self.follow_p)


BACKBONE_SPECS: dict[str, BackboneSpec] = {
    # The paper's code: three 3x3 Conv+BN+ReLU (P/4, P/2, P; strides 1, 2, 1), PrimaryCaps 3x3 stride 2.
    "sahu": BackboneSpec(
        convs=(ConvSpec(3, 1, 1, True), ConvSpec(3, 2, 1, True), ConvSpec(3, 1, 1, True)),
        primary=ConvSpec(3, 2),
        fixed_channels=(48, 96, 192),
        follow_p=(0.25, 0.5, 1.0),
    ),
    # Sabour et al. 2017: one 9x9 conv with ReLU, PrimaryCaps 9x9 stride 2.
    "sabour": BackboneSpec(
        convs=(ConvSpec(9),), primary=ConvSpec(9, 2), fixed_channels=(256,), follow_p=(1.0,)
    ),
}
BACKBONES = tuple(BACKBONE_SPECS)
PRIMARY_LAYOUTS = ("sabour", "flat")
# Initial scale of the routed capsule layers' transformation weights (see capsbench.models.layers.caps_init_std).
CAPS_INITS = ("authors", "fan_in", "coupled")
# "fixed": the backbone's default channels (sahu 48/96/192, sabour 256); "follow_p": they follow
# P = primary_types x primary_dim as in the paper's code (sahu P/4, P/2, P; sabour P).
BACKBONE_WIDTHS = ("fixed", "follow_p")
# Fields added after the first results were written, with the value that reproduces the behaviour before they
# existed (defined with the results contract, which reads old files by it). `to_dict` leaves a field out while it
# holds that value, so the ids of earlier configs stay valid, and `from_dict` reads a missing field as that value
# (an old result means the old network), not as the default.
LEGACY_VALUES: dict[str, Any] = LEGACY_MODEL_VALUES


def stable_hash(obj: Any, length: int = 10) -> str:
    """A short hash of a JSON-able object, independent of dict order and Python's hash seed."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class CapsNetConfig:
    """Conv backbone -> PrimaryCaps -> IntermediateCaps x k -> class capsules.

    `sahu` (the paper's code): three 3x3 Conv+BN+ReLU with P/4, P/2, P channels (strides 1, 2, 1), then
    PrimaryCaps 3x3 stride 2. `sabour` (Sabour et al. 2017): one 9x9 conv with P channels, PrimaryCaps 9x9
    stride 2. `backbone_channels` is the per-conv channel list; empty means the backbone's default.
    """

    backbone: str = "sahu"
    in_channels: int = 1
    image_size: int = 28
    backbone_channels: tuple[int, ...] = ()
    primary_types: int = 16
    primary_dim: int = 12
    # One (num_capsules, capsule_dim) pair per intermediate (fully connected, routed) capsule layer.
    intermediate: tuple[tuple[int, int], ...] = ()
    num_classes: int = 10
    class_dim: int = 16
    routing_iters: int = 3
    # "sabour": a capsule is `dim` channels at one position; "flat": the paper's code reshapes without a
    # permute, so a capsule is `dim` neighbouring values of one channel.
    primary_layout: str = "sabour"
    decoder: bool = False
    # Init of the routed capsule layers: "coupled" keeps the pre-squash length of s_j ~O(1) at init for any number
    # of input capsules (the default, chosen from scripts/measure_cliff.py); "fan_in" N(0, 1/d_in) was the
    # scheme before; "authors" N(0, 0.1^2) as the paper's code. See capsbench.models.layers.caps_init_std.
    caps_init: str = "coupled"
    backbone_width: str = "fixed"

    def __post_init__(self) -> None:
        # Accept lists (from JSON) but store tuples so the config stays hashable and frozen.
        object.__setattr__(self, "backbone_channels", tuple(int(c) for c in self.backbone_channels))
        object.__setattr__(self, "intermediate", tuple((int(n), int(d)) for n, d in self.intermediate))
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.primary_layout not in PRIMARY_LAYOUTS:
            raise ValueError(
                f"unknown primary_layout {self.primary_layout!r}; choose one of {PRIMARY_LAYOUTS}"
            )
        if self.caps_init not in CAPS_INITS:
            raise ValueError(f"unknown caps_init {self.caps_init!r}; choose one of {', '.join(CAPS_INITS)}")
        if self.backbone_width not in BACKBONE_WIDTHS:
            raise ValueError(
                f"unknown backbone_width {self.backbone_width!r}; choose one of {', '.join(BACKBONE_WIDTHS)}"
            )
        if self.routing_iters < 1:
            raise ValueError("routing_iters must be >= 1")
        if len(self.conv_channels) != len(self.default_channels()):
            raise ValueError(
                f"backbone {self.backbone!r} has {len(self.default_channels())} convs, "
                f"got backbone_channels={self.backbone_channels}"
            )

    def default_channels(self) -> tuple[int, ...]:
        """The backbone's channels when `backbone_channels` is empty (see BACKBONE_WIDTHS)."""
        spec = BACKBONE_SPECS[self.backbone]
        if self.backbone_width == "follow_p":
            return spec.channels_for(self.primary_channels)
        return spec.fixed_channels

    @property
    def conv_channels(self) -> tuple[int, ...]:
        return self.backbone_channels or self.default_channels()

    @property
    def primary_channels(self) -> int:
        return self.primary_types * self.primary_dim

    @property
    def primary_grid(self) -> int:
        """Side of the primary capsule grid for this input size."""
        spec = BACKBONE_SPECS[self.backbone]
        size = self.image_size
        for conv in (*spec.convs, spec.primary):
            size = conv.out_size(size)
        return size

    @property
    def num_primary_caps(self) -> int:
        grid = self.primary_grid
        return self.primary_types * grid * grid

    @property
    def caps_shapes(self) -> list[tuple[int, int]]:
        """(num_capsules, dim) of every capsule layer, PrimaryCaps first, class capsules last."""
        return [
            (self.num_primary_caps, self.primary_dim),
            *self.intermediate,
            (self.num_classes, self.class_dim),
        ]

    @property
    def depth(self) -> int:
        """Number of intermediate capsule layers."""
        return len(self.intermediate)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["backbone_channels"] = list(self.backbone_channels)
        d["intermediate"] = [list(p) for p in self.intermediate]
        for name, legacy in LEGACY_VALUES.items():
            if d[name] == legacy:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CapsNetConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CapsNetConfig fields: {sorted(unknown)}")
        return cls(**{**LEGACY_VALUES, **d})

    @property
    def id(self) -> str:
        return stable_hash(self.to_dict())


def caps_label(shapes: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> str:
    """'16x12-16x12' for a list of (num_caps, dim) pairs; '-' for none."""
    return "-".join(f"{n}x{d}" for n, d in shapes) or "-"
