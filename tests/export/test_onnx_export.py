"""ONNX export: routing unrolled (no control flow), a dynamic batch axis, the recorded export info."""

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from capsbench.export import (
    CONTROL_FLOW_OPS,
    ExportError,
    check_static_graph,
    export_onnx,
    graph_flops,
    load_onnx,
    make_session,
    op_census,
    parity,
)
from capsbench.export import onnx_export as onnx_export_module
from capsbench.export.onnx_export import to_fp16
from capsbench.models import build_capsnet


def test_deep_net_exports_with_no_control_flow_and_a_dynamic_batch_axis(exported):
    e = exported["deep"]
    proto = load_onnx(e.path)  # runs onnx.checker
    census = op_census(proto)
    assert not set(CONTROL_FLOW_OPS) & set(census)
    # 4 routed layers x 3 iterations, one Softmax over the parents each; the optimiser may merge the
    # first-iteration softmax (of all-zero logits) of two layers of the same shape into one node.
    assert 4 * 3 - 2 <= census["Softmax"] <= 4 * 3
    # per routed layer: the prediction matmul, one for s per iteration, one for the agreement per iteration
    # but the last (routing is written as batched matmuls, never Einsum)
    assert census["MatMul"] == 4 * (1 + 3 + 2)
    assert "Einsum" not in census
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    assert inp.name == "images" and out.name == "capsules"
    assert inp.type.tensor_type.shape.dim[0].dim_param == out.type.tensor_type.shape.dim[0].dim_param
    assert e.info["inputs"] == [{"name": "images", "shape": ["batch", 1, 28, 28], "dtype": "float32"}]
    assert e.info["outputs"] == [{"name": "capsules", "shape": ["batch", 10, 16], "dtype": "float32"}]


def test_export_info_records_exporter_opset_census_size_and_parameters(exported):
    info = exported["shallow"].info
    assert info["exporter"] == "dynamo" and info["fallback_reason"] is None
    assert info["opset"] >= 18
    assert info["op_census"] == op_census(exported["shallow"].path)
    assert info["file_bytes"] == exported["shallow"].path.stat().st_size
    assert info["parameters"] == exported["shallow"].model.num_parameters()
    # BatchNorm is folded into the convs: the ONNX file holds at most the weights plus a few constants
    assert info["parameters"] - 1000 < info["onnx_parameters"] <= info["parameters"] + 100
    assert info["external_data"] is None
    assert [p.name for p in exported["shallow"].path.parent.iterdir()] == ["model.onnx"]  # no side files


@pytest.mark.parametrize("batch", [1, 7])
def test_exported_model_runs_at_any_batch_size(exported, fashion, batch):
    e = exported["shallow"]
    images = fashion["test_x"][:batch]
    out = make_session(e.path, "cpu").run(images.numpy())
    with torch.inference_mode():
        ref = e.model(images).numpy()
    assert out.shape == (batch, 10, 16)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_routing_iterations_unroll_into_proportionally_more_nodes_and_stay_in_parity(
    exported, fashion, tmp_path
):
    base = exported["shallow"]
    census = {3: base.info["op_census"]}
    for iters in (1, 5):
        model = build_capsnet(dataclasses.replace(base.model.cfg, routing_iters=iters))
        model.load_state_dict(base.model.state_dict())  # routing iterations add no parameters
        path = tmp_path / f"routing{iters}.onnx"
        census[iters] = export_onnx(model.eval(), path, fashion["test_x"][:2])["op_census"]
        result = parity(path, model, fashion["test_x"][:64])
        assert result["passed"] and result["argmax_agreement"] == 1.0
    for iters, c in census.items():
        assert c["Softmax"] == iters  # one routed layer: one softmax per iteration
        assert c["MatMul"] == 2 * iters  # predictions once; s per iteration; agreement between iterations
        assert c["Conv"] == 4
    nodes = {i: sum(c.values()) for i, c in census.items()}
    assert nodes[1] < nodes[3] < nodes[5]
    assert nodes[5] - nodes[3] == nodes[3] - nodes[1]  # every extra iteration adds the same nodes
    assert census[5]["Mul"] - census[1]["Mul"] == 2 * (census[3]["Mul"] - census[1]["Mul"])


def test_graph_flops_count_convs_predictions_and_routing(exported):
    cfg = exported["shallow"].model.cfg
    flops = graph_flops(exported["shallow"].path, batch=4)
    assert flops["uncounted"] == []
    grid = cfg.primary_grid
    # the prediction matmul: (in_caps x in_dim) @ (in_dim x classes*class_dim) per image, plus routing's
    # matmuls: s = c @ u_hat every iteration and the agreement u_hat @ v between iterations, in_caps x 10 x 16 each
    prediction = 2 * cfg.num_primary_caps * cfg.primary_dim * 10 * 16
    routing = (2 * cfg.routing_iters - 1) * 2 * cfg.num_primary_caps * 10 * 16
    assert flops["by_op"]["MatMul"] == 4 * (prediction + routing)
    # convs: 28x28 (conv1), 14x14 (conv2, conv3), primary grid; 3x3 kernels
    c1, c2, c3 = cfg.conv_channels
    macs = 28 * 28 * c1 * 9 + 14 * 14 * c2 * c1 * 9 + 14 * 14 * c3 * c2 * 9 + grid * grid * 64 * c3 * 9
    assert flops["by_op"]["Conv"] == 4 * 2 * macs
    assert flops["flops_per_image"] == flops["flops"] / 4
    assert flops["by_op"]["ReduceSum"] > 0 and flops["by_op"]["Softmax"] > 0  # routing is counted


def test_control_flow_in_a_graph_is_refused():
    body = helper.make_graph(
        [helper.make_node("Identity", ["x_in"], ["x_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1]),
        ],
    )
    loop = helper.make_node("Loop", ["n", "cond", "x"], ["y"], body=body)
    graph = helper.make_graph(
        [loop],
        "g",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph)
    assert op_census(model) == {"Identity": 1, "Loop": 1}  # nested bodies are counted too
    with pytest.raises(ExportError, match="control-flow.*Loop"):
        check_static_graph(model)


def test_torchscript_fallback_is_recorded_with_the_reason(exported, fashion, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("dynamo exporter broke")

    monkeypatch.setattr(onnx_export_module, "_dynamo_export", broken)
    e = exported["shallow"]
    before = {k: v.clone() for k, v in e.model.state_dict().items()}
    info = export_onnx(e.model, tmp_path / "ts.onnx", fashion["test_x"][:1], with_lengths=True)
    # the export leaves the model as it was: eval mode, BatchNorm statistics untouched
    assert not e.model.training
    assert all(torch.equal(before[k], v) for k, v in e.model.state_dict().items())
    assert info["exporter"] == "torchscript"
    assert "dynamo exporter broke" in info["fallback_reason"]
    assert [o["name"] for o in info["outputs"]] == ["capsules", "lengths"]
    assert info["outputs"][0]["shape"] == ["batch", 10, 16]
    assert not set(CONTROL_FLOW_OPS) & set(info["op_census"])
    assert parity(tmp_path / "ts.onnx", e.model, fashion["test_x"][:32])["passed"]


def test_fp16_variant_keeps_fp32_io_and_stays_close(exported, fashion, tmp_path):
    e = exported["shallow"]
    info = to_fp16(e.path, tmp_path / "fp16.onnx")
    proto = onnx.load(str(tmp_path / "fp16.onnx"))
    assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(i.data_type != TensorProto.FLOAT for i in proto.graph.initializer)
    assert info["file_bytes"] < e.info["file_bytes"] * 0.6
    images = fashion["test_x"][:16].numpy()
    half = make_session(tmp_path / "fp16.onnx", "cpu").run(images)
    full = make_session(e.path, "cpu").run(images)
    assert np.isfinite(half).all()
    lengths = np.linalg.norm(full, axis=-1)
    assert np.abs(np.linalg.norm(half, axis=-1) - lengths).max() < 1e-2 * lengths.max()
