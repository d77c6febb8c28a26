"""torchvision architectures (randomly initialised: rcomp never downloads weights).

They stand for "any torchvision CNN": ImageNet-style inputs, depthwise convolutions
(MobileNetV2) and the standard ResNet-18 with projection shortcuts.
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from rcomp.models.registry import register_model


def _replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None)


@register_model("resnet18", (3, 224, 224), "torchvision ResNet-18 (ImageNet-style input)")
def resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    net = tvm.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = _replace_first_conv(net.conv1, in_channels)
    return net


@register_model("mobilenet_v2", (3, 224, 224), "torchvision MobileNetV2 (depthwise convolutions)")
def mobilenet_v2(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    net = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    net.features[0][0] = _replace_first_conv(net.features[0][0], in_channels)
    return net
