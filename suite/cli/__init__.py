"""The `capsbench` command line: one small module per subcommand, each with `register(subparsers)`.

`main` builds the parser, runs the chosen command and turns a CapsbenchError into one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from capsbench import __version__
from capsbench.suite.errors import CapsbenchError, os_error_message

# Subcommand modules under capsbench.suite.cli, in the order `--help` lists them.
COMMANDS = (
    "all",
    "presets",
    "data",
    "precheck",
    "train",
    "health",
    "prune",
    "export",
    "time",
    "report",
    "check",
    "history",
    "bench",
    "docker",
    "doctor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capsbench",
        description="Benchmark suite for deep Capsule Networks: train a grid of CapsNets, measure "
        "activation health (inactive capsules per layer), prune, export to ONNX and time it.",
        epilog="Run 'capsbench COMMAND --help' for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"capsbench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"capsbench.suite.cli.{name}").register(sub)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C: temp folders go, child processes are killed


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args) or 0)
    except CapsbenchError as e:
        print(f"capsbench: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # the operating system said no: a read-only folder, a full disk, a file for a folder
        print(f"capsbench: error: {os_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "capsbench: interrupted; finished stages are kept, rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
