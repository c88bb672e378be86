"""The pruning work: score a trained config's channels, prune it (or build a control), train, and measure
accuracy and health before and after. One call per `PruneVariant` (suite/prune_settings.py).

Writes <config>/prune_<criterion or control>_b<ratio>_c<ratio>/{surgery.pt, finetune.pt, pruned.pt,
prune.json, health_pruned.json}; the prune stage (suite/stages/prune.py) calls it for every variant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from capsbench import results as R
from capsbench.files import atomic_write
from capsbench.models import CapsNet, build_capsnet
from capsbench.models.health import capsule_health, init_health
from capsbench.models.pruning import count_flops, graft_capsule_layers, prune_capsnet, score_capsnet
from capsbench.results import (
    HEALTH_PRUNED_FILE,
    PRUNE_FILE,
    PRUNED_FILE,
    SURGERY_FILE,
    SWEEP_FILE,
    Status,
    read_result,
    write_json,
)
from capsbench.suite import train as training
from capsbench.suite.checkpoints import load_torch, save_torch
from capsbench.suite.env import environment
from capsbench.suite.errors import CheckpointError, ConfigError
from capsbench.suite.presets import RunConfig
from capsbench.suite.prune_settings import PruneVariant

FINETUNE_FILES = training.StageFiles(checkpoint=R.FINETUNE_CHECKPOINT, metrics=R.FINETUNE_METRICS)
SCORE_BATCH = 128
INIT_HEALTH_IMAGES = 512  # training images the health at initialisation is measured on
RANDOM_CONTROL_SEED = 7_000_000  # + config seed: the random control's draw differs from every init's


def health_summary(health: dict) -> dict:
    """Per layer: mean length, inactive and mean-only counts and fractions, without the per-capsule lists."""
    keys: tuple[str, ...] = ("name", "num_capsules", "mean_length", "inactive", "inactive_fraction")
    keys += ("inactive_mean_only", "inactive_mean_only_fraction")
    return {
        "routed_inactive": health["routed_inactive"],
        "routed_capsules": health["routed_capsules"],
        "routed_inactive_fraction": health.get("routed_inactive_fraction"),
        "layers": [{k: layer.get(k) for k in keys} for layer in health["layers"]],
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
    _siblings: dict = field(default_factory=dict)

    def sibling(self, depth: int) -> TrainedBase:
        """The trained net of this config with only its first `depth` intermediate layers: a config of the same
        run folder, which the authors' procedure prunes and builds this config's capsule layers on."""
        if depth > self.cfg.model.depth:
            raise ConfigError(
                f"config {self.cfg.id} has {self.cfg.model.depth} intermediate layers, fewer than the authors' "
                f"base depth {depth}: nothing to build on it"
            )
        if depth == self.cfg.model.depth:
            return self
        if depth not in self._siblings:
            cfg = self.cfg.replace(intermediate=self.cfg.model.intermediate[:depth])
            out = self.out_dir.parent / cfg.id
            if not R.is_trained(out):
                raise CheckpointError(
                    f"the authors' procedure builds config {self.cfg.id} on its depth-{depth} net, config {cfg.id}, "
                    f"which is not trained in {out.parent}: train it first (a preset whose grid has depth {depth}, "
                    f"or --configs {cfg.id})"
                )
            self._siblings[depth] = TrainedBase(cfg, out, self.splits, self.device)
        return self._siblings[depth]

    @property
    def model(self) -> CapsNet:
        if self._model is None:
            if not R.is_trained(self.out_dir):
                raise CheckpointError(
                    f"{self.out_dir}: config {self.cfg.id} has no finished training; run 'capsbench train' "
                    "with the same preset and options first"
                )
            ckpt = self.out_dir / R.CHECKPOINT_FILE
            self._model = training.load_model(self.cfg, ckpt).to(self.device).eval()
        return self._model

    def measured(self) -> dict:
        if self._measured is None:
            self._measured = measure(self.model, self.cfg, self.splits, self.device)
        return self._measured

    def scores(
        self, criterion: str, score_images: int, capsules: bool, capsule_criterion: str = "chip"
    ) -> dict[str, torch.Tensor]:
        key = (criterion, score_images, capsules, capsule_criterion)
        if key not in self._scores:
            images = self.splits.train_x[:score_images]
            batches = training.eval_batches(images, self.device, SCORE_BATCH)
            self._scores[key] = score_capsnet(
                self.model,
                batches,
                criterion,
                capsules=capsules,
                capsule_criterion=capsule_criterion,
                seed=self.cfg.seed,
            )
        return self._scores[key]

    def random_scores(self) -> dict[str, torch.Tensor]:
        """Uniform scores of the same shapes as every criterion's, seeded by the config's seed: the random
        control removes channels, capsule types and capsules at the same ratios, chosen by chance."""
        shapes = score_capsnet(self.model, None, "l1", capsules=True, capsule_criterion="random")
        g = torch.Generator().manual_seed(RANDOM_CONTROL_SEED + self.cfg.seed)
        return {k: torch.rand(len(v), generator=g, dtype=torch.float64) for k, v in shapes.items()}


def prune_config(
    base: TrainedBase, variant: PruneVariant, *, force: bool = False, progress: bool = True
) -> dict:
    """Prune `base`'s trained net as `variant` says (or build its control), train, re-measure; returns what
    prune.json holds (see PruneVariant for the variants and their epochs).

    Resumable: the surgery result is kept in surgery.pt and training resumes from its own checkpoint; a
    finished variant (prune.json complete with the same settings) is returned unless `force`.
    """
    cfg, out_dir, splits, device = base.cfg, base.out_dir, base.splits, base.device
    sub_name, settings, control = variant.folder, variant.to_dict(), variant.control
    sub = out_dir / sub_name
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
        state = _surgery(cfg, splits, device, base, settings)
        state["surgery_seconds"] = time.perf_counter() - t_start
        save_torch(sub / SURGERY_FILE, state)

    epochs = settings["train_epochs"]
    files_here = training.StageFiles(
        checkpoint=f"{sub_name}/{FINETUNE_FILES.checkpoint}", metrics=f"{sub_name}/{FINETUNE_FILES.metrics}"
    )
    finetune, pruned = None, None
    if control == "extra_training" and variant.procedure != "authors":
        # Resume the base's own checkpoint (weights, optimizer, schedule) for F more epochs.
        if not (sub / FINETUNE_FILES.checkpoint).is_file() and not R.is_trained(out_dir, files_here.metrics):
            src = out_dir / R.CHECKPOINT_FILE
            atomic_write(sub / FINETUNE_FILES.checkpoint, lambda f: f.write(src.read_bytes()), mode="wb")
        epochs = variant.total_epochs
    else:
        pruned = training.model_from_state(state, cfg.model)
    if settings["train_epochs"] > 0:
        finetune = training.train(
            cfg,
            out_dir,
            splits,
            device=device,
            progress=progress,
            label=control or "finetune",  # a control trains under its own name in the progress output
            model=pruned,
            epochs=epochs,
            files=files_here,
        )
        pruned = training.load_model(cfg, sub / FINETUNE_FILES.checkpoint)
    elif pruned is None:
        pruned = base.model
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
    # Without training the final net is the surgery's: its accuracy and counts are already measured.
    after = measure(pruned, cfg, splits, device, health) if finetune else {**state["after_surgery"]}
    new_history = [
        h for h in (finetune or {}).get("history", []) if h["epoch"] > epochs - settings["train_epochs"]
    ]
    result = {
        "config_id": cfg.id,
        "label": cfg.label,
        "status": Status.COMPLETE,
        # None for the pruning under test; the report names a control's rows and series after it.
        "control": control,
        "procedure": settings["procedure"],
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
            # Fractions: a pruned net has fewer capsules, so counts do not compare.
            "routed_inactive_fraction": {
                "before": state["before"]["health"]["routed_inactive_fraction"],
                "after_surgery": state["after_surgery"]["health"]["routed_inactive_fraction"],
                "after_finetune": after["health"]["routed_inactive_fraction"],
            },
        },
        "before": state["before"],
        "after_surgery": state["after_surgery"],
        "after_finetune": after,
        "finetune_epochs": variant.finetune_epochs,
        "train_epochs": settings["train_epochs"],
        "total_epochs": settings["total_epochs"],
        "finetune_history": new_history,
        "plan": state["plan"],
        "eval_images": len(splits.test_x),
        "score_images": min(variant.score_images, len(splits.train_x)),
        "surgery_seconds": state["surgery_seconds"],
        "finetune_seconds": sum(h["train_seconds"] for h in new_history),
        "wall_seconds_this_run": time.perf_counter() - t_start,
        "environment": environment(device),
    }
    write_json(sub / PRUNE_FILE, "prune", result)
    return result


def _surgery(
    cfg: RunConfig, splits: training.Splits, device: torch.device, base: TrainedBase, settings: dict
) -> dict:
    """The net a variant starts its training from, its plan and its measurements before training."""
    control, inter = settings["control"], settings["intermediate_ratio"]
    state = {"config_id": cfg.id, "config": cfg.to_dict(), "settings": settings, "before": base.measured()}
    if settings["procedure"] == "authors":
        return _authors_surgery(cfg, splits, device, base, settings, state)
    if control == "extra_training":
        model = base.model
        plan = {
            "layers": [],
            "model_config_before": cfg.model.to_dict(),
            "model_config_after": cfg.model.to_dict(),
        }
        return {
            **state,
            "model_config": cfg.model.to_dict(),
            "model": model.state_dict(),
            "plan": plan,
            "after_surgery": base.measured(),
        }
    if control == "random":
        scores = base.random_scores()
    else:
        scores = base.scores(
            settings["criterion"], settings["score_images"], inter > 0, settings["capsule_criterion"]
        )
    torch.manual_seed(cfg.seed)  # the fresh capsule weights of reinit_caps_layers
    model, plan = prune_capsnet(
        base.model,
        settings["backbone_ratio"],
        settings["caps_ratio"],
        scores,
        intermediate_ratio=inter,
        reinit_caps_layers=settings["reinit_caps_layers"] and control != "scratch",
    )
    return _surgery_result(cfg, splits, device, state, model, plan, scratch=control == "scratch")


def _surgery_result(
    cfg: RunConfig,
    splits: training.Splits,
    device: torch.device,
    state: dict,
    model: CapsNet,
    plan: dict,
    *,
    scratch: bool,
) -> dict:
    health = None
    if scratch:
        # The pruned architecture with every weight fresh, seeded as the base's own initialisation; its health
        # at initialisation as training sees it (BatchNorm on batch statistics, not untrained running stats).
        torch.manual_seed(cfg.seed)
        model = build_capsnet(model.cfg).to(device)
        images = splits.train_x[:INIT_HEALTH_IMAGES]
        health = init_health(
            model, training.eval_batches(images, device, SCORE_BATCH), cfg.inactive_threshold, device
        )
    return {
        **state,
        "model_config": model.cfg.to_dict(),
        "model": model.state_dict(),
        "plan": plan,
        "after_surgery": measure(model, cfg, splits, device, health),
    }


def _authors_surgery(
    cfg: RunConfig,
    splits: training.Splits,
    device: torch.device,
    base: TrainedBase,
    settings: dict,
    state: dict,
) -> dict:
    """The authors' procedure: score and prune the backbone and PrimaryCaps of the config's trained net at the
    base depth, then build this config's capsule layers, freshly initialised (seeded by the config's seed), on the
    pruned backbone. Its controls: extra_training builds on the unpruned backbone (re-initialisation alone),
    random on randomly chosen channels, scratch trains the built architecture from fresh weights."""
    src = base.sibling(settings["base_depth"])
    control = settings["control"]
    plan: dict[str, Any]
    if control == "extra_training":
        pruned, plan = src.model, {"layers": []}
    else:
        if control == "random":
            scores = src.random_scores()
        else:
            scores = src.scores(
                settings["criterion"], settings["score_images"], False, settings["capsule_criterion"]
            )
        pruned, plan = prune_capsnet(src.model, settings["backbone_ratio"], settings["caps_ratio"], scores)
    torch.manual_seed(cfg.seed)  # the fresh capsule layers
    model = graft_capsule_layers(pruned, cfg.model)
    plan = {
        **plan,
        "procedure": "authors",
        "base_config_id": src.cfg.id,
        "base_model_config": src.cfg.model.to_dict(),
        "model_config_before": cfg.model.to_dict(),
        "model_config_after": model.cfg.to_dict(),
    }
    return _surgery_result(cfg, splits, device, state, model, plan, scratch=control == "scratch")


def _surgery_state(cfg: RunConfig, sub: Path, settings: dict) -> dict | None:
    """The kept surgery result, or None when it was made with other settings (it is then redone)."""
    state = load_torch(sub / SURGERY_FILE)
    if not isinstance(state, dict) or state.get("config_id") != cfg.id:
        raise CheckpointError(
            f"{sub / SURGERY_FILE}: not a surgery result of config {cfg.id}; rerun with --force"
        )
    return state if state.get("settings") == settings else None


def prune_sweep(base: TrainedBase, variants: list[PruneVariant], criterion: str, **kw) -> list[dict]:
    """`prune_config` for every variant, scoring the trained net once; writes a summary
    (prune_sweep_<criterion>.json: one row per variant, for the accuracy-vs-ratio plot) and returns the rows."""
    rows = [sweep_row(prune_config(base, v, **kw)) for v in variants]
    write_json(
        base.out_dir / SWEEP_FILE.format(criterion=criterion),
        "prune_sweep",
        {"config_id": base.cfg.id, "label": base.cfg.label, "criterion": criterion, "rows": rows},
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
