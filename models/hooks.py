"""Forward hooks as a context manager: the one mechanism behind the health probes and the feature-map taps.

Subclasses say what to keep from each named module's output; hooks are removed on exit, whatever happens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ForwardHooks:
    """Registers a forward hook on each (name, module) on entry that calls `record(name, output)`."""

    def __init__(self, modules: Sequence[tuple[str, nn.Module]]):
        self.modules = list(modules)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def record(self, name: str, output: torch.Tensor) -> None:
        raise NotImplementedError

    def _hook(self, name: str):
        def hook(_module: nn.Module, _inputs, output: torch.Tensor) -> None:
            self.record(name, output)

        return hook

    def __enter__(self):
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
