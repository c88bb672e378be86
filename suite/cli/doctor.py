"""`capsbench doctor`: what this machine offers (CUDA, cuDNN, ONNX Runtime providers, the C++ toolchain, Docker's
GPU runtime, datasets) and what capsbench will use here; `--json` for scripts.
"""

from __future__ import annotations

import json

from capsbench.suite.cli import options


def register(sub) -> None:
    p = sub.add_parser(
        "doctor",
        help="show what this machine offers and what capsbench will use",
        description="Report Python, torch (CUDA build, availability, GPUs), cuDNN, the NVIDIA driver, ONNX "
        "Runtime (version, providers, and the provider a session really gets), cmake and the C++ compiler "
        "for the C++ runner, the Docker client and daemon with its runtimes (nvidia: GPUs in containers), "
        "and the verified datasets; then the torch device and ORT provider capsbench will use.",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    options.add_data_dir(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from capsbench.suite.doctor import diagnose, format_report

    report = diagnose(args.data_dir)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
