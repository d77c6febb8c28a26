"""Differentiable cost of a masked network and the hardware-budget constraint.

:class:`CostModel` turns the masks of a :class:`~rcomp.masks.MaskedModel` into the MACs and the
parameter count of the network that :mod:`rcomp.surgery` would produce from the current hard
masks. It follows the convention of :mod:`rcomp.count` (fvcore): batch 1, one multiply-add = one
op, conv + linear only, BatchNorm folded (0 ops); params = every ``nn.Parameter`` element of the
pruned model, BatchNorm affine included.

Channel regularity
    Every conv / linear / norm layer has an *active* number of output (and input) channels:
    channels covered by a group's ``out_slices`` / ``in_slices`` count ``Mb[root_idx]``, channels
    not covered by any group (the classifier's outputs, the first conv's inputs) are always on.
    ``conv MACs = k_h*k_w*H_out*W_out*C_out*C_in`` (groups == 1), ``k_h*k_w*H_out*W_out*C_out`` for
    depthwise convs, ``linear MACs = in*out`` (times the positions it is applied at).
    Other grouped convolutions are refused.
Weight regularity
    ``ops = sum H_out*W_out*nnz(Mb)`` over convs (``nnz(Mb)`` for linears): the *sparse* MACs, see
    :func:`rcomp.count.sparse_macs`. fvcore and dense runtimes (onnxruntime, TensorRT) count and
    execute the dense figure: irregular zeros make the file compressible, not the model faster.
    ``params = nnz(Mb)`` + every other parameter (biases, BatchNorm affine ...).

Both values are computed from the STE binary masks (``masks.binary(i)``) in float64: the forward
value is the exact integer count of the physically pruned network, and the gradient of the smooth
surrogate reaches the real-valued masks ``M``.

:class:`BudgetController` schedules the limits during training (dense → final over the warm-up),
turns the excess into a loss penalty, tells the trainer when to freeze the masks, and finally
:meth:`BudgetController.project` makes the hard masks meet every constraint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rcomp.errors import RcompError
from rcomp.masks import ChannelMasks, MaskedModel, WeightMasks

METRICS = ("ops", "params")
#: Every metric a budget can constrain; "latency" (ms, a latency table's p50 prediction) needs
#: :meth:`CostModel.attach_latency`.
CONSTRAINT_METRICS = (*METRICS, "latency")
#: Bound on the Lagrange multipliers, so a long violation (masks lag the schedule) cannot wind
#: the pressure up without limit and overshoot far once the masks move.
MAX_MULTIPLIER = 5.0

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class Constraint:
    """One budget: ``value(metric) <= limit`` on the pruned model (absolute MACs or params)."""

    metric: str  # "ops" (MACs), "params" or "latency" (ms, p50 by a latency table)
    limit: float  # absolute: MACs, parameter count or milliseconds
    source: str = ""  # e.g. "--target-ops 0.5" or "profile jetson: budgets.mops"

    def __post_init__(self):
        if self.metric not in CONSTRAINT_METRICS:
            raise RcompError(f"unknown budget metric {self.metric!r}; expected 'ops', 'params' or 'latency'")
        try:
            limit = float(self.limit)
        except (TypeError, ValueError):
            limit = math.nan
        if not (math.isfinite(limit) and limit > 0):
            raise RcompError(f"budget limit for {self.metric} must be a positive number, got {self.limit!r}")
        object.__setattr__(self, "limit", limit)


# --------------------------------------------------------------------------------------------
# constraints
# --------------------------------------------------------------------------------------------


def _label(source: str, default: str) -> str:
    return f"{source}: {default}" if source else default


def _fraction(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RcompError(f"{what} must be a number in (0, 1], got {value!r}") from None
    if not (0.0 < v <= 1.0):
        raise RcompError(f"{what} must be a fraction of the dense model in (0, 1], got {value!r}")
    return v


def _positive(value, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RcompError(f"{what} must be a positive number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise RcompError(f"{what} must be a positive number, got {value!r}")
    return v


def constraints_from_targets(
    cost: "CostModel",
    *,
    target_ops: float | None = None,
    target_params: float | None = None,
    mops: float | None = None,
    params: float | None = None,
    source: str = "",
) -> list[Constraint]:
    """Constraints from fractions of the dense model (``target_*`` in (0, 1]) and/or absolute budgets.

    ``mops`` is in millions of MACs, ``params`` a parameter count. Several may be given; all must hold.
    """
    out: list[Constraint] = []
    if target_ops is not None:
        f = _fraction(target_ops, "target ops")
        out.append(Constraint("ops", f * cost.dense_ops, _label(source, f"--target-ops {target_ops:g}")))
    if target_params is not None:
        f = _fraction(target_params, "target params")
        out.append(Constraint("params", f * cost.dense_params, _label(source, f"--target-params {target_params:g}")))
    if mops is not None:
        v = _positive(mops, "MOps budget")
        out.append(Constraint("ops", v * 1e6, _label(source, f"--mops {mops:g}")))
    if params is not None:
        v = _positive(params, "params budget")
        out.append(Constraint("params", v, _label(source, f"--params {params:g}")))
    return out


def _attr(obj, key: str):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def constraints_from_profile(cost: "CostModel", profile) -> list[Constraint]:
    """Constraints from a hardware profile's ``budgets`` (mops, params, ops_fraction, params_fraction)."""
    budgets = _attr(profile, "budgets")
    name = _attr(profile, "name") or ""
    prefix = f"profile {name}" if name else "profile"
    out: list[Constraint] = []
    v = _attr(budgets, "mops")
    if v is not None:
        out.append(Constraint("ops", _positive(v, f"{prefix}: budgets.mops") * 1e6, f"{prefix}: budgets.mops"))
    v = _attr(budgets, "params")
    if v is not None:
        out.append(Constraint("params", _positive(v, f"{prefix}: budgets.params"), f"{prefix}: budgets.params"))
    v = _attr(budgets, "ops_fraction")
    if v is not None:
        f = _fraction(v, f"{prefix}: budgets.ops_fraction")
        out.append(Constraint("ops", f * cost.dense_ops, f"{prefix}: budgets.ops_fraction"))
    v = _attr(budgets, "params_fraction")
    if v is not None:
        f = _fraction(v, f"{prefix}: budgets.params_fraction")
        out.append(Constraint("params", f * cost.dense_params, f"{prefix}: budgets.params_fraction"))
    return out


# --------------------------------------------------------------------------------------------
# cost model
# --------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """One module whose cost depends on active channels: ``a*out*in + b*out + c`` per metric."""

    name: str
    kind: str  # conv, dwconv, linear, norm
    out_total: int
    in_total: int
    ops_a: float = 0.0
    ops_b: float = 0.0
    params_a: float = 0.0
    params_b: float = 0.0


def _channel_units(masks: ChannelMasks, unit_offsets: list[int]) -> dict[tuple[str, str], dict[int, int]]:
    """Local channel -> global mask unit, per (module, side "out"/"in").

    The cost of a layer is read off the units its channels belong to; a channel claimed by two
    groups would be counted twice, which means the dependency graph was read wrongly upstream.
    """
    cover: dict[tuple[str, str], dict[int, int]] = {}
    for gi, group in enumerate(masks.groups):
        off = unit_offsets[gi]
        for side, slices in (("out", group.out_slices), ("in", group.in_slices)):
            for sl in slices:
                mapping = cover.setdefault((sl.module, side), {})
                for local, root in zip(sl.idxs, sl.root_idxs):
                    unit = off + int(root)
                    if mapping.setdefault(int(local), unit) != unit:
                        raise RcompError(
                            f"channel {local} of {sl.module} ({side}) belongs to two channel groups; "
                            "cannot cost this model"
                        )
    return cover


def _costed_layers(model: nn.Module, positions: dict[str, float],
                   cover: dict[tuple[str, str], dict[int, int]]) -> tuple[list[_Layer], float]:
    """Every conv / linear / masked norm as a ``_Layer`` (cost per active channel pair), and the
    params of everything else, which no mask can remove."""
    layers: list[_Layer] = []
    const_params = 0.0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            layers.append(_weighted_layer(name, module, positions.get(name, 0.0)))
            extra = [p for p in own if p is not module.weight and p is not module.bias]
        elif isinstance(module, _NORM_TYPES) and (name, "out") in cover:
            per_channel = [p for p in own if p.dim() == 1]
            channels = per_channel[0].numel() if per_channel else 0
            layers.append(_Layer(name, "norm", channels, 0, params_b=float(len(per_channel))))
            extra = [p for p in own if p.dim() != 1]
        else:
            extra = own
        const_params += float(sum(p.numel() for p in extra))
    return layers, const_params


def _weighted_layer(name: str, module: nn.Conv2d | nn.Linear, positions: float) -> _Layer:
    """A conv's or linear's cost: ``a*out*in`` (dense) or ``b*out`` (depthwise), plus its bias."""
    bias = 1.0 if module.bias is not None else 0.0
    if isinstance(module, nn.Linear):
        return _Layer(name, "linear", module.out_features, module.in_features, ops_a=positions, params_a=1.0,
                      params_b=bias)
    kind = _conv_kind(name, module)
    kk = float(math.prod(module.kernel_size))
    layer = _Layer(name, kind, module.out_channels, module.in_channels)
    if kind == "gconv":  # never masked (rcomp.masks leaves its groups alone): out * in / groups is exact
        kind = layer.kind = "conv"
        kk /= module.groups
    if kind == "conv":
        layer.ops_a, layer.params_a, layer.params_b = kk * positions, kk, bias
    else:
        layer.ops_b, layer.params_b = kk * positions, kk + bias
    return layer


def _unit_counts(layers: list[_Layer], cover: dict[tuple[str, str], dict[int, int]]) -> tuple[dict, dict]:
    """The sparse structure ``active(layer, side) = uncovered + sum_k count[layer, k] * u[k]``:
    per side, the channels no mask covers and (layer, unit, count) triplets."""
    entries = {"out": ([], [], []), "in": ([], [], [])}
    uncovered = {"out": [], "in": []}
    for li, layer in enumerate(layers):
        for side, total in (("out", layer.out_total), ("in", layer.in_total)):
            mapping = {c: u for c, u in cover.get((layer.name, side), {}).items() if c < total}
            uncovered[side].append(float(total - len(mapping)))
            counts: dict[int, int] = {}
            for u in mapping.values():
                counts[u] = counts.get(u, 0) + 1
            rows, cols, vals = entries[side]
            for u, c in counts.items():
                rows.append(li)
                cols.append(u)
                vals.append(float(c))
    return ({s: torch.tensor(v, dtype=torch.float64) for s, v in uncovered.items()},
            {s: (torch.tensor(r, dtype=torch.long), torch.tensor(c, dtype=torch.long), torch.tensor(v, dtype=torch.float64))
             for s, (r, c, v) in entries.items()})


def _record_positions(model: nn.Module, example_input: Tensor) -> dict[str, float]:
    """Output positions (H_out*W_out, summed over calls) of every conv / linear, batch 1."""
    positions: dict[str, float] = {}
    handles = []

    def hook(name):
        def fn(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                pos = math.prod(output.shape[2:])
            else:  # Linear on (N, ..., in): applied at every position of the middle dims
                pos = math.prod(output.shape[1:-1]) if output.dim() > 2 else 1
            positions[name] = positions.get(name, 0.0) + float(pos)

        return fn

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return positions


def _conv_kind(name: str, conv: nn.Conv2d, masked: bool = False) -> str:
    """conv, dwconv, or gconv: another grouped convolution, which channel masks never cover."""
    if conv.groups == 1:
        return "conv"
    if conv.groups == conv.in_channels == conv.out_channels:
        return "dwconv"
    if not masked:
        return "gconv"
    raise RcompError(
        f"grouped convolution with groups={conv.groups} is not supported ({name}: "
        f"{conv.in_channels}->{conv.out_channels}); only groups=1 and depthwise convolutions are"
    )


class CostModel:
    """MACs and parameter count of the pruned network as differentiable functions of the masks."""

    def __init__(self):  # use CostModel.build
        self.masked: MaskedModel
        self.regularity: str = ""
        self.dense_ops: float = 0.0
        self.dense_params: float = 0.0
        self.latency: LatencyCost | None = None  # set by attach_latency
        self.dense_latency: float = 0.0

    # ---------------------------------------------------------------- construction
    @classmethod
    def build(cls, masked: MaskedModel, example_input: Tensor) -> "CostModel":
        self = cls()
        self.masked = masked
        masks = masked.masks
        self.regularity = masks.regularity
        model = masked.model
        positions = _record_positions(model, example_input)
        if isinstance(masks, ChannelMasks):
            self._build_channel(model, masks, positions)
        elif isinstance(masks, WeightMasks):
            self._build_weight(model, masks, positions)
        else:
            raise RcompError(f"unsupported mask set {type(masks).__name__}")
        with torch.no_grad():
            ops, params = self._evaluate(dense=True)
        self.dense_ops, self.dense_params = float(ops), float(params)
        return self

    def _build_channel(self, model: nn.Module, masks: ChannelMasks, positions: dict[str, float]) -> None:
        sizes = [g.size for g in masks.groups]
        self._unit_offsets = [0]
        for s in sizes:
            self._unit_offsets.append(self._unit_offsets[-1] + s)
        self._num_units = self._unit_offsets[-1]
        cover = _channel_units(masks, self._unit_offsets)
        layers, self._const_params = _costed_layers(model, positions, cover)
        self._layers = layers
        self._uncovered, self._entries = _unit_counts(layers, cover)
        f64 = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
        self._coef = {
            "ops": (f64([l.ops_a for l in layers]), f64([l.ops_b for l in layers])),
            "params": (f64([l.params_a for l in layers]), f64([l.params_b for l in layers])),
        }
        self._device_cache: dict = {}

    def _build_weight(self, model: nn.Module, masks: WeightMasks, positions: dict[str, float]) -> None:
        modules = dict(model.named_modules())
        self._weight_positions = []
        masked_numel = 0
        for name in masks.names:
            module = modules[name]
            self._weight_positions.append(positions.get(name, 0.0))
            masked_numel += math.prod(masks.params[masks.names.index(name)].shape)
        total = sum(p.numel() for p in model.parameters())
        self._const_params = float(total - masked_numel)
        self._layers = []
        for name in masks.names:
            module = modules[name]
            kind = "linear" if isinstance(module, nn.Linear) else _conv_kind(name, module)
            out_total = module.out_features if kind == "linear" else module.out_channels
            in_total = module.in_features if kind == "linear" else module.in_channels
            self._layers.append(_Layer(name, kind, out_total, in_total))

    # ---------------------------------------------------------------- evaluation
    def _tensors(self, device):
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = (
                {s: v.to(device) for s, v in self._uncovered.items()},
                {s: tuple(t.to(device) for t in e) for s, e in self._entries.items()},
                {m: tuple(t.to(device) for t in c) for m, c in self._coef.items()},
            )
        return self._device_cache[key]

    def _unit_vector(self, dense: bool = False) -> Tensor:
        masks = self.masked.masks
        device = masks.params[0].device
        if dense:
            return torch.ones(self._num_units, dtype=torch.float64, device=device)
        return torch.cat([masks.binary(i).reshape(-1) for i in range(len(masks))]).to(torch.float64)

    def _active(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Active (out, in) channel counts of every costed layer for unit vector ``u``."""
        uncovered, entries, _ = self._tensors(u.device)
        result = []
        for side in ("out", "in"):
            rows, cols, vals = entries[side]
            result.append(uncovered[side].index_add(0, rows, u[cols] * vals))
        return result[0], result[1]

    def _evaluate(self, dense: bool = False, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.regularity == "weight":
            return self._evaluate_weight(dense)
        if u is None:
            u = self._unit_vector(dense)
        out, inn = self._active(u)
        _, _, coef = self._tensors(u.device)
        values = []
        for metric in METRICS:
            a, b = coef[metric]
            v = (a * out * inn + b * out).sum()
            if metric == "params":
                v = v + self._const_params
            values.append(v)
        return values[0], values[1]

    def _evaluate_weight(self, dense: bool) -> tuple[Tensor, Tensor]:
        masks = self.masked.masks
        ops = params = None
        for i, pos in enumerate(self._weight_positions):
            if dense:
                nnz = torch.tensor(float(masks.params[i].numel()), dtype=torch.float64, device=masks.params[i].device)
            else:
                nnz = masks.binary(i).to(torch.float64).sum()
            ops = nnz * pos if ops is None else ops + nnz * pos
            params = nnz if params is None else params + nnz
        return ops, params + self._const_params

    def ops(self) -> Tensor:
        """MACs of the pruned network (float64 scalar; exact forward value, STE gradient to the masks)."""
        return self._evaluate()[0]

    def params(self) -> Tensor:
        """Parameter count of the pruned network (float64 scalar; exact forward value, STE gradient)."""
        return self._evaluate()[1]

    def value(self, metric: str) -> Tensor:
        if metric == "ops":
            return self.ops()
        if metric == "params":
            return self.params()
        if metric == "latency":
            return self.latency_ms()
        raise RcompError(f"unknown budget metric {metric!r}; expected 'ops' or 'params'")

    def values(self) -> dict[str, Tensor]:
        """Both metrics from one pass over the masks (and the latency, with a table attached)."""
        ops, params = self._evaluate()
        out = {"ops": ops, "params": params}
        if self.latency is not None:
            out["latency"] = self.latency_ms()
        return out

    def dense_value(self, metric: str) -> float:
        if metric == "ops":
            return self.dense_ops
        if metric == "params":
            return self.dense_params
        if metric == "latency" and self.latency is not None:
            return self.dense_latency
        raise RcompError(f"unknown budget metric {metric!r}; expected 'ops', 'params' or 'latency' (with a latency table)")

    # ---------------------------------------------------------------- latency
    def attach_latency(self, table: dict) -> "CostModel":
        """Cost the masks' latency by a per-layer table (:mod:`rcomp.export.latency_table`) too."""
        if self.regularity != "channel":
            raise RcompError("a latency budget prices channel widths; it needs regularity: channel")
        self.latency = LatencyCost(table, self._layers)
        with torch.no_grad():
            self.dense_latency = float(self.latency.value(*self._active(self._unit_vector(dense=True))))
        return self

    def latency_ms(self) -> Tensor:
        """The table's p50 prediction (ms) of the pruned network: exact at the table's widths,
        bilinear between them, with the STE gradient to the masks."""
        if self.latency is None:
            raise RcompError("no latency table attached to this cost model")
        return self.latency.value(*self._active(self._unit_vector()))

    def layer_table(self) -> list[dict]:
        """Per costed layer (hard masks): name, kind, active in / out, macs, params."""
        rows = []
        with torch.no_grad():
            if self.regularity == "weight":
                masks = self.masked.masks
                for i, layer in enumerate(self._layers):
                    nnz = int(masks.binary(i).sum())
                    numel = masks.params[i].numel()
                    rows.append(
                        {
                            "name": layer.name,
                            "kind": layer.kind,
                            "in": layer.in_total,
                            "out": layer.out_total,
                            "macs": int(round(nnz * self._weight_positions[i])),
                            "params": nnz,
                            "density": nnz / numel if numel else 0.0,
                        }
                    )
                return rows
            out, inn = self._active(self._unit_vector())
            _, _, coef = self._tensors(out.device)
            for li, layer in enumerate(self._layers):
                o, n = float(out[li]), float(inn[li])
                macs = float(coef["ops"][0][li]) * o * n + float(coef["ops"][1][li]) * o
                params = float(coef["params"][0][li]) * o * n + float(coef["params"][1][li]) * o
                rows.append(
                    {
                        "name": layer.name,
                        "kind": layer.kind,
                        "in": int(n) if layer.kind != "norm" else None,
                        "out": int(o),
                        "in_total": layer.in_total if layer.kind != "norm" else None,
                        "out_total": layer.out_total,
                        "macs": int(round(macs)),
                        "params": int(round(params)),
                    }
                )
        return rows

    # ---------------------------------------------------------------- helpers for project()
    def _linear_structure(self):
        """Python-side structure for fast incremental costing of single-unit flips (channel masks)."""
        entries, coef = self._entries, self._coef
        per_unit: list[dict[int, list[float]]] = [dict() for _ in range(self._num_units)]
        for si, side in enumerate(("out", "in")):
            rows, cols, vals = (t.tolist() for t in entries[side])
            for r, c, v in zip(rows, cols, vals):
                per_unit[c].setdefault(r, [0.0, 0.0])[si] += v
        units = [[(r, ab[0], ab[1]) for r, ab in d.items()] for d in per_unit]
        coefs = {m: (coef[m][0].tolist(), coef[m][1].tolist()) for m in METRICS}
        return units, coefs


# --------------------------------------------------------------------------------------------
# controller
# --------------------------------------------------------------------------------------------


class BudgetController:
    """Schedules the budget during training, penalises the excess and projects the final masks."""

    def __init__(
        self,
        cost: CostModel,
        constraints: list[Constraint],
        *,
        penalty_weight: float = 1.0,
        warmup_fraction: float = 0.3,
        freeze_fraction: float = 0.8,
        dual_lr: float = 0.05,
        start_fraction: float = 0.0,
        dual_reset: bool = False,
    ):
        if not (0.0 <= start_fraction < 1.0):
            raise RcompError(f"start_fraction must be in [0, 1), got {start_fraction}")
        if not (0.0 <= warmup_fraction <= 1.0):
            raise RcompError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        if not (0.0 <= freeze_fraction <= 1.0):
            raise RcompError(f"freeze_fraction must be in [0, 1], got {freeze_fraction}")
        if penalty_weight < 0:
            raise RcompError(f"penalty_weight must be >= 0, got {penalty_weight}")
        self.cost = cost
        self.constraints = list(constraints)
        if dual_lr < 0:
            raise RcompError(f"dual_lr must be >= 0, got {dual_lr}")
        self.penalty_weight = float(penalty_weight)
        self.dual_lr = float(dual_lr)
        self.dual_reset = bool(dual_reset)
        self.multipliers = [0.0] * len(self.constraints)  # Lagrange multipliers, one per constraint
        self.warmup_fraction = float(warmup_fraction)
        self.freeze_fraction = float(freeze_fraction)
        self.start_fraction = float(start_fraction)

    def limit_at(self, constraint: Constraint, progress: float) -> float:
        """The dense value until ``start_fraction``, then linear to the final limit over ``warmup_fraction``."""
        dense = self.cost.dense_value(constraint.metric)
        start = max(dense, constraint.limit)
        p = min(max(float(progress), 0.0), 1.0) - self.start_fraction
        if p <= 0.0 and self.start_fraction > 0.0:
            return start
        if self.warmup_fraction <= 0.0 or p >= self.warmup_fraction:
            return float(constraint.limit)
        t = p / self.warmup_fraction
        return start + (constraint.limit - start) * t

    def penalty(self, progress: float) -> Tensor:
        """``sum_c (weight * relu(r_c) + lambda_c * r_c)`` with ``r_c = value_c / limit_c(t) - 1``.

        The hinge alone pushes every mask with the same strength the moment the budget is exceeded,
        and masks that started equal then cross zero together (measured: ops fell from 1.0 to 0.03
        of dense within one short epoch). The Lagrange multiplier ``lambda_c`` instead grows only
        as long as the constraint stays violated (dual ascent, :meth:`update`), so the pressure
        rises gradually and the masks whose task-loss gradient resists least go first. The hinge
        bounds how far the network can overshoot the schedule and damps the multiplier's swings:
        at half its default weight a ResNet20 run's multiplier wound up to its cap and the masks
        fell to 0.07 of the ops for a 0.3 target (measured, README's ablation section).

        The multiplier may go negative: below the limit it then pulls masks back on, so a network
        that overshot returns to the budget instead of staying stuck far below it (measured
        without this: 0.31 of dense for a 0.5 target; off masks get no other push back).
        """
        values = self.cost.values()
        device = values["ops"].device
        total = torch.zeros((), dtype=torch.float64, device=device)
        for c, lam in zip(self.constraints, self.multipliers):
            excess = values[c.metric] / self.limit_at(c, progress) - 1.0
            total = total + self.penalty_weight * torch.relu(excess) + lam * excess
        return total.to(torch.float32)

    @torch.no_grad()
    def update(self, progress: float) -> None:
        """One dual-ascent step on the multipliers, after each optimizer step.

        With ``dual_reset`` a positive multiplier drops to zero the first step its constraint holds
        (anti-windup by integrator reset). The pressure it stored was built while the masks lagged
        the schedule; spent after the limit is reached, it only drives the masks on past it
        (measured: ResNet56 at 0.3 reached 0.175 of the ops at the end of the ramp, 0.294 with the
        reset; its accuracy did not move, README's ablation section).
        """
        values = self.cost.values()
        excesses = [float(values[c.metric]) / self.limit_at(c, progress) - 1.0 for c in self.constraints]
        binding = max(range(len(excesses)), key=excesses.__getitem__) if excesses else -1
        for i, excess in enumerate(excesses):
            held = self.multipliers[i]
            if self.dual_reset and excess <= 0.0:
                held = min(held, 0.0)
            updated = min(MAX_MULTIPLIER, max(-MAX_MULTIPLIER, held + self.dual_lr * excess))
            # only the tightest constraint may pull masks back on; the others only push down
            self.multipliers[i] = updated if i == binding else max(0.0, updated)

    def state_dict(self) -> dict:
        """The multipliers: part of a resumable training state."""
        return {"multipliers": list(self.multipliers)}

    def load_state_dict(self, state: dict) -> None:
        multipliers = [float(m) for m in state["multipliers"]]
        if len(multipliers) != len(self.constraints):
            raise RcompError("budget state does not match the constraints of this run")
        self.multipliers = multipliers

    def should_freeze(self, progress: float) -> bool:
        return float(progress) >= self.freeze_fraction

    # ---------------------------------------------------------------- status
    def status(self) -> dict:
        with torch.no_grad():
            v = {m: float(x) for m, x in self.cost.values().items()}
        ops, params = v["ops"], v["params"]
        latency = {} if "latency" not in v else {
            "latency_ms": v["latency"], "dense_latency_ms": self.cost.dense_latency,
            "latency_ratio": v["latency"] / self.cost.dense_latency if self.cost.dense_latency else 0.0}
        return {
            "ops": int(round(ops)),
            "params": int(round(params)),
            "dense_ops": int(round(self.cost.dense_ops)),
            "dense_params": int(round(self.cost.dense_params)),
            "ops_ratio": ops / self.cost.dense_ops if self.cost.dense_ops else 0.0,
            "params_ratio": params / self.cost.dense_params if self.cost.dense_params else 0.0,
            "constraints": [
                {
                    "metric": c.metric,
                    "limit": c.limit,
                    "source": c.source,
                    "value": v[c.metric],
                    "satisfied": v[c.metric] <= c.limit,
                }
                for c in self.constraints
            ],
            "limits": self._limits(),
            "multipliers": list(self.multipliers),
            "satisfied": all(v[c.metric] <= c.limit for c in self.constraints),
            **latency,
        }

    def satisfied(self) -> bool:
        return bool(self.status()["satisfied"])

    def _limits(self) -> dict[str, float]:
        limits = {}
        for c in self.constraints:
            limits[c.metric] = min(limits.get(c.metric, math.inf), float(c.limit))
        return limits

    # ---------------------------------------------------------------- projection
    def project(self) -> dict:
        """Make the hard masks meet every final constraint, then refill greedily by score.

        Phase 1 switches off the lowest-scoring units (every channel group keeps at least one
        channel) until every constraint holds; phase 2 walks the off units from the highest score
        down and switches each back on if all constraints still hold, so the result lands just
        below the tightest limit. Raises RcompError when even the smallest network is over budget.
        """
        before = self.status()
        if self.cost.regularity == "weight":
            changed = self._project_weight()
        else:
            changed = self._project_channel()
        after = self.status()
        if not after["satisfied"]:  # cannot happen unless the incremental arithmetic drifted
            raise RcompError(f"budget projection failed: {after['constraints']}")
        latency = {} if "latency_ms" not in after else {
            "latency_ms_before": before["latency_ms"], "latency_ms_after": after["latency_ms"]}
        return {
            "ops_before": before["ops"],
            "ops_after": after["ops"],
            "params_before": before["params"],
            "params_after": after["params"],
            "units_changed": changed["on"] + changed["off"],
            "units_turned_on": changed["on"],
            "units_turned_off": changed["off"],
            "limits": self._limits(),
            "satisfied": after["satisfied"],
            **latency,
        }

    def _project_channel(self) -> dict:
        masks = self.cost.masked.masks
        projection = _ChannelProjection(self.cost, self._limits())
        projection.meet_limits()
        projection.refill()
        if masks.channel_multiple > 1:
            projection.snap_to_multiples()
        return projection.write_masks()

    def _project_weight(self) -> dict:
        cost = self.cost
        masks = cost.masked.masks
        limits = self._limits()
        with torch.no_grad():
            scores = torch.cat([s.reshape(-1) for s in masks.scores()]).double().cpu()
            initial = torch.cat([masks.binary(i).reshape(-1) for i in range(len(masks))]).bool().cpu()
        unit_ops = torch.cat(
            [torch.full((masks.params[i].numel(),), float(p), dtype=torch.float64) for i, p in enumerate(cost._weight_positions)]
        )
        unit_cost = {"ops": unit_ops, "params": torch.ones_like(unit_ops)}
        budget = {m: lim - (cost._const_params if m == "params" else 0.0) for m, lim in limits.items()}
        if any(v < 0 for v in budget.values()):
            raise RcompError("params budget is below the parameters that weight masks cannot remove (biases, norms)")
        # both phases together: the greedy-by-score set = the longest score-ordered prefix that
        # fits, then a skip-fill over the following units (cheaper ones may still fit)
        order = torch.argsort(scores, descending=True, stable=True)
        k = order.numel()
        for m, b in budget.items():
            csum = torch.cumsum(unit_cost[m][order], 0)
            k = min(k, int(torch.searchsorted(csum, torch.tensor([b + 1e-6], dtype=torch.float64), right=True)[0]))
        keep = torch.zeros_like(initial)
        keep[order[:k]] = True
        used = {m: float(unit_cost[m][order[:k]].sum()) for m in budget}
        tail = order[k : k + 50_000]
        tail_cost = {m: unit_cost[m][tail].tolist() for m in budget}
        for j, idx in enumerate(tail.tolist()):
            if all(used[m] + tail_cost[m][j] <= budget[m] + 1e-6 for m in budget):
                keep[idx] = True
                for m in budget:
                    used[m] += tail_cost[m][j]
        start = 0
        for i in range(len(masks)):
            n = masks.params[i].numel()
            masks.set_hard(i, keep[start : start + n].view_as(masks.params[i]))
            start += n
        return {"on": int((keep & ~initial).sum()), "off": int((~keep & initial).sum())}


class _ChannelProjection:
    """The channel projection's state: which units are on, and the running cost of that network.

    Flipping one unit updates every metric incrementally (exact: costs are bilinear in the active
    in / out channels of each layer), so the greedy phases cost a few list operations per flip
    instead of a forward pass through the cost model.
    """

    def __init__(self, cost: CostModel, limits: dict[str, float]):
        self.masks = cost.masked.masks
        self.limits = limits
        self.units, self.coefs = cost._linear_structure()
        self.offsets = cost._unit_offsets
        self.group_of = []
        for gi in range(len(self.masks)):
            self.group_of += [gi] * (self.offsets[gi + 1] - self.offsets[gi])
        self.scores = torch.cat([s.reshape(-1) for s in self.masks.scores()]).double().tolist()
        self._rankings: dict[int, list[int]] = {}
        with torch.no_grad():
            u = cost._unit_vector()
            out_t, in_t = cost._active(u)
        self.state = [bool(x) for x in u.tolist()]
        self.initial = list(self.state)
        self.out, self.inn = out_t.tolist(), in_t.tolist()
        self.value = {}
        for m in METRICS:
            a, b = self.coefs[m]
            self.value[m] = sum(a[i] * self.out[i] * self.inn[i] + b[i] * self.out[i] for i in range(len(self.out)))
        self.value["params"] += cost._const_params
        self.latency = cost.latency
        if self.latency is not None:
            self.value["latency"] = self.latency.value_at(self.out, self.inn)
        self.on_count = [0] * len(self.masks)
        for k, on in enumerate(self.state):
            self.on_count[self.group_of[k]] += int(on)

    def delta(self, k: int, sign: float) -> dict[str, float]:
        d = {}
        for m in self.limits:
            if m == "latency":
                d[m] = self.latency.delta_at(self.out, self.inn, self.units[k], sign)
                continue
            a, b = self.coefs[m]
            t = 0.0
            for li, ao, ai in self.units[k]:
                ao_s, ai_s = sign * ao, sign * ai
                t += a[li] * (ao_s * self.inn[li] + ai_s * self.out[li] + ao_s * ai_s) + b[li] * ao_s
            d[m] = t
        return d

    def flip(self, k: int, sign: float, d: dict[str, float] | None = None) -> None:
        d = self.delta(k, sign) if d is None else d
        for li, ao, ai in self.units[k]:
            self.out[li] += sign * ao
            self.inn[li] += sign * ai
        for m, dv in d.items():
            self.value[m] += dv
        self.state[k] = sign > 0
        self.on_count[self.group_of[k]] += 1 if sign > 0 else -1

    def ok(self, extra: dict[str, float] | None = None) -> bool:
        tol = 1e-6
        return all(self.value[m] + (extra or {}).get(m, 0.0) <= lim + tol for m, lim in self.limits.items())

    def _raise_over_budget(self, fewest: str) -> None:
        raise RcompError(
            f"budget cannot be met with the fewest channels every group keeps{fewest}: minimum "
            + ", ".join(f"{m} {self.value[m]:,.4g} > limit {lim:,.4g}" for m, lim in self.limits.items()
                        if self.value[m] > lim)
        )

    def meet_limits(self) -> None:
        """Phase 1: switch off the lowest-scoring units until every constraint holds."""
        if self.ok():
            return
        for k in sorted((k for k in range(len(self.state)) if self.state[k]), key=lambda k: self.scores[k]):
            if self.on_count[self.group_of[k]] <= self.masks.min_channels(self.group_of[k]):
                continue
            self.flip(k, -1.0)
            if self.ok():
                return
        self._raise_over_budget("")

    def refill(self) -> None:
        """Phase 2: switch back on the highest-scoring off units that still fit."""
        for k in sorted((k for k in range(len(self.state)) if not self.state[k]), key=lambda k: -self.scores[k]):
            d = self.delta(k, 1.0)
            if self.ok(d):
                self.flip(k, 1.0, d)

    # ---------------------------------------------------------------- phase 3: channel multiples
    def _ranked(self, gi: int) -> list[int]:
        """Group ``gi``'s units, best score first: a group of width w keeps its w best channels.

        Sorted once per group: the scores do not change during a projection, and phase 3 asks for
        a group's ranking at every width step it tries.
        """
        if gi not in self._rankings:
            self._rankings[gi] = sorted(range(self.offsets[gi], self.offsets[gi + 1]), key=lambda k: -self.scores[k])
        return self._rankings[gi]

    def _set_width(self, gi: int, width: int) -> None:
        for rank, k in enumerate(self._ranked(gi)):
            if self.state[k] != (rank < width):
                self.flip(k, 1.0 if rank < width else -1.0)

    def _step_score(self, gi: int, lo: int, hi: int) -> float:
        """Mean score of the channels between widths ``lo`` and ``hi``: what that step keeps or drops."""
        ranked = self._ranked(gi)[lo:hi]
        return sum(self.scores[k] for k in ranked) / len(ranked)

    def snap_to_multiples(self) -> None:
        """Phase 3: every group's width becomes one of ``masks.allowed_widths`` (multiples of
        ``masks.channel_multiple``, or the full group), still within every limit.

        Each group is rounded down to the nearest allowed width (up to its smallest, if below it);
        while a limit is exceeded, the group whose last step holds the lowest mean score steps
        down; then, as in phase 2, the best-scoring step up that still fits is taken until none
        fits. Width steps replace single channels, so the result lands a step below the limit.
        """
        allowed = [self.masks.allowed_widths(gi) for gi in range(len(self.masks))]
        level = []
        for gi, widths in enumerate(allowed):
            below = [i for i, w in enumerate(widths) if w <= self.on_count[gi]]
            level.append(below[-1] if below else 0)
            self._set_width(gi, widths[level[gi]])
        while not self.ok():
            down = [(self._step_score(gi, allowed[gi][lv - 1], allowed[gi][lv]), gi) for gi, lv in enumerate(level) if lv > 0]
            if not down:
                self._raise_over_budget(f" at widths in multiples of {self.masks.channel_multiple}")
            gi = min(down)[1]
            level[gi] -= 1
            self._set_width(gi, allowed[gi][level[gi]])
        blocked: set[int] = set()
        while True:
            up = [(-self._step_score(gi, allowed[gi][lv], allowed[gi][lv + 1]), gi)
                  for gi, lv in enumerate(level) if lv + 1 < len(allowed[gi]) and gi not in blocked]
            if not up:
                return
            gi = min(up)[1]
            self._set_width(gi, allowed[gi][level[gi] + 1])
            if self.ok():
                level[gi] += 1
            else:
                self._set_width(gi, allowed[gi][level[gi]])
                blocked.add(gi)

    def write_masks(self) -> dict:
        """Set the hard masks to the projected state; the counts of units switched on and off."""
        for gi in range(len(self.masks)):
            keep = torch.tensor(self.state[self.offsets[gi] : self.offsets[gi + 1]], dtype=torch.bool)
            self.masks.set_hard(gi, keep)
        return {
            "on": sum(1 for a, b in zip(self.initial, self.state) if b and not a),
            "off": sum(1 for a, b in zip(self.initial, self.state) if a and not b),
        }


# --------------------------------------------------------------------------------------------
# latency
# --------------------------------------------------------------------------------------------


class LatencyCost:
    """A latency table's p50 prediction (ms) of the pruned network, from each conv's active widths.

    ``value = scale * (overhead + fixed + sum_conv table(out_active, in_active))``: each conv's
    measured grid (widths in multiples of the profile's ``channel_multiple``) interpolated
    bilinearly in its active output and input channels, so the value is exact at the widths the
    projection snaps to and its gradient reaches the masks through the active counts (STE) in
    between. ``scale`` is the table's whole-model calibration (1 when its raw sum was close).
    """

    def __init__(self, table: dict, layers: list):
        from rcomp.export import latency_table as lt

        self._lt = lt
        by_name = {e["name"]: e for e in table["layers"]}
        self.entries: list[tuple[int, dict]] = []
        for li, layer in enumerate(layers):
            if layer.kind not in ("conv", "dwconv"):
                continue
            e = by_name.pop(layer.name, None)
            if e is None or (e["out"], e["in"]) != (layer.out_total, layer.in_total):
                have = f"{e['in']}->{e['out']}" if e else "nothing"
                raise RcompError(f"the latency table (model {table.get('model')}) has {have} for conv {layer.name} "
                                 f"({layer.in_total}->{layer.out_total}): it was measured for another architecture")
            self.entries.append((li, e))
        if by_name:
            raise RcompError(f"the latency table names convs this model lacks ({', '.join(sorted(by_name)[:3])}, ...): "
                             "it was measured for another architecture")
        self.const = float(table["overhead_ms"]) + float(table["fixed_ms"])
        self.scale = lt.scale_of(table)
        self.p90_over_p50 = float((table.get("calibration") or {}).get("p90_over_p50") or 1.0)

    @staticmethod
    def _axis(widths: list[int], x: Tensor):
        """Grid indices around ``x`` and the (differentiable) weight of the upper one."""
        if len(widths) == 1:
            return 0, 0, x * 0.0
        lo, hi, _ = LatencyCost._segment(widths, float(x.detach()))
        return lo, hi, (x - widths[lo]) / float(widths[hi] - widths[lo])

    @staticmethod
    def _segment(widths, x):
        from rcomp.export.latency_table import _segment

        return _segment(widths, x)

    def value(self, out: Tensor, inn: Tensor) -> Tensor:
        total = torch.zeros((), dtype=torch.float64, device=out.device) + self.const
        for li, e in self.entries:
            o0, o1, t = self._axis(e["out_widths"], out[li])
            depthwise = e["group"] != 1
            i0, i1, s = (0, 0, out[li] * 0.0) if depthwise else self._axis(e["in_widths"], inn[li])
            g = e["p50_ms"]
            v = (1 - t) * (1 - s) * g[o0][i0] + t * (1 - s) * g[o1][i0] + (1 - t) * s * g[o0][i1] + t * s * g[o1][i1]
            total = total + v.clamp_min(0.0)
        return total * self.scale

    def value_at(self, out: list[float], inn: list[float]) -> float:
        """:meth:`value` on plain lists (the projection's incremental state)."""
        return self.scale * (self.const + sum(self._layer(e, out[li], inn[li]) for li, e in self.entries))

    def _layer(self, e: dict, out: float, inn: float) -> float:
        return self._lt.interpolate(e, out, inn if e["group"] == 1 else 0)

    def delta_at(self, out: list[float], inn: list[float], unit: list, sign: float) -> float:
        """The change of :meth:`value_at` when one mask unit (``(layer, d_out, d_in)`` triplets) flips."""
        by_layer = {li: e for li, e in self.entries}
        d = 0.0
        for li, ao, ai in unit:
            e = by_layer.get(li)
            if e is None:
                continue
            d += self._layer(e, out[li] + sign * ao, inn[li] + sign * ai) - self._layer(e, out[li], inn[li])
        return self.scale * d


def load_latency_table(path, profile=None) -> dict:
    """A latency table file, refused (exit 2) if measured under another onnxruntime or profile."""
    from rcomp.export import latency_table as lt

    table = lt.load_table(path)
    lt.check_table(table, profile, source=f"latency table {path}")
    return table


def latency_constraints(cost: CostModel, config, *, source: str = "") -> list[Constraint]:
    """The latency budgets of a training config (``target_latency``: a fraction of the dense
    model's predicted latency; ``latency_p90_ms``: a profile's absolute budget), with the config's
    ``latency_table`` attached to ``cost``. None without a table.

    The table predicts p50; an absolute p90 budget becomes a p50 limit through the p90/p50 ratio of
    the table's whole-model measurement (1 without one), so both sides speak of the same run.
    """
    path = getattr(config, "latency_table", None)
    fraction = getattr(config, "target_latency", None)
    p90 = getattr(config, "latency_p90_ms", None)
    if path is None:
        if fraction is not None or p90 is not None:
            raise RcompError("a latency budget needs a latency table (--latency-table, from rcomp latency-table)")
        return []
    if fraction is None and p90 is None:
        raise RcompError("--latency-table without a latency budget: give --target-latency or a profile's "
                         "budgets.latency_p90_ms")
    if cost.latency is None:
        cost.attach_latency(load_latency_table(path))
    out = []
    if fraction is not None:
        f = _fraction(fraction, "target latency")
        out.append(Constraint("latency", f * cost.dense_latency, _label(source, f"--target-latency {fraction:g}")))
    if p90 is not None:
        ratio = cost.latency.p90_over_p50
        limit = _positive(p90, "latency_p90_ms") / ratio
        out.append(Constraint("latency", limit, _label(source, f"latency_p90_ms {p90:g} (p50 {limit:.3f} ms by the "
                                                                f"table's p90/p50 {ratio:.3f})")))
    return out
