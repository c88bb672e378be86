"""`capsbench presets`: list the named grids, or the configs of one with their ids."""

from __future__ import annotations

from capsbench.suite.presets import PRESETS, get_preset


def register(sub) -> None:
    p = sub.add_parser(
        "presets",
        help="list presets (named grids of configs)",
        description="List the presets, or with --preset NAME the configs of one with their ids.",
    )
    p.add_argument("--preset", default=None, help="show the configs of this preset")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.preset is None:
        for preset in PRESETS.values():
            print(f"{preset.name:<8} {len(preset.configs()):>3} configs  {preset.description}")
        return 0
    preset = get_preset(args.preset)
    for stratum in preset.stratum_list():
        if (
            preset.strata
        ):  # a stratified study: each part with its stages and pruning (a config may be in two)
            prune = stratum.prune or preset.prune
            pruned = "prune" in (stratum.stages or ("prune",))
            what = (
                f"pairs {list(prune.pairs)}, {prune.procedure}, controls {list(prune.controls)}"
                if pruned
                else ""
            )
            stages = " ".join(stratum.stages) if stratum.stages else "every stage"
            print(
                f"# {stratum.name}: {len(stratum.configs())} configs; {stages}{'; ' + what if what else ''}"
            )
        for cfg in stratum.configs():
            print(f"{cfg.id}  {cfg.dataset:<14} {cfg.epochs:>3} ep  {cfg.label}")
    return 0
