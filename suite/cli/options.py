"""Options shared by several subcommands, defined once so they read the same everywhere."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capsbench.suite import data
from capsbench.suite.errors import ConfigError
from capsbench.suite.presets import RunConfig, Stratum, get_preset
from capsbench.suite.prune_settings import CONTROLS, PROCEDURES, PruneSettings

if TYPE_CHECKING:
    from capsbench.suite.stages import Settings, TrainSettings

# ------------------------------------------------------------------------------------- numeric option types
# Every numeric option is checked while parsing, so a bad value is one line from argparse (exit 2) before any
# work starts, never a SIGFPE inside ONNX Runtime or a traceback deep in a stage.


def _number(kind: type, text: str) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and value != value:  # NaN passes every comparison below
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, epochs, iterations, image counts, threads)."""
    value = int(_number(int, text))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (warm-up runs, fine-tune epochs, seeds)."""
    value = int(_number(int, text))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(float, text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def ratio(text: str) -> float:
    """A share to remove: in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {text!r}")
    return value


def add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset folder (default: $CAPSBENCH_DATA, else ~/.cache/capsbench/data)",
    )


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)"
    )


def add_grid(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset", default="smoke", help="named grid of configs (default: smoke; see 'capsbench presets')"
    )
    p.add_argument(
        "--configs",
        nargs="+",
        metavar="ID",
        default=None,
        help="only the configs whose id starts with one of these prefixes",
    )
    p.add_argument(
        "--runs-dir", type=Path, default=Path("runs"), help="where runs are kept (default: ./runs)"
    )
    p.add_argument(
        "--run-id",
        default=None,
        help="name of the run folder (default: the preset's name, so rerunning resumes it)",
    )
    p.add_argument("--dataset", choices=data.DATASETS, default=None, help="override the preset's dataset")
    p.add_argument("--epochs", type=positive_int, default=None, help="override the preset's number of epochs")
    p.add_argument(
        "--train-subset",
        type=positive_int,
        default=None,
        help="override: train on the first N shuffled images",
    )
    p.add_argument(
        "--eval-subset", type=positive_int, default=None, help="override: evaluate on the first N test images"
    )
    p.add_argument("--seed", type=nonnegative_int, default=None, help="override the preset's seed")


def add_training(p: argparse.ArgumentParser, compile_flag: str = "--compile") -> None:
    """How configs are trained: torch.compile policy and precision (`train`; `all`, where `--compile` is the
    timing's torch.compile backend, names the first `--train-compile`)."""
    from capsbench.suite.train import COMPILE_CHOICES, PRECISIONS

    p.add_argument(
        compile_flag,
        dest="train_compile",
        nargs="?",
        const="default",
        default="auto",
        choices=COMPILE_CHOICES,
        metavar="MODE",
        help="torch.compile for training. auto (the default): time the first 4 steps eager and compile for the "
        "rest only when the steps left would save at least twice a compile's cost (measured on 2 CPU threads: "
        "a compiled step takes 0.65-1.0 x an eager one on the quick and sabour nets, a first compile 16-40 s: "
        "there the quick and sabour grids compile, the smoke and depth grids train eager); the decision is "
        "recorded in metrics.json. off: eager. The flag alone or MODE default, max-autotune, or on CUDA "
        "reduce-overhead (CUDA graphs, untested here): always compile",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="bf16: autocast the forward and the loss to bfloat16 (weights, Adam, squash, capsule lengths and "
        "evaluation stay fp32). Recorded in metrics.json: a config trained in the other precision is trained "
        "again (default: %(default)s)",
    )


def training_settings(args: argparse.Namespace) -> TrainSettings:
    """The train stage's settings from `add_training`'s options."""
    from capsbench.suite.stages import TrainSettings

    if args.train_compile not in ("off", "auto"):
        _require_compiler(f"--compile {args.train_compile}", "train eager (off) or with the auto policy")
    return TrainSettings(compile=args.train_compile, precision=args.precision)


def _require_compiler(option: str, instead: str) -> None:
    """Refuse an option that needs torch.compile where it cannot build (env.compile_unavailable), in one line."""
    from capsbench.suite.env import compile_unavailable

    if (why := compile_unavailable()) is not None:
        raise ConfigError(f"{option}: {why}; {instead}")


def add_pruning(p: argparse.ArgumentParser, defaults: str) -> None:
    """The pruning options of `prune` and `all`, declared once; every one left out keeps `defaults` (what the
    help names: the preset's settings for `all`, capsbench's for `prune`). The ratio pairs are each
    command's own (--backbone/--caps/--sweep, --prune B,C)."""
    from capsbench.models.pruning import CAPSULE_CRITERIA, CRITERIA

    d = f"(default: {defaults})"
    p.add_argument(
        "--criterion",
        choices=CRITERIA,
        default=None,
        help="channel score: chip: per-image CHIP, averaged (Sui et al. 2021); chip-mean: CHIP of the "
        f"batch-averaged maps (the paper's code); l1: filter L1 norms {d}",
    )
    p.add_argument(
        "--finetune-epochs",
        type=nonnegative_int,
        default=None,
        help=f"epochs of fine-tuning after surgery {d}",
    )
    p.add_argument(
        "--score-images",
        type=positive_int,
        default=None,
        help="training images the channel scores are computed on. Per-image CHIP does one eigendecomposition "
        f"per channel per image: on a CPU, lower this or use chip-mean for wide layers {d}",
    )
    p.add_argument(
        "--intermediate",
        type=ratio,
        default=None,
        help="a share of every intermediate layer's capsules to remove other than the capsule ratio's (0: "
        f"PrimaryCaps types only). Not output-preserving: routing re-normalises over the parents {d}",
    )
    p.add_argument(
        "--capsule-criterion",
        choices=CAPSULE_CRITERIA,
        default=None,
        help="how intermediate capsules are chosen: chip (CHIP of the unit-length poses: information, not "
        f"length), weight_norm, random, length (the least active first; picks the dead ones by construction) {d}",
    )
    p.add_argument(
        "--procedure",
        choices=PROCEDURES,
        default=None,
        help="finetune: prune this config's trained net, keep the surviving weights and fine-tune; authors (the "
        "paper's code): prune the backbone and PrimaryCaps of the trained net at --base-depth, build this config's "
        f"capsule layers on it freshly initialised, retrain for --finetune-epochs {d}",
    )
    p.add_argument(
        "--base-depth",
        type=nonnegative_int,
        default=None,
        help="the authors' procedure: the depth of the trained net whose backbone and PrimaryCaps are pruned and "
        f"built on (the config with that many intermediate layers must be trained in the same run) {d}",
    )
    p.add_argument(
        "--controls",
        nargs="*",
        choices=CONTROLS,
        default=None,
        help="controls beside every pair (none: --controls with no name): extra_training (the unpruned net "
        "trained F more epochs), scratch (the pruned architecture from scratch for E+F epochs), random "
        f"(random channels and capsules, fine-tuned F epochs) {d}",
    )
    p.add_argument(
        "--reinit-caps",
        action="store_true",
        default=None,
        help="re-initialise the routed capsule layers after pruning (implied by --procedure authors)",
    )
    p.add_argument(
        "--keep-intermediate",
        action="store_true",
        help="keep surgery.pt and finetune.pt after pruning (removed by default: a third of a run folder)",
    )


def prune_settings(args: argparse.Namespace, defaults: PruneSettings, **fields) -> PruneSettings:
    """`defaults` with what the pruning options (add_pruning) and `fields` set."""
    return defaults.replace(
        criterion=args.criterion,
        finetune_epochs=args.finetune_epochs,
        score_images=args.score_images,
        intermediate_ratio=args.intermediate,
        capsule_criterion=args.capsule_criterion,
        procedure=args.procedure,
        base_depth=args.base_depth,
        controls=None if args.controls is None else tuple(args.controls),
        reinit_caps_layers=args.reinit_caps,
        **fields,
    )


def add_timing(p: argparse.ArgumentParser) -> None:
    """The timing harness's options (`time`, and `all` for its time and cpp stages)."""
    from capsbench.export.latency import DEFAULT_BATCH_SIZES
    from capsbench.export.sessions import PROVIDERS
    from capsbench.export.timing import TimeSettings

    p.add_argument(
        "--batch-sizes",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help=f"batch sizes to time (default: the preset's, else {' '.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    p.add_argument(
        "--iters",
        type=positive_int,
        default=TimeSettings.iters,
        help="timed runs per batch size (default: %(default)s)",
    )
    p.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=TimeSettings.warmup,
        help="untimed runs (default: %(default)s)",
    )
    p.add_argument(
        "--max-seconds",
        type=positive_float,
        default=TimeSettings.max_seconds,
        help="stop timing a backend at one batch size after this many seconds, keeping at least 5 runs "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=TimeSettings.rounds,
        help="time the whole sweep this many times, each in a fresh process, so 'capsbench check' sees the "
        "spread between processes (default: %(default)s)",
    )
    p.add_argument(
        "--ort-delay-ms",
        type=nonnegative_float,
        default=0.0,
        metavar="MS",
        help="a test hook: add a fixed cost of MS milliseconds to every ONNX Runtime call, a known slowdown to "
        "check that 'capsbench check' flags it; recorded in latency.json, part of its settings (default: 0)",
    )
    p.add_argument(
        "--min-rounds",
        type=positive_int,
        default=None,
        metavar="N",
        help="stop after N (at least 2) clean rounds when every measurement was stable in each and the gated "
        "figure (ORT's speedup over torch eager; the p50 of rows timed without eager) moved by at most 10%% "
        "between them (default: the preset's; smoke: 2, the others: all --rounds)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for ORT, C++ and torch (default: all cores)",
    )
    p.add_argument(
        "--provider",
        choices=PROVIDERS,
        default="auto",
        help="ONNX Runtime execution provider: auto (an accelerator when it really runs, else CPU) or one of "
        "export/sessions.py's EXECUTION_PROVIDERS (default: auto)",
    )


def _selected(args: argparse.Namespace) -> list[tuple[Stratum, RunConfig]]:
    """(stratum, config) of every config the command line selects: the preset's strata with their seeds (or
    --seeds), the overrides applied, --configs' prefixes matched against the ids before and after overrides."""
    preset = get_preset(args.preset)
    overrides = {
        k: getattr(args, k)
        for k in ("dataset", "epochs", "train_subset", "eval_subset", "seed")
        if getattr(args, k, None) is not None
    }
    if "dataset" in overrides:  # the model's input follows the dataset's image shape
        channels, size, _ = data.get_spec(overrides["dataset"]).shape
        overrides.update(in_channels=channels, image_size=size)
    # (stratum, ids that select it, config): with --seeds N, every seed of a grid point answers to its first id too.
    triples = []
    for stratum in preset.stratum_list():
        seeds = stratum.seeds if getattr(args, "seeds", None) is None else args.seeds
        for first in stratum.configs(seeds=1):
            for k in range(seeds):
                c = first.replace(seed=first.seed + k)
                ids = {c.id, c.replace(**overrides).id}
                if getattr(args, "seeds", None) is not None:
                    ids |= {first.id, first.replace(**overrides).id}
                triples.append((stratum, ids, c.replace(**overrides)))
    if args.configs:
        # Match the ids 'capsbench presets' lists as well as the ids after overrides (the run folders' names).
        triples = [t for t in triples if any(i.startswith(p) for i in t[1] for p in args.configs)]
        if not triples:
            raise ConfigError(
                f"no config of preset {args.preset!r} matches {args.configs}; "
                f"see 'capsbench presets --preset {args.preset}' for the ids"
            )
    return [(stratum, c) for stratum, _, c in triples]


def select_configs(args: argparse.Namespace) -> list[RunConfig]:
    """The preset's configs with the command line's overrides and filters applied."""
    return list(
        dict.fromkeys(c for _, c in _selected(args))
    )  # --seed on a multi-seed preset leaves one of each


def select_strata(args: argparse.Namespace) -> list[tuple[Stratum, list[RunConfig]]]:
    """The selected configs per stratum of the preset, in the preset's order (a stratum with none left out)."""
    by_stratum: dict[str, tuple[Stratum, list[RunConfig]]] = {}
    for stratum, c in _selected(args):
        entry = by_stratum.setdefault(stratum.name, (stratum, []))
        if c not in entry[1]:
            entry[1].append(c)
    return list(by_stratum.values())


def run_dir(args: argparse.Namespace) -> Path:
    return args.runs_dir / (args.run_id or args.preset)


def time_settings(args: argparse.Namespace):
    """The timing settings of `time` and `all` from their options; an option a command lacks keeps the default."""
    import dataclasses

    from capsbench.export.latency import DEFAULT_BATCH_SIZES
    from capsbench.export.timing import TimeSettings

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TimeSettings) if hasattr(args, f.name)}
    # What the command line leaves open comes from the preset (its timing budget), then the harness.
    preset = get_preset(args.preset) if getattr(args, "preset", None) else None
    if given.get("batch_sizes") is None:
        given["batch_sizes"] = (preset and preset.time_batch_sizes) or DEFAULT_BATCH_SIZES
    if given.get("min_rounds") is None and preset is not None:
        given["min_rounds"] = preset.time_min_rounds
    given["batch_sizes"] = tuple(given["batch_sizes"])
    if given.get("compile"):
        _require_compiler("--compile", "time without it")
    return TimeSettings(**given)


def stage_settings(args: argparse.Namespace, **parts: Any) -> Settings:
    """The runner's settings from the options every stage command shares, plus the command's own parts (each
    stage's settings by its name: train=TrainSettings(...), time=TimeSettings(...), ...)."""
    from capsbench.suite.stages import Settings

    return Settings(
        device=getattr(args, "device", None),
        force=getattr(args, "force", False),
        keep_intermediate=getattr(args, "keep_intermediate", False),
        progress=not getattr(args, "no_progress", True),
        **parts,
    )


def run_stages(
    args: argparse.Namespace,
    configs: list[RunConfig],
    names,
    settings,
    folder: Path | None = None,
    executor=None,
):
    """Run the stages `names` for `configs` with the one runner; every failure becomes one line on stderr."""
    import sys

    from capsbench.suite import runner

    result = runner.run(
        configs,
        folder or run_dir(args),
        names,
        settings,
        data_dir=getattr(args, "data_dir", None),
        run_info={"preset": args.preset} if getattr(args, "preset", None) else None,
        log=lambda line: print(line, flush=True),
        executor=executor,
    )
    for failure in result.failures:
        print(f"capsbench: error: {failure.message}", file=sys.stderr)
    return result
