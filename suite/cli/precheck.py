"""`capsbench precheck`: where each config of a preset stands before training, in seconds per config."""

from __future__ import annotations

from capsbench.suite import precheck, rundir
from capsbench.suite import train as training
from capsbench.suite.cli import options
from capsbench.suite.cli.summary import terminal_safe
from capsbench.suite.env import pick_device


def register(sub) -> None:
    p = sub.add_parser(
        "precheck",
        help="before training: each config's capsule lengths and gradients at initialisation, and its placement",
        description="For every config of a preset, without training: build the net as training would (seeded), "
        "measure its capsule-length profile at initialisation beside the one each layer's gain predicts, and "
        "the margin loss's gradient RMS for every routed layer on one training batch. Places each config "
        f"healthy, at the edge, or past the cliff ({precheck.PLACEMENT_RULE}). Writes precheck.json at the run's "
        "root (the report shows it) and prints a table.",
    )
    options.add_grid(p)
    options.add_data_dir(p)
    options.add_device(p)
    p.set_defaults(func=run)


def format_rows(rows: list[dict]) -> str:
    head = f"{'config':<11}{'shape':>7}{'depth':>6}  {'placement':<9}{'max grad':>10}  class length measured / predicted"
    lines = [head, "-" * len(head)]
    for r in rows:
        last = r["layers"][-1]
        lines.append(
            f"{r['config_id']:<11}{r['shape']:>7}{r['depth']:>6}  {r['placement']:<9}{r['max_grad_rms']:>10.1e}  "
            f"{last['measured_rms_length']:.2e} / {last['predicted_rms_length']:.2e}   {terminal_safe(r['label'])}"
        )
    return "\n".join(lines)


def run(args) -> int:
    configs = options.select_configs(args)
    run_dir = options.run_dir(args)
    device = pick_device(args.device)
    rows = []
    for i, cfg in enumerate(configs, 1):
        splits = training.load_splits(cfg, args.data_dir)
        rows.append(precheck.precheck_config(cfg, splits, device))
        print(
            f"[{i}/{len(configs)}] {cfg.id}: {rows[-1]['placement']} ({rows[-1]['seconds']:.1f} s)",
            flush=True,
        )
    with rundir.folder_lock(run_dir, "run", wait=True):
        path = precheck.write_precheck(run_dir, rows, args.preset)
    print(format_rows(rows))
    print(f"results: {path}")
    return 0
