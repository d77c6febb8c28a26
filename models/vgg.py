"""VGG-16 with BatchNorm for 32x32 inputs, the CIFAR variant the pruning literature uses.

13 conv layers of the original configuration and a single linear classifier on the 512
features (about 14.7 M parameters and 313 M MACs at 32x32, the "15 M parameters" of the poster).
An adaptive average pool before the classifier is a no-op at 32x32 and lets smaller inputs work.
"""

from __future__ import annotations

from torch import nn

from rcomp.models.registry import register_model

_CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class CifarVGG(nn.Module):
    def __init__(self, cfg, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.flatten(self.pool(self.features(x))))


@register_model("vgg16", (3, 32, 32), "CIFAR VGG-16 with BatchNorm, 14.7 M params")
def vgg16(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarVGG(_CFG16, num_classes, in_channels)
