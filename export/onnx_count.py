"""Cost of an ONNX graph (MACs, parameters) read from the file itself, without torch.

Why a second counter next to ``rcomp.count`` (fvcore on the PyTorch model): the gate must judge
the artefact that ships, on a board with no torch. The convention is docs/design.md's: one op = one
multiply-add, batch 1, Conv/ConvTranspose/Gemm/MatMul only; every other node type is listed in
``not_counted`` with its occurrence count so nothing is skipped silently. On the zoo the MAC
total equals fvcore's conv + linear count exactly (the tests check it).

``params`` here is the number of stored weight elements (initializers and ``Constant`` tensors).
It is *not* the PyTorch parameter count: after onnxsim, BatchNorm is folded into the conv (its
gamma/beta disappear, a conv bias appears), identical tensors may be stored once (onnxsim dedups,
e.g. all-zero folded biases or equal mean/std vectors), and the normalization constants count.
The PyTorch count travels in the metadata as ``rcomp.params``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from math import prod

import onnx

from rcomp.errors import RcompError

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class OnnxCost:
    """MACs per batch-1 inference and stored weight elements of one ONNX graph."""

    macs: int
    params: int
    per_node: list[tuple[str, str, int, int]] = field(default_factory=list)  # name, op, macs, params
    not_counted: dict[str, int] = field(default_factory=dict)

    @property
    def mops(self) -> float:
        return self.macs / 1e6


def load_model(path_or_model, *, load_weights: bool = True) -> onnx.ModelProto:
    """Load and sanity-check an ONNX file; any failure becomes a one-line :class:`RcompError`."""
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    path = os.fspath(path_or_model)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise RcompError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=load_weights)
    except Exception:  # protobuf's DecodeError and friends; the type varies across versions
        raise RcompError(f"{name}: not an ONNX model (protobuf parse failed)") from None
    # Arbitrary bytes sometimes parse as a protobuf with only unknown fields: require a graph.
    if not model.HasField("graph") or not model.graph.node or not model.opset_import:
        raise RcompError(f"{name}: not an ONNX model (no graph or opset in the file)")
    return model


def read_metadata(path_or_model) -> dict[str, str]:
    """The file's ``metadata_props`` as a plain dict (weights are not loaded)."""
    model = load_model(path_or_model, load_weights=False)
    return {p.key: p.value for p in model.metadata_props}


def input_spec(path_or_model) -> tuple[str, tuple]:
    """``(name, shape)`` of the single graph input; symbolic dims appear as their name (a str)."""
    model = load_model(path_or_model, load_weights=False)
    inits = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        names = ", ".join(i.name for i in inputs)
        raise RcompError(f"ONNX model must have exactly one input, found {len(inputs)}: {names}")
    return inputs[0].name, _shape_of(inputs[0])


def output_classes(path_or_model) -> int | None:
    """Width of the first graph output [batch, classes] when the file states it, else ``None``."""
    model = load_model(path_or_model, load_weights=False)
    if not model.graph.output:
        return None
    shape = _shape_of(model.graph.output[0])
    if not shape or len(shape) != 2 or not isinstance(shape[-1], int) or shape[-1] < 1:
        return None
    return shape[-1]


def _shape_of(value_info) -> tuple | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Shape of every tensor after ONNX shape inference (initializers included)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:
        raise RcompError(f"ONNX shape inference failed: {str(exc).splitlines()[0]}") from None
    g = inferred.graph
    shapes = {i.name: tuple(i.dims) for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shapes.setdefault(vi.name, _shape_of(vi))
    for node in g.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            shapes[node.output[0]] = tuple(node.attribute[0].t.dims)
    return shapes


def _node_macs(node, shapes: dict[str, tuple]) -> int:
    """MACs of one counted node for the whole graph batch (divided by the batch later)."""
    need = [node.output[0]] if node.op_type in ("Conv", "Gemm", "MatMul") else []
    need += list(node.input[:2])
    missing = [n for n in need if not _static(shapes.get(n))]
    if missing:
        raise RcompError(f"cannot count {node.op_type} node {node.name!r}: unknown shape of {missing[0]!r}")
    a, b = shapes[node.input[0]], shapes[node.input[1]]
    if node.op_type == "Conv":  # weight [Cout, Cin/group, k...]: each output element is one dot
        out = shapes[node.output[0]]
        return out[0] * prod(out[2:]) * prod(b)
    if node.op_type == "ConvTranspose":  # every input element is scattered through the kernel
        return a[0] * prod(a[2:]) * prod(b)
    if node.op_type == "Gemm":
        attrs = {at.name: onnx.helper.get_attribute_value(at) for at in node.attribute}
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * k * n
    out = shapes[node.output[0]]  # MatMul, numpy broadcasting: out [..., M, N], K from A
    k = a[-1] if len(a) > 1 else a[0]
    return prod(out) * k


def _graph_batch(model: onnx.ModelProto) -> int:
    _, shape = input_spec(model)
    if not shape or not isinstance(shape[0], int) or shape[0] < 1:
        raise RcompError(f"cannot count an ONNX graph with a non-static batch dimension: input shape {shape}")
    return shape[0]


def _node_params(node, inits: dict, seen: set) -> int:
    """Weight elements first used by this node (so per-node params add up to the total)."""
    if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
        return prod(node.attribute[0].t.dims)
    total = 0
    for name in node.input:
        if name in inits and name not in seen:
            seen.add(name)
            total += inits[name]
    return total


def count_onnx(path_or_model) -> OnnxCost:
    """Count MACs (per batch-1 inference) and stored parameters of an ONNX graph.

    MACs of a batch-N graph are divided by N, so a file exported at batch 8 costs the same as
    at batch 1; a graph whose counted MACs are not divisible by N is rejected rather than rounded.
    """
    model = load_model(path_or_model)
    shapes = _shapes(model)
    batch = _graph_batch(model)
    inits = {i.name: prod(i.dims) for i in model.graph.initializer}
    cost, seen = OnnxCost(macs=0, params=0), set()
    for node in model.graph.node:
        params = _node_params(node, inits, seen)
        macs = 0
        if node.op_type in COUNTED_OPS:
            macs, rest = divmod(_node_macs(node, shapes), batch)
            if rest:
                raise RcompError(f"{node.op_type} node {node.name!r}: MACs not divisible by batch {batch}")
        else:
            cost.not_counted[node.op_type] = cost.not_counted.get(node.op_type, 0) + 1
        cost.per_node.append((node.name or node.output[0], node.op_type, macs, params))
        cost.macs += macs
        cost.params += params
    cost.params += sum(n for name, n in inits.items() if name not in seen)  # unused initializers
    return cost
