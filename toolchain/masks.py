"""Trainable pruning masks with a straight-through estimator (the poster's in-train pruning).

A real-valued mask ``M`` per prunable unit is binarized as ``Mb = round(shift(scale(tanh(M))))``
with scale = shift = 0.5, so ``Mb = 1`` exactly when ``M > 0``. ``round`` has zero gradient almost
everywhere; the straight-through estimator passes the gradient of the smooth part
``0.5 * tanh(M) + 0.5`` instead, so the task loss (and the budget term) keep updating ``M``.
The masks are ordinary parameters: they sit in the optimizer next to the weights and share their
weight decay (unless ``mask_weight_decay`` sets theirs), which pulls every ``M`` towards the
decision boundary 0 so that masks keep moving (and can come back) during the whole run instead of
freezing early.

Two regularities:

* ``channel`` — one mask per coupled channel group. Groups come from torch-pruning's
  ``DependencyGraph``: channels tied by a residual add, a concat or a depthwise convolution share one
  mask value. The mask multiplies the output of every producer of the group's channels *after* its
  BatchNorm (before the non-linearity), so a channel whose mask is 0 is exactly zero everywhere
  downstream — residual adds included — and removing it physically changes nothing.
* ``weight`` — one mask per weight element of every conv / linear layer (irregular sparsity),
  applied with ``torch.nn.utils.parametrize`` so the layer sees ``W * Mb``.

The classifier's outputs and the first conv's inputs are never prunable, and every channel group
keeps at least its highest-scoring channel so that no layer is emptied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import parametrize

from rcomp.errors import RcompError
from rcomp.models import find_classifier

#: Initial value of every mask: comfortably on (Mb = 1), yet close enough to 0 to move.
MASK_INIT = 1.0
#: Masks are clipped to [-MASK_BOUND, MASK_BOUND] after every optimizer step.
MASK_BOUND = 1.0
#: Lowest initial mask of :meth:`MaskSet.init_from_scores`: the least important unit starts just on.
SCORE_INIT_LOW = 0.05

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_LAYER_TYPES = (nn.Conv2d, nn.Linear)


def ste_binarize(m: torch.Tensor) -> torch.Tensor:
    """``round(0.5 * tanh(M) + 0.5)`` forward, the gradient of ``0.5 * tanh(M) + 0.5`` backward."""
    soft = 0.5 * torch.tanh(m) + 0.5
    return soft + (torch.round(soft) - soft).detach()


def ste_slope(m: torch.Tensor) -> torch.Tensor:
    """d Mb / d M as :func:`ste_binarize` passes it back, ``0.5 * (1 - tanh(M)^2)``: what turns a
    gradient with respect to the 0/1 value the forward used into one with respect to ``M`` (and
    dividing by it, back)."""
    return 0.5 * (1 - torch.tanh(m.detach()) ** 2)


@dataclass(frozen=True)
class LayerSlice:
    """Channels of one module that belong to a group: local index ``idxs[j]`` is root channel ``root_idxs[j]``."""

    module: str
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]


@dataclass
class ChannelGroup:
    """A set of coupled channels with one mask value per channel of its root layer."""

    name: str  # qualified name of the root conv / linear
    size: int
    out_slices: list[LayerSlice] = field(default_factory=list)  # conv/linear/norm out-channels
    in_slices: list[LayerSlice] = field(default_factory=list)  # conv/linear in-channels
    apply_at: list[LayerSlice] = field(default_factory=list)  # outputs the mask multiplies

    @property
    def is_stream(self) -> bool:
        """Several layers produce these channels and are added together: a residual stream, whose
        width every block of its stage reads and writes (one producer: a block's inner channels)."""
        return len(self.apply_at) > 1


class MaskSet(nn.Module):
    """The trainable masks of a model: one parameter tensor per group (channel) or layer (weight)."""

    regularity: str = ""

    def __init__(self, names: list[str], sizes: list[torch.Size], init: float = MASK_INIT):
        super().__init__()
        self.names = list(names)
        self.params = nn.ParameterList(nn.Parameter(torch.full(s, float(init))) for s in sizes)
        self._handles: list = []
        self._constant: dict[int, tuple] = {}  # i -> (M and _binary_inputs it was computed from, the mask)

    def __len__(self) -> int:
        return len(self.params)

    def binary(self, i: int) -> torch.Tensor:
        """Mask ``i`` as the forward pass uses it (values exactly 0/1).

        While ``M`` learns (it requires grad, grad mode on), the STE binarization with its gradient
        to ``M``. Otherwise (before ``mask_start``, after the freeze, under ``no_grad``) the same
        0/1 values as a constant, binarized again only when ``M`` has changed, which lets the hooks
        reuse their channel scale and pass an all-on mask's outputs through untouched
        (``bench/mask_overhead.py``)."""
        p = self.params[i]
        if p.requires_grad and torch.is_grad_enabled():
            return self._binary(i)
        cached, inputs = self._constant.get(i), self._binary_inputs(i)
        if (cached is None or cached[0].device != p.device or not torch.equal(cached[0], p.detach())
                or cached[1] != inputs):
            with torch.no_grad():
                cached = (p.detach().clone(), inputs, self._binary(i))
            self._constant[i] = cached
        return cached[2]

    def _binary(self, i: int) -> torch.Tensor:
        """STE-binarized mask ``i`` (values exactly 0/1, gradient to ``M``)."""
        return ste_binarize(self.params[i])

    def _binary_inputs(self, i: int):
        """What mask ``i``'s binarization reads besides ``M`` (a reused mask is stale once it changes)."""
        return None

    def hard(self) -> list[torch.Tensor]:
        """Detached 0/1 masks, as the forward pass uses them."""
        with torch.no_grad():
            return [self.binary(i).detach().clone() for i in range(len(self))]

    def snapshot(self) -> torch.Tensor:
        """All hard masks flattened into one bool vector (to measure how many flipped)."""
        return torch.cat([h.flatten() for h in self.hard()]).bool()

    @property
    def num_units(self) -> int:
        return sum(p.numel() for p in self.params)

    def density(self) -> float:
        return float(self.snapshot().float().mean())

    def scores(self) -> list[torch.Tensor]:
        """The real-valued masks: the learned importance of every unit (higher = keep)."""
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def clip_(self, bound: float = MASK_BOUND) -> None:
        """Keep ``M`` in [-bound, bound] after each step, as BinaryConnect clips its latent weights.

        The STE treats ``round`` as the identity, so nothing stops an off mask from drifting far
        below 0 (momentum carries it) and never coming back; clipping keeps every mask within one
        bound of the decision boundary, which is what lets units return during training.
        """
        for p in self.params:
            p.clamp_(-bound, bound)

    @torch.no_grad()
    def init_from_scores(self, scores: list[torch.Tensor], low: float = SCORE_INIT_LOW) -> None:
        """Set every ``M`` from an importance score, mapped linearly onto [low, MASK_INIT] over all units.

        Every mask stays on (``M > 0``), so the forward pass does not change; what changes is how far
        each unit is from the decision boundary, so the budget switches the least important units
        off first instead of masks that all start at ``MASK_INIT`` and cross zero in lockstep.
        """
        if len(scores) != len(self.params) or any(s.numel() != p.numel() for s, p in zip(scores, self.params)):
            raise RcompError("one score per mask unit is needed to initialise the masks")
        flat = torch.cat([s.detach().float().reshape(-1).cpu() for s in scores])
        lo, hi = float(flat.min()), float(flat.max())
        span = hi - lo if hi > lo else 1.0
        for p, s in zip(self.params, scores):
            value = low + (MASK_INIT - low) * (s.detach().float().cpu() - lo) / span
            p.copy_(value.reshape(p.shape).to(p.device))

    def on_states(self) -> list[torch.Tensor]:
        """Which units are on (``M > 0``), before the channel groups' keep-one rule."""
        return [(p.detach() > 0) for p in self.params]

    @torch.no_grad()
    def limit_switch_off(self, before: list[torch.Tensor], max_off: int) -> int:
        """Let at most ``max_off`` units switch off in one step (the most decisive ones); returns how many were held.

        Units with the same cost receive the same budget gradient, so masks that start equal move in
        lockstep: measured on ResNet20, 15 of the 16 channels of a residual stream crossed zero in
        the same few steps and accuracy fell to chance. Limiting the switch-offs per step makes the
        architecture change gradually, so the task loss can react to each removal (its gradient on
        the remaining masks grows) before the next one; switching units back on is never limited.
        """
        candidates = []
        for i, (p, was_on) in enumerate(zip(self.params, before)):
            turned_off = (was_on & (p <= 0)).flatten().nonzero().flatten()
            candidates += zip(p.view(-1)[turned_off].tolist(), [i] * len(turned_off), turned_off.tolist())
        if len(candidates) <= max_off:
            return 0
        candidates.sort()
        for _, i, j in candidates[max_off:]:
            self.params[i].view(-1)[j] = 1e-3  # stays on, right at the boundary
        return len(candidates) - max_off

    def freeze(self, frozen: bool = True) -> None:
        for p in self.params:
            p.requires_grad_(not frozen)

    @torch.no_grad()
    def set_hard(self, i: int, keep: torch.Tensor, magnitude: float = MASK_INIT) -> None:
        """Force mask ``i`` to ``keep`` (bool), keeping |M| where the state does not change."""
        p = self.params[i]
        mag = p.abs().clamp_min(1e-3).clamp_max(magnitude)
        p.copy_(torch.where(keep.to(p.device), mag, -mag))

    def remove(self) -> None:
        """Detach every hook / parametrization from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


class ChannelMasks(MaskSet):
    """One mask per coupled channel group, found with torch-pruning's DependencyGraph."""

    regularity = "channel"

    def __init__(self, groups: list[ChannelGroup], init: float = MASK_INIT):
        super().__init__([g.name for g in groups], [torch.Size([g.size]) for g in groups], init)
        self.groups = groups
        #: (group root, reason) of the coupled groups left unpruned as unsafe (:func:`classify_channel_groups`).
        self.skipped: list[tuple[str, str]] = []

    #: Fraction of every group's channels that always stays on (torch-pruning's ``1 - max_pruning_ratio``).
    min_keep_fraction: float = 0.0
    #: The floor of the residual-stream groups (:attr:`ChannelGroup.is_stream`) instead, when set.
    min_keep_stream_fraction: float | None = None

    def min_channels(self, i: int) -> int:
        """How many channels group ``i`` keeps at least: never fewer than one, so no layer is emptied."""
        fraction = self.min_keep_fraction
        if self.min_keep_stream_fraction is not None and self.groups[i].is_stream:
            fraction = self.min_keep_stream_fraction
        return max(1, math.ceil(fraction * self.groups[i].size))

    #: Widths the final projection may give a group: multiples of this (or the whole group).
    #: onnxruntime's CPU convolutions run blocked kernels on channel counts in multiples of 8 and a
    #: slower path on the rest (``bench/latency.py``), so a profile can ask for them.
    channel_multiple: int = 1

    def allowed_widths(self, i: int) -> list[int]:
        """The widths group ``i`` may be projected to, ascending: multiples of
        :attr:`channel_multiple` from :meth:`min_channels` up, and the full group."""
        size, step, least = self.groups[i].size, self.channel_multiple, self.min_channels(i)
        widths = [w for w in range(step, size + 1, step) if w >= least]
        return widths if widths and widths[-1] == size else widths + [size]

    def _binary_inputs(self, i: int) -> int:
        return self.min_channels(i)

    def _binary(self, i: int) -> torch.Tensor:
        """Group ``i``'s 0/1 mask; when fewer than :meth:`min_channels` are on, the best-scoring ones stay on."""
        mb = super()._binary(i)
        k = self.min_channels(i)
        if int(mb.detach().sum()) < k:
            top = self.params[i].detach().topk(k).indices
            keep = torch.zeros_like(mb)
            keep[top] = 1.0
            mb = mb + (torch.maximum(mb.detach(), keep) - mb.detach())
        return mb

    @classmethod
    def attach(cls, model: nn.Module, example_input: torch.Tensor, init: float = MASK_INIT) -> "ChannelMasks":
        groups, skipped = classify_channel_groups(model, example_input)
        if not groups:
            why = f": {len(skipped)} left alone as unsafe, e.g. {skipped[0][1]}" if skipped else ""
            raise RcompError(f"model {type(model).__name__} has no channel group rcomp can prune{why}")
        masks = cls(groups, init)
        masks.skipped = skipped
        modules = dict(model.named_modules())
        for gi, group in enumerate(groups):
            for sl in group.apply_at:
                masks._handles.append(modules[sl.module].register_forward_hook(_ChannelHook(masks, gi, sl)))
        return masks


class _ChannelHook:
    """Forward hook: multiply the channels of one producer by its group's binary mask."""

    def __init__(self, masks: ChannelMasks, group_index: int, sl: LayerSlice):
        self.masks = masks
        self.group_index = group_index
        self.idxs = torch.tensor(sl.idxs, dtype=torch.long)
        self.root_idxs = torch.tensor(sl.root_idxs, dtype=torch.long)
        self._on_device: dict = {}
        self._last: tuple | None = None  # (constant mask, dtype, the scale built from it or None, device)

    def _indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The index tensors on ``device``, copied once: a copy per forward would stall a GPU every call."""
        if device not in self._on_device:
            self._on_device[device] = (self.idxs.to(device), self.root_idxs.to(device))
        return self._on_device[device]

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        scale = self._scale(output, _channel_dim(module, output))
        if scale is None:  # a constant mask with every channel on: the product would be ``output`` itself
            return output
        if _channel_dim(module, output) != 1:  # a Linear over tokens / channels-last: features are the last dim
            return output * scale
        return output * scale.view(1, -1, *([1] * (output.dim() - 2)))

    def _scale(self, output: torch.Tensor, dim: int = 1) -> torch.Tensor | None:
        """The producer's per-channel factor, None for a constant all-on mask; built again only when
        its group's mask is a new tensor (always while the mask learns, see :meth:`MaskSet.binary`)."""
        mb = self.masks.binary(self.group_index)
        last = self._last
        if last is not None and last[0] is mb and last[1] == output.dtype and last[3] == output.device:
            return last[2]
        idxs, root_idxs = self._indices(output.device)
        scale = torch.ones(output.shape[dim], device=output.device, dtype=output.dtype)
        scale = scale.index_put((idxs,), mb[root_idxs.to(mb.device)].to(output.dtype))
        if mb.requires_grad:
            self._last = None
            return scale
        scale = None if bool(scale.eq(1).all()) else scale
        self._last = (mb, output.dtype, scale, output.device)
        return scale


def _channel_dim(module: nn.Module, output: torch.Tensor) -> int:
    """Where a producer's channels are: dim 1 (NCHW, NC), the last dim for a Linear over more dims."""
    return -1 if isinstance(module, nn.Linear) and output.dim() > 2 else 1


class WeightMasks(MaskSet):
    """One mask per weight element of every conv / linear layer (irregular sparsity)."""

    regularity = "weight"

    @classmethod
    def attach(cls, model: nn.Module, init: float = MASK_INIT) -> "WeightMasks":
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYER_TYPES)]
        if not layers:
            raise RcompError("model has no conv / linear layers to mask")
        masks = cls([n for n, _ in layers], [m.weight.shape for _, m in layers], init)
        for i, (_, module) in enumerate(layers):
            parametrize.register_parametrization(module, "weight", _WeightMask(masks, i))
        masks._model_layers = [m for _, m in layers]
        return masks

    @torch.no_grad()
    def weight_magnitudes(self) -> list[torch.Tensor]:
        """``|W|`` of every masked layer over its mean, so layers compare like normalised channel groups."""
        out = []
        for module in self._model_layers:
            w = module.parametrizations.weight.original.abs()
            out.append(w / w.mean().clamp_min(1e-12))
        return out

    def remove(self) -> None:
        """Fold ``W * Mb`` into the weights and drop the parametrizations."""
        for module in getattr(self, "_model_layers", []):
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        self._model_layers = []


class _WeightMask(nn.Module):
    """Parametrization ``W -> W * Mb``; refers to the MaskSet without registering it twice."""

    def __init__(self, masks: WeightMasks, index: int):
        super().__init__()
        object.__setattr__(self, "_masks", masks)
        self.index = index

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self._masks.binary(self.index).to(weight.dtype)


class MaskedModel(nn.Module):
    """A model together with its masks, so one ``state_dict`` / one DDP wrapper holds both."""

    def __init__(self, model: nn.Module, masks: MaskSet):
        super().__init__()
        self.model = model
        self.masks = masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        mask_ids = {id(p) for p in self.masks.parameters()}
        return (p for p in self.parameters() if id(p) not in mask_ids)


def attach_masks(model: nn.Module, regularity: str, example_input: torch.Tensor, init: float = MASK_INIT) -> MaskedModel:
    """Wrap ``model`` with trainable masks of the given regularity (``channel`` or ``weight``)."""
    if regularity == "channel":
        return MaskedModel(model, ChannelMasks.attach(model, example_input, init))
    if regularity == "weight":
        return MaskedModel(model, WeightMasks.attach(model, init))
    raise RcompError(f"unknown regularity {regularity!r}; expected 'channel' or 'weight'")


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """torch-pruning's graph of the model, traced in eval mode so BatchNorm statistics stay untouched."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    except Exception as exc:  # noqa: BLE001 - torch-pruning's tracer fails on code it cannot follow
        text = " ".join(str(exc).split())[:160]
        raise RcompError(f"torch-pruning cannot trace {type(model).__name__} ({type(exc).__name__}: {text})") from None
    finally:
        model.train(was_training)


def find_channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """Coupled channel groups rooted at conv / linear layers; the classifier's outputs are excluded,
    and so are the groups :func:`classify_channel_groups` finds unsafe."""
    return classify_channel_groups(model, example_input)[0]


def classify_channel_groups(model: nn.Module, example_input: torch.Tensor
                            ) -> tuple[list[ChannelGroup], list[tuple[str, str]]]:
    """(groups rcomp can mask and remove exactly, [(root, why not)] for the groups it leaves alone).

    A mask zeroes a channel and surgery removes it; both must compute the same function, and the cost
    model must count it. That fails for channels that pass through a LayerNorm / GroupNorm (removing a
    channel changes the statistics of the rest), attention, a non-depthwise grouped convolution,
    a transpose or permute of the channel axis (channel shuffle) or an op torch-pruning only
    approximates; such groups keep all their channels and are reported, the others are pruned.
    """
    dg = build_dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    classifier = find_classifier(model)
    groups, skipped = [], []
    for group in dg.get_all_groups(ignored_layers=[classifier], root_module_types=list(_LAYER_TYPES)):
        root = group[0].dep.target.module
        if names.get(root) is None:
            continue
        reason = _unsafe_reason(group, names)
        if reason is not None:
            skipped.append((names[root], reason))
            continue
        channel_group = _describe_group(group, names, dg)
        if channel_group is not None:
            groups.append(channel_group)
    return groups, skipped


#: torch-pruning's pseudo-modules whose channel index mapping it follows exactly.
_SAFE_OPS = ("_ElementWiseOp", "_ConcatOp", "_SplitOp", "_ReshapeOp")
_SAFE_MODULES = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _unsafe_reason(group, names: dict) -> str | None:
    """Why masking and removing this group's channels would not be exact, or None when it is."""
    for item in group.items:
        module = item.dep.target.module
        name = names.get(module)
        if name is None:
            kind = type(module).__name__
            grad_fn = str(getattr(module, "_grad_fn", "")).lower()
            if kind == "_OutputOp":
                return "its channels are the model's output (the classes)"
            if kind not in _SAFE_OPS:
                return f"{kind.strip('_')} on the channels (torch-pruning cannot map them exactly)"
            if "transpose" in grad_fn or "permute" in grad_fn:
                return f"a {grad_fn.split('backward')[0]} of the channel axis (e.g. channel shuffle or channels-last)"
            continue
        if isinstance(module, nn.Conv2d) and module.groups > 1 and not (
                module.groups == module.in_channels == module.out_channels):
            return f"{name}: grouped convolution (groups={module.groups})"
        if not isinstance(module, _SAFE_MODULES):
            return f"{name}: {type(module).__name__} (channels it mixes cannot be masked exactly)"
    return None


def _describe_group(group, names: dict, dg: tp.DependencyGraph) -> ChannelGroup | None:
    root_module = group[0].dep.target.module
    size = _out_channels(root_module)
    result = ChannelGroup(names[root_module], size)
    norms_in_group = set()
    for item in group.items:
        module, handler = item.dep.target.module, item.dep.handler
        if module not in names:
            continue  # torch-pruning's element-wise pseudo-modules
        sl = LayerSlice(names[module], tuple(int(i) for i in item.idxs), tuple(int(i) for i in item.root_idxs))
        if _is_out_handler(handler, dg, module):
            if isinstance(module, _LAYER_TYPES + _NORM_TYPES) and sl not in result.out_slices:
                result.out_slices.append(sl)
                if isinstance(module, _NORM_TYPES):
                    norms_in_group.add(module)
        elif isinstance(module, _LAYER_TYPES) and sl not in result.in_slices:
            result.in_slices.append(sl)
    modules = {n: m for m, n in names.items()}
    for sl in result.out_slices:
        module = modules[sl.module]
        if isinstance(module, _NORM_TYPES) or not _feeds_norm(dg, module, norms_in_group):
            result.apply_at.append(sl)
    return result if result.apply_at else None


def _is_out_handler(handler, dg: tp.DependencyGraph, module: nn.Module) -> bool:
    return handler == dg.get_pruner_of_module(module).prune_out_channels


def _feeds_norm(dg: tp.DependencyGraph, module: nn.Module, norms: set) -> bool:
    node = dg.module2node[module]
    return any(out.module in norms for out in node.outputs)


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    raise RcompError(f"unsupported group root {type(module).__name__}")
