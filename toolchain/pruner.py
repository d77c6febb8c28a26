"""In-train pruning as one object: masks, budget and the per-step rules, for any training loop.

:class:`InTrainPruner` is the poster's in-train pruning for a model and a training loop that are
the user's own, in the style of Torch-Pruning's ``MetaPruner`` and ModelOpt's ``mtp.prune``: it
takes an ``nn.Module`` and gives it back smaller. rcomp's own trainer (:mod:`rcomp.train`) is
built on it, so the loop below is the one ``rcomp prune`` runs, minus the data, the attack
schedule, the guard and the checkpoints::

    pruner = InTrainPruner(model, example_input, budget={"ops": 0.5}, total_steps=epochs * len(loader))
    opt = torch.optim.SGD(pruner.param_groups(weight_decay=5e-4), lr=0.1, momentum=0.9)
    for x, y in batches:
        loss = F.cross_entropy(pruner.model(attack(pruner.model, x, y)), y) + pruner.penalty()
        opt.zero_grad(); loss.backward(); opt.step()
        pruner.step()
    slim = pruner.finalize()

What each call does, and why it sits there:

* the constructor attaches trainable channel (or weight) masks (:func:`rcomp.masks.attach_masks`),
  builds the differentiable cost model and, for a budget, the controller (:mod:`rcomp.budget`);
* :meth:`penalty` is the budget term for this step. Its gradient to each mask is already scaled
  by the mask's cost share (:meth:`budget_gradient_scale`), so one ordinary ``backward()`` of
  ``loss + penalty`` gives every mask ``dCE/dM + scale * dpen/dM``: no hook between backward and
  the optimizer step is needed. It also notes which units are on, for the switch-off limit;
* :meth:`step`, after ``optimizer.step()``: at most ``max_switch_off`` of the units switch off,
  masks are clipped to [-1, 1], the Lagrange multipliers take their dual step, and at
  ``freeze_at`` of ``total_steps`` the hard masks are projected onto the budget and frozen. It
  also starts the masks at ``mask_start`` (optionally from group magnitude) and sets which masks
  take gradients in the next step (only those that learn: a still mask is a cached constant).

The pruner counts its own steps (like ``OneCycleLR``'s ``total_steps``), so the budget's schedule,
the mask start and the freeze cannot drift apart by a step between :meth:`penalty` and :meth:`step`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from rcomp.budget import BudgetController, Constraint, CostModel, constraints_from_profile, constraints_from_targets
from rcomp.errors import RcompError
from rcomp.masks import MaskedModel, attach_masks

#: How the masks are set when they start learning: all at ``MASK_INIT``, or from group magnitude.
MASK_INITS = ("constant", "magnitude")
#: ``budget`` keys and what each means: fractions of the dense model, or absolute figures.
BUDGET_KEYS = {"ops": "target_ops", "params": "target_params", "mops": "mops", "param_count": "params"}


class _ScaledBudgetGradient(torch.autograd.Function):
    """The budget term's value, passing each mask a gradient computed (and scaled) in advance.

    Why a Function: the budget gradient of a mask must be scaled by its cost share, while the
    task loss's gradient must not; computing the budget term's gradient eagerly and handing it on
    here lets one ``backward()`` of ``loss + penalty`` do both, in the user's loop as in rcomp's.
    """

    @staticmethod
    def forward(ctx, value, grads, *masks):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        return (None, None, *(None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads))


class InTrainPruner:
    """Trainable masks on ``model`` under a budget, with every per-step rule of in-train pruning.

    ``budget``: a dict of ``ops`` / ``params`` (fractions of the dense model, in (0, 1]), ``mops``
    (millions of MACs) and ``param_count`` (parameters), all of which must hold; or a hardware
    profile (a :class:`rcomp.config.Profile`, or its name or path), whose budgets and channel
    multiple are used; or None (masks learn from the task loss alone). ``total_steps``: the
    optimizer steps the run will take; ``mask_start``, ``warmup`` and ``freeze_at`` are fractions
    of it. The remaining arguments are the expert settings of ``rcomp prune``'s recipe (same
    names and defaults): ``min_keep`` / ``min_keep_stream`` (the fraction of every channel group /
    of residual-stream groups that stays), ``channel_multiple`` (final widths are multiples of
    it), ``max_switch_off`` (fraction of units that may switch off per step), ``cost_exponent``
    (budget-gradient scaling), ``penalty_weight``, ``dual_lr``, ``dual_reset`` (the controller),
    ``mask_init`` and ``mask_weight_decay`` (None: the weights' weight decay).
    ``extra_constraints(cost_model)`` may add constraints of its own on the pruner's cost model
    (rcomp's trainer adds its latency budgets this way); ``log`` receives the pruner's messages.

    ``model`` may be a :class:`~rcomp.masks.MaskedModel` already (its masks are used). Put it on
    its device before, with ``example_input`` (one batch of the input shape) on the same device.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor, budget=None, *, total_steps: int,
                 regularity: str = "channel", channel_multiple: int | None = None, min_keep: float = 0.2,
                 min_keep_stream: float | None = None, mask_start: float = 0.0, mask_init: str = "constant",
                 warmup: float = 0.3, freeze_at: float = 0.8, max_switch_off: float = 0.002,
                 cost_exponent: float = 0.5, penalty_weight: float = 1.0, dual_lr: float = 0.05,
                 dual_reset: bool = False, mask_weight_decay: float | None = None,
                 extra_constraints: Callable[[CostModel], list[Constraint]] | None = None,
                 log: Callable[[str], None] | None = None):
        profile = _profile(budget)
        if channel_multiple is None:
            channel_multiple = profile.target.channel_multiple if profile is not None and regularity == "channel" else 1
        _validate(total_steps, regularity, channel_multiple, min_keep, min_keep_stream, mask_start, mask_init,
                  freeze_at, max_switch_off)
        self.total_steps, self.mask_init, self.max_switch_off = int(total_steps), mask_init, float(max_switch_off)
        self.cost_exponent, self.mask_weight_decay = float(cost_exponent), mask_weight_decay
        self.log = log or (lambda message: None)
        self.example = example_input[:1].detach()
        self.masked = model if isinstance(model, MaskedModel) else attach_masks(model, regularity, self.example)
        self.masks = self.masked.masks
        self.masks.to(_device_of(self.masked))
        if self.masks.regularity == "channel":
            self.masks.min_keep_fraction, self.masks.min_keep_stream_fraction = min_keep, min_keep_stream
            self.masks.channel_multiple = int(channel_multiple)
        self.cost = CostModel.build(self.masked, self.example)
        constraints = _constraints(self.cost, budget, profile)
        constraints += list(extra_constraints(self.cost)) if extra_constraints is not None else []
        self.controller = BudgetController(
            self.cost, constraints, penalty_weight=penalty_weight, warmup_fraction=warmup, freeze_fraction=freeze_at,
            dual_lr=dual_lr, start_fraction=mask_start, dual_reset=dual_reset) if constraints else None
        self.budget_scale = self.budget_gradient_scale()
        self.start_step = round(mask_start * self.total_steps)
        self.steps, self.frozen, self.projection = 0, False, None
        self._on_before: list[torch.Tensor] | None = None
        if self.start_step == 0:
            self.init_masks()
        self._sync_requires_grad()

    # ---------------------------------------------------------------- what the loop sees
    @property
    def model(self) -> MaskedModel:
        """The masked model to train and attack: the user's network with its masks (one ``state_dict``)."""
        return self.masked

    @property
    def progress(self) -> float:
        """The fraction of ``total_steps`` taken so far."""
        return self.steps / self.total_steps

    @property
    def learning(self) -> bool:
        """Whether the masks train in the step being taken: started, and not yet frozen."""
        return not self.frozen and self.steps >= self.start_step

    @property
    def device(self) -> torch.device:
        return self.masks.params[0].device

    def param_groups(self, lr: float | None = None, weight_decay: float = 0.0,
                     weights: Iterable[nn.Parameter] | None = None) -> list[dict]:
        """The optimizer's two groups: the weights, and the masks in the same optimizer with the
        weights' weight decay (the poster's "regularise masks along with the weights"), unless
        ``mask_weight_decay`` sets theirs. ``weights``: another set of weights to train (rcomp's
        trainer passes the slim network's once it has removed the channels mid-run)."""
        weights = self.masked.weight_parameters() if weights is None else weights
        decay = weight_decay if self.mask_weight_decay is None else self.mask_weight_decay
        groups = [{"params": list(weights), "weight_decay": weight_decay},
                  {"params": list(self.masks.parameters()), "weight_decay": decay}]
        return [dict(g, lr=lr) for g in groups] if lr is not None else groups

    def penalty(self) -> torch.Tensor:
        """The budget term to add to this step's loss (0 while the masks do not learn).

        Its value is :meth:`BudgetController.penalty` at :attr:`progress`; its gradient to each
        mask is that term's, scaled by :attr:`budget_scale` (see :class:`_ScaledBudgetGradient`).
        Call it once per step, before ``backward()``: it also notes which units are on before the
        optimizer step, which :meth:`step` needs to limit the switch-offs.
        """
        if not self.learning:
            return torch.zeros((), device=self.device)
        self._on_before = self.masks.on_states()
        if self.controller is None:
            return torch.zeros((), device=self.device)
        value = self.controller.penalty(self.progress)
        if self.budget_scale is None or not value.requires_grad:
            return value
        params = list(self.masks.params)
        grads = torch.autograd.grad(value, params, allow_unused=True)
        scaled = [None if g is None else g * s for g, s in zip(grads, self.budget_scale)]
        return _ScaledBudgetGradient.apply(value.detach(), scaled, *params)

    def step(self) -> dict | None:
        """Everything after ``optimizer.step()`` for the masks; the projection report on the step
        the masks are projected onto the budget and frozen, else None.

        In a step that trained the masks: at most ``max_switch_off`` of the units switch off
        (:meth:`MaskSet.limit_switch_off`) and the masks are clipped (:meth:`MaskSet.clip_`). Then
        the step counts; the multipliers take their dual step; at ``freeze_at`` the masks are
        projected and frozen; at ``mask_start`` they start (:meth:`init_masks`).
        """
        if self.learning:
            before = self._on_before if self._on_before is not None else self.masks.on_states()
            self.masks.limit_switch_off(before, max(1, math.ceil(self.max_switch_off * self.masks.num_units)))
            self.masks.clip_()
        self._on_before = None
        self.steps += 1
        projection = None
        if self.controller is not None and self.learning:
            self.controller.update(self.progress)
        if self.controller is not None and not self.frozen and self.controller.should_freeze(self.progress):
            projection = self.freeze()
        if self.steps == self.start_step and not self.frozen:
            self.init_masks()
        self._sync_requires_grad()
        return projection

    # ---------------------------------------------------------------- the masks' life cycle
    def init_masks(self) -> None:
        """Set the masks as ``mask_init`` says, from the weights they start with.

        Masks that all start at the same value give the budget nothing to choose by: the first
        units to cross zero are those the budget gradient pushes hardest (measured: the residual
        streams, whatever their use). With ``mask_init="magnitude"`` torch-pruning's group
        magnitude orders them (all still on); the task-loss gradient refines that order. Called at
        ``mask_start``; call it again after loading weights from before it (rcomp's guard does).
        """
        if self.mask_init == "magnitude":
            self.masks.init_from_scores(self._magnitude_scores())
        elif self.start_step == 0:
            return  # the default: masks learn from the first step, nothing to say
        self.log(f"masks start learning at step {self.steps}/{self.total_steps} ({self.mask_init} init)")

    def project(self) -> dict:
        """Make the hard masks meet the final budget now (:meth:`BudgetController.project`)."""
        if self.controller is None:
            raise RcompError("project() needs a budget; this pruner was made without one")
        self.projection = self.controller.project()
        return self.projection

    def freeze(self) -> dict | None:
        """Project the hard masks onto the budget (if there is one) and freeze them: the
        architecture is final, the weights train on; the projection report."""
        projection = self.project() if self.controller is not None else None
        self.masks.freeze()
        self.frozen = True
        self._on_before = None
        return projection

    def finalize(self) -> nn.Module:
        """The network without its switched-off channels (channel masks, :func:`rcomp.surgery.remove_channels`)
        or with its weight masks folded in (:func:`rcomp.surgery.fold_weight_masks`): a plain
        ``nn.Module`` of standard layers. Projects and freezes first if that has not happened or the
        budget does not hold. The removals are kept in :attr:`pruned_channels` (to rebuild it)."""
        from rcomp.surgery import fold_weight_masks, remove_channels

        if not self.frozen or (self.controller is not None and not self.controller.satisfied()):
            self.freeze()
        if self.masks.regularity == "channel":
            pruned = remove_channels(self.masked, self.example)
        else:
            pruned = fold_weight_masks(self.masked)
        self.pruned_channels = pruned.pruned_channels
        return pruned.model

    # ---------------------------------------------------------------- reports and checkpoints
    def status(self) -> dict:
        """Ops and params of the network the hard masks describe now, against the dense model
        and the budget (:meth:`BudgetController.status`), with the pruner's progress and the
        channel groups left unpruned as unsafe (``skipped``: root module, reason)."""
        if self.controller is not None:
            status = self.controller.status()
        else:
            with torch.no_grad():
                v = self.cost.values()
            ops, params = float(v["ops"]), float(v["params"])
            dense_ops, dense_params = self.cost.dense_ops, self.cost.dense_params
            status = {"ops": int(round(ops)), "params": int(round(params)), "dense_ops": int(round(dense_ops)),
                      "dense_params": int(round(dense_params)), "ops_ratio": ops / dense_ops,
                      "params_ratio": params / dense_params, "constraints": [], "satisfied": True}
        skipped = list(getattr(self.masks, "skipped", []))  # coupled groups left whole as unsafe, with why
        return dict(status, step=self.steps, total_steps=self.total_steps, learning=self.learning, frozen=self.frozen,
                    skipped=skipped)

    def state_dict(self) -> dict:
        """The pruner's own progress (the masks are in ``model.state_dict()``): plain values only."""
        return {"step": self.steps, "frozen": self.frozen, "projection": self.projection,
                "budget": self.controller.state_dict() if self.controller is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; load ``model.state_dict()`` first (the masks, and the
        weights a mask start at this very step reads)."""
        self.steps, self.frozen = int(state["step"]), bool(state["frozen"])
        self.projection = state.get("projection")
        if self.controller is not None and state.get("budget") is not None:
            self.controller.load_state_dict(state["budget"])
        if self.frozen:
            self.masks.freeze()
        elif self.steps == self.start_step and self.steps > 0:
            self.init_masks()  # from the loaded weights, as the run did (the same masks again)
        self._on_before = None
        self._sync_requires_grad()

    # ---------------------------------------------------------------- internals
    def budget_gradient_scale(self) -> list[torch.Tensor] | None:
        """Per-unit factors ``(cost_i / mean cost) ** -cost_exponent`` for the budget gradient.

        The budget gradient of a unit is proportional to its cost, and the channels of a residual
        stream cost ~14x a block-internal channel in ResNet20 (they feed every block of a stage).
        With the raw gradient those channels were pruned first and together — 15 of 16 within a few
        steps, accuracy at chance — before the task loss could resist. An exponent of 1 would rank
        units by learned importance alone; 0.5 keeps the pruning cost-aware but lets importance win.
        """
        if self.controller is None or self.cost_exponent == 0 or self.masks.regularity != "channel":
            return None
        params = list(self.masks.params)
        value = sum(self.cost.value(c.metric) / c.limit for c in self.controller.constraints)
        grads = torch.autograd.grad(value, params, allow_unused=True)
        flat = torch.cat([g.abs().flatten() if g is not None else torch.zeros(p.numel(), device=p.device)
                          for g, p in zip(grads, params)])
        mean = flat[flat > 0].mean() if bool((flat > 0).any()) else torch.tensor(1.0)
        scales = []
        for g, p in zip(grads, params):
            c = g.detach().abs() if g is not None else torch.zeros_like(p)
            scales.append(((c / mean).clamp_min(1e-3) ** -self.cost_exponent).clamp(0.05, 20.0))
        return scales

    def _sync_requires_grad(self) -> None:
        """The masks take gradients only in the steps that train them, from ``mask_start`` to the freeze.

        Outside those steps each mask is a constant 0/1 per unit, which :meth:`MaskSet.binary`
        then reuses instead of binarizing it again in every forward: the same numbers, less work.
        """
        learning = self.learning
        if any(p.requires_grad != learning for p in self.masks.params):
            self.masks.freeze(not learning)

    def _magnitude_scores(self) -> list[torch.Tensor]:
        if self.masks.regularity == "channel":
            from rcomp.posttrain import magnitude_scores

            return magnitude_scores(self.masked.model, self.masks, self.example.to(self.device))
        return self.masks.weight_magnitudes()


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _profile(budget):
    """The profile a budget names (a Profile, or a name or path of one), else None."""
    if budget is None or isinstance(budget, Mapping):
        return None
    if isinstance(budget, (str, os.PathLike)):
        from rcomp.config import resolve_profile

        return resolve_profile(budget)
    if hasattr(budget, "budgets") and hasattr(budget, "target"):
        return budget
    raise RcompError(f"budget must be a dict ({', '.join(BUDGET_KEYS)}) or a profile, got {type(budget).__name__}")


def _constraints(cost: CostModel, budget, profile) -> list:
    if profile is not None:
        return constraints_from_profile(cost, profile)
    if not budget:
        return []
    unknown = sorted(set(budget) - set(BUDGET_KEYS))
    if unknown:
        raise RcompError(f"unknown budget key {', '.join(map(repr, unknown))}; expected {', '.join(BUDGET_KEYS)} "
                         "(ops/params: fractions of the dense model; mops: millions of MACs; param_count: parameters)")
    return constraints_from_targets(cost, **{BUDGET_KEYS[k]: v for k, v in budget.items() if v is not None})


def _validate(total_steps, regularity, channel_multiple, min_keep, min_keep_stream, mask_start, mask_init,
              freeze_at, max_switch_off) -> None:
    """The argument errors a run would otherwise meet later, as one-line RcompErrors now."""
    if not isinstance(total_steps, int) or total_steps < 1:
        raise RcompError(f"total_steps must be a positive integer (the run's optimizer steps), got {total_steps!r}")
    if regularity not in ("channel", "weight"):
        raise RcompError(f"unknown regularity {regularity!r}; expected 'channel' or 'weight'")
    if int(channel_multiple) < 1 or (int(channel_multiple) > 1 and regularity == "weight"):
        raise RcompError(f"channel_multiple must be at least 1 (and 1 for weight masks), got {channel_multiple}")
    if not 0.0 <= min_keep <= 1.0 or (min_keep_stream is not None and not 0.0 < min_keep_stream <= 1.0):
        raise RcompError(f"min_keep must be in [0, 1] and min_keep_stream in (0, 1], got {min_keep}, {min_keep_stream}")
    if mask_init not in MASK_INITS:
        raise RcompError(f"unknown mask_init {mask_init!r}; expected {' or '.join(MASK_INITS)}")
    if not 0.0 <= mask_start < freeze_at:
        raise RcompError(f"mask_start must be in [0, freeze_at={freeze_at}), got {mask_start}")
    if not 0.0 < max_switch_off <= 1.0:
        raise RcompError(f"max_switch_off must be a fraction in (0, 1], got {max_switch_off}")
