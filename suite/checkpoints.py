"""The one checkpoint reader and writer: torch files saved atomically and loaded with weights_only=True, and
the networks they hold rebuilt with their own architecture (a pruned net is smaller than its config's)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from capsbench.files import atomic_write
from capsbench.models import CapsNet, CapsNetConfig, build_capsnet
from capsbench.suite.errors import CheckpointError


def not_trained_message(cfg: Any, out_dir: Path) -> str:
    """The one line for a stage asked to use a config (a RunConfig) whose training has not finished."""
    return (
        f"{cfg.id}: not trained yet (no finished training in {out_dir}); "
        f"run 'capsbench train' for this config first (e.g. --configs {cfg.id})"
    )


def save_torch(path: Path, obj: Any) -> Path:
    """torch.save through a temp file and rename, so a killed run never leaves a truncated checkpoint. The
    bytes are made in memory first and written by Python: a full disk is then the OS's own error (ENOSPC,
    one line at the CLI), not torch's writer's 'unexpected pos'."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(Path(path), lambda f: f.write(buffer.getbuffer()), "wb")


def load_torch(path: Path) -> Any:
    """torch.load of tensors and plain containers only (weights_only), with a clear error for a missing or
    corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a corrupt zip/pickle
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: corrupt or unreadable checkpoint ({type(e).__name__}: {first}); "
            "delete it or rerun with --force"
        ) from e


def read_checkpoint(cfg: Any, checkpoint: Path) -> dict:
    """A checkpoint's contents, refusing a foreign file or one written for another config."""
    state = load_torch(checkpoint)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(
            f"{checkpoint}: not a capsbench checkpoint (no model state); rerun with --force"
        )
    if state.get("config_id") != cfg.id:
        raise CheckpointError(
            f"{checkpoint}: written for config {state.get('config_id')}, not {cfg.id}; "
            "delete the folder or rerun with --force"
        )
    return state


def model_from_state(state: dict, fallback: CapsNetConfig) -> CapsNet:
    """Rebuild the network a checkpoint holds: its own architecture (a pruned net is smaller than its config's)."""
    arch = state.get("model_config")
    model = build_capsnet(CapsNetConfig.from_dict(arch) if arch else fallback)
    model.load_state_dict(state["model"])
    return model


def load_model(cfg: Any, checkpoint: Path) -> CapsNet:
    """A trained (or pruned) model from a checkpoint of this config."""
    return model_from_state(read_checkpoint(cfg, Path(checkpoint)), cfg.model)
