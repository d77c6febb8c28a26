"""PyTorch → ONNX export: checker, opset, parity with PyTorch, metadata, atomic write."""

import onnx
import onnxsim
import pytest
import torch
import torch_pruning as tp
from torch import nn

from rcomp.export import onnx_export
from rcomp.export.onnx_count import input_spec, read_metadata
from rcomp.export.onnx_export import ExportError, ParityError, export_onnx, parity
from rcomp.models import create_model

SHAPE = (1, 3, 32, 32)


def pruned_resnet20() -> nn.Module:
    """resnet20 with a few channels of a residual stream and of two blocks removed (non-uniform
    widths), and non-trivial BN statistics so that BN folding actually changes the weights."""
    torch.manual_seed(0)
    model = create_model("resnet20")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(SHAPE))
    net = model.net
    for conv, idxs in ((net.conv1, [1, 2]), (net.layer1[0].conv1, [0, 3, 5]), (net.layer3[1].conv1, list(range(10)))):
        dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs).prune()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = pruned_resnet20()
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    meta = {"base_model": "resnet20", "mops": "37.31", "rcomp.profile": "test", "params": 257734}
    return model, path, export_onnx(model, SHAPE, path, opset=13, metadata=meta)


def test_export_is_valid_static_and_pinned(exported):
    _, path, result = exported
    onnx.checker.check_model(str(path), full_check=True)
    m = onnx.load(str(path))
    assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [13]
    assert input_spec(path) == ("input", SHAPE)
    assert [o.name for o in m.graph.output] == ["logits"]
    assert "BatchNormalization" not in {n.op_type for n in m.graph.node}  # folded by onnxsim
    assert result.simplified and result.max_abs_diff_vs_torch <= 1e-4


def test_parity_with_pytorch_on_16_inputs(exported):
    model, path, _ = exported
    x = torch.rand((16,) + SHAPE[1:], generator=torch.Generator().manual_seed(3))
    res = parity(model, path, x, atol=1e-4)
    assert res.passed and res.n == 16
    assert res.max_abs_diff <= 1e-4 and res.top1_agreement == 1.0


def test_metadata_round_trips(exported):
    _, path, result = exported
    meta = read_metadata(path)
    assert meta == result.metadata
    assert meta["rcomp.base_model"] == "resnet20" and meta["rcomp.profile"] == "test"
    assert meta["rcomp.params"] == "257734" and meta["rcomp.input_shape"] == "1x3x32x32"
    assert meta["rcomp.opset"] == "13" and "rcomp.version" in meta


def test_parity_error_carries_the_numbers(exported):
    model, path, _ = exported
    other = pruned_resnet20()
    with torch.no_grad():
        other.net.fc.bias += 1.0
    with pytest.raises(ParityError, match=r"max \|logit diff\| 1 .*top-1 agreement"):
        parity(other, path, torch.rand((4,) + SHAPE[1:]))


def test_parity_scales_its_tolerance_with_the_logits(tmp_path):
    # random weights, BatchNorm at its initial statistics: logits in the thousands, float32 rounding ~1e-3
    model = create_model("resnet56").eval()
    with torch.no_grad():
        scale = float(model(torch.rand((4,) + SHAPE[1:])).abs().max())
    result = export_onnx(model, SHAPE, tmp_path / "r56.onnx", opset=17, metadata={})  # raised at 1e-4 absolute here
    assert scale > 1000 and result.max_abs_diff_vs_torch <= 1e-4 + 1e-5 * scale


def test_failed_export_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    model = create_model("tiny_cnn")
    dest = tmp_path / "model.onnx"
    dest.write_bytes(b"old content")

    def boom(*_a, **_k):
        raise RuntimeError("simplifier crashed")

    monkeypatch.setattr(onnxsim, "simplify", boom)
    with pytest.raises(RuntimeError, match="simplifier crashed"):
        export_onnx(model, SHAPE, dest, opset=17, metadata={})
    with pytest.raises(RuntimeError):
        export_onnx(model, SHAPE, tmp_path / "new.onnx", opset=17, metadata={})
    assert dest.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_failed_simplifier_check_is_loud(tmp_path, monkeypatch):
    monkeypatch.setattr(onnxsim, "simplify", lambda model, check_n: (model, False))
    with pytest.raises(ExportError, match="onnxsim"):
        export_onnx(create_model("tiny_cnn"), SHAPE, tmp_path / "m.onnx", opset=17, metadata={})
    assert not (tmp_path / "m.onnx").exists()


def test_export_restores_training_mode_and_rejects_bad_metadata(tmp_path):
    model = create_model("tiny_cnn").train()
    export_onnx(model, SHAPE, tmp_path / "m.onnx", opset=17, metadata={}, check_n=1)
    assert model.training
    with pytest.raises(TypeError, match="metadata"):
        export_onnx(model, SHAPE, tmp_path / "m2.onnx", opset=17, metadata={"x": [1]})


def test_legacy_exporter_is_used_explicitly(monkeypatch, tmp_path):
    """torch 2.14 defaults to the dynamo exporter (needs onnxscript); we must pass dynamo=False."""
    seen = {}
    real = torch.onnx.export

    def spy(*a, **k):
        seen.update(k)
        return real(*a, **k)

    monkeypatch.setattr(onnx_export.torch.onnx, "export", spy)
    export_onnx(create_model("tiny_cnn"), SHAPE, tmp_path / "m.onnx", opset=17, metadata={}, check_n=1)
    assert seen["dynamo"] is False and seen["opset_version"] == 17
