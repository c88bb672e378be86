"""`capsbench bench train`: images/s of a full training step per preset net, against the fp32 GEMM rate."""

from __future__ import annotations

from pathlib import Path

import torch

from capsbench.results import RowStatus
from capsbench.suite.cli import options
from capsbench.suite.env import pick_device
from capsbench.suite.presets import PRESETS
from capsbench.suite.train import PRECISIONS
from capsbench.suite.trainbench import BACKENDS, TRAIN_BENCH_FILE, format_train_bench, run_train_bench

DEFAULT_PRESETS = tuple(p for p in ("smoke", "quick", "sabour", "depth") if p in PRESETS)


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the training step (images/s, GFLOP/s, fraction of the GEMM rate)",
        description="Micro-benchmarks of the suite itself. 'bench train' times one full training step "
        "(forward, margin loss, backward, Adam) of each preset's heaviest net at its batch size on a preloaded "
        "batch, eager and torch.compile'd, and compares the step's GFLOP/s (3 x the forward's FLOPs, counted "
        "from the model) with this machine's fp32 GEMM rate measured in the same run.",
    )
    what = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    t = what.add_parser("train", help="time a training step per preset net", description=p.description)
    t.add_argument(
        "--preset",
        action="append",
        choices=sorted(PRESETS),
        help=f"a preset whose heaviest net to time; repeat for several (default: {', '.join(DEFAULT_PRESETS)})",
    )
    t.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="eager and/or compiled (torch.compile; its first step compiles, reported apart) (default: both)",
    )
    t.add_argument(
        "--precision",
        action="append",
        choices=PRECISIONS,
        help="fp32 and/or bf16 (autocast over forward and loss, as 'capsbench train --precision bf16'); "
        "repeat for both (default: fp32)",
    )
    t.add_argument(
        "--steps", type=int, default=5, help="timed steps per net and backend (default: %(default)s)"
    )
    t.add_argument(
        "--warmup", type=int, default=2, help="untimed steps after the first (default: %(default)s)"
    )
    t.add_argument(
        "--compile-mode",
        default=None,
        help="torch.compile mode, e.g. max-autotune, or reduce-overhead (CUDA graphs, CUDA only)",
    )
    t.add_argument(
        "--deterministic",
        action="store_true",
        help="time under torch.use_deterministic_algorithms(True), as suite/train.py trains on CPU",
    )
    t.add_argument(
        "--channels-last",
        action="store_true",
        help="store the convs' weights and the batch channels-last (NHWC) for oneDNN; measured on 2 CPU threads: "
        "1.1 x on the quick net eager, within the noise on sabour and depth",
    )
    t.add_argument(
        "--tf32",
        action="store_true",
        help="allow TF32 for fp32 matmuls and convolutions on CUDA (recorded in the result); default: IEEE fp32, "
        "as the timing harness",
    )
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    t.add_argument(
        "--out",
        type=Path,
        default=Path("runs") / "bench" / TRAIN_BENCH_FILE,
        help="result file (default: %(default)s)",
    )
    options.add_device(t)
    options.add_data_dir(t)
    t.set_defaults(func=run)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_train_bench(
        args.preset or DEFAULT_PRESETS,
        args.out,
        backends=args.backend or BACKENDS,
        precisions=args.precision or ("fp32",),
        device=pick_device(args.device),
        warmup=args.warmup,
        steps=args.steps,
        compile_mode=args.compile_mode,
        deterministic=args.deterministic,
        channels_last=args.channels_last,
        data_dir=args.data_dir,
        tf32=args.tf32,
    )
    print(format_train_bench(result))
    print(f"results: {args.out}")
    return 0 if all(r["status"] == RowStatus.OK for r in result["rows"]) else 1
