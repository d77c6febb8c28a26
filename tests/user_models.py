"""A user's own CNN, written outside rcomp's zoo: what ``--model tests/user_models.py:factory`` builds.

It holds the blocks custom models bring and pruning tools trip over: a depthwise-separable block,
a squeeze-and-excitation block (channel gating by a multiply), a concatenation skip (DenseNet-style)
and a residual block with a 1x1 projection shortcut. Also a few broken factories for the error tests.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise then 1x1 pointwise (MobileNet)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.dw = conv_bn(cin, cin, 3, stride, groups=cin)
        self.pw = conv_bn(cin, cout, 1)

    def forward(self, x):
        return self.pw(self.dw(x))


class SqueezeExcite(nn.Module):
    """Channel gates from global context (SENet): ``x * sigmoid(fc2(relu(fc1(pool(x)))))``."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


class ConcatSkip(nn.Module):
    """``cat([x, f(x)])`` along channels (DenseNet): the output has both inputs' channels."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.f = conv_bn(cin, growth)

    def forward(self, x):
        return torch.cat([x, self.f(x)], dim=1)


class ProjectionBlock(nn.Module):
    """Residual block whose shortcut is a 1x1 conv (ResNet option B), here changing width and stride."""

    def __init__(self, cin: int, cout: int, stride: int = 2):
        super().__init__()
        self.a = conv_bn(cin, cout, 3, stride)
        self.b = nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.b(self.a(x)) + self.shortcut(x))


class UserNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = conv_bn(in_channels, width)
        self.dws = DepthwiseSeparable(width, 2 * width, stride=2)
        self.se = SqueezeExcite(2 * width)
        self.cat = ConcatSkip(2 * width, width)
        self.proj = ProjectionBlock(3 * width, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.proj(self.cat(self.se(self.dws(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def factory(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> nn.Module:
    return UserNet(num_classes, in_channels, width)


class SelfNormalizing(UserNet):
    """A module that normalizes its input itself (``--model-normalizes``)."""

    def forward(self, x):
        return super().forward((x - 0.5) / 0.25)


def self_normalizing(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return SelfNormalizing(num_classes, in_channels)


def raises(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    raise ValueError("width must be a multiple of 8\nsecond line of the message")


def not_a_module(num_classes: int = 10, in_channels: int = 3):
    return {"layers": 3}


def wrong_output(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ShuffleNet(nn.Module):
    """Channel shuffle (ShuffleNet) in the middle: the group through the shuffle cannot be pruned."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.a = conv_bn(in_channels, 16)
        self.b = conv_bn(16, 16)
        self.c = conv_bn(16, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(self.c(self.b(x)).mean((2, 3)))


def shuffle(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ShuffleNet(num_classes, in_channels)


class OnlyLayerNorm(nn.Module):
    """Every coupled group passes a GroupNorm: nothing rcomp can prune exactly."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.a(x))).mean((2, 3)))


def only_groupnorm(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return OnlyLayerNorm(num_classes, in_channels)
