"""A differentiable PyTorch twin of a QDQ-quantized ONNX model, for white-box attacks on INT8.

Why: adversarial examples crafted on the float model transfer imperfectly to its INT8 version
(Double-Win Quant, ICML 2021), and quantization can hide gradients (Bernhard et al., 2019), so
the INT8 check attacks the quantized model itself. The twin is built from the quantized graph
(not from the float PyTorch model plus metadata), so it carries exactly the scales and zero
points onnxruntime runs:

* ``DequantizeLinear`` of a weight initializer becomes a constant float tensor (per-channel
  ``axis`` honoured);
* each ``QuantizeLinear`` of an activation is fake quantization, ``clamp(round(x / s) + z, qmin, qmax)``,
  with a straight-through estimator for the rounding: the gradient passes unchanged where the
  value lies inside the quantization range and is zero where it is clamped. The clamp matters: the
  quantizer removes ReLUs whose range it covers (a zero point at ``qmin`` clamps negatives), so
  this is also the ReLU's gradient;
* the float ops between them (Conv, Gemm, Add, ...) are their torch equivalents.

Only the ops rcomp's exported CNNs use are supported; any other op raises :class:`RcompError`
(the check then reports the twin attack as not evaluated, with the op's name). Needs torch.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from rcomp.errors import RcompError

_QRANGE = {onnx.TensorProto.UINT8: (0, 255), onnx.TensorProto.INT8: (-128, 127),
           onnx.TensorProto.INT32: (-(2**31), 2**31 - 1)}


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """QuantizeLinear then DequantizeLinear, with a straight-through gradient for the rounding
    (round half to even, as ONNX and torch.round both do) and zero gradient where clamped."""
    q = x / scale + zero_point
    q = q + (torch.round(q) - q).detach()
    return (torch.clamp(q, qmin, qmax) - zero_point) * scale


class QDQTwin(torch.nn.Module):
    """Runs the ONNX graph node by node in torch; ``forward(x)`` returns the logits."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        g = model.graph
        self.consts = {i.name: torch.from_numpy(np.array(numpy_helper.to_array(i))) for i in g.initializer}
        self.nodes = list(g.node)
        inits = set(self.consts)
        self.input_name = next(i.name for i in g.input if i.name not in inits)
        self.output_name = g.output[0].name
        self._qtypes = {i.name: i.data_type for i in g.initializer}
        unsupported = sorted({n.op_type for n in self.nodes} - set(_OPS))
        if unsupported:
            raise RcompError(f"the fake-quant twin does not support ONNX op(s) {', '.join(unsupported)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, object] = dict(self.consts)
        env[self.input_name] = x
        for node in self.nodes:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            args = [env[i] if i else None for i in node.input]
            outs = _OPS[node.op_type](self, node, args, attrs)
            for name, value in zip(node.output, outs if isinstance(outs, tuple) else (outs,)):
                env[name] = value
        return env[self.output_name]


class _Quantized:
    """The output of an activation's QuantizeLinear: its fake-quantized float value and parameters."""

    def __init__(self, value, scale, zero_point):
        self.value, self.scale, self.zero_point = value, scale, zero_point


def _float(t) -> torch.Tensor:
    return t.to(torch.float32)


def _per_axis(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-channel scale/zero-point vector shaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if t.dim() == 0 or ndim == 0:
        return t
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return t.reshape(shape)


def _quantize(twin, node, args, attrs):
    x, scale, zp = args[0], _float(args[1]), args[2]
    qtype = twin._qtypes.get(node.input[2], onnx.TensorProto.UINT8) if len(node.input) > 2 else onnx.TensorProto.UINT8
    qmin, qmax = _QRANGE[qtype]
    zpf = _float(zp) if zp is not None else torch.zeros(())
    axis = attrs.get("axis", 1)
    s, z = _per_axis(scale, x.dim(), axis), _per_axis(zpf, x.dim(), axis)
    if s.dim() == 0 and qtype != onnx.TensorProto.INT32:  # torch's fused kernel: same rounding, same gradient mask, ~3x faster
        value = torch.fake_quantize_per_tensor_affine(_float(x), s, z.to(torch.int32), qmin, qmax)
    else:
        value = fake_quantize(_float(x), s, z, qmin, qmax)
    return _Quantized(value, s, z)


def _dequantize(twin, node, args, attrs):
    x = args[0]
    if isinstance(x, _Quantized):  # the pair around an activation: already the dequantized value
        scale, zp = _float(args[1]), _float(args[2]) if args[2] is not None else torch.zeros(())
        if not (torch.equal(x.scale.flatten(), scale.flatten()) and torch.equal(x.zero_point.flatten(), zp.flatten())):
            raise RcompError(f"{node.name or node.output[0]}: DequantizeLinear parameters differ from its QuantizeLinear's")
        return x.value
    scale = _float(args[1])
    zp = _float(args[2]) if len(args) > 2 and args[2] is not None else torch.zeros(())
    axis = attrs.get("axis", 1)
    xf = _float(x)
    return (xf - _per_axis(zp, xf.dim(), axis)) * _per_axis(scale, xf.dim(), axis)


def _conv(twin, node, args, attrs):
    x, w = args[0], args[1]
    b = args[2] if len(args) > 2 else None
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise RcompError("the fake-quant twin supports only explicit Conv padding")
    pads = list(attrs.get("pads", [0] * 2 * (w.dim() - 2)))
    k = len(pads) // 2
    if pads[:k] != pads[k:]:
        x = F.pad(x, [p for i in reversed(range(k)) for p in (pads[i], pads[i + k])])
        pads = [0] * 2 * k
    fn = {3: F.conv1d, 4: F.conv2d}[w.dim()]
    return fn(x, w, b, stride=tuple(attrs.get("strides", [1] * k)), padding=tuple(pads[:k]),
              dilation=tuple(attrs.get("dilations", [1] * k)), groups=attrs.get("group", 1))


def _gemm(twin, node, args, attrs):
    a, b = args[0], args[1]
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        y = y + attrs.get("beta", 1.0) * args[2]
    return y


def _pool(kind):
    def run(twin, node, args, attrs):
        x = args[0]
        k = tuple(attrs["kernel_shape"])
        pads = list(attrs.get("pads", [0] * 2 * len(k)))
        if pads[: len(k)] != pads[len(k):]:
            raise RcompError("the fake-quant twin supports only symmetric pooling pads")
        stride = tuple(attrs.get("strides", [1] * len(k)))
        if kind == "max":
            return F.max_pool2d(x, k, stride, tuple(pads[: len(k)]), ceil_mode=bool(attrs.get("ceil_mode", 0)))
        return F.avg_pool2d(x, k, stride, tuple(pads[: len(k)]), ceil_mode=bool(attrs.get("ceil_mode", 0)),
                            count_include_pad=bool(attrs.get("count_include_pad", 0)))
    return run


def _flatten(twin, node, args, attrs):
    axis = attrs.get("axis", 1)
    x = args[0]
    return x.reshape(int(np.prod(x.shape[:axis])) if axis else 1, -1)


def _reduce_mean(twin, node, args, attrs):
    axes = attrs.get("axes")
    if axes is None and len(args) > 1 and args[1] is not None:
        axes = [int(a) for a in args[1].tolist()]
    return args[0].mean(dim=tuple(axes) if axes else None, keepdim=bool(attrs.get("keepdims", 1)))


def _clip(twin, node, args, attrs):
    lo = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
    hi = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
    return torch.clamp(args[0], None if lo is None else float(lo), None if hi is None else float(hi))


_OPS = {
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda t, n, a, at: a[0] @ a[1],
    "Add": lambda t, n, a, at: a[0] + a[1],
    "Sub": lambda t, n, a, at: a[0] - a[1],
    "Mul": lambda t, n, a, at: a[0] * a[1],
    "Div": lambda t, n, a, at: a[0] / a[1],
    "Relu": lambda t, n, a, at: F.relu(a[0]),
    "Clip": _clip,
    "Sigmoid": lambda t, n, a, at: torch.sigmoid(a[0]),
    "Identity": lambda t, n, a, at: a[0],
    "GlobalAveragePool": lambda t, n, a, at: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "AveragePool": _pool("avg"),
    "MaxPool": _pool("max"),
    "Flatten": _flatten,
    "Reshape": lambda t, n, a, at: a[0].reshape([int(v) if int(v) != 0 else a[0].shape[i] for i, v in enumerate(a[1].tolist())]),
    "ReduceMean": _reduce_mean,
    "Concat": lambda t, n, a, at: torch.cat(a, dim=at["axis"]),
}


def build_twin(model) -> QDQTwin:
    """The twin of an ONNX model (path or ModelProto), in eval mode with no trainable parameters."""
    from rcomp.export.onnx_count import load_model

    twin = QDQTwin(load_model(model)).eval()
    return twin
