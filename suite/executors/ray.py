"""The Ray executor: each config's chain of stages up to the ONNX export (train -> health -> prune -> export) is
one Ray task, one GPU (and its share of the CPUs) per task where the cluster has GPUs, else one CPU, with every
thread pool of the task (torch, ONNX Runtime's CPU sessions) sized to the CPUs it reserved; the timing stages (time, cpp) run
afterwards on the driver, one config after another, once every chain has finished.

Why timing waits for a phase of its own on the driver: latency measured beside other work (another config's
training on the same cores or GPU) is wrong, and timing every config on one machine keeps the figures comparable
across configs. While the timing phase runs, no capsbench task runs anywhere in the cluster.

Every task runs the runner's per-config function (runner.run_config), so a chain writes into the run folder
exactly what the local runner writes (pipeline.json, error.txt, every stage's files), skips finished stages the
same way, and records a failing stage the same way. The tasks write directly into the run folder: on a cluster of
several machines it must lie on storage every node mounts at the same path. A worker that dies (killed, out of
memory, its node lost) is retried up to `max_retries` times by Ray; the retry resumes from the config's last
finished stage (and training from its last finished epoch).
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from capsbench import results as R
from capsbench.files import atomic_write
from capsbench.results import PipelineStatus, StageStatus
from capsbench.suite.errors import CapsbenchError

if TYPE_CHECKING:
    from capsbench.suite.runner import Outcome

INSTALL_HINT = "--executor ray needs Ray, which is not installed: pip install 'capsbench[ray]'"
DRIVER_STAGES = ("time", "cpp")  # timing, never beside other work: on the driver after every chain
MAX_RETRIES = 2


class RayMissingError(CapsbenchError):
    """Ray is not installed."""


def check_installed() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayMissingError(INSTALL_HINT) from None


@contextlib.contextmanager
def reserved_threads(cpus: int) -> Iterator[None]:
    """Every thread pool of the chain sized to the CPUs Ray reserved for its task: torch's (Ray sets
    OMP_NUM_THREADS, this makes sure) and ONNX Runtime's CPU sessions (export's parity), which otherwise take
    every core of the node (`sessions.default_threads`) beside the other tasks' work. Restored afterwards (Ray
    reuses worker processes)."""
    import torch

    from capsbench.export import sessions

    saved = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(cpus)
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    try:
        with sessions.thread_limit(cpus):  # every default_threads() caller, not only make_session
            yield
    finally:
        torch.set_num_threads(saved[0])
        if saved[1] is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved[1]


def _chain(run_one: Callable, cfg, names: list[str], cpus: int = 1):
    """One config's chain, in a Ray worker, on the `cpus` CPUs its task reserved."""
    with reserved_threads(cpus):
        return run_one(cfg, names)


def cpus_per_task(cluster_cpus: int, cluster_gpus: int) -> int:
    """A GPU task reserves its GPU's share of the CPUs (its data loading and ONNX Runtime's CPU parity run on
    them); a CPU task one CPU, so that as many configs run at once as there are CPUs."""
    return max(1, cluster_cpus // cluster_gpus) if cluster_gpus else 1


def make(address: str | None = None, max_retries: int = MAX_RETRIES) -> Callable:
    """An executor on the Ray cluster at `address` (None: $RAY_ADDRESS, else a cluster started for this run)."""
    return functools.partial(execute, address=address, max_retries=max_retries)


def execute(
    configs: list,
    names: list[str],
    run_one: Callable,
    log: Callable[[str], None],
    *,
    address: str | None = None,
    max_retries: int = MAX_RETRIES,
) -> list:
    check_installed()
    chain = [n for n in names if n not in DRIVER_STAGES]
    timing = [n for n in names if n in DRIVER_STAGES]
    outcomes: dict[str, Outcome] = {}
    if chain and configs:
        outcomes = _run_chains(configs, chain, run_one, log, address, max_retries)
    if timing:
        log(f"timing phase on the driver: {' '.join(timing)} for {len(configs)} configs, one after another")
    result: list[Outcome] = []
    for i, cfg in enumerate(configs, 1):
        outcome = outcomes.get(cfg.id)
        if timing and (outcome is None or not _gate_failed(outcome)):
            log(f"[{i}/{len(configs)}] {cfg.id}  {cfg.label}  ({' '.join(timing)})")
            timed = run_one(cfg, timing)
            # The record read back from pipeline.json already holds the chain's stages.
            if outcome is not None:
                timed.outputs = {**outcome.outputs, **timed.outputs}
                timed.failures = [*outcome.failures, *timed.failures]
            outcome = timed
        elif outcome is None:  # no stage for the cluster nor the timing phase: record it as the runner does
            outcome = run_one(cfg, names)
        result.append(outcome)
    return result


def _gate_failed(outcome) -> bool:
    from capsbench.suite import stages

    return any(stages.get(f.stage).gate for f in outcome.failures if f.stage in stages.MODULES) or any(
        f.stage == "worker" for f in outcome.failures
    )


def _run_chains(configs, chain, run_one, log, address, max_retries) -> dict:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    try:
        return _submit(configs, chain, run_one, log, max_retries)
    finally:
        if started:
            ray.shutdown()


def _submit(configs, chain, run_one, log, max_retries) -> dict:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 0))
    task_cpus = cpus_per_task(cpus, gpus)
    # num_gpus only where the cluster has GPUs; keywords spelt out (not a **dict) to match ray.remote's overloads.
    if gpus:
        remote = ray.remote(num_gpus=1, num_cpus=task_cpus, max_retries=max_retries, retry_exceptions=False)
    else:
        remote = ray.remote(num_cpus=task_cpus, max_retries=max_retries, retry_exceptions=False)
    task = remote(_chain)
    log(
        f"ray: {len(configs)} configs ({' -> '.join(chain)}) on a cluster of {cpus} CPUs and {gpus} GPUs, "
        f"{'one GPU and ' if gpus else ''}{task_cpus} CPU(s) (threads) per config, up to {max_retries} retries"
    )
    refs = {
        task.options(name=f"capsbench:{cfg.id}").remote(run_one, cfg, chain, task_cpus): cfg
        for cfg in configs
    }
    outcomes, pending, t0 = {}, list(refs), time.perf_counter()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        cfg = refs[ready[0]]
        try:
            outcome = ray.get(ready[0])
        except Exception as e:  # the worker died more often than it may be retried, or Ray failed
            outcome = _lost(run_one, cfg, e)
        outcomes[cfg.id] = outcome
        stages_line = " ".join(
            f"{k}:{v['status']}" for k, v in outcome.record.items() if isinstance(v, dict) and k in chain
        )
        log(
            f"[{len(outcomes)}/{len(configs)}] {cfg.id}  {outcome.record.get('status', 'failed')}  "
            f"{stages_line}  ({time.perf_counter() - t0:.0f} s)  {cfg.label}"
        )
    return outcomes


def _lost(run_one, cfg, error: BaseException):
    """A config whose chain never returned: its pipeline.json records a failed 'worker' step, like a stage."""
    from capsbench.suite import rundir
    from capsbench.suite.runner import Failure, Outcome, message_of

    out = rundir.config_dir(run_one.keywords["run_dir"], cfg)
    record = R.read_if_valid(out / R.PIPELINE_FILE, "pipeline") or {}
    record = {
        "config_id": cfg.id,
        "label": cfg.label,
        **{k: v for k, v in record.items() if isinstance(v, dict)},
    }
    record["worker"] = {
        "status": StageStatus.FAILED,
        "error": message_of(error),
        "error_type": type(error).__name__,
    }
    record["status"] = PipelineStatus.FAILED
    out.mkdir(parents=True, exist_ok=True)
    R.write_json(out / R.PIPELINE_FILE, "pipeline", record)
    atomic_write(out / R.ERROR_FILE, lambda f: f.write(f"worker:\n{error}\n"))
    return Outcome(record, {}, [Failure(cfg.id, "worker", error)])
