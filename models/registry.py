"""Name → constructor registry and the normalization layer every model starts with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from rcomp.errors import RcompError


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a layer, so the model's input stays in [0, 1].

    Keeping normalization inside the model means an eps of 8/255 is measured in pixel units
    everywhere: in the attacks, in the exported ONNX graph and on the target.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std must have the same length")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"channels={self.mean.shape[1]}"


class Classifier(nn.Module):
    """``net(normalize(x))``: the wrapper that gives every zoo model the same first layer."""

    def __init__(self, normalize: Normalize, net: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the toolchain needs to know about a registered architecture."""

    name: str
    default_input: tuple[int, int, int]  # (C, H, W) the architecture was designed for
    description: str
    builder: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, default_input: tuple[int, int, int], description: str):
    """Decorator: register ``builder(num_classes, in_channels) -> nn.Module`` under ``name``."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelInfo(name, default_input, description, builder)
        return builder

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RcompError(
            f"unknown model {name!r}; available: {', '.join(list_models())}"
        ) from None


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    factory_kwargs: dict | None = None,
    normalizes: bool = False,
) -> nn.Module:
    """Build a model by reference with its normalization layer in front.

    ``name`` is a zoo name, ``torchvision:NAME``, ``file.py:factory`` or ``package.module:factory``
    (:mod:`rcomp.models.reference`); ``factory_kwargs`` go to a non-zoo factory, and
    ``normalizes=True`` leaves out the ``Normalize`` layer (the user's module normalizes itself).
    ``mean``/``std`` default to 0.5 per channel; the data module passes the dataset's own.
    """
    from rcomp.models.reference import build_foreign, is_zoo_name

    zoo = is_zoo_name(name)
    if zoo and (factory_kwargs or normalizes):
        raise RcompError(f"--model-kwargs / --model-normalizes apply to torchvision:NAME and file.py:factory models, "
                         f"not to the zoo's {name}")
    info = get_model_info(name) if zoo else None
    if num_classes < 2:
        raise RcompError(f"num_classes must be at least 2, got {num_classes}")
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise RcompError(f"mean/std need {in_channels} values, got {len(mean)}/{len(std)}")
    if zoo:
        net = info.builder(num_classes=num_classes, in_channels=in_channels)
    else:
        net = build_foreign(name, num_classes, in_channels, factory_kwargs)
        if normalizes:
            return net
    return Classifier(Normalize(mean, std), net)


def default_input(name: str) -> tuple[int, int, int]:
    """(C, H, W) to train ``name`` at when no profile says: the zoo's design size, else 3x32x32."""
    from rcomp.models.reference import DEFAULT_FOREIGN_INPUT, is_zoo_name

    return get_model_info(name).default_input if is_zoo_name(name) else DEFAULT_FOREIGN_INPUT


def find_classifier(model: nn.Module) -> nn.Module:
    """The output layer: its outputs are the classes, never pruned.

    The last ``nn.Linear``, or for a fully convolutional classifier (SqueezeNet's 1x1 conv head)
    the last ``nn.Conv2d``. rcomp.masks also refuses every group that reaches the model's output,
    so a head found wrongly is left unpruned, not cut.
    """
    last = last_conv = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
        elif isinstance(module, nn.Conv2d):
            last_conv = module
    if last is None and last_conv is None:
        raise RcompError("model has no nn.Linear or nn.Conv2d output layer")
    return last if last is not None else last_conv
