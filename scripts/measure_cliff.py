"""Where do deep CapsNets lose their capsules? Measures the 'cliff' for issue 12 and the `depth` preset.

Part `init`: the mean capsule length per layer at initialisation as training sees it (BatchNorm on batch
statistics), for depths 0..6, intermediate capsule counts {8, 16}, dims {8, 16}, every capsule-layer init.
Part `eps`: the same training at the edge and past the cliff with Adam's eps at its default 1e-8 and at 1e-16, a
few seeds each: if the cliff is the gradients falling below eps, a smaller eps moves it.
Part `train`: one short seeded training per config (default 1 epoch on 6000 Fashion-MNIST training images,
batch 64, Adam 1e-3), then test accuracy, mean length and inactive fraction per layer (mean AND std of length
< 0.01 over 1000 test images, eval mode), and the wall time per config (train + health).

Backbone: sahu 16/32/64 with 8 x 8 PrimaryCaps (288 primary capsules), the suite's narrow CPU net.

    flock /tmp/capsbench-cpu.lock .venv/bin/python scripts/measure_cliff.py init train --out scripts/measure_cliff.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

import torch

from capsbench.models import CapsNet, CapsNetConfig, build_capsnet, margin_loss
from capsbench.models.config import CAPS_INITS
from capsbench.models.health import capsule_health, init_health
from capsbench.suite import data

SCHEMA_VERSION = 1
DEPTHS = range(7)
COUNTS = (8, 16)
DIMS = (8, 16)


def net_config(depth: int, count: int, dim: int, init: str) -> CapsNetConfig:
    return CapsNetConfig(
        backbone_channels=(16, 32, 64),
        primary_types=8,
        primary_dim=8,
        intermediate=((count, dim),) * depth,
        caps_init=init,
    )


def profile(health: dict) -> list[dict]:
    return [
        {
            "name": la["name"],
            "mean_length": round(la["mean_length"], 6),
            "inactive_fraction": la["inactive_fraction"],
            "inactive_mean_only_fraction": la["inactive_mean_only_fraction"],
        }
        for la in health["layers"]
    ]


def measure_init(x: torch.Tensor, seed: int) -> list[dict]:
    rows = []
    for init in CAPS_INITS:
        for count in COUNTS:
            for dim in DIMS:
                for depth in DEPTHS:
                    torch.manual_seed(seed)
                    net = build_capsnet(net_config(depth, count, dim, init))
                    h = init_health(net, [x])
                    rows.append(
                        {"init": init, "count": count, "dim": dim, "depth": depth, "layers": profile(h)}
                    )
                    lens = " ".join(f"{la['mean_length']:.2g}" for la in rows[-1]["layers"])
                    print(f"init {init:8s} {count:2d}x{dim:<2d} depth {depth}: {lens}", flush=True)
    return rows


def grid(args) -> list[tuple[str, int, int, int]]:
    """(init, count, dim, depth) of every net the train and eps parts train, in their order."""
    return list(itertools.product(args.inits, args.counts, args.dims, args.depths))


def train_one(
    cfg: CapsNetConfig, x, y, xt, yt, epochs: float, batch: int, seed: int, eps: float = 1e-8
) -> dict:
    torch.manual_seed(seed)
    net = build_capsnet(cfg).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, eps=eps)
    g = torch.Generator().manual_seed(seed)
    steps = int(epochs * len(x) / batch)
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        loss = margin_loss(CapsNet.lengths(net(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    batches = [xt[i : i + 250] for i in range(0, len(xt), 250)]
    h = capsule_health(net, batches)
    net.eval()
    with torch.no_grad():
        pred = torch.cat([CapsNet.lengths(net(b)).argmax(1) for b in batches])
    eval_s = time.perf_counter() - t1
    return {
        "steps": steps,
        "final_loss": losses[-1],
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
        "test_accuracy": (pred == yt).float().mean().item(),
        "routed_inactive_fraction": h["routed_inactive_fraction"],
        "layers": profile(h),
        "train_seconds": round(train_s, 2),
        "eval_seconds": round(eval_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="+", choices=("init", "train", "eps"))
    ap.add_argument("--eps-values", nargs="+", type=float, default=[1e-8, 1e-16])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the eps part")
    ap.add_argument("--out", type=Path, default=Path("scripts/measure_cliff.json"))
    ap.add_argument("--train-images", type=int, default=6000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--inits", nargs="+", default=list(CAPS_INITS), choices=CAPS_INITS)
    ap.add_argument("--counts", nargs="+", type=int, default=list(COUNTS))
    ap.add_argument("--dims", nargs="+", type=int, default=list(DIMS))
    ap.add_argument("--depths", nargs="+", type=int, default=list(DEPTHS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_dir = data.resolve_data_dir(None)
    x, y = data.load_split("fashion-mnist", "train", data_dir)
    xt, yt = data.load_split("fashion-mnist", "test", data_dir)
    x, y = x[: args.train_images].float() / 255.0, y[: args.train_images]
    xt, yt = xt[:1000].float() / 255.0, yt[:1000]
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update(
        {
            "schema_version": SCHEMA_VERSION,
            "machine": {"platform": platform.platform(), "threads": args.threads, "torch": torch.__version__},
            "backbone": "sahu 16/32/64, PrimaryCaps 8x8 (288 capsules), class caps 10x16",
            "inactive_rule": "mean and std of a capsule's length over 1000 test images both < 0.01",
        }
    )
    if "init" in args.parts:
        result["init"] = {
            "images": 128,
            "batchnorm": "batch statistics",
            "rows": measure_init(x[:128], args.seed),
        }
    if "train" in args.parts:
        rows = []
        for init, count, dim, depth in grid(args):
            r = train_one(
                net_config(depth, count, dim, init), x, y, xt, yt, args.epochs, args.batch, args.seed
            )
            rows.append({"init": init, "count": count, "dim": dim, "depth": depth, **r})
            frac = " ".join(f"{la['inactive_fraction']:.2f}" for la in r["layers"][1:])
            lens = " ".join(f"{la['mean_length']:.2g}" for la in r["layers"])
            print(
                f"train {init:8s} {count:2d}x{dim:<2d} depth {depth}: acc {r['test_accuracy']:.3f} "
                f"len {lens} | inactive {frac} | {r['train_seconds']}s + {r['eval_seconds']}s",
                flush=True,
            )
        settings = {"images": len(x), "epochs": args.epochs, "batch": args.batch, "seed": args.seed}
        result.setdefault("train", {"settings": settings, "rows": []})
        done = {(r["init"], r["count"], r["dim"], r["depth"]) for r in rows}
        keep = [
            r for r in result["train"]["rows"] if (r["init"], r["count"], r["dim"], r["depth"]) not in done
        ]
        result["train"] = {"settings": settings, "rows": keep + rows}
    if "eps" in args.parts:
        rows = []
        for (init, count, dim, depth), seed, eps in itertools.product(
            grid(args), args.seeds, args.eps_values
        ):
            r = train_one(
                net_config(depth, count, dim, init), x, y, xt, yt, args.epochs, args.batch, seed, eps
            )
            rows.append(
                {"init": init, "count": count, "dim": dim, "depth": depth, "seed": seed, "eps": eps, **r}
            )
            frac = " ".join(f"{la['inactive_fraction']:.2f}" for la in r["layers"][1:])
            print(
                f"eps {eps:g} {init} {count}x{dim} depth {depth} seed {seed}: acc "
                f"{r['test_accuracy']:.3f} | inactive {frac} | {r['train_seconds']}s",
                flush=True,
            )
        settings = {"images": len(x), "epochs": args.epochs, "batch": args.batch, "seeds": args.seeds}
        result["eps"] = {"settings": settings, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
