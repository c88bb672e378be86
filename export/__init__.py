"""ONNX export of a CapsNet with routing unrolled, parity against PyTorch, ONNX Runtime sessions and the timing
harness. Takes any nn.Module and example input: nothing here knows about training, datasets or the CLI.
"""

from capsbench.export.errors import ExportError, ParityError, SessionError
from capsbench.export.latency import runtime_environment, summarize, sweep, time_backend
from capsbench.export.onnx_export import INPUT_NAME, LENGTHS_NAME, OUTPUT_NAME, export_onnx
from capsbench.export.sessions import OrtSession, make_session
from capsbench.export.validate import (
    CONTROL_FLOW_OPS,
    check_static_graph,
    graph_flops,
    load_onnx,
    op_census,
    parity,
)

__all__ = [
    "CONTROL_FLOW_OPS",
    "INPUT_NAME",
    "LENGTHS_NAME",
    "OUTPUT_NAME",
    "ExportError",
    "OrtSession",
    "ParityError",
    "SessionError",
    "check_static_graph",
    "export_onnx",
    "graph_flops",
    "load_onnx",
    "make_session",
    "op_census",
    "parity",
    "runtime_environment",
    "summarize",
    "sweep",
    "time_backend",
]
