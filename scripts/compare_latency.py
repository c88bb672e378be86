"""Benchmark (not a test): p50 latency of the C++ runner against Python ONNX Runtime on the same model, threads,
optimisation level, warm-up, iterations and real images, measured back to back and repeated (medians reported).

    .venv/bin/python scripts/compare_latency.py [--nets smoke,sabour] [--batches 1,8,64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

from capsbench.export import export_onnx, make_session
from capsbench.export.cpp_runner import build_runner, run_runner, write_tensor
from capsbench.export.latency import take_batch, time_backend
from capsbench.models import CapsNetConfig, build_capsnet
from capsbench.suite import data

NETS = {
    "smoke": CapsNetConfig(backbone="sahu", backbone_channels=(16, 32, 64), primary_types=8, primary_dim=8),
    "sabour": CapsNetConfig(backbone="sabour", primary_types=32, primary_dim=8),
}


def iters_for(net: str, batch: int, base: int) -> int:
    """Fewer timed runs where one run is long, so a repeat stays around a few seconds."""
    scale = {"smoke": 1, "sabour": 8}[net] * max(batch // 8, 1)
    return max(base // scale, 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nets", default="smoke,sabour")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--iters", type=int, default=200, help="timed runs at batch 1 on the smoke net (scaled down)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, help="write every measurement here")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, _ = data.load_split("fashion-mnist", "test")
    images = images[: max(batches)].numpy().astype(np.float32) / 255
    runner = build_runner()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for net in args.nets.split(","):
            path = Path(tmp) / f"{net}.onnx"
            export_onnx(build_capsnet(NETS[net]).eval(), path, torch.from_numpy(images[:2]))
            session = make_session(path, "cpu", args.threads, opt_level="all")
            for b in batches:
                x = take_batch(images, b)
                cbt = write_tensor(Path(tmp) / f"x{b}.cbt", x)
                iters = iters_for(net, b, args.iters)
                for r in range(args.repeats):
                    # Alternate which goes first, so a change in machine load hits both alike.
                    order = ["python", "cpp"] if r % 2 == 0 else ["cpp", "python"]
                    p50 = {}
                    for who in order:
                        if who == "python":
                            run_fn, sync = session.runner(x)
                            p50[who] = time_backend(run_fn, args.warmup, iters, sync, batch=b)["p50_ms"]
                        else:
                            res = run_runner(runner, path, [b], args.threads, args.warmup, iters, input=cbt)
                            p50[who] = res["rows"][0]["p50_ms"]
                    records.append({"net": net, "batch": b, "repeat": r, "iters": iters, **p50})
                    print(
                        f"{net:>7} batch {b:>3} repeat {r}: python {p50['python']:9.3f} ms  "
                        f"cpp {p50['cpp']:9.3f} ms  ratio {p50['cpp'] / p50['python']:.3f}",
                        flush=True,
                    )
            del session

    print(
        f"\nmedians over {args.repeats} repeats, {args.threads} threads, ORT_ENABLE_ALL, warmup {args.warmup}"
    )
    print(
        f"{'net':>7} {'batch':>5} {'python p50 ms':>14} {'cpp p50 ms':>11} {'cpp/python':>11} {'paired ratio':>13}"
    )
    for net in args.nets.split(","):
        for b in batches:
            rs = [r for r in records if r["net"] == net and r["batch"] == b]
            py = statistics.median(r["python"] for r in rs)
            cpp = statistics.median(r["cpp"] for r in rs)
            paired = statistics.median(r["cpp"] / r["python"] for r in rs)
            print(f"{net:>7} {b:>5} {py:>14.3f} {cpp:>11.3f} {cpp / py:>11.3f} {paired:>13.3f}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
