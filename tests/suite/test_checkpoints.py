"""The one checkpoint reader (suite/checkpoints.py): a crafted checkpoint is refused without running its code."""

from pathlib import Path

import pytest
import torch

from capsbench.suite.checkpoints import read_checkpoint
from capsbench.suite.errors import CheckpointError
from capsbench.suite.presets import get_preset

CFG = get_preset("smoke").configs()[0].replace(train_subset=256, eval_subset=128, epochs=1)


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_does_not_run_code_when_loaded(tmp_path):
    marker, ckpt = tmp_path / "pwned", tmp_path / "checkpoint.pt"
    torch.save({"model": _Exploit(marker), "config_id": CFG.id}, ckpt)
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        read_checkpoint(CFG, ckpt)
    assert not marker.exists()
