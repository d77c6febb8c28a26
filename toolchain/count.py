"""MACs and parameters of a plain model, with fvcore as the source of truth.

Convention (shared with :mod:`rcomp.budget` and the ONNX counter):

* batch 1, one multiply-add = one op: fvcore's "flop" *is* a MAC, so its totals are used as is.
  "MOps" = 1e6 MACs;
* counted: convolutions and linear layers (``aten::_convolution``, ``aten::linear``/``addmm``; the
  matrix products ``mm``/``matmul``/``bmm``/``einsum`` too, should a model use them);
* BatchNorm is treated as folded into the preceding conv: 0 ops. fvcore counts it by default and
  ``set_op_handle("aten::batch_norm", None)`` does *not* remove the built-in handle (the name only
  goes to an ignore set that the lookup of registered handles never consults), so rcomp installs
  handles that return 0 for the norms, pooling, upsampling and activations instead;
* not counted but listed with their occurrence counts in :attr:`CostReport.not_counted`: norms,
  pooling (adaptive and plain), residual ``add``, the input normalization ``sub``/``div``,
  activations, and whatever fvcore reports as unsupported — nothing is skipped silently;
* params = every ``nn.Parameter`` element of the model (BatchNorm affine included).

Weight-masked models keep their dense shapes, so fvcore reports the dense MACs, which is what a
dense runtime executes; :func:`sparse_macs` gives the non-zero-weight figure.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from rcomp.reports import render_table

CONVENTION = (
    "MACs at batch 1 (one multiply-add = one op, fvcore), conv + linear only; BatchNorm folded into "
    "the conv (0); pooling, element-wise ops (residual add, normalization sub/div) and activations "
    "not counted (listed in not_counted); params = every nn.Parameter element, BatchNorm affine included"
)

#: ops fvcore has a built-in handle for that rcomp does not count (norms are folded, pooling and
#: upsampling are cheap element-wise work); plus activations fvcore silently ignores.
_ZERO_OPS = (
    "aten::batch_norm",
    "aten::group_norm",
    "aten::layer_norm",
    "aten::instance_norm",
    "aten::upsample_nearest2d",
    "aten::upsample_bilinear2d",
    "aten::adaptive_avg_pool2d",
    "aten::grid_sampler",
    "aten::relu",
    "aten::relu_",
    "aten::hardtanh",
    "aten::hardtanh_",
    "aten::clamp",
    "aten::clamp_",
    "aten::leaky_relu",
    "aten::leaky_relu_",
    "aten::max_pool2d",
    "aten::avg_pool2d",
    "aten::add",
    "aten::add_",
    "aten::sub",
    "aten::div",
    "aten::mul",
    "aten::sigmoid",
    "aten::silu",
    "aten::silu_",
    "aten::gelu",
    "aten::hardswish",
    "aten::hardswish_",
    "aten::hardsigmoid",
    "aten::softmax",
)


@dataclass(frozen=True)
class LayerCost:
    name: str
    kind: str  # module class name: Conv2d, Linear, BatchNorm2d ...
    macs: int
    params: int


@dataclass
class CostReport:
    macs: int
    params: int
    layers: list[LayerCost] = field(default_factory=list)
    not_counted: dict[str, int] = field(default_factory=dict)
    convention: str = CONVENTION

    @property
    def mops(self) -> float:
        return self.macs / 1e6

    def to_dict(self) -> dict:
        return {
            "macs": self.macs,
            "mops": self.mops,
            "params": self.params,
            "layers": [asdict(layer) for layer in self.layers],
            "not_counted": dict(self.not_counted),
            "convention": self.convention,
        }

    def to_table(self) -> str:
        rows = [[layer.name, layer.kind, layer.macs, layer.params] for layer in self.layers]
        rows.append(["total", "", self.macs, self.params])
        table = render_table(rows, ["layer", "kind", "MACs", "params"])
        lines = [table, f"{self.mops:.3f} MOps, {self.params:,} params"]
        if self.not_counted:
            lines.append("not counted: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.not_counted.items())))
        lines.append(f"convention: {self.convention}")
        return "\n".join(lines)


def example_input(input_shape: tuple[int, ...], device: torch.device | str | None = None) -> torch.Tensor:
    """Pixels in [0, 1] of exactly ``input_shape``, seeded: what a model is counted, traced and exported
    with (rcomp's one example builder). Its own generator leaves torch's global RNG as it was."""
    x = torch.rand(tuple(int(d) for d in input_shape), generator=torch.Generator().manual_seed(0))
    return x.to(device) if device is not None else x


def _one_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A batch-1 example on the model's device: (C, H, W) / (features,) get the batch dimension, (N, ...) becomes 1."""
    shape = tuple(int(s) for s in input_shape)
    shape = (1,) + shape if len(shape) in (1, 3) else (1,) + shape[1:]
    p = next(model.parameters(), None)
    return example_input(shape, p.device if p is not None else None)


def count_model(model: nn.Module, input_shape: tuple[int, ...]) -> CostReport:
    """fvcore count of ``model`` for one input of ``input_shape``.

    ``input_shape`` is (C, H, W) or (features,) without the batch dimension, or (N, C, H, W) /
    (N, features) with it (N is replaced by 1). The model is traced in eval mode (restored afterwards).
    """
    with warnings.catch_warnings():  # fvcore scripts a few helpers at import (TorchScript deprecation)
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

    x = _one_input(model, input_shape)
    zero_counts: Counter = Counter()

    def zero_handle(name: str):
        short = name.split("::", 1)[-1]

        def handle(inputs, outputs):
            zero_counts[short] += 1
            return Counter()

        return handle

    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, (x,))
            analysis.set_op_handle(**{name: zero_handle(name) for name in _ZERO_OPS})
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(analysis.total())
            by_module = analysis.by_module()
            unsupported = analysis.unsupported_ops()
    finally:
        model.train(was_training)

    not_counted: dict[str, int] = dict(zero_counts)
    for op, n in unsupported.items():
        short = op.split("::", 1)[-1]
        not_counted[short] = not_counted.get(short, 0) + int(n)

    layers = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        is_leaf = not any(True for _ in module.children())
        macs = int(by_module.get(name, 0)) if is_leaf else 0
        if is_leaf and (own or macs):
            layers.append(LayerCost(name, type(module).__name__, macs, int(own)))
        elif not is_leaf and own:  # parameters held directly by a container (rare)
            layers.append(LayerCost(name or "(root)", type(module).__name__, 0, int(own)))
    params = int(sum(p.numel() for p in model.parameters()))
    return CostReport(total, params, layers, dict(sorted(not_counted.items())), CONVENTION)


def sparse_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs with zero weights skipped: sum over conv / linear of non-zero weights x output positions.

    This is the figure of a sparse kernel; fvcore and dense runtimes count (and run) the dense one.
    """
    x = _one_input(model, input_shape)
    total = 0
    handles = []

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            pos = math.prod(output.shape[2:])
        else:
            pos = math.prod(output.shape[1:-1]) if output.dim() > 2 else 1
        total += int(torch.count_nonzero(module.weight.detach())) * int(pos)

    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
