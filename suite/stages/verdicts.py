"""The verdicts stage: once per run, before the report, the paper's claims tested on the run's results ->
verdicts.json (see suite/verdicts.py for the tests and the four outcomes)."""

from __future__ import annotations

from pathlib import Path

from capsbench.suite.stages.base import Context, Stage


def run(ctx: Context) -> Path:
    from capsbench.suite.verdicts import write_verdicts

    return write_verdicts(ctx.run_dir)


def done(ctx: Context) -> bool:
    return False  # cheap, and it reads every config: always written again


STAGE = Stage(
    "verdicts",
    run=run,
    done=done,
    help="the paper's claims tested on the run's results (held / did not hold / inconclusive / not testable)",
    per_run=True,
)
