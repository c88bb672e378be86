"""Checks on an exported graph: loading with clear errors, op census, no control flow, FLOPs, and parity of
ONNX Runtime against PyTorch on the same real images.
"""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import ModelProto

from capsbench.export.errors import ExportError, ParityError

# Routing must be unrolled into a static graph: any of these means it was not.
CONTROL_FLOW_OPS = ("Loop", "If", "Scan")
PARITY_ATOL = 1e-4  # fp32: max abs error of class-capsule lengths
PARITY_RTOL = 1e-3  # max abs error relative to each image's longest class capsule (floored at atol/rtol)
REEXPORT_ADVICE = "delete it and re-export (capsbench export --force)"


def load_onnx(path: str | Path, check: bool = True) -> ModelProto:
    """The ModelProto of an ONNX file; ExportError naming the file when it is missing, corrupt or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: ONNX file not found; export the model first (capsbench export)")
    try:
        proto = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, missing external data, ...
        raise ExportError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {e}); {REEXPORT_ADVICE}"
        ) from e
    if not proto.graph.node or not proto.graph.input:
        raise ExportError(f"{path}: not an ONNX model (empty graph); {REEXPORT_ADVICE}")
    if check:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"{path}: fails onnx.checker ({e}); {REEXPORT_ADVICE}") from e
    return proto


def _graphs(graph: onnx.GraphProto):
    """A graph and every subgraph nested in its nodes' attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def _nodes(proto: ModelProto):
    for g in _graphs(proto.graph):
        yield from g.node
    for fn in proto.functions:  # local functions (the exporter inlines them, but a file may have some)
        yield from fn.node


def op_census(model: ModelProto | str | Path) -> dict[str, int]:
    """Op type -> number of nodes, most frequent first; ops outside the default domain are 'domain.Op'."""
    proto = model if isinstance(model, ModelProto) else load_onnx(model, check=False)
    counts = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in _nodes(proto)
    )
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_static_graph(model: ModelProto, name: str = "model") -> None:
    """ExportError when the graph has control flow: routing iterations must be unrolled."""
    census = op_census(model)
    found = {op: census[op] for op in CONTROL_FLOW_OPS if op in census}
    if found:
        raise ExportError(
            f"{name}: the graph has control-flow nodes {found}; routing must be a fixed Python loop so the "
            "exporter unrolls it (no data-dependent iteration count)"
        )


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    """Shape of a graph input/output: ints for fixed axes, the symbol (e.g. 'batch') for dynamic ones."""
    return [
        d.dim_param or (d.dim_value if d.HasField("dim_value") else "?")
        for d in value.type.tensor_type.shape.dim
    ]


def io_spec(model: ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Names, shapes and element types of the graph's inputs and outputs."""
    inits = {i.name for i in model.graph.initializer}

    def spec(v: onnx.ValueInfoProto) -> dict[str, Any]:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        return {"name": v.name, "shape": _dims(v), "dtype": str(dtype)}

    return {
        "inputs": [spec(v) for v in model.graph.input if v.name not in inits],
        "outputs": [spec(v) for v in model.graph.output],
    }


# ------------------------------------------------------------------------------------------------- FLOPs

_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Sqrt",
    "Relu",
    "Pow",
    "Neg",
    "Exp",
    "Sigmoid",
    "Reciprocal",
    "Clip",
    "Max",
    "Min",
}
_REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceSumSquare"}


def graph_flops(model: ModelProto | str | Path, batch: int = 1) -> dict[str, Any]:
    """Floating-point operations of one run at `batch`, from the graph's shapes.

    A multiply-add is 2 FLOPs (Conv, MatMul, Gemm); elementwise ops count one per output element, reductions
    one per input element, Softmax three per element. Shape-only ops count nothing; ops with no rule are listed
    under 'uncounted' so a total is never silently short.
    """
    proto = model if isinstance(model, ModelProto) else load_onnx(model, check=False)
    proto = copy.deepcopy(proto)
    for v in [*proto.graph.input, *proto.graph.output]:
        for d in v.type.tensor_type.shape.dim:
            if d.dim_param:
                d.ClearField("dim_param")
                d.dim_value = batch
    del proto.graph.value_info[:]  # the exporter's symbolic shapes; re-infer them with the concrete batch
    proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    shapes: dict[str, list[int]] = {i.name: list(i.dims) for i in proto.graph.initializer}
    for v in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[v.name] = [d.dim_value for d in dims]

    by_op: Counter[str] = Counter()
    uncounted: set[str] = set()
    for node in proto.graph.node:
        op = node.op_type
        out = shapes.get(node.output[0]) if node.output else None
        ins = [shapes.get(i) for i in node.input]
        if op == "Conv" and out is not None and ins[1] is not None:
            w = ins[1]  # (out_ch, in_ch / groups, kh, kw)
            flops = 2 * int(np.prod(out)) * int(np.prod(w[1:]))
        elif op in ("MatMul", "FusedMatMul", "Gemm") and out is not None and ins[0] is not None:
            k = ins[0][-1] if op != "Gemm" or not _attr(node, "transA") else ins[0][0]
            flops = 2 * int(np.prod(out)) * k
        elif op in _ELEMENTWISE and out is not None:
            flops = int(np.prod(out))
        elif op in _REDUCE and ins and ins[0] is not None:
            flops = int(np.prod(ins[0]))
        elif op in ("Softmax", "LogSoftmax") and out is not None:
            flops = 3 * int(np.prod(out))
        elif op == "BatchNormalization" and out is not None:
            flops = 2 * int(np.prod(out))
        elif op in _SHAPE_ONLY:
            continue
        else:
            uncounted.add(op)
            continue
        by_op[op] += flops
    total = sum(by_op.values())
    return {
        "batch": batch,
        "flops": total,
        "flops_per_image": total / batch,
        "by_op": dict(by_op.most_common()),
        "uncounted": sorted(uncounted),
    }


_SHAPE_ONLY = {
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Shape",
    "Concat",
    "Expand",
    "Gather",
    "Constant",
    "ConstantOfShape",
    "Flatten",
    "Slice",
    "Identity",
    "Cast",
}


def _attr(node: onnx.NodeProto, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return None


# ------------------------------------------------------------------------------------------------ parity


def torch_capsules(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """The PyTorch model's class capsules for `images`, in batches: the reference every ONNX output is checked
    against (never ONNX Runtime on the same file, which agrees with any file)."""
    model.eval()
    device = next(model.parameters()).device
    outs = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            out = model(images[i : i + batch_size].to(device))
            outs.append((out[0] if isinstance(out, tuple | list) else out).float().cpu().numpy())
    return np.concatenate(outs)


def parity(
    onnx_path: str | Path,
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    session=None,
    atol: float = PARITY_ATOL,
    rtol: float = PARITY_RTOL,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on the same images and compare the class capsules.

    images: (N, C, H, W) float in [0, 1] (uint8 is scaled). Errors are on class-capsule lengths; the relative
    error divides by each image's longest capsule, so tiny (untrained) capsules are judged fairly. Raises
    ParityError (with the result dict as `.result`) when the top class differs on any image, except near-ties
    whose torch lengths differ by less than `atol`, or when max abs error > atol or relative error > rtol.
    """
    from capsbench.export.sessions import make_session

    onnx_path = Path(onnx_path)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    images = images.float().cpu()
    if session is None:
        session = make_session(onnx_path, provider="cpu")
    session.check_input(tuple(images.shape))

    ort_out = np.concatenate(
        [session.run(images[i : i + batch_size].numpy()) for i in range(0, len(images), batch_size)]
    )
    ref = torch_capsules(model, images, batch_size)
    if ort_out.shape != ref.shape:
        raise ParityError(
            f"{onnx_path}: ONNX gives capsules of shape {ort_out.shape[1:]} but the model gives "
            f"{ref.shape[1:]}: the file was exported from another model; {REEXPORT_ADVICE}"
        )
    ort_len = np.sqrt((ort_out.astype(np.float64) ** 2).sum(-1))  # (N, classes)
    ref_len = np.sqrt((ref.astype(np.float64) ** 2).sum(-1))
    err = np.abs(ort_len - ref_len)
    # Relative to the image's longest class capsule, but never to less than atol/rtol: where capsules have
    # vanished (lengths ~1e-9 in a net past the cliff) float noise over a near-zero scale is no disagreement,
    # and below that scale the absolute tolerance is the binding one anyway.
    scale = np.maximum(ref_len.max(axis=1, keepdims=True), atol / rtol)
    pred_ort, pred_ref = ort_len.argmax(1), ref_len.argmax(1)
    differ = np.flatnonzero(pred_ort != pred_ref)
    rows = np.arange(len(ref_len))
    near_tie = np.abs(ref_len[rows, pred_ref] - ref_len[rows, pred_ort]) <= atol
    finite = bool(np.isfinite(ort_out).all())
    result = {
        "onnx": str(onnx_path),
        "images": len(images),
        "provider": session.provider,
        "atol": atol,
        "rtol": rtol,
        "max_abs_err": float(err.max()) if finite else float("nan"),
        "mean_abs_err": float(err.mean()) if finite else float("nan"),
        "max_rel_err": float((err / scale).max()) if finite else float("nan"),
        "capsules_max_abs_err": float(np.abs(ort_out - ref).max()) if finite else float("nan"),
        "max_length": float(ref_len.max()),
        "argmax_agreement": float((pred_ort == pred_ref).mean()),
        "disagreements": int(len(differ)),
        "near_ties": int(near_tie[differ].sum()),
    }
    problems = []
    if not finite:
        problems.append("ONNX Runtime produced NaN/inf")
    if len(differ) > result["near_ties"]:
        problems.append(f"top class differs on {len(differ) - result['near_ties']} of {len(images)} images")
    if finite and result["max_abs_err"] > atol:
        problems.append(f"max abs error of capsule lengths {result['max_abs_err']:.3g} > {atol:g}")
    if finite and result["max_rel_err"] > rtol:
        problems.append(f"max relative error {result['max_rel_err']:.3g} > {rtol:g}")
    result["passed"] = not problems
    if problems:
        err_ = ParityError(
            f"{onnx_path}: ONNX Runtime and PyTorch disagree: {'; '.join(problems)}. If the model was "
            f"retrained or pruned since the export, {REEXPORT_ADVICE}"
        )
        err_.result = result
        raise err_
    return result
