"""Run configs and the named presets (grids of configs): `smoke`, `depth`, `quick`, `paper` and the `sabour` reference.

A RunConfig is what produces one trained model: the architecture plus data and schedule. Its id hashes all of it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capsbench.models.config import CapsNetConfig, caps_label, stable_hash
from capsbench.suite.errors import ConfigError
from capsbench.suite.prune_settings import CONTROLS, PROCEDURES, PruneSettings  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class RunConfig:
    model: CapsNetConfig
    dataset: str = "fashion-mnist"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_decay: float = 0.96  # ExponentialLR gamma per epoch; 1.0 = constant (the paper's code)
    weight_decay: float = 2e-7
    m_pos: float = 0.9
    m_neg: float = 0.1
    lam: float = 0.5
    recon_weight: float = 0.0005  # used only when model.decoder is on
    train_subset: int | None = None  # first N images of a seeded shuffle of the training split; None = all
    eval_subset: int | None = None  # first N images of the test split; None = all
    seed: int = 0
    inactive_threshold: float = 0.01
    # loss = margin - ccm_weight * CCM(backbone maps): the paper's code uses 0.01 (rewarding correlated, hence
    # prunable, channels); ccm_detach reproduces that code's detached maps, under which the term has no effect.
    ccm_weight: float = 0.0
    ccm_detach: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ConfigError(f"unknown RunConfig fields: {sorted(set(d) - known)}")
        d["model"] = CapsNetConfig.from_dict(d["model"])
        return cls(**d)

    @property
    def id(self) -> str:
        return stable_hash(self.to_dict())

    @property
    def label(self) -> str:
        """Human-readable: backbone, primary caps, intermediate layers, seed."""
        m = self.model
        inter = caps_label(m.intermediate) if m.intermediate else "none"
        return f"{m.backbone} prim {m.primary_types}x{m.primary_dim} | inter {m.depth}: {inter} | seed {self.seed}"

    def replace(self, **changes: Any) -> RunConfig:
        model_changes = {k: changes.pop(k) for k in list(changes) if k in CapsNetConfig.__dataclass_fields__}
        model = dataclasses.replace(self.model, **model_changes) if model_changes else self.model
        return dataclasses.replace(self, model=model, **changes)


@dataclass(frozen=True)
class Stratum:
    """A part of a preset's study with its own configs, seeds, stages and pruning (e.g. the `depth` preset trains
    a wide grid for the depth claims and prunes only the configs at the cliff's edge)."""

    name: str
    build: Callable[[], list[RunConfig]]
    seeds: int = 1
    stages: tuple[str, ...] | None = None  # None: every stage the command runs
    prune: PruneSettings | None = None  # None: the preset's

    def configs(self, seeds: int | None = None) -> list[RunConfig]:
        seeds = self.seeds if seeds is None else seeds
        return [c.replace(seed=c.seed + k) for c in self.build() for k in range(seeds)]


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    build: Callable[[], list[RunConfig]]
    # What `capsbench all` prunes each trained config with (suite/prune_settings.py).
    prune: PruneSettings = PruneSettings()
    seeds: int = 1  # every config with seeds seed, seed+1, ..., seed+seeds-1
    timed_configs: int | None = None  # export and time only the first N configs (None: all)
    # The timing budget (`time` and `all` unless --batch-sizes / --min-rounds): batch sizes (None: the
    # harness's) and the clean rounds that may stop the time stage early when they agree (None: all rounds).
    time_batch_sizes: tuple[int, ...] | None = None
    time_min_rounds: int | None = None

    # Parts of the study with their own configs, seeds, stages and pruning; empty: one stratum of everything.
    strata: tuple[Stratum, ...] = ()

    def stratum_list(self) -> tuple[Stratum, ...]:
        return self.strata or (Stratum("all", self.build, self.seeds, None, self.prune),)

    def configs(self, seeds: int | None = None) -> list[RunConfig]:
        """Every config of every stratum, each once, in the strata's order."""
        return list(dict.fromkeys(c for st in self.stratum_list() for c in st.configs(seeds)))


PRESETS: dict[str, Preset] = {}


def register_preset(name: str, description: str, **fields: Any):
    def wrap(fn: Callable[[], list[RunConfig]]) -> Callable[[], list[RunConfig]]:
        preset = Preset(name, description, fn, **fields)
        PRESETS[name] = preset
        return fn

    return wrap


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(
            f"unknown preset {name!r}; known presets: {', '.join(PRESETS)} (see 'capsbench presets')"
        ) from None


def capsule_grid(base: RunConfig, num_caps: list[int], dims: list[int], depths: list[int]) -> list[RunConfig]:
    """The paper's grid: capsule count n and dimension d for PrimaryCaps types and every intermediate layer
    (the paper's code uses 16 x 12 for both), and the number of intermediate layers k."""
    return [
        base.replace(primary_types=n, primary_dim=d, intermediate=((n, d),) * k)
        for k, n, d in itertools.product(depths, num_caps, dims)
    ]


@register_preset(
    "smoke",
    "2 tiny sahu nets (0 and 3 intermediate layers) on 12k Fashion-MNIST images, 2 epochs: "
    "a few minutes on 2 CPU cores; used by the tests and CI",
    prune=PruneSettings(pairs=((0.25, 0.25),), finetune_epochs=1),
    time_min_rounds=2,  # the first run's timing budget: two rounds when they agree, three when not
)
def _smoke() -> list[RunConfig]:
    base = RunConfig(
        model=CapsNetConfig(backbone="sahu", backbone_channels=(16, 32, 64)),
        epochs=2,
        train_subset=12000,
        eval_subset=2000,
    )
    return capsule_grid(base, num_caps=[8], dims=[8], depths=[0, 3])


def _depth_base() -> RunConfig:
    # fan_in: the scheme under which the cliff lies inside a CPU budget (docs/presets-and-pruning.md, the
    # pre-check): at initialisation the largest routed-layer gradient is >= 3.6e-6 at depth 2 (the net trains),
    # 1e-11 to 1e-8 at depth 3 (the edge: it ends partly alive), <= 2e-17 at depth 4 (it stays dead).
    return RunConfig(
        model=CapsNetConfig(backbone="sahu", backbone_channels=(16, 32, 64), caps_init="fan_in"),
        epochs=1,
        batch_size=64,  # as measured: 94 steps, enough for depth 2 to recover from its dead start
        train_subset=6000,
        eval_subset=1000,
    )


# 16 x 16, the costliest shape, is left out: 8x8 vs 8x16 varies the dimension, 8x8 vs 16x8 the count.
DEPTH_SHAPES = ((8, 8), (8, 16), (16, 8))
DEPTH_EDGE = ((16, 8), (8, 16))  # placed at the edge at depth 3 by the pre-check, deepest into it first


def _shape(n: int, d: int, depth: int) -> RunConfig:
    return _depth_base().replace(primary_types=n, primary_dim=d, intermediate=((n, d),) * depth)


def _depth_grid() -> list[RunConfig]:
    return [_shape(n, d, depth) for depth in (1, 2, 3, 4) for n, d in DEPTH_SHAPES]


register_preset(
    "depth",
    "the vanishing-activation cliff on 2 CPU cores (sahu 16/32/64, fan_in, 6000 images, 1 epoch), in strata: "
    "{8x8, 8x16, 16x8} x depths 1-4 x 3 seeds trained for the depth and dimension claims; the two shapes the "
    "pre-check places at the edge (depth 3) x 5 seeds pruned at (0.5, 0.5) with the ablations (0.5, 0) and (0, "
    "0.5) and the three controls beside (0.5, 0.5); the authors' procedure on 8x8 (depth 0 -> 3, 3 seeds) with "
    "its controls; only the first config timed (batch 1, 32)",
    strata=(
        Stratum("depth grid (claims a, b)", _depth_grid, seeds=3, stages=("train", "health")),
        Stratum(
            "edge (claim c)",
            lambda: [_shape(n, d, 3) for n, d in DEPTH_EDGE],
            seeds=5,
            stages=("train", "health", "prune"),
            prune=PruneSettings(
                pairs=((0.5, 0.5), (0.5, 0.0), (0.0, 0.5)),
                finetune_epochs=1,
                controls=CONTROLS,
                control_pairs=((0.5, 0.5),),
            ),
        ),
        Stratum("authors' base", lambda: [_shape(8, 8, 0)], seeds=3, stages=("train", "health")),
        Stratum(
            "authors' procedure",
            lambda: [_shape(8, 8, 3)],
            seeds=3,
            stages=("train", "health", "prune"),
            prune=PruneSettings(
                pairs=((0.5, 0.5),), finetune_epochs=1, procedure="authors", controls=CONTROLS
            ),
        ),
    ),
    prune=PruneSettings(pairs=((0.5, 0.5),), finetune_epochs=1, controls=CONTROLS),
    timed_configs=1,
    time_batch_sizes=(1, 32),
)(_depth_grid)


@register_preset(
    "quick",
    "the paper's sahu net (backbone width follows P) on full Fashion-MNIST, 5 epochs, {8, 16} capsules x {8, 16} dims x "
    "{0, 2, 4, 6} intermediate layers under the authors' init, 3 seeds, the authors' procedure (prune the "
    "depth-0 net, build each deeper net on it) at one pruning pair with the three controls: a few hours on one GPU",
    prune=PruneSettings(pairs=((0.5, 0.5),), finetune_epochs=2, procedure="authors", controls=CONTROLS),
    seeds=3,
    timed_configs=4,
)
def _quick() -> list[RunConfig]:
    # The paper's code trains with margin loss - 0.01 x CCM of the backbone's feature maps, N(0, 0.1) capsule
    # weights and a backbone that follows P. Under that init the cliff lies at depth 2 (measure_cliff.json), so
    # {0, 2, 4, 6} crosses it with room on both sides.
    base = RunConfig(
        model=CapsNetConfig(backbone="sahu", caps_init="authors", backbone_width="follow_p"),
        epochs=5,
        ccm_weight=0.01,
    )
    return capsule_grid(base, num_caps=[8, 16], dims=[8, 16], depths=[0, 2, 4, 6])


@register_preset(
    "paper",
    "the full grid: {8, 16, 32} capsules x {4, 8, 12, 16, 32} dims x 0-5 intermediate layers, authors' init "
    "and procedure, 30 epochs on full Fashion-MNIST, 3 seeds, pruning pairs with the three controls (GPU; "
    "the schedule is assumed, see docs/models.md)",
    prune=PruneSettings(
        pairs=((0.25, 0.25), (0.5, 0.5), (0.75, 0.75)),
        finetune_epochs=5,
        procedure="authors",
        controls=CONTROLS,
    ),
    seeds=3,
    timed_configs=6,
)
def _paper() -> list[RunConfig]:
    base = RunConfig(
        model=CapsNetConfig(backbone="sahu", caps_init="authors", backbone_width="follow_p"),
        epochs=30,
        ccm_weight=0.01,
    )
    return capsule_grid(base, num_caps=[8, 16, 32], dims=[4, 8, 12, 16, 32], depths=[0, 1, 2, 3, 4, 5])


@register_preset(
    "sabour",
    "the classic Sabour et al. 2017 CapsNet (9x9 convs, 32x8 primary caps, decoder): "
    "the performance reference, 10 epochs",
)
def _sabour() -> list[RunConfig]:
    model = CapsNetConfig(backbone="sabour", primary_types=32, primary_dim=8, decoder=True)
    return [RunConfig(model=model, epochs=10)]
