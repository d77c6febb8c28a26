"""A small CNN with one residual block: fast enough for tests, rich enough to have coupled channels."""

from __future__ import annotations

from torch import nn

from rcomp.models.registry import register_model


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.down = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True)
        )
        self.conv_a = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(2 * width)
        self.relu_a = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv2d(2 * width, 2 * width, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(2 * width)
        self.relu_b = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.down(self.stem(x))
        out = self.relu_a(self.bn_a(self.conv_a(x)))
        out = self.relu_b(self.bn_b(self.conv_b(out)) + x)
        return self.fc(self.flatten(self.pool(out)))


@register_model("tiny_cnn", (3, 32, 32), "3-conv CNN with one residual block, for tests and demos")
def tiny_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TinyCNN(num_classes, in_channels)
