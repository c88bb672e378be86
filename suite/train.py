"""Training of one RunConfig: seeded, resumable from atomic per-epoch checkpoints, stopped cleanly on divergence.

Writes config.json, checkpoint.pt and metrics.json into the config's folder; health.json via `measure_health`.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from capsbench.models import CapsNet, build_capsnet, margin_loss, reconstruction_loss
from capsbench.models.health import capsule_health
from capsbench.models.losses import ccm_loss
from capsbench.models.pruning import FeatureMaps, backbone_blocks
from capsbench.results import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    HEALTH_FILE,
    METRICS_FILE,
    Status,
    is_trained,
    read_result,
    write_json,
)
from capsbench.suite import data as datasets
from capsbench.suite.checkpoints import load_model, model_from_state, read_checkpoint, save_torch
from capsbench.suite.env import environment, pick_device
from capsbench.suite.errors import CheckpointError, ConfigError, DivergenceError
from capsbench.suite.presets import RunConfig

__all__ = ["CheckpointError", "load_model", "model_from_state", "read_checkpoint", "is_trained"]
EVAL_BATCH = 500
# Training precision: fp32, or bf16 autocast over forward and loss (weights, optimizer and evaluation stay fp32).
PRECISIONS = ("fp32", "bf16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of a training forward and loss: autocast for bf16, nothing for fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown training precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


# torch.compile's "auto" policy (the default of `capsbench train`): time the run's first eager steps, then compile
# for the rest when the steps left at that step time would save clearly more than a compile costs. Measured
# with `capsbench bench train` on 2 CPU threads (docs/performance.md): a compiled step took 0.65-0.75 x the
# eager one on the quick net, 0.9-1.0 x on sabour's (whose eager step lost its routing copies); a first compile
# took 16 s (sabour) to 40 s (quick), 2-3 s when inductor's on-disk cache already holds the graph. Where the
# saving is small the nets are big and the runs long, so the bounded cost of a wrong "compile" is one compile.
AUTO_COMPILE_SAVING = 0.15  # share of an eager step's time that compile saves
AUTO_COMPILE_COST_S = 60.0  # seconds of a first compile, at most
AUTO_COMPILE_MARGIN = 2.0  # compile only when the estimated saving is this many compile costs
AUTO_TIMED_STEPS = 3  # eager steps timed after the first one (which warms the allocator)
COMPILE_MODES = ("auto", "default", "max-autotune", "reduce-overhead")
# torch.compile for training, one encoding from the command line (--compile) through the settings to train():
# "off" trains eager, "auto" compiles when it pays, a torch.compile mode always compiles with that mode.
COMPILE_CHOICES = ("off", *COMPILE_MODES)


def compile_pays(steps_left: int, eager_step_s: float) -> bool:
    """The auto policy's rule: do `steps_left` steps of `eager_step_s` save AUTO_COMPILE_MARGIN compiles?"""
    return steps_left * eager_step_s * AUTO_COMPILE_SAVING > AUTO_COMPILE_MARGIN * AUTO_COMPILE_COST_S


def compiled(model: CapsNet, compile_mode: str) -> Callable:
    return torch.compile(model, mode=None if compile_mode in ("default", "auto") else compile_mode)


def recorded_compile_mode(compile_mode: str) -> str | None:
    """`compile_mode` as the checkpoint and metrics.json record it: null for eager, as they always have."""
    return None if compile_mode == "off" else compile_mode


def emulated_bf16(device: torch.device, precision: str) -> bool:
    """bf16 asked on a CPU with neither avx512_bf16 nor amx_bf16: oneDNN converts in software there, and a bf16
    step runs slower than fp32 (the faster machines of this project's kind have avx512_bf16; the slower not)."""
    from capsbench.export.latency import cpu_isa

    return precision == "bf16" and device.type == "cpu" and not {"avx512_bf16", "amx_bf16"} & set(cpu_isa())


def trained_precision(record: dict) -> str:
    """The precision a metrics file or checkpoint was trained in (files from before the option: fp32)."""
    return record.get("precision", "fp32")


@dataclass(frozen=True)
class StageFiles:
    """Where a training stage keeps its resumable checkpoint and its metrics (training and fine-tuning differ)."""

    checkpoint: str = CHECKPOINT_FILE
    metrics: str = METRICS_FILE


TRAIN_FILES = StageFiles()


@dataclass
class Splits:
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_splits(cfg: RunConfig, data_dir: str | Path | None = None) -> Splits:
    """The config's dataset, cut to its subsets: a seeded shuffle of train, the first N test images."""
    train_x, train_y = datasets.load_split(cfg.dataset, "train", data_dir)
    test_x, test_y = datasets.load_split(cfg.dataset, "test", data_dir)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    if tuple(train_x.shape[1:]) != shape:
        raise ConfigError(
            f"dataset {cfg.dataset} has images of shape {tuple(train_x.shape[1:])} but the model expects {shape}; "
            "set in_channels/image_size to match"
        )
    if cfg.train_subset is not None and cfg.train_subset < len(train_x):
        keep = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.seed))[
            : cfg.train_subset
        ]
        train_x, train_y = train_x[keep], train_y[keep]
    if cfg.eval_subset is not None:
        test_x, test_y = test_x[: cfg.eval_subset], test_y[: cfg.eval_subset]
    return Splits(train_x, train_y, test_x, test_y)


def test_images(splits: Splits, count: int) -> torch.Tensor:
    """The first `count` test images as float32 in [0, 1] (parity checks and timing inputs)."""
    return splits.test_x[:count].float().div_(255.0)


def to_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] on the device."""
    return x.to(device, non_blocking=True).float().div_(255.0)


def eval_batches(images: torch.Tensor, device: torch.device, batch: int = EVAL_BATCH):
    for i in range(0, len(images), batch):
        yield to_input(images[i : i + batch], device)


@torch.no_grad()
def evaluate(model: CapsNet, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Top-1 accuracy: the longest class capsule is the prediction."""
    model.eval()
    correct = 0
    for x, i in zip(eval_batches(images, device), range(0, len(images), EVAL_BATCH), strict=True):
        pred = CapsNet.lengths(model(x)).argmax(dim=1).cpu()
        correct += int((pred == labels[i : i + EVAL_BATCH]).sum())
    return correct / max(len(images), 1)


def train(
    cfg: RunConfig,
    out_dir: Path,
    splits: Splits,
    *,
    device: str | torch.device | None = None,
    force: bool = False,
    progress: bool = True,
    model: CapsNet | None = None,
    epochs: int | None = None,
    files: StageFiles = TRAIN_FILES,
    label: str = "train",
    compile_mode: str = "off",
    precision: str = "fp32",
) -> dict:
    """Train (or resume, or skip when finished) one config; returns the metrics written to `files.metrics`.

    With `model`, training starts from that network (e.g. a pruned one, for fine-tuning) instead of a fresh
    one, for `epochs` epochs (default: the config's); the checkpoint records the network's own architecture.
    `label` names the stage in the progress output ("train", "finetune", ...). The progress bar is drawn only
    when stderr is a terminal; in a log file the output is one line per epoch.

    `compile_mode` (one of COMPILE_CHOICES): a torch.compile mode ("default", "max-autotune", or on CUDA
    "reduce-overhead" for CUDA graphs) for the training forward (and, through AOTAutograd, its backward); "off"
    trains eager; "auto" (the CLI's default) times the first AUTO_TIMED_STEPS + 1 steps eager and compiles for the rest of this run only when
    `compile_pays`: on 2 CPU threads a first compile (tens of seconds per net) outweighs its gain on the smoke
    and depth nets and pays off many times on the quick and sabour ones (see `capsbench bench train`). The
    decision and its figures are recorded in the metrics ("compile"). The checkpoint holds the eager module's
    weights either way.

    `precision`: "fp32", or "bf16" for autocast over the forward and the loss (fp32 weights and Adam; capsule
    lengths and squash in fp32, see models.layers.full_precision; evaluation in fp32, as the net is exported).
    It is recorded in the checkpoint and metrics: a finished or half-done training of the other precision is
    not reused but trained again from scratch.
    """
    out_dir = Path(out_dir)
    device = torch.device(device) if isinstance(device, torch.device) else pick_device(device)
    epochs = cfg.epochs if epochs is None else epochs
    ckpt_path = out_dir / files.checkpoint
    autocast(device, precision)  # an unknown precision fails here, before anything is removed or written
    if compile_mode not in COMPILE_CHOICES:
        raise ConfigError(
            f"unknown compile mode {compile_mode!r}; choose one of {', '.join(COMPILE_CHOICES)}"
        )
    if not force and is_trained(out_dir, files.metrics, files.checkpoint):
        done = read_result(out_dir / files.metrics, "metrics")
        if trained_precision(done) == precision:
            return done
        force = True  # a finished training of the other precision: train again, as with --force
        if progress:
            tqdm.write(
                f"  {label} {cfg.id}: trained in {trained_precision(done)}, {precision} asked: training again"
            )
    if force:
        for name in (files.checkpoint, files.metrics):
            (out_dir / name).unlink(missing_ok=True)
    if emulated_bf16(device, precision):
        tqdm.write(
            f"  {label} {cfg.id}: note: this CPU has no avx512_bf16 or amx_bf16, so bf16 is emulated and "
            "slower than fp32 here (recorded in metrics.json)"
        )
    write_json(
        out_dir / CONFIG_FILE, "config", {"config_id": cfg.id, "label": cfg.label, "config": cfg.to_dict()}
    )

    torch.manual_seed(cfg.seed)
    if torch.device(device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    history: list[dict] = []
    start_epoch, resumed_from = 1, None
    state = read_checkpoint(cfg, ckpt_path) if ckpt_path.exists() else None
    if state is not None and trained_precision(state) != precision:
        state = None  # never resume one precision's run in another: start afresh, overwriting it
    if state is not None:
        model = model_from_state(state, cfg.model)
    elif model is None:
        model = build_capsnet(cfg.model)
    model = model.to(device)
    forward = model if compile_mode in ("off", "auto") else compiled(model, compile_mode)
    decision = None if compile_mode == "auto" else {"policy": compile_mode, "compiled": forward is not model}
    step_times: list[float] = []
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.lr_decay)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = resumed_from = state["epoch"] + 1

    n = len(splits.train_x)
    steps = math.ceil(n / cfg.batch_size)
    # These datasets fit on any device: move them once (uint8) so a step is an index and a float conversion.
    train_x, train_y = splits.train_x.to(device), splits.train_y.to(device)
    t_start = time.perf_counter()
    steps_left = steps * max(epochs - start_epoch + 1, 0)
    for epoch in range(start_epoch, epochs + 1):
        model.train()
        # Shuffle from (seed, epoch) alone so a resumed run sees exactly the batches of an uninterrupted one.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)).to(
            device
        )
        loss_sum, correct, seen = 0.0, 0, 0
        t0 = time.perf_counter()
        bar = tqdm(
            range(steps),
            desc=f"{label} {cfg.id} epoch {epoch}/{epochs}",
            disable=None if progress else True,  # None: tqdm draws nothing when stderr is not a TTY
            leave=False,
            unit="batch",
            dynamic_ncols=True,
        )
        # CCM needs the backbone's post-ReLU maps: hooks only when the term is on, so the default path is as is.
        ccm_maps = FeatureMaps(backbone_blocks(model), detach=False) if cfg.ccm_weight else None
        ccm_sum = 0.0
        with ccm_maps or contextlib.nullcontext():
            for step in bar:
                t_step = time.perf_counter()
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                x, y = train_x[idx].float().div_(255.0), train_y[idx]
                with autocast(device, precision):
                    v = forward(x)
                    lengths = CapsNet.lengths(v)
                    loss = margin_loss(lengths, y, cfg.m_pos, cfg.m_neg, cfg.lam)
                    if model.decoder is not None:
                        loss = loss + cfg.recon_weight * reconstruction_loss(model.decoder(v, y), x)
                    if ccm_maps is not None:
                        ccm = ccm_loss(list(ccm_maps.maps.values()), detach=cfg.ccm_detach)
                        loss = loss - cfg.ccm_weight * ccm
                        ccm_sum += ccm.item() * len(idx)
                if not torch.isfinite(loss):
                    raise DivergenceError(
                        f"config {cfg.id}: loss became {loss.item()} at epoch {epoch}, step {step + 1}; "
                        "likely causes: capsules that vanished (lengths at or near 0 in a deep stack: see "
                        "health_init.json and health.json), the capsule-layer init scale (model.caps_init), or "
                        "a learning rate (lr) too high for this net"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)
                correct += int((lengths.argmax(dim=1) == y).sum())
                seen += len(idx)
                steps_left -= 1
                if decision is None:  # auto: decide once the first eager steps are timed
                    step_times.append(time.perf_counter() - t_step)
                    if len(step_times) == AUTO_TIMED_STEPS + 1:
                        decision = auto_compile(step_times[1:], steps_left)
                        if decision["compiled"]:
                            forward = compiled(model, compile_mode)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        test_acc = evaluate(model, splits.test_x, splits.test_y, device)
        history.append(
            {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "test_acc": test_acc,
                "lr": opt.param_groups[0]["lr"],
                "train_seconds": train_seconds,
                "train_images_per_s": seen / train_seconds,
            }
        )
        if ccm_maps is not None:
            history[-1]["train_ccm"] = ccm_sum / seen
        sched.step()
        save_torch(
            ckpt_path,
            {
                "config_id": cfg.id,
                "config": cfg.to_dict(),
                "model_config": model.cfg.to_dict(),
                "epoch": epoch,
                "precision": precision,
                "compile_mode": recorded_compile_mode(compile_mode),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
            },
        )
        if progress:
            tqdm.write(
                f"  {label} {cfg.id} epoch {epoch}/{epochs}: loss {loss_sum / seen:.4f} "
                f"train acc {correct / seen:.4f} test acc {test_acc:.4f} ({seen / train_seconds:.0f} img/s)"
            )
    if not history:
        raise CheckpointError(f"{ckpt_path}: no finished epoch recorded; rerun with --force")
    if decision is None:
        decision = {"policy": "auto", "compiled": False, "reason": "too few steps to time"}
    metrics = {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": Status.COMPLETE,
        "epochs": epochs,
        "test_accuracy": history[-1]["test_acc"],
        "best_test_accuracy": max(h["test_acc"] for h in history),
        "train_images": n,
        "eval_images": len(splits.test_x),
        "parameters": model.num_parameters(),
        "resumed_from_epoch": resumed_from,
        "precision": precision,
        "bf16_emulated": emulated_bf16(device, precision),
        "compile_mode": recorded_compile_mode(compile_mode),
        "compile": decision,
        "wall_seconds_this_run": time.perf_counter() - t_start,
        "train_seconds_total": sum(h["train_seconds"] for h in history),
        "history": history,
        "environment": environment(device),
    }
    write_json(out_dir / files.metrics, "metrics", metrics)
    return metrics


def auto_compile(eager_step_times: list[float], steps_left: int) -> dict:
    """The auto policy's decision from the timed eager steps, with the figures it was made on."""
    from capsbench.suite.env import compile_unavailable

    step_s = statistics.median(eager_step_times)
    unavailable = compile_unavailable()
    return {
        "policy": "auto",
        "compiled": compile_pays(steps_left, step_s) and unavailable is None,
        **({"unavailable": unavailable} if unavailable else {}),
        "eager_step_s": step_s,
        "steps_left": steps_left,
        "estimated_saving_s": steps_left * step_s * AUTO_COMPILE_SAVING,
        "compile_cost_s": AUTO_COMPILE_COST_S,
    }


def write_failure(
    out_dir: Path, cfg: RunConfig, status: Status, error: str, files: StageFiles = TRAIN_FILES
) -> dict:
    """Record a config that could not finish, so the run goes on and the report can say why."""
    metrics = {"config_id": cfg.id, "label": cfg.label, "status": status, "error": error}
    write_json(Path(out_dir) / files.metrics, "metrics", metrics)
    return metrics


def measure_health(
    cfg: RunConfig,
    out_dir: Path,
    splits: Splits,
    *,
    device: str | torch.device | None = None,
    threshold: float | None = None,
    checkpoint: str = CHECKPOINT_FILE,
    output: str = HEALTH_FILE,
) -> dict:
    """Capsule lengths of every capsule layer over the evaluation set -> health.json."""
    device = torch.device(device) if isinstance(device, torch.device) else pick_device(device)
    model = load_model(cfg, Path(out_dir) / checkpoint).to(device)
    threshold = cfg.inactive_threshold if threshold is None else threshold
    health = capsule_health(model, eval_batches(splits.test_x, device), threshold=threshold, device=device)
    health = {"config_id": cfg.id, "label": cfg.label, "eval_images": len(splits.test_x), **health}
    write_json(Path(out_dir) / output, "health", health)
    return health
