"""Training-step benchmark: images/s of one full step (forward, margin loss, backward, Adam) per preset net.

Each row counts the step's GFLOP from the model (3 x the forward's, the usual training-step estimate) and
compares the achieved GFLOP/s with this machine's fp32 GEMM rate measured in the same run; eager and
torch.compile are timed on the same preloaded batch, with the compile time reported apart.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from capsbench.export.latency import _tf32_knobs, fp32_torch, gemm_gflops
from capsbench.models import CapsNet, build_capsnet, margin_loss, reconstruction_loss
from capsbench.models.pruning import flop_breakdown
from capsbench.results import RowStatus, write_json
from capsbench.suite import data as datasets
from capsbench.suite.env import environment
from capsbench.suite.presets import RunConfig, get_preset
from capsbench.suite.train import autocast

TRAIN_BENCH_FILE = "train_bench.json"
BACKENDS = ("eager", "compiled")
# A training step: forward + backward (grad wrt activations and wrt weights, each ~ the forward's work).
TRAIN_STEP_FORWARDS = 3


@contextlib.contextmanager
def precision_policy(tf32: bool = False) -> Iterator[dict[str, Any]]:
    """The timing harness's precision policy for the whole benchmark (the GEMM rate too): fp32 is IEEE fp32
    (`latency.fp32_torch`), unless TF32 is asked for, explicitly, and then recorded as such. bf16/fp16 rows run
    under autocast either way; the policy governs what stays in fp32. Restored afterwards; yields the record."""
    if not tf32:
        with fp32_torch() as policy:
            yield policy
        return
    knobs = _tf32_knobs()
    saved = [getattr(o, a) for o, a, _, _ in knobs]
    on = ["tf32" if a == "fp32_precision" else True for _, a, _, _ in knobs]
    try:
        for (o, a, _, _), v in zip(knobs, on, strict=True):
            setattr(o, a, v)
        settings = {name: v for (_, _, _, name), v in zip(knobs, on, strict=True)}
        yield {"fp32": "tf32", "torch_tf32": True, "asked": "tf32=True", "torch_settings": settings}
    finally:
        for (o, a, _, _), v in zip(knobs, saved, strict=True):
            setattr(o, a, v)


def forward_macs(model: CapsNet) -> dict[str, int]:
    """Multiply-accumulates of one image's forward pass per part, the decoder's linears included when present."""
    cfg = model.cfg
    parts = flop_breakdown(model, (cfg.in_channels, cfg.image_size, cfg.image_size))
    if model.decoder is not None:
        parts["decoder"] = sum(
            m.in_features * m.out_features for m in model.decoder.modules() if isinstance(m, nn.Linear)
        )
    return parts


def train_gflop_per_image(model: CapsNet) -> float:
    return TRAIN_STEP_FORWARDS * 2 * sum(forward_macs(model).values()) / 1e9


def heaviest_config(preset: str) -> RunConfig:
    """The preset's config with the most work per training image: the one that dominates its training time."""
    configs = get_preset(preset).configs()
    return max(configs, key=lambda c: train_gflop_per_image(build_capsnet(c.model)))


def preloaded_batch(cfg: RunConfig, device: torch.device, data_dir: str | Path | None = None):
    """One real training batch of the config's dataset, as float32 in [0, 1] already on the device."""
    x, y = datasets.load_split(cfg.dataset, "train", data_dir)
    x = x[: cfg.batch_size].to(device).float().div_(255.0)
    return x, y[: cfg.batch_size].to(device)


def make_step(
    model: CapsNet, cfg: RunConfig, forward: Callable | None = None, precision: str = "fp32"
) -> Callable:
    """The training step of suite/train.py (margin loss, + reconstruction with a decoder; no CCM term), with its
    autocast for `precision`."""
    forward = model if forward is None else forward
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = next(model.parameters()).device

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            v = forward(x)
            loss = margin_loss(CapsNet.lengths(v), y, cfg.m_pos, cfg.m_neg, cfg.lam)
            if model.decoder is not None:
                loss = loss + cfg.recon_weight * reconstruction_loss(model.decoder(v, y), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable, x, y, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Seconds of the first step (compiles, if any), then `warmup` untimed steps and `steps` timed ones."""
    t0 = time.perf_counter()
    step(x, y)
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step(x, y)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step(x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {
        "first_step_s": first,
        "step_s_p50": statistics.median(times),
        "step_s_min": min(times),
        "steps": steps,
        "final_loss": float(loss.detach()),
    }


def bench_config(
    cfg: RunConfig,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    backend: str,
    device: torch.device,
    warmup: int,
    steps: int,
    compile_mode: str | None = None,
    precision: str = "fp32",
    channels_last: bool = False,
) -> dict[str, Any]:
    """One row: a freshly seeded net trained for warmup + steps + 1 steps on the preloaded batch. `channels_last`
    stores the convs' weights and the input batch NHWC (measured: up to 1.1 x on the quick net, eager)."""
    torch.manual_seed(cfg.seed)
    model = build_capsnet(cfg.model).to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model, mode=compile_mode) if backend == "compiled" else model
    row: dict[str, Any] = {
        "backend": backend,
        "precision": precision,
        "batch": len(x),
        "status": RowStatus.OK,
    }
    row["memory_format"] = "channels_last" if channels_last else "contiguous"
    if backend == "compiled":
        row["compile_mode"] = compile_mode or "default"
    try:
        row.update(time_steps(make_step(model, cfg, forward, precision), x, y, device, warmup, steps))
    except Exception as e:  # noqa: BLE001 - a failing backend is a row, not the end of the sweep
        return {**row, "status": RowStatus.ERROR, "error": f"{type(e).__name__}: {e}"}
    row["images_per_s"] = len(x) / row["step_s_p50"]
    # The first step's excess over a steady one: tracing and code generation (eager: allocator warm-up only).
    row["compile_s"] = max(row["first_step_s"] - row["step_s_p50"], 0.0)
    return row


def run_train_bench(
    presets: Sequence[str],
    out_path: Path | None = None,
    *,
    backends: Sequence[str] = BACKENDS,
    precisions: Sequence[str] = ("fp32",),
    channels_last: bool = False,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    steps: int = 5,
    compile_mode: str | None = None,
    deterministic: bool = False,
    data_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = print,
    tf32: bool = False,
) -> dict[str, Any]:
    """Time a training step of each preset's heaviest net per backend and precision; write `out_path` (kind
    "train_bench"). The GEMM rate the rows are compared with is fp32's, whatever their precision. Under the
    timing harness's precision policy (`precision_policy`: IEEE fp32 unless `tf32`), recorded in the result."""
    with precision_policy(tf32) as policy:
        result = _train_bench(
            presets, backends, precisions, channels_last, torch.device(device), warmup, steps, compile_mode,
            deterministic, data_dir, progress,
        )  # fmt: skip
    result["precision_policy"] = policy
    if out_path is not None:
        write_json(Path(out_path), "train_bench", result)
    return result


def _train_bench(
    presets, backends, precisions, channels_last, device, warmup, steps, compile_mode, deterministic, data_dir,
    progress,
) -> dict[str, Any]:  # fmt: skip
    say = progress or (lambda _msg: None)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    gemm_before = gemm_gflops(device=device, iters=10)
    say(
        f"fp32 GEMM rate: {gemm_before['gflops_per_s']:.1f} GFLOP/s ({gemm_before['threads']} threads, {device})"
    )
    rows = []
    for preset in presets:
        cfg = heaviest_config(preset)
        model = build_capsnet(cfg.model)
        macs = forward_macs(model)
        gflop = train_gflop_per_image(model)
        x, y = preloaded_batch(cfg, device, data_dir)
        for backend, precision in ((b, p) for b in backends for p in precisions):
            row = bench_config(
                cfg,
                x,
                y,
                backend=backend,
                device=device,
                warmup=warmup,
                steps=steps,
                compile_mode=compile_mode,
                precision=precision,
                channels_last=channels_last,
            )
            row = {"preset": preset, "config_id": cfg.id, "label": cfg.label, **row}
            row["forward_macs_per_image"] = macs
            row["train_gflop_per_image"] = gflop
            if row["status"] == RowStatus.OK:
                row["gflops_per_s"] = row["images_per_s"] * gflop
                say(
                    f"  {preset:<8} {backend:<9} {precision:<5} {row['images_per_s']:8.1f} img/s "
                    f"{row['gflops_per_s']:7.1f} GFLOP/s  (first step {row['first_step_s']:.1f} s)"
                )
            else:
                say(f"  {preset:<8} {backend:<9} {precision:<5} error: {row['error']}")
            rows.append(row)
    # The rate is measured before and after the sweep and the higher one kept: on a shared machine a single
    # measurement can land in someone else's burst and flatter every fraction.
    gemm_after = gemm_gflops(device=device, iters=10)
    gemm = max(gemm_before, gemm_after, key=lambda g: g["gflops_per_s"])
    gemm = {
        **gemm,
        "gflops_per_s_before": gemm_before["gflops_per_s"],
        "gflops_per_s_after": gemm_after["gflops_per_s"],
    }
    for row in rows:
        if row["status"] == RowStatus.OK:
            row["gemm_fraction"] = row["gflops_per_s"] / gemm["gflops_per_s"]
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "deterministic": deterministic,
        "channels_last": channels_last,
        "warmup": warmup,
        "steps": steps,
        "train_step_forwards": TRAIN_STEP_FORWARDS,
        "gemm": gemm,
        "rows": rows,
        "environment": environment(device),
    }
    return result


def format_train_bench(result: dict[str, Any]) -> str:
    lines = [
        f"training step, {result['device']}, {result['threads']} threads, fp32 GEMM rate "
        f"{result['gemm']['gflops_per_s']:.1f} GFLOP/s"
        + (", channels_last" if result.get("channels_last") else ""),
        f"{'preset':<8} {'backend':<9} {'prec':<5} {'batch':>5} {'GFLOP/img':>10} {'img/s':>9} {'GFLOP/s':>9} {'of GEMM':>8} "
        f"{'compile s':>10}",
    ]
    for r in result["rows"]:
        head = f"{r['preset']:<8} {r['backend']:<9} {r.get('precision', 'fp32'):<5} {r['batch']:>5} {r['train_gflop_per_image']:>10.3f}"
        if r["status"] != RowStatus.OK:
            lines.append(f"{head} error: {r['error']}")
            continue
        compile_s = f"{r['compile_s']:>10.1f}" if r["backend"] == "compiled" else f"{'-':>10}"
        lines.append(
            f"{head} {r['images_per_s']:>9.1f} {r['gflops_per_s']:>9.1f} {100 * r['gemm_fraction']:>7.1f}% {compile_s}"
        )
    return "\n".join(lines)
