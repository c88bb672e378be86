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
    for cfg in preset.configs():
        print(f"{cfg.id}  {cfg.dataset:<14} {cfg.epochs:>3} ep  {cfg.label}")
    return 0
