"""The workstation half of latency tables: a model's layers file, and the table for a training run.

``emit_layers`` exports the dense model at the profile's input shape and opset and describes its
graph (:func:`rcomp.export.latency_table.describe_onnx`), with every conv named by its torch
module and marked with the sides a channel mask can prune. The board then measures that file with
``rcomp latency-table --layers`` (onnx + onnxruntime only) and the table comes back for training.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.export import latency_table as lt
from rcomp.reports import write_json_atomic


def _conv_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Conv2d]]:
    """The convs in the order the forward pass runs them (the exported graph's order)."""
    names = {m: n for n, m in model.named_modules()}
    order, handles = [], []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, i, o: order.append(mod)))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    seen, out = set(), []
    for m in order:
        if id(m) not in seen:
            seen.add(id(m))
            out.append((names[m], m))
    return out


def _prunable_sides(model: nn.Module, example: torch.Tensor) -> dict[str, set[str]]:
    """Which sides ("out", "in") of every module a channel mask covers (the groups of rcomp.masks)."""
    from rcomp.masks import find_channel_groups

    sides: dict[str, set[str]] = {}
    for group in find_channel_groups(model, example):
        for side, slices in (("out", group.out_slices), ("in", group.in_slices)):
            for sl in slices:
                sides.setdefault(sl.module, set()).add(side)
    return sides


def emit_layers(model_name: str, profile, out_path, *, num_classes: int = 10) -> dict:
    """Write ``out_path`` (the layers file) and the dense ONNX beside it (for the calibration)."""
    from rcomp.export.onnx_export import export_onnx
    from rcomp.models import create_model

    out_path = Path(out_path)
    shape = tuple(int(d) for d in profile.input_shape)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes, in_channels=shape[1]).eval()
    example = torch.rand(shape)
    dense_path = out_path.with_suffix(".onnx")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, shape, dense_path, opset=int(profile.opset),
                metadata={"rcomp.role": "dense reference for a latency table"})
    convs, fixed = lt.describe_onnx(onnx.load(str(dense_path)))
    torch_convs = _conv_order(model, example)
    if len(torch_convs) != len(convs):
        raise RcompError(f"{model_name}: {len(torch_convs)} conv modules but {len(convs)} convs in the exported graph")
    sides = _prunable_sides(model, example)
    layers = []
    for (name, mod), conv in zip(torch_convs, convs):
        if (mod.out_channels, mod.in_channels, list(mod.kernel_size)) != (conv["out"], conv["in"], conv["kernel"]):
            raise RcompError(f"{model_name}: conv {name} does not match the exported graph's conv in the same place")
        conv.pop("onnx_output")
        layers.append({"name": name, **conv, "prune_out": "out" in sides.get(name, set()),
                       "prune_in": "in" in sides.get(name, set())})
    doc = {"format": lt.LAYERS_FORMAT, "model": model_name, "num_classes": num_classes, "input_shape": list(shape),
           "opset": int(profile.opset), "emitted_for_profile": profile.name, "layers": layers, "fixed": fixed,
           "dense_onnx": dense_path.name}
    write_json_atomic(out_path, doc)
    return doc
