"""Export an nn.Module to ONNX with a dynamic batch axis and routing unrolled into a static graph.

The torch.export-based (dynamo) exporter is the default; the TorchScript exporter is a recorded fallback.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from capsbench.export.errors import ExportError
from capsbench.export.validate import check_static_graph, io_spec, op_census
from capsbench.files import atomic_write

INPUT_NAME, OUTPUT_NAME, LENGTHS_NAME = "images", "capsules", "lengths"
BATCH = "batch"
TORCHSCRIPT_OPSET = 17
# protobuf cannot serialise one message over 2 GiB: larger models keep their weights in a side file.
INLINE_LIMIT = 2**31 - 2**20


class WithLengths(nn.Module):
    """Adds the class-capsule lengths (the class scores) as a second output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.model(x)  # (batch, classes, dim)
        return v, torch.sqrt((v * v).sum(dim=-1))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data), "wb")


@contextmanager
def _quiet_exporter():
    """The dynamo exporter warns about torchvision ops it cannot register and torch's own deprecations on every
    export; none concern a CapsNet, and a grid would print them for every model."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def _dynamo_export(model: nn.Module, x: torch.Tensor, names: list[str], opset: int | None) -> onnx.ModelProto:
    with _quiet_exporter():
        return _dynamo_program(model, x, names, opset).model_proto


def _dynamo_program(model: nn.Module, x: torch.Tensor, names: list[str], opset: int | None):
    return torch.onnx.export(
        model,
        (x,),
        None,
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=names,
        dynamic_shapes=({0: torch.export.Dim(BATCH)},),
        opset_version=opset,
        external_data=False,
        optimize=True,
        verbose=False,
    )


def _torchscript_export(
    model: nn.Module, x: torch.Tensor, names: list[str], opset: int | None
) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            buf,  # type: ignore[arg-type]  # a file object is accepted (torch.onnx's docs), the stub says path
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_axes={n: {0: BATCH} for n in [INPUT_NAME, *names]},
            opset_version=opset or TORCHSCRIPT_OPSET,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _fix_output_shapes(proto: onnx.ModelProto, module: nn.Module, x: torch.Tensor) -> None:
    """The TorchScript exporter leaves non-batch output axes symbolic: fix them from one torch run."""
    with torch.inference_mode():
        outs = module(x)
    outs = outs if isinstance(outs, tuple) else (outs,)
    for v, out in zip(proto.graph.output, outs, strict=True):
        for d, size in list(zip(v.type.tensor_type.shape.dim, out.shape, strict=True))[1:]:
            d.ClearField("dim_param")
            d.dim_value = int(size)


def _check_dynamic_batch(proto: onnx.ModelProto) -> None:
    for v in [*proto.graph.input, *proto.graph.output]:
        dims = v.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            raise ExportError(
                f"{v.name}: axis 0 is fixed ({dims[0].dim_value if dims else 'no shape'}), not a dynamic batch axis"
            )


def _save(proto: onnx.ModelProto, path: Path) -> str | None:
    """Write the model atomically; returns the external-data file name when the weights could not be inline."""
    if proto.ByteSize() < INLINE_LIMIT:
        _atomic_write_bytes(path, proto.SerializeToString())
        (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # a stale side file of an older export
        return None
    # Weights first (to a temp name, renamed), then the graph that points at them: the graph's rename is
    # the commit, so a reader never sees a graph whose weights are half written.
    data_name = f"{path.name}.data"
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        onnx.save_model(
            proto,
            str(Path(tmp) / path.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data_name,
        )
        os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(Path(tmp) / path.name, path)
    return data_name


@contextmanager
def _eval_mode(model: nn.Module):
    """Export in eval mode and give the caller back the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _export_proto(
    model: nn.Module, x: torch.Tensor, with_lengths: bool, opset: int | None, dynamo: bool, path: Path
) -> tuple[onnx.ModelProto, str, str | None]:
    """(graph, exporter used, why the dynamo exporter was not used)."""
    # eval() on the wrapper too: a fresh module is in training mode, and the TorchScript exporter restores
    # that mode afterwards, recursively, which would put the caller's BatchNorm layers back into training.
    module = (WithLengths(model) if with_lengths else model).eval()
    names = [OUTPUT_NAME, LENGTHS_NAME] if with_lengths else [OUTPUT_NAME]
    fallback_reason = None
    if dynamo:
        try:
            return _dynamo_export(module, x, names, opset), "dynamo", None
        except Exception as e:  # the exporter raises many types; the reason is recorded, not swallowed
            fallback_reason = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    try:
        proto = _torchscript_export(module, x, names, opset)
    except Exception as e:
        raise ExportError(
            f"{path}: ONNX export failed: dynamo: {fallback_reason or 'not tried'}; "
            f"torchscript: {type(e).__name__}: {e}"
        ) from e
    _fix_output_shapes(proto, module.eval(), x)
    return proto, "torchscript", fallback_reason


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_input: torch.Tensor,
    opset: int | None = None,
    dynamo: bool = True,
    with_lengths: bool = False,
) -> dict[str, Any]:
    """Export `model` to `path`: input 'images' (batch, C, H, W), output 'capsules' (batch, classes, dim) and,
    with `with_lengths`, 'lengths' (batch, classes). Returns the export info (JSON-ready).

    The model's routing must be a fixed Python loop: the exporter traces it into unrolled nodes, and the
    result is refused if it has Loop/If/Scan. onnx.checker runs before the file is written (atomically).
    """
    path = Path(path)
    device = next(model.parameters()).device
    x = example_input.to(device).float()
    if x.shape[0] < 2:  # torch.export specialises a size-1 axis to a constant: trace with a batch of 2
        x = x.expand(2, *x.shape[1:]).contiguous()
    t0 = time.perf_counter()
    with _eval_mode(model):
        proto, exporter, fallback_reason = _export_proto(model, x, with_lengths, opset, dynamo, path)
    export_seconds = time.perf_counter() - t0

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path}: the exported graph fails onnx.checker: {e}") from e
    check_static_graph(proto, name=str(path))
    try:
        _check_dynamic_batch(proto)
    except ExportError as e:
        raise ExportError(f"{path}: {e}; the exporter specialised the batch size") from e
    external = _save(proto, path)

    # CapsNet counts the weights its forward uses (not the decoder); any other module counts all.
    count = getattr(model, "num_parameters", None)
    torch_params = int(count()) if callable(count) else sum(p.numel() for p in model.parameters())
    onnx_params = sum(int(torch.Size(i.dims).numel()) for i in proto.graph.initializer)
    opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
    return {
        "onnx_file": path.name,
        "exporter": exporter,
        "fallback_reason": fallback_reason,
        "opset": opsets.get("ai.onnx"),
        "opset_imports": opsets,
        "op_census": op_census(proto),
        "nodes": len(proto.graph.node),
        "file_bytes": path.stat().st_size,
        "external_data": external,
        "parameters": torch_params,
        "onnx_parameters": onnx_params,
        **io_spec(proto),
        "export_seconds": export_seconds,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }


def to_fp16(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """An fp16 copy of an fp32 ONNX model with fp32 inputs and outputs (a Cast at each end), for GPUs.

    Weights and constants are cast to fp16; scalar constants too small for fp16 (squash's eps = 1e-8) are
    raised to fp16's smallest normal number instead of flushing to 0, which would turn 0/sqrt(0) into NaN.
    Parity against the fp32 model needs a looser tolerance (about 1e-3 on capsule lengths).
    """
    from onnx import TensorProto, helper, numpy_helper

    from capsbench.export.validate import load_onnx

    src, dst = Path(src), Path(dst)
    proto = load_onnx(src)
    g = proto.graph
    tiny = float(np.finfo(np.float16).tiny)

    def half(t: onnx.TensorProto) -> onnx.TensorProto:
        a = numpy_helper.to_array(t)
        if a.size == 1:
            a = np.where((a != 0) & (np.abs(a) < tiny), np.sign(a) * tiny, a)
        return numpy_helper.from_array(a.astype(np.float16), t.name)

    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT:
            g.initializer[i].CopyFrom(half(t))
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.FLOAT16
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT:
                a.t.CopyFrom(half(a.t))
    del g.value_info[:]  # intermediate types change; ORT re-infers them
    renames = {}
    for v in [*g.input, *g.output]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            renames[v.name] = f"{v.name}_fp16"
    outputs = {v.name for v in g.output}
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in renames:  # graph inputs, and outputs also consumed inside, are read in fp16
                node.input[k] = renames[name]
        for k, name in enumerate(node.output):
            if name in renames and name in outputs:
                node.output[k] = renames[name]
    casts_in = [
        helper.make_node("Cast", [v.name], [renames[v.name]], to=TensorProto.FLOAT16)
        for v in g.input
        if v.name in renames
    ]
    casts_out = [
        helper.make_node("Cast", [renames[v.name]], [v.name], to=TensorProto.FLOAT)
        for v in g.output
        if v.name in renames
    ]
    nodes = [*casts_in, *g.node, *casts_out]
    del g.node[:]
    g.node.extend(nodes)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{src}: the fp16 cast gives an invalid graph ({e}); use the fp32 model") from e
    _save(proto, dst)
    return {"onnx_file": dst.name, "source": src.name, "dtype": "float16", "file_bytes": dst.stat().st_size}
