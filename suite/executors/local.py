"""The default executor: every config in this process, one after another."""

from __future__ import annotations

from collections.abc import Callable


def execute(configs: list, names: list[str], run_one: Callable, log: Callable[[str], None]) -> list:
    outcomes = []
    for i, cfg in enumerate(configs, 1):
        log(f"[{i}/{len(configs)}] {cfg.id}  {cfg.label}")
        outcomes.append(run_one(cfg, names))
    return outcomes
