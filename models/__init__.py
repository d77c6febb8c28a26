"""Model zoo with a registry by name, in the style of timm's ``create_model``.

Every model takes pixels in [0, 1] and carries its input normalization as its first layer
(:class:`Normalize`), so attacks, the exported ONNX file and the runtime checks all see pixels.
"""

from rcomp.models.registry import (
    ModelInfo,
    Normalize,
    create_model,
    default_input,
    find_classifier,
    get_model_info,
    list_models,
    register_model,
)
from rcomp.models import cifar_resnet as _cifar_resnet  # noqa: F401  (registers resnet20/56)
from rcomp.models import vgg as _vgg  # noqa: F401  (registers vgg16)
from rcomp.models import tiny as _tiny  # noqa: F401  (registers tiny_cnn)
from rcomp.models import tv as _tv  # noqa: F401  (registers resnet18, mobilenet_v2)

__all__ = [
    "ModelInfo",
    "Normalize",
    "create_model",
    "default_input",
    "find_classifier",
    "get_model_info",
    "list_models",
    "register_model",
]
