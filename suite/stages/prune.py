"""The pruning stage: score a trained config's channels, prune it, fine-tune, and measure health before and after.

Writes <config>/prune_<criterion>_b<ratio>_c<ratio>/{surgery.pt, finetune.pt, pruned.pt, prune.json, ...}.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from capsbench.models import CapsNet
from capsbench.models.health import capsule_health
from capsbench.models.pruning import CRITERIA, count_flops, prune_capsnet, score_capsnet
from capsbench.suite import rundir
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_torch, save_torch
from capsbench.suite.env import environment, pick_device
from capsbench.suite.errors import CheckpointError, ConfigError
from capsbench.suite.presets import RunConfig
from capsbench.suite.rundir import (
    HEALTH_PRUNED_FILE,
    PRUNE_FILE,
    PRUNED_FILE,
    SURGERY_FILE,
    SWEEP_FILE,
    prune_dir_name,
    read_result,
    write_json,
)
from capsbench.suite.stages.base import Context, Stage

FINETUNE_FILES = training.StageFiles(checkpoint=rundir.FINETUNE_CHECKPOINT, metrics=rundir.FINETUNE_METRICS)
DEFAULT_FINETUNE_EPOCHS = 2
DEFAULT_SCORE_IMAGES = 640  # CHIP's 5 batches of 128
SCORE_BATCH = 128


def health_summary(health: dict) -> dict:
    """The per-layer inactive counts of a health result, without the per-capsule lists."""
    return {
        "routed_inactive": health["routed_inactive"],
        "routed_capsules": health["routed_capsules"],
        "layers": [
            {k: layer[k] for k in ("name", "num_capsules", "inactive", "inactive_mean_only", "mean_length")}
            for layer in health["layers"]
        ],
    }


def measure(
    model: CapsNet, cfg: RunConfig, splits: training.Splits, device: torch.device, health: dict | None = None
) -> dict:
    """Accuracy, evaluation wall time, parameters, FLOPs and health (unless given) of one net on the
    evaluation images. The wall time is of `evaluate` on this machine: compare it only within one run."""
    model = model.to(device)
    t0 = time.perf_counter()
    accuracy = training.evaluate(model, splits.test_x, splits.test_y, device)
    seconds = time.perf_counter() - t0
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    if health is None:
        health = capsule_health(
            model, training.eval_batches(splits.test_x, device), cfg.inactive_threshold, device=device
        )
    return {
        "test_accuracy": accuracy,
        "eval_seconds": seconds,
        "eval_images_per_s": len(splits.test_x) / seconds if seconds > 0 else None,
        "parameters": model.num_parameters(),
        "flops": count_flops(model, shape),
        "health": health_summary(health),
    }


@dataclass
class TrainedBase:
    """The trained net of a config and what a sweep shares: its measurements and its channel scores."""

    cfg: RunConfig
    out_dir: Path
    splits: training.Splits
    device: torch.device
    _model: CapsNet | None = None
    _measured: dict | None = None
    _scores: dict = field(default_factory=dict)

    @property
    def model(self) -> CapsNet:
        if self._model is None:
            if not rundir.is_trained(self.out_dir):
                raise CheckpointError(
                    f"{self.out_dir}: config {self.cfg.id} has no finished training; run 'capsbench train' "
                    "with the same preset and options first"
                )
            ckpt = self.out_dir / rundir.CHECKPOINT_FILE
            self._model = training.load_model(self.cfg, ckpt).to(self.device).eval()
        return self._model

    def measured(self) -> dict:
        if self._measured is None:
            self._measured = measure(self.model, self.cfg, self.splits, self.device)
        return self._measured

    def scores(self, criterion: str, score_images: int, capsules: bool) -> dict[str, torch.Tensor]:
        key = (criterion, score_images, capsules)
        if key not in self._scores:
            images = self.splits.train_x[:score_images]
            batches = training.eval_batches(images, self.device, SCORE_BATCH)
            self._scores[key] = score_capsnet(self.model, batches, criterion, capsules=capsules)
        return self._scores[key]


def _settings(**kw) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kw.items()}


def prune_config(
    cfg: RunConfig,
    out_dir: Path,
    splits: training.Splits,
    backbone_ratio: float,
    caps_ratio: float,
    criterion: str = "chip",
    *,
    finetune_epochs: int = DEFAULT_FINETUNE_EPOCHS,
    intermediate_ratio: float = 0.0,
    reinit_caps_layers: bool = False,
    score_images: int = DEFAULT_SCORE_IMAGES,
    device: str | torch.device | None = None,
    force: bool = False,
    progress: bool = True,
    base: TrainedBase | None = None,
) -> dict:
    """Prune one trained config at one ratio pair, fine-tune, re-measure; returns what prune.json holds.

    Resumable: the surgery result is kept in surgery.pt and fine-tuning resumes from its own checkpoint; a
    finished setting (prune.json complete) is skipped unless `force`.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    for name, r in (("backbone", backbone_ratio), ("caps", caps_ratio), ("intermediate", intermediate_ratio)):
        if not 0.0 <= r < 1.0:
            raise ConfigError(f"--{name} ratio must lie in [0, 1), got {r}")
    if finetune_epochs < 0 or score_images < 1:
        raise ConfigError("finetune epochs must be >= 0 and score images >= 1")
    out_dir = Path(out_dir)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    base = base or TrainedBase(cfg, out_dir, splits, device)
    sub_name = prune_dir_name(criterion, backbone_ratio, caps_ratio, intermediate_ratio, reinit_caps_layers)
    sub = out_dir / sub_name
    settings = _settings(
        criterion=criterion,
        backbone_ratio=backbone_ratio,
        caps_ratio=caps_ratio,
        intermediate_ratio=intermediate_ratio,
        reinit_caps_layers=reinit_caps_layers,
        finetune_epochs=finetune_epochs,
        score_images=score_images,
    )
    files = [SURGERY_FILE, FINETUNE_FILES.checkpoint, FINETUNE_FILES.metrics, PRUNED_FILE, PRUNE_FILE]
    if force:
        for name in [*files, HEALTH_PRUNED_FILE]:
            (sub / name).unlink(missing_ok=True)
    elif (sub / PRUNE_FILE).is_file():
        done = read_result(sub / PRUNE_FILE, "prune")
        if done.get("settings") != settings:
            raise CheckpointError(
                f"{sub / PRUNE_FILE}: made with {done.get('settings')}, not {settings}; rerun with --force"
            )
        return done

    t_start = time.perf_counter()
    state = _surgery_state(cfg, sub, settings) if (sub / SURGERY_FILE).is_file() else None
    if state is None:
        for name in files[1:] + [HEALTH_PRUNED_FILE]:
            (sub / name).unlink(missing_ok=True)  # anything made from an older surgery
        scores = base.scores(criterion, score_images, capsules=intermediate_ratio > 0)
        torch.manual_seed(cfg.seed)  # the fresh capsule weights of reinit_caps_layers
        pruned, plan = prune_capsnet(
            base.model,
            backbone_ratio,
            caps_ratio,
            scores,
            intermediate_ratio=intermediate_ratio,
            reinit_caps_layers=reinit_caps_layers,
        )
        state = {
            "config_id": cfg.id,
            "config": cfg.to_dict(),
            "model_config": pruned.cfg.to_dict(),
            "model": pruned.state_dict(),
            "settings": settings,
            "plan": plan,
            "before": base.measured(),
            "after_surgery": measure(pruned, cfg, splits, device),
            "surgery_seconds": time.perf_counter() - t_start,
        }
        save_torch(sub / SURGERY_FILE, state)
    pruned = training.model_from_state(state, cfg.model)

    finetune = None
    if finetune_epochs > 0:
        finetune = training.train(
            cfg,
            out_dir,
            splits,
            device=device,
            progress=progress,
            label="finetune",
            model=pruned,
            epochs=finetune_epochs,
            files=training.StageFiles(
                checkpoint=f"{sub_name}/{FINETUNE_FILES.checkpoint}",
                metrics=f"{sub_name}/{FINETUNE_FILES.metrics}",
            ),
        )
        pruned = training.load_model(cfg, sub / FINETUNE_FILES.checkpoint)
    save_torch(
        sub / PRUNED_FILE,
        {
            "config_id": cfg.id,
            "config": cfg.to_dict(),
            "model_config": pruned.cfg.to_dict(),
            "model": pruned.state_dict(),
            "settings": settings,
        },
    )
    health = training.measure_health(
        cfg,
        out_dir,
        splits,
        device=device,
        checkpoint=f"{sub_name}/{PRUNED_FILE}",
        output=f"{sub_name}/{HEALTH_PRUNED_FILE}",
    )
    # Without fine-tuning the final net is the surgery's: its accuracy and counts are already measured.
    after = measure(pruned, cfg, splits, device, health) if finetune else {**state["after_surgery"]}
    result = {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": "complete",
        "settings": settings,
        "folder": sub_name,
        "model_config_before": state["plan"]["model_config_before"],
        "model_config_after": state["plan"]["model_config_after"],
        "summary": {
            "test_accuracy": {
                "before": state["before"]["test_accuracy"],
                "after_surgery": state["after_surgery"]["test_accuracy"],
                "after_finetune": after["test_accuracy"],
            },
            "parameters": {"before": state["before"]["parameters"], "after": after["parameters"]},
            "flops": {"before": state["before"]["flops"], "after": after["flops"]},
            "routed_inactive": {
                "before": state["before"]["health"]["routed_inactive"],
                "after_surgery": state["after_surgery"]["health"]["routed_inactive"],
                "after_finetune": after["health"]["routed_inactive"],
            },
        },
        "before": state["before"],
        "after_surgery": state["after_surgery"],
        "after_finetune": after,
        "finetune_epochs": finetune_epochs,
        "finetune_history": finetune["history"] if finetune else [],
        "plan": state["plan"],
        "eval_images": len(splits.test_x),
        "score_images": min(score_images, len(splits.train_x)),
        "surgery_seconds": state["surgery_seconds"],
        "finetune_seconds": finetune["train_seconds_total"] if finetune else 0.0,
        "wall_seconds_this_run": time.perf_counter() - t_start,
        "environment": environment(device),
    }
    write_json(sub / PRUNE_FILE, "prune", result)
    return result


def _surgery_state(cfg: RunConfig, sub: Path, settings: dict) -> dict | None:
    """The kept surgery result, or None when it was made with other settings (it is then redone)."""
    state = load_torch(sub / SURGERY_FILE)
    if not isinstance(state, dict) or state.get("config_id") != cfg.id:
        raise CheckpointError(
            f"{sub / SURGERY_FILE}: not a surgery result of config {cfg.id}; rerun with --force"
        )
    return state if state.get("settings") == settings else None


def prune_sweep(
    cfg: RunConfig,
    out_dir: Path,
    splits: training.Splits,
    pairs: list[tuple[float, float]],
    criterion: str = "chip",
    *,
    device: str | torch.device | None = None,
    **kw,
) -> list[dict]:
    """`prune_config` at every (backbone, caps) ratio pair, scoring the trained net once; writes a summary
    (prune_sweep_<criterion>.json: one row per pair, for the accuracy-vs-ratio plot) and returns the rows."""
    out_dir = Path(out_dir)
    device = pick_device(device) if not isinstance(device, torch.device) else device
    base = TrainedBase(cfg, out_dir, splits, device)
    rows = []
    for b, c in pairs:
        result = prune_config(cfg, out_dir, splits, b, c, criterion, device=device, base=base, **kw)
        rows.append(sweep_row(result))
    write_json(
        out_dir / SWEEP_FILE.format(criterion=criterion),
        "prune_sweep",
        {"config_id": cfg.id, "label": cfg.label, "criterion": criterion, "rows": rows},
    )
    return rows


def sweep_row(result: dict) -> dict:
    s, settings = result["summary"], result["settings"]
    return {
        "config_id": result["config_id"],
        "folder": result["folder"],
        "backbone_ratio": settings["backbone_ratio"],
        "caps_ratio": settings["caps_ratio"],
        **{f"acc_{k}": v for k, v in s["test_accuracy"].items()},
        "parameters_before": s["parameters"]["before"],
        "parameters_after": s["parameters"]["after"],
        "flops_before": s["flops"]["before"],
        "flops_after": s["flops"]["after"],
        **{f"routed_inactive_{k}": v for k, v in s["routed_inactive"].items()},
        "inactive_before": [
            f"{lay['inactive']}/{lay['num_capsules']}" for lay in result["before"]["health"]["layers"]
        ],
        "inactive_after": [
            f"{lay['inactive']}/{lay['num_capsules']}" for lay in result["after_finetune"]["health"]["layers"]
        ],
    }


def format_sweep(rows: list[dict]) -> str:
    head = (
        f"{'config':<11}{'b':>5}{'c':>5}{'acc':>7}{'surg':>7}{'tuned':>7}{'params':>16}{'MFLOPs':>16}"
        "  inactive per layer before -> after"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        params = f"{r['parameters_before']}->{r['parameters_after']}"
        flops = f"{r['flops_before'] / 1e6:.1f}->{r['flops_after'] / 1e6:.1f}"
        lines.append(
            f"{r['config_id']:<11}{r['backbone_ratio']:>5.2f}{r['caps_ratio']:>5.2f}{r['acc_before']:>7.4f}"
            f"{r['acc_after_surgery']:>7.4f}{r['acc_after_finetune']:>7.4f}{params:>16}{flops:>16}  "
            f"{' '.join(r['inactive_before'])} -> {' '.join(r['inactive_after'])}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- stage


def _settings_of(ctx: Context, b: float, c: float) -> dict:
    p = ctx.settings.prune
    return _settings(
        criterion=p.criterion,
        backbone_ratio=b,
        caps_ratio=c,
        intermediate_ratio=p.intermediate_ratio,
        reinit_caps_layers=p.reinit_caps_layers,
        finetune_epochs=p.finetune_epochs,
        score_images=p.score_images,
    )


def done(ctx: Context) -> bool:
    p = ctx.settings.prune
    if ctx.settings.force:
        return False
    for b, c in p.pairs:
        sub = ctx.out / prune_dir_name(p.criterion, b, c, p.intermediate_ratio, p.reinit_caps_layers)
        res = rundir.read_if_valid(sub / PRUNE_FILE, "prune")
        if res is None or res.get("settings") != _settings_of(ctx, b, c):
            return False
    return True


def run(ctx: Context) -> list[dict]:
    """Every ratio pair of the settings, scoring the trained net once."""
    p = ctx.settings.prune
    kw = dict(
        finetune_epochs=p.finetune_epochs,
        intermediate_ratio=p.intermediate_ratio,
        reinit_caps_layers=p.reinit_caps_layers,
        score_images=p.score_images,
        force=ctx.settings.force,
        progress=ctx.settings.progress,
    )
    if p.write_sweep:
        return prune_sweep(
            ctx.cfg, ctx.out, ctx.splits(), list(p.pairs), p.criterion, device=ctx.device, **kw
        )
    base = TrainedBase(ctx.cfg, ctx.out, ctx.splits(), ctx.device)
    return [
        prune_config(ctx.cfg, ctx.out, ctx.splits(), b, c, p.criterion, device=ctx.device, base=base, **kw)
        for b, c in p.pairs
    ]


STAGE = Stage(
    "prune",
    reads=(rundir.CHECKPOINT_FILE, rundir.METRICS_FILE),
    writes=("prune_*/" + PRUNED_FILE, "prune_*/" + PRUNE_FILE, "prune_*/" + HEALTH_PRUNED_FILE),
    run=run,
    done=done,
    help="channel-prune, fine-tune and measure health again",
    intermediate=("prune_*/" + SURGERY_FILE, "prune_*/" + FINETUNE_FILES.checkpoint),
)
