"""Post-train robust pruning: the three-stage baseline the poster compares against.

1. FastAT-train the dense model (``dense_fraction`` of the epochs),
2. prune channel groups to the ops/params target by group magnitude — torch-pruning's
   ``GroupMagnitudeImportance`` (L1 over every layer of a coupled group, normalised per group so
   groups compare), removing the least important channels one at a time until every constraint
   holds and then re-admitting the most important ones that still fit (the same greedy projection
   in-train pruning ends with, so both methods land equally close to the target),
3. FastAT fine-tune the physically pruned model for the remaining epochs.

With the default split the total epoch budget equals the in-train run's, so the comparison is fair;
``finetune_epochs`` gives the method its own schedule instead (a fully trained dense model, then
fine-tuning), whose dense phase is the dense baseline's own training.
Each phase checkpoints into its own folder and a resumed run continues where it stopped; the
pruned architecture is saved between phases 2 and 3 so phase 3 can be rebuilt on resume.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from rcomp.budget import BudgetController, CostModel, constraints_from_targets, latency_constraints
from rcomp.masks import attach_masks, build_dependency_graph
from rcomp.surgery import PrunedModel, load_pruned, remove_channels, save_pruned
from rcomp.train import set_channel_floors, train_seconds

#: Share of the epochs spent on dense training; the rest fine-tunes the pruned model.
DENSE_FRACTION = 2 / 3


@dataclass
class PostTrainResult:
    """Same fields as ``rcomp.train.TrainResult`` plus what the pruning step removed."""

    model: nn.Module
    history: list = field(default_factory=list)
    best_epoch: int | None = None
    co_events: list = field(default_factory=list)
    budget_status: dict | None = None
    projection: dict | None = None
    wall_seconds: float = 0.0
    resumed_from: int | None = None
    pruned_channels: list = field(default_factory=list)
    phase_seconds: dict = field(default_factory=dict)
    dense_history: list = field(default_factory=list)  # phase 1's epoch logs, as dicts


def split_epochs(epochs: int, dense_fraction: float = DENSE_FRACTION,
                 finetune_epochs: int | None = None) -> tuple[int, int]:
    """(dense, fine-tune) epochs; both phases get at least one epoch.

    By default ``epochs`` is split, so the method costs the in-train run's epochs. With
    ``finetune_epochs`` the method runs on its own schedule instead: a dense model trained for all
    ``epochs`` (the dense baseline itself), then that many fine-tuning epochs on top.
    """
    if finetune_epochs is not None:
        return epochs, finetune_epochs
    if epochs < 2:
        raise ValueError("post-train pruning needs at least 2 epochs (train, then fine-tune)")
    dense = min(max(1, round(epochs * dense_fraction)), epochs - 1)
    return dense, epochs - dense


def magnitude_scores(model: nn.Module, masks, example_input: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel group-magnitude importance for every mask group, from torch-pruning."""
    dg = build_dependency_graph(model, example_input)
    importance = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="mean")
    modules = dict(model.named_modules())
    scores = []
    for group in masks.groups:
        root = modules[group.name]
        handler = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        pg = dg.get_pruning_group(root, handler, idxs=list(range(group.size)))
        scores.append(importance(pg).detach().float().cpu())
    return scores


def budgeted_masks(model: nn.Module, config, example_input: torch.Tensor, source: str):
    """Channel masks on a trained dense model, with its cost model and the config's budgets.

    Shared by the post-train baselines (magnitude here, the RL search in :mod:`rcomp.rl`), so both
    prune under the same per-group floor and the same constraints as in-train pruning.
    """
    masked = attach_masks(model, "channel", example_input)
    set_channel_floors(masked.masks, config)
    cost = CostModel.build(masked, example_input)
    constraints = constraints_from_targets(cost, target_ops=config.target_ops, target_params=config.target_params,
                                           mops=config.mops, params=config.params, source=source)
    constraints += latency_constraints(cost, config, source=source)
    return masked, cost, constraints


def prune_by_magnitude(model: nn.Module, config, example_input: torch.Tensor) -> tuple[PrunedModel, dict]:
    """Meet the config's budget on a trained dense model by removing low-magnitude channel groups."""
    masked, cost, constraints = budgeted_masks(model, config, example_input, "posttrain")
    for i, score in enumerate(magnitude_scores(model, masked.masks, example_input)):
        with torch.no_grad():
            masked.masks.params[i].copy_(score.clamp_min(1e-6))  # all on; the value is the importance
    controller = BudgetController(cost, constraints)
    projection = controller.project()
    return remove_channels(masked, example_input), {"projection": projection, "status": controller.status()}


@dataclass
class PruneOutcome:
    """What a post-train pruning step hands back to :func:`train_in_three_phases`.

    ``extra`` is method-specific and JSON-plain (the RL search summary, say): it is saved with the
    pruned stage, so a resumed run gets it back without pruning again.
    """

    pruned: PrunedModel
    status: dict
    projection: dict
    seconds: float
    extra: dict = field(default_factory=dict)


def train_in_three_phases(config, bundle, model: nn.Module, *, method: str, phase: str,
                          prune: Callable[[nn.Module], PruneOutcome], model_name: str, model_kwargs: dict, out_dir,
                          resume: bool = False, log=print, pretrained: bool = False) -> tuple[PostTrainResult, dict]:
    """Dense robust training, a pluggable prune step, robust fine-tuning: every post-train method.

    The epochs are split by :func:`split_epochs`, so the total equals ``config.epochs`` (the
    in-train run's), unless ``config.finetune_epochs`` asks for the method's own schedule. The
    pruned network is saved as ``<method>-pruned.pt`` between phases 2 and 3, and each training
    phase checkpoints per epoch, so a resumed run skips what is done.
    ``phase_seconds`` charges each phase its time across resumes (``dense``, ``phase``, ``finetune``,
    ``total``), which is what the comparison with in-train pruning's single run needs.
    Returns the result and the stage's metadata (with ``extra`` merged in).
    ``pretrained`` (``--weights``): the model is trained already, so phase 1 is skipped and the prune
    step starts from it; the fine-tuning gets ``finetune_epochs`` or else all ``config.epochs``.
    """
    out_dir = Path(out_dir)
    if pretrained:
        dense_epochs, tune_epochs = 0, config.finetune_epochs or config.epochs
    else:
        dense_epochs, tune_epochs = split_epochs(config.epochs, finetune_epochs=config.finetune_epochs)
    dense_cfg = dataclasses.replace(config, epochs=dense_epochs, regularity=None, target_ops=None,
                                    target_params=None, mops=None, params=None, target_latency=None, latency_p90_ms=None,
                                    slim_at_freeze=False, finetune_epochs=None)
    started = time.perf_counter()
    stage = out_dir / f"{method}-pruned.pt"
    if resume and stage.exists():
        pruned, meta = _load_stage(stage, log, method)
    else:
        dense, dense_seconds = _dense_phase(dense_cfg, bundle, model, out_dir, resume, log, method, pretrained)
        outcome = prune(dense.model.cpu().eval())
        pruned = outcome.pruned
        meta = json.loads(json.dumps({
            "status": outcome.status, "projection": outcome.projection, **outcome.extra,
            "history": [dataclasses.asdict(h) for h in dense.history], "co_events": list(dense.co_events),
            "phase_seconds": {"dense": dense_seconds, phase: outcome.seconds},
        }))
        save_pruned(stage, pruned, model_name=model_name, model_kwargs=model_kwargs,
                    input_shape=tuple(bundle.input_shape), extra=meta)
    log(f"{method}: phase 3/3, robust fine-tuning for {tune_epochs} epochs")
    t0 = time.perf_counter()
    tuned = _train(dataclasses.replace(dense_cfg, epochs=tune_epochs), bundle, pruned.model, out_dir / "finetune",
                   resume, log)
    phases = dict(meta["phase_seconds"], finetune=train_seconds(tuned, time.perf_counter() - t0))
    phases["total"] = phases["dense"] + phases[phase] + phases["finetune"]
    result = PostTrainResult(
        model=tuned.model, history=tuned.history, best_epoch=tuned.best_epoch,
        co_events=meta["co_events"] + list(tuned.co_events), budget_status=meta["status"],
        projection=meta["projection"], wall_seconds=time.perf_counter() - started, resumed_from=tuned.resumed_from,
        pruned_channels=pruned.pruned_channels, phase_seconds=phases, dense_history=meta["history"],
    )
    return result, meta


def _dense_phase(dense_cfg, bundle, model, out_dir: Path, resume: bool, log, method: str, pretrained: bool):
    """Phase 1 (the trained dense model and its seconds), or the given model as is when it is ``pretrained``."""
    if pretrained:
        from types import SimpleNamespace

        log(f"{method}: phase 1/3 skipped, starting from the given weights (--weights)")
        return SimpleNamespace(model=model, history=[], co_events=[]), 0.0
    log(f"{method}: phase 1/3, dense robust training for {dense_cfg.epochs} epochs")
    t0 = time.perf_counter()
    dense = _train(dense_cfg, bundle, model, out_dir / "dense", resume, log)
    return dense, train_seconds(dense, time.perf_counter() - t0)


def _train(config, bundle, model, out_dir: Path, resume: bool, log):
    from rcomp.train import train

    return train(config, bundle, model, out_dir=out_dir, resume=resume, log=log)


def _load_stage(path: Path, log, method: str) -> tuple[PrunedModel, dict]:
    model, meta = load_pruned(path)
    log(f"{method}: resuming fine-tuning of {path}")
    extra = dict(meta["extra"])
    extra.update(extra.pop("prune", {}))  # stages written before the shared driver nested status/projection
    return PrunedModel(model, [tuple(p) for p in meta["pruned_channels"]], "channel", 0.0), extra


def train_posttrain(config, bundle, model: nn.Module, *, model_name: str, model_kwargs: dict, out_dir,
                    resume: bool = False, log=print, pretrained: bool = False) -> PostTrainResult:
    """Dense FastAT, group-magnitude pruning to the budget, FastAT fine-tuning (same total epochs)."""
    example = torch.rand(1, *bundle.input_shape)

    def prune(dense: nn.Module) -> PruneOutcome:
        t0 = time.perf_counter()
        pruned, info = prune_by_magnitude(dense, config, example)
        log(f"posttrain: phase 2/3, pruned to ops ratio {info['status']['ops_ratio']:.3f}")
        return PruneOutcome(pruned, info["status"], info["projection"], time.perf_counter() - t0)

    result, _ = train_in_three_phases(config, bundle, model, method="posttrain", phase="prune", prune=prune,
                                      model_name=model_name, model_kwargs=model_kwargs, out_dir=out_dir,
                                      resume=resume, log=log, pretrained=pretrained)
    return result
