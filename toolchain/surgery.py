"""Physical removal of masked channels (torch-pruning) and folding of weight masks.

Channel regularity: the channels whose hard mask is 0 are cut out of every member of their
coupled group with torch-pruning (conv / linear / BatchNorm, producers and consumers), so the
result is a plain, smaller ``nn.Module`` that computes exactly what the masked model computes.

Weight regularity: ``W * Mb`` is folded into the weights and the parametrizations are dropped.
The zeros stay zeros, but the tensors keep their dense shapes: **dense runtimes (onnxruntime,
TensorRT, PyTorch) do not get faster from irregular sparsity** — the file compresses better and a
sparse kernel could skip the zeros, nothing more.

Checkpoints (``format: "rcomp.pruned/1"``) hold tensors and plain Python values only and are
read with ``torch.load(weights_only=True)``: the architecture is rebuilt from the model name and
kwargs, the same removals are replayed (:func:`apply_pruning`) and the state dict must then fit
exactly (``strict=True``).
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from torch import Tensor, nn
from torch.nn.utils import parametrize

from rcomp.errors import CheckpointError, RcompError
from rcomp.guards import check_input_shape
from rcomp.masks import ChannelMasks, MaskedModel, WeightMasks, _ChannelHook, build_dependency_graph
from rcomp.reports import write_bytes_atomic

FORMAT = "rcomp.pruned/1"


@dataclass
class PrunedModel:
    model: nn.Module  # plain nn.Module of standard layers, no hooks / masks
    pruned_channels: list[tuple[str, list[int]]] = field(default_factory=list)  # (group root, removed root channels)
    regularity: str = "channel"
    sparsity: float = 0.0  # fraction of zero weights in conv / linear layers


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of exactly-zero weights over all conv / linear weight tensors."""
    zeros = total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            w = module.weight.detach()
            zeros += int(w.numel() - torch.count_nonzero(w))
            total += w.numel()
    return zeros / total if total else 0.0


def _strip_mask_hooks(model: nn.Module) -> None:
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if isinstance(hook, _ChannelHook):
                del module._forward_hooks[key]


def _prune_fn(module: nn.Module):
    if isinstance(module, nn.Conv2d):
        return tp.prune_conv_out_channels
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    raise RcompError(f"cannot prune the outputs of a {type(module).__name__}")


def apply_pruning(model: nn.Module, pruned_channels, example_input: Tensor) -> nn.Module:
    """Replay ``pruned_channels`` ((root name, removed root channels), in order) on ``model`` in place."""
    pruned_channels = [(str(n), [int(i) for i in idxs]) for n, idxs in pruned_channels]
    if not any(idxs for _, idxs in pruned_channels):
        return model
    was_training = model.training
    model.eval()
    try:
        dg = build_dependency_graph(model, example_input)
        modules = dict(model.named_modules())
        for name, idxs in pruned_channels:
            if not idxs:
                continue
            root = modules.get(name)
            if root is None:
                raise RcompError(f"no module named {name!r} to prune in {type(model).__name__}")
            width = root.out_channels if isinstance(root, nn.Conv2d) else getattr(root, "out_features", 0)
            if len(set(idxs)) != len(idxs) or min(idxs) < 0 or max(idxs) >= width or len(idxs) >= width:
                raise RcompError(f"cannot remove channels {idxs[:8]}... from {name} ({width} channels)")
            group = dg.get_pruning_group(root, _prune_fn(root), idxs=sorted(idxs))
            if not dg.check_pruning_group(group):
                raise RcompError(f"torch-pruning refuses to remove {len(idxs)} channels of {name} (it would empty a layer)")
            group.prune()
    finally:
        model.train(was_training)
    return model


def removed_channels(masks: ChannelMasks) -> list[tuple[str, list[int]]]:
    """(group root, channels whose hard mask is 0) for every group that loses any: what :func:`apply_pruning` replays."""
    if not isinstance(masks, ChannelMasks):
        raise RcompError(f"remove_channels needs channel masks, got {masks.regularity or type(masks).__name__} masks")
    pruned_channels = []
    for group, h in zip(masks.groups, masks.hard()):
        removed = [int(i) for i in torch.nonzero(h.cpu() == 0).flatten().tolist()]
        if removed:
            pruned_channels.append((group.name, removed))
    return pruned_channels


def plain_copy(masked: MaskedModel) -> nn.Module:
    """A deep copy of the network inside ``masked`` without its masks or mask hooks (``masked`` stays usable).

    The memo maps the masks to themselves, so they are not copied; the copied hooks that still
    point at them are dropped, which leaves a plain model of standard layers.
    """
    plain = copy.deepcopy(masked.model, {id(masked.masks): masked.masks})
    _strip_mask_hooks(plain)
    plain.train(masked.training)
    return plain


def remove_channels(masked: MaskedModel, example_input: Tensor) -> PrunedModel:
    """A pruned deep copy of ``masked`` without the channels whose hard mask is 0 (``masked`` stays usable)."""
    pruned_channels = removed_channels(masked.masks)
    plain = plain_copy(masked)
    apply_pruning(plain, pruned_channels, example_input.to(next(plain.parameters()).device))
    return PrunedModel(plain, pruned_channels, "channel", weight_sparsity(plain))


def fold_weight_masks(masked: MaskedModel) -> PrunedModel:
    """A deep copy with ``W * Mb`` folded into the weights and the parametrizations removed.

    Zeros stay exact zeros, shapes stay dense: dense runtimes do not get faster from irregular
    sparsity (see the module docstring).
    """
    masks = masked.masks
    if not isinstance(masks, WeightMasks):
        raise RcompError(f"fold_weight_masks needs weight masks, got {masks.regularity or type(masks).__name__} masks")
    plain = copy.deepcopy(masked.model, {id(masks): masks})
    with torch.no_grad():
        for module in plain.modules():
            if parametrize.is_parametrized(module, "weight"):
                _fold_parametrized_weight(module)
    plain.train(masked.training)
    return PrunedModel(plain, [], "weight", weight_sparsity(plain))


def _fold_parametrized_weight(module: nn.Module) -> None:
    """Replace a (deep-copied) parametrized ``weight`` by a plain parameter holding ``W * Mb``.

    ``parametrize.remove_parametrizations`` cannot be used on a deep copy: the copy shares the
    dynamically created ``Parametrized<Conv2d>`` class with the original, and removal deletes the
    ``weight`` property from that class, which breaks the original model.
    """
    if len(module.parametrizations) != 1 or "weight" not in module.parametrizations:
        raise RcompError(f"unexpected parametrizations on {type(module).__name__}: {list(module.parametrizations)}")
    original = module.parametrizations["weight"].original
    folded = module.weight.detach().clone()
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]
    module.weight = nn.Parameter(folded, requires_grad=original.requires_grad)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------

_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value, where: str) -> None:
    if isinstance(value, _PLAIN) or isinstance(value, Tensor):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise CheckpointError(f"cannot save {where}: key {k!r} is not a str or int")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"cannot save {where}: {type(value).__name__} is not a tensor or plain Python value "
        "(checkpoints are loaded with weights_only=True)"
    )


def _plain_kwargs(kwargs: dict) -> dict:
    out = {}
    for k, v in (kwargs or {}).items():
        if isinstance(v, tuple):
            v = list(v)
        if isinstance(v, list):
            v = [float(x) if isinstance(x, float) else x for x in v]
        out[str(k)] = v
    return out


def save_pruned(
    path,
    pruned: PrunedModel,
    *,
    model_name: str,
    model_kwargs: dict,
    input_shape,
    extra: dict | None = None,
) -> None:
    """Write ``pruned`` atomically as a ``rcomp.pruned/1`` dict of tensors and plain values."""
    state = {k: v.detach().cpu().clone() for k, v in pruned.model.state_dict().items()}
    ckpt = {
        "format": FORMAT,
        "model_name": str(model_name),
        "model_kwargs": _plain_kwargs(model_kwargs),
        "input_shape": [int(s) for s in input_shape],
        "regularity": str(pruned.regularity),
        "sparsity": float(pruned.sparsity),
        "pruned_channels": [[str(n), [int(i) for i in idxs]] for n, idxs in pruned.pruned_channels],
        "state_dict": state,
        "extra": dict(extra or {}),
    }
    _check_plain({k: v for k, v in ckpt.items() if k != "state_dict"}, "checkpoint")
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, buf.getvalue())


def _state_dict_mismatch(model: nn.Module, state: dict) -> str:
    """Counts of missing / unexpected / differently shaped tensors, the facts a user can act on."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shaped = [k for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    parts = [f"{len(v)} {what}, e.g. {v[0]}" for what, v in
             (("missing", missing), ("unexpected", unexpected), ("with another shape", shaped)) if v]
    return "; ".join(parts) or "incompatible tensors"


def _one_line(exc: BaseException, limit: int = 160) -> str:
    """The first sentence of an exception, on one line: torch's messages run to paragraphs."""
    text = re.split(r"(?<=\.)\s", " ".join(str(exc).split()), maxsplit=1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_finite(model: nn.Module, path) -> None:
    """A checkpoint with NaN/inf weights or statistics scores any accuracy at all (NaN logits argmax
    to class 0), so evaluating, counting or exporting it would report figures that mean nothing."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: {name} holds non-finite values (NaN/inf): the training that "
                                  "wrote it diverged or the file was altered; use an earlier checkpoint")


def load_pruned(path, map_location="cpu") -> tuple[nn.Module, dict]:
    """Rebuild a pruned model saved by :func:`save_pruned`; returns (model in eval mode, meta)."""
    from rcomp.models import create_model

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {_one_line(exc)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        tag = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not a pruned-model checkpoint (format {tag!r}, expected {FORMAT!r})")
    missing = [k for k in ("model_name", "model_kwargs", "input_shape", "pruned_channels", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    name, kwargs = ckpt["model_name"], dict(ckpt["model_kwargs"] or {})
    input_shape = tuple(int(s) for s in ckpt["input_shape"])
    check_input_shape(input_shape, str(path))  # before the example input below is allocated
    what = f"checkpoint is for {name} ({len(ckpt['pruned_channels'])} pruned groups)"
    try:
        model = create_model(name, **kwargs)
        example = torch.rand((1,) + input_shape if len(input_shape) == 3 else (1,) + input_shape[1:])
        apply_pruning(model, ckpt["pruned_channels"], example)
    except (RcompError, RuntimeError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: {what} but the architecture cannot be rebuilt: {_one_line(exc)}") from None
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (RuntimeError, TypeError, KeyError):
        raise CheckpointError(f"{path}: {what} but its weights do not match the rebuilt architecture "
                              f"({_state_dict_mismatch(model, ckpt['state_dict'])})") from None
    _require_finite(model, path)
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    model.eval()
    meta = {
        "format": ckpt["format"],
        "model_name": name,
        "model_kwargs": kwargs,
        "input_shape": input_shape,
        "regularity": ckpt.get("regularity", "channel"),
        "sparsity": float(ckpt.get("sparsity", 0.0)),
        "pruned_channels": [(str(n), [int(i) for i in idxs]) for n, idxs in ckpt["pruned_channels"]],
        "extra": ckpt.get("extra", {}),
    }
    return model, meta


@dataclass(frozen=True)
class Architecture:
    """A pruned checkpoint's shape without its weights: the zoo model and the channels removed from it."""

    model_name: str
    input_shape: tuple[int, ...]
    pruned_channels: list[tuple[str, list[int]]]
    source: str


def read_architecture(path) -> Architecture:
    """The widths a pruned checkpoint chose, to train them again from fresh weights.

    Training the final architecture of a pruning method from scratch (Liu et al., "Rethinking the
    value of network pruning", 2019) tells what the method's process adds over its choice of widths.
    A weight-masked checkpoint keeps the dense shapes, so it has no architecture of its own to give.
    """
    _, meta = load_pruned(path)
    if not any(idxs for _, idxs in meta["pruned_channels"]):
        raise CheckpointError(f"{path}: no channels were removed ({meta['regularity']} regularity), so its "
                              f"architecture is the dense {meta['model_name']}: train --model {meta['model_name']} instead")
    return Architecture(meta["model_name"], tuple(meta["input_shape"]), meta["pruned_channels"], str(path))

