"""Parity of ONNX Runtime with PyTorch on real Fashion-MNIST images, and clear errors for the wrong file."""

import dataclasses

import pytest
import torch

from capsbench.export import ExportError, ParityError, export_onnx, load_onnx, make_session, parity
from capsbench.models import build_capsnet


@pytest.mark.parametrize("name", ["shallow", "deep", "pruned"])
def test_onnx_matches_torch_on_real_images(exported, fashion, name):
    e = exported[name]
    result = parity(e.path, e.model, fashion["test_x"])
    assert result["passed"]
    assert result["images"] == 256 and result["provider"] == "CPUExecutionProvider"
    assert result["max_abs_err"] < 1e-5
    assert result["max_rel_err"] < 1e-4
    assert result["disagreements"] == result["near_ties"]  # only exact ties may flip
    assert result["max_length"] > 1e-3  # briefly trained: capsules are not vanishingly small
    if name != "deep":  # the deep net's class capsules are still nearly uniform after a few steps
        assert result["argmax_agreement"] == 1.0


def test_parity_catches_a_model_other_than_the_exported_one(exported, fashion):
    e = exported["shallow"]
    torch.manual_seed(1)
    other = build_capsnet(e.model.cfg).eval()  # same shapes, other weights
    with pytest.raises(ParityError, match=rf"{e.path}.*disagree.*re-export") as info:
        parity(e.path, other, fashion["test_x"][:64])
    assert info.value.result["passed"] is False
    assert info.value.result["max_rel_err"] > 1e-3


def test_parity_names_the_file_when_output_shapes_differ(exported, fashion):
    e = exported["shallow"]
    other = build_capsnet(dataclasses.replace(e.model.cfg, class_dim=8)).eval()
    with pytest.raises(ParityError, match=rf"{e.path}.*exported from another model"):
        parity(e.path, other, fashion["test_x"][:8])


def test_wrong_input_shape_is_a_clear_error(exported):
    e = exported["shallow"]
    with pytest.raises(ExportError, match=rf"{e.path}.*\['batch', 1, 28, 28\].*\(4, 1, 32, 32\)"):
        parity(e.path, e.model, torch.rand(4, 1, 32, 32))
    with pytest.raises(ExportError, match="images are"):
        make_session(e.path, "cpu").run(torch.rand(2, 3, 28, 28).numpy())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_onnx_file_is_a_clear_error(exported, tmp_path, damage):
    good = exported["shallow"].path.read_bytes()
    bad = tmp_path / "model.onnx"
    bad.write_bytes(
        {"garbage": b"\x08\x07not an onnx model" * 50, "truncated": good[: len(good) // 2], "empty": b""}[
            damage
        ]
    )
    with pytest.raises(ExportError, match=rf"{bad}.*re-export"):
        load_onnx(bad)
    with pytest.raises(ExportError, match=rf"{bad}.*re-export"):
        make_session(bad, "cpu")


def test_missing_onnx_file_says_to_export_first(tmp_path):
    with pytest.raises(ExportError, match="not found; export the model first"):
        make_session(tmp_path / "model.onnx")


def test_export_writes_atomically_over_an_existing_file(exported, fashion, tmp_path):
    e = exported["pruned"]
    path = tmp_path / "model.onnx"
    path.write_bytes(b"old")
    export_onnx(e.model, path, fashion["test_x"][:2], dynamo=False)  # the quick exporter: same write path
    assert load_onnx(path) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left behind


@pytest.mark.slow
def test_a_net_whose_class_capsules_vanished_passes_parity(fashion, tmp_path):
    """Past the cliff every class capsule is ~0: float noise over that scale is no disagreement (it used to fail
    with relative errors of 15 on the depth preset's dead nets)."""
    from capsbench.models import CapsNet, CapsNetConfig

    cfg = CapsNetConfig(
        backbone="sahu",
        backbone_channels=(8, 16, 32),
        primary_types=8,
        primary_dim=8,
        intermediate=((8, 8),) * 4,
        caps_init="authors",
    )
    torch.manual_seed(0)
    model = build_capsnet(cfg).eval()
    images = fashion["test_x"][:32]
    with torch.no_grad():
        lengths = CapsNet.lengths(model(images))
    assert float(lengths.max()) < 1e-3  # the net really is dead
    path = tmp_path / "dead.onnx"
    export_onnx(model, path, images[:2])
    result = parity(path, model, images)
    assert result["passed"] and result["max_abs_err"] <= result["atol"]
