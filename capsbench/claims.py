"""The claims a run is judged on, in one registry that the statistics stage (suite/verdicts.py) and the report
(reports/render.py) both read: each claim's words, where it comes from (the paper, or this suite's own reading of
it), the paired difference that tests it, the sign the claim predicts, its equivalence margin, and the report's
chart that shows the data behind it. Also the verdict words and the rule that decides between them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from capsbench.results import StrEnum


class Verdict(StrEnum):
    """A claim's verdict in one stratum (verdicts.json's `verdict`; RULE says how each is reached)."""

    HELD = "held"
    DID_NOT_HOLD = "did not hold"
    INCONCLUSIVE = "inconclusive"
    NOT_TESTABLE = "not testable"


VERDICTS = tuple(Verdict)
MIN_NON_TIED = (
    6  # paired units whose difference is not 0: fewer cannot reach p < 0.05 in a two-sided sign test
)
ALPHA = 0.05  # family-wise, Holm across every claim and stratum of a run
LEVEL = 0.95  # the effect's BCa bootstrap interval

RULE = (
    "Per claim and stratum, paired differences over units (config shape and seed). not testable: fewer than "
    f"{MIN_NON_TIED} non-tied units, or (inactive-capsule claims) no reference net in the stratum partly alive. "
    "held: the exact two-sided sign test over the non-tied units, Holm-adjusted across all claims and strata, "
    f"gives p < {ALPHA} and the {int(LEVEL * 100)}% BCa bootstrap interval of the mean difference lies strictly on "
    "the claim's side of 0. did not hold: that interval lies strictly on the other side, or wholly inside the "
    "claim's equivalence margin (no effect worth the name). inconclusive: anything else, e.g. an interval that "
    "touches or crosses 0."
)


@dataclass(frozen=True)
class Claim:
    key: str
    text: str  # the claim in words
    source: (
        str  # "paper": Sahu & Altahhan 2024 claim it; "suite": this suite's reading of the paper's premise
    )
    difference: str  # the paired difference that tests it, in words
    direction: int  # the sign of that difference the claim predicts (+1 / -1)
    margin: float  # equivalence margin of the difference ("did not hold" when the interval lies inside it)
    chart: str  # the report's anchor for the data behind it

    @property
    def predicts(self) -> str:
        return "> 0" if self.direction > 0 else "< 0"


CLAIMS: tuple[Claim, ...] = (
    Claim(
        "deeper_loses_accuracy",
        "Adding capsule layers does not improve accuracy, or lowers it (Sahu & Altahhan 2024; Everett et al. 2023).",
        "paper",
        "test accuracy, deeper minus shallower (adjacent trained depths, same capsule shape and seed)",
        -1,
        0.02,
        "accuracy-depth",
    ),
    Claim(
        "deeper_more_inactive",
        "Deeper capsule layers have more inactive capsules (vanishing activations).",
        "paper",
        "inactive fraction, mean over routed layers, deeper minus shallower (adjacent depths, same shape and seed)",
        +1,
        0.05,
        "depth-profile",
    ),
    Claim(
        "larger_dims_train_deeper",
        "Larger capsule dimensions let deeper capsule networks train (their class capsules stay longer).",
        "paper",
        "log10 mean class-capsule length, capsule dimension 16 minus 8 (same capsule count, depth, init and seed)",
        +1,
        0.1,
        "depth-profile",
    ),
    Claim(
        "pruning_fewer_inactive",
        "Pruned models have fewer inactive capsules than the unpruned models of the same configuration.",
        "paper",
        "inactive fraction per routed layer over the layers both nets share (mean), pruned minus reference",
        -1,
        0.05,
        "depth-profile",
    ),
    Claim(
        "pruning_better_accuracy",
        "Pruned models have better accuracy than the unpruned models of the same configuration.",
        "paper",
        "test accuracy, pruned minus reference",
        +1,
        0.02,
        "pruning",
    ),
)
BY_KEY = {c.key: c for c in CLAIMS}


# ------------------------------------------------------------------ the measure of inactive capsules


def routed_fractions(health: dict | None) -> dict[str, float]:
    """{layer name: inactive fraction} of the routed layers (all but PrimaryCaps) of a health summary."""
    out = {}
    for layer in (health or {}).get("layers") or []:
        if layer.get("name") == "primary" or not layer.get("num_capsules"):
            continue
        frac = layer.get("inactive_fraction")
        out[layer["name"]] = frac if frac is not None else layer["inactive"] / layer["num_capsules"]
    return out


def mean_inactive_fraction(health: dict | None) -> float | None:
    """The mean over routed layers of each layer's inactive fraction (a layer of 8 capsules weighs as much as one
    of 32: a narrower pruned net with the same dead layers shows the same value); the pooled routed fraction
    when the file has no layers."""
    fractions = routed_fractions(health)
    if fractions:
        return statistics.fmean(fractions.values())
    return None if not health else health.get("routed_inactive_fraction")
