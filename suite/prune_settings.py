"""What to prune, declared once: `PruneSettings` (what a preset holds and the CLI overrides) and the typed
`PruneVariant`s it expands into, one per pruned net or control, each with its folder name and the settings
dict that prune.json records and "done" compares.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from capsbench.models.pruning import CAPSULE_CRITERIA, CRITERIA
from capsbench.results import prune_dir_name
from capsbench.suite.errors import ConfigError

PROCEDURES = ("finetune", "authors")
CONTROLS = ("extra_training", "scratch", "random")
DEFAULT_FINETUNE_EPOCHS = 2
DEFAULT_SCORE_IMAGES = 640  # CHIP's 5 batches of 128


def _check_ratio(name: str, r: float) -> None:
    if not 0.0 <= r < 1.0:
        raise ConfigError(f"--{name} ratio must lie in [0, 1), got {r}")


@dataclass(frozen=True)
class PruneVariant:
    """One pruned net or control of a config. Every variant ends after base_epochs + finetune_epochs epochs of
    training in all: the pruned net and the random control (base + fine-tuning), extra_training (the unpruned
    base resumed for finetune_epochs more), scratch (the pruned architecture, fresh weights, the whole budget)."""

    criterion: str
    backbone_ratio: float
    caps_ratio: float
    intermediate_ratio: float  # resolved: the capsule ratio unless set apart
    capsule_criterion: str
    procedure: str
    reinit_caps_layers: bool
    control: str | None
    finetune_epochs: int
    score_images: int
    base_epochs: int  # the config's own training epochs
    base_depth: int | None = (
        None  # the authors' procedure: the depth of the trained net it prunes and builds on
    )

    @property
    def folder(self) -> str:
        """Its sub-folder of the config folder, e.g. prune_chip_b0.50_c0.50, prune_scratch_b0.50_c0.50, or under
        the authors' procedure prune_chip_b0.50_c0.50_authors (built on the depth-0 net; _base<k> on depth k's)."""
        name = self.control or self.criterion
        if self.procedure == "authors":
            base = f"_base{self.base_depth}" if self.base_depth else ""  # built on the net of that depth
            return prune_dir_name(name, self.backbone_ratio, self.caps_ratio) + "_authors" + base
        reinit = self.reinit_caps_layers and self.control != "scratch"
        return prune_dir_name(name, self.backbone_ratio, self.caps_ratio, self.intermediate_ratio, reinit)

    @property
    def train_epochs(self) -> int:
        """Epochs of this variant's own training (fine-tuning, resumption, scratch)."""
        return self.base_epochs + self.finetune_epochs if self.control == "scratch" else self.finetune_epochs

    @property
    def total_epochs(self) -> int:
        return self.base_epochs + self.finetune_epochs

    def to_dict(self) -> dict[str, Any]:
        """The settings prune.json records (and a finished variant is compared by)."""
        return {
            "criterion": self.criterion,
            "backbone_ratio": self.backbone_ratio,
            "caps_ratio": self.caps_ratio,
            "intermediate_ratio": self.intermediate_ratio,
            "capsule_criterion": self.capsule_criterion,
            "procedure": self.procedure,
            "reinit_caps_layers": self.reinit_caps_layers,
            "control": self.control,
            "finetune_epochs": self.finetune_epochs,
            "train_epochs": self.train_epochs,
            "total_epochs": self.total_epochs,
            "score_images": self.score_images,
        } | ({"base_depth": self.base_depth} if self.procedure == "authors" else {})


@dataclass(frozen=True)
class PruneSettings:
    """What the prune stage makes of every trained config: each (backbone, capsule) ratio pair's pruned net, and
    the controls beside it. The capsule ratio removes that share of PrimaryCaps types and, unless
    intermediate_ratio says otherwise, of every intermediate capsule layer's capsules. Invalid values are
    refused (ConfigError) when the settings are made."""

    pairs: tuple[tuple[float, float], ...] = ((0.5, 0.5),)
    criterion: str = "chip"  # channel score (models.pruning.CRITERIA)
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS
    intermediate_ratio: float | None = None  # None: the pair's capsule ratio
    capsule_criterion: str = "chip"  # how intermediate capsules are scored (models.pruning.CAPSULE_CRITERIA)
    # "finetune": prune this config's trained net, keep the surviving weights and fine-tune. "authors" (the
    # paper's code): prune the backbone and PrimaryCaps of the trained net of this config at depth base_depth,
    # build this config's capsule layers on it freshly initialised, retrain for finetune_epochs.
    procedure: str = "finetune"
    base_depth: int = 0
    controls: tuple[str, ...] = ()  # beside every pair (CONTROLS), or beside control_pairs only
    control_pairs: tuple[tuple[float, float], ...] | None = None  # None: every pair
    reinit_caps_layers: bool = False  # implied by procedure "authors"
    score_images: int = DEFAULT_SCORE_IMAGES
    write_sweep: bool = False  # prune_sweep_<criterion>.json (what `capsbench prune` writes for its plot)

    def __post_init__(self) -> None:
        for what, value, known in (
            ("pruning criterion", self.criterion, CRITERIA),
            ("capsule criterion", self.capsule_criterion, CAPSULE_CRITERIA),
            ("pruning procedure", self.procedure, PROCEDURES),
            *(("control", c, CONTROLS) for c in self.controls),
        ):
            if value not in known:
                raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(known)}")
        for b, c in self.pairs:
            _check_ratio("backbone", b)
            _check_ratio("caps", c)
        if self.control_pairs is not None and set(self.control_pairs) - set(self.pairs):
            raise ConfigError(f"control_pairs {self.control_pairs} are not all among the pairs {self.pairs}")
        if self.intermediate_ratio is not None:
            _check_ratio("intermediate", self.intermediate_ratio)
        if self.base_depth < 0:
            raise ConfigError(f"the authors' base depth must be >= 0, got {self.base_depth}")
        if self.finetune_epochs < 0 or self.score_images < 1:
            raise ConfigError("finetune epochs must be >= 0 and score images >= 1")

    def replace(self, **changes: Any) -> PruneSettings:
        """These settings with the given fields changed (None leaves a field as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def variant(
        self, base_epochs: int, backbone: float, caps: float, control: str | None = None
    ) -> PruneVariant:
        """One pair's pruned net (control None) or one of its controls."""
        inter = caps if self.intermediate_ratio is None else self.intermediate_ratio
        reinit = self.reinit_caps_layers
        authors = self.procedure == "authors"
        if authors:  # backbone and PrimaryCaps only; every routed layer fresh
            inter, reinit = 0.0, True
        if control == "extra_training":
            # finetune: the unpruned net trained on. authors: the same build on the unpruned backbone
            # (re-initialisation alone), trained as long.
            backbone = caps = inter = 0.0
            reinit = authors
        return PruneVariant(
            criterion=self.criterion,
            backbone_ratio=backbone,
            caps_ratio=caps,
            intermediate_ratio=inter,
            capsule_criterion=self.capsule_criterion,
            procedure=self.procedure,
            reinit_caps_layers=reinit,
            control=control,
            finetune_epochs=self.finetune_epochs,
            score_images=self.score_images,
            base_epochs=base_epochs,
            base_depth=self.base_depth if authors else None,
        )

    def variants(self, base_epochs: int) -> list[PruneVariant]:
        """Every net the settings ask for: each pair's pruned net and its scratch and random controls, then one
        extra_training control per config (it has no ratios)."""
        out = []
        for b, c in self.pairs:
            out.append(self.variant(base_epochs, b, c))
            if self.control_pairs is None or (b, c) in self.control_pairs:
                out += [
                    self.variant(base_epochs, b, c, k) for k in ("scratch", "random") if k in self.controls
                ]
        if "extra_training" in self.controls and self.pairs:
            out.append(self.variant(base_epochs, 0.0, 0.0, "extra_training"))
        return out
