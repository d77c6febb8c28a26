"""The zoo: registry behaviour, normalization in front, and the published dense MAC counts."""

import pytest
import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.models import Normalize, create_model, find_classifier, get_model_info, list_models


def conv_linear_macs(model: nn.Module, shape) -> int:
    """Independent closed-form count with hooks (conv + linear MACs), to check fvcore against."""
    total = 0

    def conv_hook(m, _i, out):
        nonlocal total
        total += out.shape[2] * out.shape[3] * m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, _i, _o):
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [m.register_forward_hook(conv_hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    hooks += [m.register_forward_hook(linear_hook) for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return total


def test_registry_lists_the_zoo():
    assert {"resnet20", "resnet56", "vgg16", "resnet18", "mobilenet_v2", "tiny_cnn"} <= set(list_models())


def test_unknown_model_is_a_user_error():
    with pytest.raises(RcompError, match="unknown model 'resnet21'"):
        create_model("resnet21")


@pytest.mark.parametrize("name", ["resnet20", "vgg16", "tiny_cnn", "mobilenet_v2"])
def test_every_model_starts_with_normalization(name):
    model = create_model(name, num_classes=7, in_channels=1, mean=[0.3], std=[0.2])
    first = next(model.children())
    assert isinstance(first, Normalize)
    assert find_classifier(model).out_features == 7
    x = torch.rand(2, 1, 32, 32)
    assert model.eval()(x).shape == (2, 7)


def test_resnet_closed_forms_option_b():
    # 3x3 convs of the three stages + stem + two 1x1 projection shortcuts + fc (option B)
    def closed_form(n):
        stem = 3 * 16 * 9 * 32 * 32
        s1 = 2 * n * 16 * 16 * 9 * 32 * 32
        s2 = 16 * 32 * 9 * 16 * 16 + (2 * n - 1) * 32 * 32 * 9 * 16 * 16 + 16 * 32 * 16 * 16
        s3 = 32 * 64 * 9 * 8 * 8 + (2 * n - 1) * 64 * 64 * 9 * 8 * 8 + 32 * 64 * 8 * 8
        return stem + s1 + s2 + s3 + 64 * 10

    assert closed_form(3) == 40_813_184  # the 40.81 M of the FIELD-NOTES
    assert conv_linear_macs(create_model("resnet20"), (1, 3, 32, 32)) == closed_form(3)
    assert conv_linear_macs(create_model("resnet56"), (1, 3, 32, 32)) == closed_form(9)


def test_default_inputs_are_declared():
    assert get_model_info("resnet20").default_input == (3, 32, 32)
    assert get_model_info("resnet18").default_input == (3, 224, 224)
