"""MACs and parameters counted on the ONNX graph equal fvcore's conv + linear count."""

import onnx
import pytest
import torch
import torch_pruning as tp
from fvcore.nn import FlopCountAnalysis
from onnx import numpy_helper
from torch import nn

from rcomp.errors import RcompError
from rcomp.export.onnx_count import count_onnx, input_spec, read_metadata
from rcomp.export.onnx_export import export_onnx
from rcomp.models import create_model

SHAPE = (1, 3, 32, 32)


def fvcore_conv_linear(model: nn.Module, shape=SHAPE) -> int:
    """fvcore's conv + linear MACs. by_operator is used because set_op_handle(name, None) does
    not remove fvcore's built-in handles."""
    analysis = FlopCountAnalysis(model.eval(), torch.rand(shape))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    return by_op["conv"] + by_op.get("linear", 0)


def pruned_resnet20() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet20")
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.rand(SHAPE))
    net = model.net
    for conv, idxs in ((net.conv1, [1, 2]), (net.layer2[0].conv1, [0, 3, 5, 7]), (net.layer3[2].conv1, list(range(9)))):
        dg.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=idxs).prune()
    return model.eval()


def _export(model, tmp_path, name):
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, SHAPE, path, opset=17, metadata={"base_model": name}, check_n=1)
    return path


def test_resnet20_dense_matches_fvcore_and_closed_form(tmp_path):
    model = create_model("resnet20")
    cost = count_onnx(_export(model, tmp_path, "resnet20"))
    assert cost.macs == 40_813_184 == fvcore_conv_linear(model)
    assert cost.not_counted == {"Sub": 1, "Div": 1, "Relu": 19, "Add": 9, "GlobalAveragePool": 1, "Flatten": 1}
    assert sum(n[2] for n in cost.per_node) == cost.macs
    assert [n[1] for n in cost.per_node if n[2]].count("Conv") == 21


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    model = pruned_resnet20()
    return model, _export(model, tmp_path_factory.mktemp("pruned"), "pruned")


def _check_against_fvcore(model, path):
    cost = count_onnx(path)
    assert cost.macs == fvcore_conv_linear(model)
    m = onnx.load(str(path))
    assert cost.params == sum(numpy_helper.to_array(i).size for i in m.graph.initializer)
    assert sum(n[3] for n in cost.per_node) == cost.params
    return cost


def test_tiny_cnn_matches_fvcore(tmp_path):
    model = create_model("tiny_cnn")
    _check_against_fvcore(model, _export(model, tmp_path, "tiny"))


def test_pruned_resnet20_matches_fvcore(pruned):
    model, path = pruned
    cost = _check_against_fvcore(model, path)
    assert cost.macs < 40_813_184
    # ONNX params are stored weights (BN folded into conv bias): never the PyTorch count with BN affine.
    assert cost.params < sum(p.numel() for p in model.parameters())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_batch_is_divided_out(tmp_path):
    model = create_model("tiny_cnn").eval()
    path = tmp_path / "b4.onnx"
    torch.onnx.export(model, (torch.rand(4, 3, 32, 32),), str(path), opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamo=False)
    assert count_onnx(path).macs == fvcore_conv_linear(model)
    assert count_onnx(onnx.load(str(path))).macs == fvcore_conv_linear(model)


def test_metadata_and_input_spec(tmp_path):
    path = _export(create_model("tiny_cnn"), tmp_path, "tiny")
    assert read_metadata(path)["rcomp.base_model"] == "tiny"
    assert input_spec(path) == ("input", SHAPE)


def test_invalid_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf, just a text file\n" * 20)
    for fn in (count_onnx, read_metadata, input_spec):
        with pytest.raises(RcompError, match=r"^model\.onnx: not an ONNX model") as info:
            fn(bad)
        assert "\n" not in str(info.value)
    with pytest.raises(RcompError, match="no such file"):
        count_onnx(tmp_path / "missing.onnx")
