"""Tiny ONNX models and CBT1 input files for the runner's CTest suite (needs only onnx and numpy).

Usage: python make_fixtures.py OUT_DIR
"""

import struct
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CODES = {np.dtype(np.float32): 1, np.dtype(np.float64): 11}


def write_cbt(path: Path, a: np.ndarray, truncate: int = 0) -> None:
    """The CBT1 format of tensor_io.h (kept independent of capsbench, so CTest runs without the package)."""
    a = np.ascontiguousarray(a)
    raw = b"CBT1" + struct.pack("<II", CODES[a.dtype], a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
    raw += a.astype(a.dtype.newbyteorder("<")).tobytes()
    path.write_bytes(raw[: len(raw) - truncate] if truncate else raw)


def model(batch: str | int, inputs: int = 1) -> onnx.ModelProto:
    """y = relu(x) * 2 and s = sum(x) per image, for x of shape (batch, 1, 4, 4)."""
    xs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [batch, 1, 4, 4]) for i in range(inputs)]
    nodes = [
        helper.make_node("Relu", ["x0"], ["r"]),
        helper.make_node("Mul", ["r", "two"], ["y"]),
        helper.make_node("ReduceSum", ["x0", "axes"], ["s"], keepdims=0),
    ]
    nodes += [helper.make_node("Identity", [f"x{i}"], [f"id{i}"]) for i in range(1, inputs)]
    outs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1, 4, 4]),
        helper.make_tensor_value_info("s", TensorProto.FLOAT, [batch]),
    ]
    outs += [
        helper.make_tensor_value_info(f"id{i}", TensorProto.FLOAT, [batch, 1, 4, 4]) for i in range(1, inputs)
    ]
    init = [
        helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
        helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
    ]
    graph = helper.make_graph(nodes, "tiny", xs, outs, init)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # readable by every ONNX Runtime the runner may link
    onnx.checker.check_model(m)
    return m


def fails_unless_batch_2() -> onnx.ModelProto:
    """A dynamic batch axis in the signature but a Reshape to a fixed (2, 16) inside: other batches fail at run time."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 16])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "fixed", [x], [y], [shape]
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model("batch"), out / "tiny.onnx")
    onnx.save(model(1), out / "fixed_batch.onnx")
    onnx.save(model("batch", inputs=2), out / "two_inputs.onnx")
    onnx.save(fails_unless_batch_2(), out / "fails_unless_batch_2.onnx")
    (out / "corrupt.onnx").write_bytes(b"this is not an ONNX model\n" * 4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    write_cbt(out / "good.cbt", x)
    write_cbt(out / "wrong_shape.cbt", rng.standard_normal((3, 1, 5, 4)).astype(np.float32))
    write_cbt(out / "wrong_dtype.cbt", x.astype(np.float64))
    write_cbt(out / "truncated.cbt", x, truncate=10)
    (out / "bad_magic.cbt").write_bytes(b"NOPE" + bytes(64))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
