"""One training loop for every method: plain, robust (FastAT / N-FGSM) and robust in-train pruning.

Per step: (augment) → training attack on the current model in train mode (as Wong et al. do) →
``CE(model(x_adv), y) + budget penalty`` → backward → SGD step → the masks' rules. The masks, the
budget and those rules are :class:`rcomp.pruner.InTrainPruner`'s, the object the Python API gives
users for their own loops; this module adds the data, the schedule, the guard and checkpoints.
Masks are ordinary parameters in the same optimizer and share the weights' weight decay (the
poster's "regularize masks along with the weights"). At ``freeze_fraction`` of the steps the budget
controller projects the hard masks onto the budget once and the masks freeze; the weights then keep
training on the final architecture, so the network that is evaluated and exported is the one that
was fine-tuned.
With ``mask_start`` > 0 the run begins dense (masks on and still, no budget) and the masks start
learning at that fraction of the steps, optionally from group magnitude (``mask_init``); the budget
schedule then starts from there. With ``slim_at_freeze`` the channels the frozen masks switch off
are removed right at the freeze (torch-pruning, as the shipped model's are), so the steps after it
train the smaller network instead of the whole masked one: the same network at the cut (float
rounding differs from there on), in less time per step.

Reproducibility: data order, augmentation and every attack draw from generators seeded by
``(seed, epoch)`` only, and checkpoints carry every global RNG state, so a run resumed from its
last epoch checkpoint ends with exactly the weights of an uninterrupted run (CPU).

Catastrophic-overfitting guard (Wong et al.'s early stop, adapted): each epoch PGD and FGSM
accuracy are measured on a fixed training batch. Catastrophic overfitting (FGSM-robust, PGD-broken)
shows in three ways: PGD collapsing by more than ``co_drop`` below its best while FGSM holds, or, with
no good epoch to compare with (it has struck in the first epoch here), PGD far below FGSM on the
same batch at the same moment, or far below the epoch's accuracy on its own training attack
(:func:`is_catastrophic_overfitting`). On an event the guard restores
the best state (weights, BatchNorm statistics, masks and the budget's multipliers), if there is one,
and takes one step down a ladder of milder training rather than stopping, because stopping before
the masks are projected would leave a pruned model that was never fine-tuned: FGSM-RS → N-FGSM →
N-FGSM at half the learning rate; an event at the bottom stops the run like Wong et al. The
returned model is then the best state since the architecture was last changed; if there is none, or
the masks have not frozen yet, there is no finished model to return and the run fails
(:class:`~rcomp.errors.TrainingCollapse`, exit 3).

Data parallel (``torchrun``, :mod:`rcomp.distributed`): every rank holds the whole MaskedModel and
takes a strided share of each global batch (``batch_size`` stays the global batch, so a recipe
means the same on 1 or N ranks). The loss forward runs through DistributedDataParallel, which
averages every gradient, masks' included; the budget term's gradient depends only on the masks,
identical on every rank, so its average is itself. Attacks run on the
unwrapped model (they differentiate w.r.t. the input only). BatchNorm is per rank; running
statistics are averaged at the end of each epoch. Evaluation is sharded and its counts summed,
so every decision (CO guard, projection, stopping) is taken identically on all ranks, which
therefore stay bit-identical. Rank 0 alone logs, writes checkpoints and, on resume, reads one and
broadcasts it.

CUDA: ``amp`` trains (attack and loss forward) under fp16 autocast with a GradScaler; evaluation
attacks stay fp32. Models use channels_last and batches come from pinned memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rcomp import distributed
from rcomp.attacks import ATTACKS, AccuracyResult, evaluate, fgsm, pgd
from rcomp.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from rcomp.errors import CheckpointError, ConfigError, NumericalError, RcompError, TrainingCollapse
from rcomp.recipe import (MACHINE_FIELDS, AttackConfig, BudgetConfig, GuardConfig, MaskConfig, OptimizerConfig,
                          RunConfig, ScheduleConfig, reject_removed_keys, validate_recipe)

#: Training examples of the fixed batch the guard attacks every epoch.
GUARD_SIZE = 256


@dataclass
class TrainConfig(RunConfig, GuardConfig, MaskConfig, OptimizerConfig, BudgetConfig, AttackConfig, ScheduleConfig):
    """A training recipe: the keys of every group in :mod:`rcomp.recipe`, flat (``cfg.eps``, recipe
    YAML keys, train.json's "recipe"), in the order a user reads them: the schedule, the attack and
    the budget, then the expert groups (optimizer, masks, guard) and the machine. The bases are
    listed in reverse because a dataclass collects its fields from the last base first.
    :meth:`validate` checks each group in one place (:func:`rcomp.recipe.validate_recipe`)."""

    def validate(self) -> None:
        validate_recipe(self)


def set_channel_floors(masks, config: TrainConfig) -> None:
    """Give channel masks the config's floors and width multiple, so in-train pruning, the post-train
    baselines and the final projection all choose each group's width from the same set."""
    masks.min_keep_fraction = config.min_keep
    masks.min_keep_stream_fraction = config.min_keep_stream
    masks.channel_multiple = config.channel_multiple


@dataclass
class EpochLog:
    """One epoch. ``train_acc``: clean accuracy on the guard's fixed training batch (eval mode);
    ``train_adv_acc``: running accuracy on the batches the loss saw (attacked, train mode);
    ``train_fgsm`` / ``train_pgd``: the guard's measurements. ``val_*`` are None on epochs
    skipped by ``eval_every``. ``ops`` is None for dense runs (ratios are then 1)."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    train_adv_acc: float
    val_clean: float | None
    val_pgd: float | None
    ops: float | None
    params: float | None
    ops_ratio: float
    params_ratio: float
    mask_density: float
    masks_flipped: float
    penalty: float
    seconds: float
    guard: str | None = None
    train_fgsm: float | None = None
    train_pgd: float | None = None
    attack: str = ""
    multipliers: list[float] | None = None  # the budget's Lagrange multipliers at the end of the epoch


@dataclass
class TrainResult:
    model: nn.Module
    history: list[EpochLog]
    best_epoch: int | None  # the epoch whose weights ``model`` holds
    co_events: list[str]
    budget_status: dict | None
    projection: dict | None
    wall_seconds: float
    resumed_from: int | None
    pruned_channels: list | None = None  # set when ``model`` is already slim (``slim_at_freeze``): its removals


def train_seconds(result: TrainResult, wall: float) -> float:
    """Wall time of a training run across resumes: its logged epochs before the resume plus ``wall``.

    ``wall`` is this process's share; a resumed run's earlier epochs were timed by the processes
    that trained them and kept in the checkpoint's history.
    """
    before = result.history[: result.resumed_from] if result.resumed_from else []
    return sum(h.seconds for h in before) + wall


# --------------------------------------------------------------------------------------------
# pure helpers


def lr_at(config: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` in [0, 1] of all optimizer steps."""
    p = min(max(progress, 0.0), 1.0)
    if config.schedule == "cosine":
        return 0.5 * config.lr_max * (1.0 + math.cos(math.pi * p))
    peak = config.peak_fraction
    return config.lr_max * (p / peak if p <= peak else (1.0 - p) / (1.0 - peak))


def lr_at_step(config: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (1-based) of ``total_steps``."""
    return lr_at(config, step / total_steps)


def stream_seed(seed: int, epoch: int, stream: int) -> int:
    """A seed that depends only on (seed, epoch, stream): what makes resumed epochs identical."""
    return (int(seed) * 1_000_003 + int(epoch) * 10_007 + int(stream) * 101 + 12345) % (2**63 - 1)


def is_catastrophic_overfitting(pgd_acc: float, fgsm_acc: float, best_pgd: float, fgsm_at_best: float,
                                co_drop: float = 0.2, fgsm_tolerance: float = 0.05,
                                train_adv_acc: float | None = None) -> bool:
    """PGD fell more than ``co_drop`` below its best while FGSM did not fall (beyond noise), or
    PGD is far below FGSM right now (:func:`pgd_broken_under_fgsm`), or far below the accuracy
    on the training attack's own examples (:func:`pgd_broken_under_training_attack`).

    Both falling together is ordinary instability (too high an LR, pruning pressure), which
    restoring weights would not cure; FGSM holding while PGD collapses is the FGSM-only
    robustness of catastrophic overfitting.
    """
    dropped = best_pgd >= 0 and pgd_acc < best_pgd - co_drop and fgsm_acc >= fgsm_at_best - fgsm_tolerance
    return (dropped or pgd_broken_under_fgsm(pgd_acc, fgsm_acc)
            or (train_adv_acc is not None and pgd_broken_under_training_attack(pgd_acc, train_adv_acc, fgsm_acc)))


def pgd_broken_under_training_attack(pgd_acc: float, train_adv_acc: float, fgsm_acc: float, gap: float = 0.15,
                                     ratio: float = 0.25, attack_gap: float = 0.05) -> bool:
    """PGD accuracy on the guard batch below ``ratio`` of the epoch's accuracy on its training attack.

    The model has learned to resist the one attack it trains on and nothing else: the defining
    symptom of catastrophic overfitting, even when FGSM without a random start is fooled too and
    the FGSM rules see "both fell". Measured on CIFAR-10 ResNet20 at seed 0 (dense, N-FGSM, peak LR
    0.15): epoch 2 trained at 42.0 % adversarial accuracy while the guard's PGD was 0.0 % and FGSM
    9.8 %, which neither FGSM rule caught. In the 39 healthy epochs logged under ``bench/runs`` the
    training-attack accuracy (a running mean over the epoch) was at most 2.4 points above the
    guard's PGD. The thresholds are wider than the FGSM rule's, because an epoch of heavy pruning
    legitimately ends below its own running mean. PGD must also beat FGSM by ``attack_gap``: a
    network broken as a whole (BatchNorm's running statistics lagging after an epoch that pruned
    half the ops: the digits ResNet20 of the main job, guard FGSM = PGD = 16.4 % against 83.3 %
    training accuracy) is fooled no more by many steps than by one, and restoring would not help.
    """
    return pgd_acc < ratio * train_adv_acc and train_adv_acc - pgd_acc >= gap and fgsm_acc - pgd_acc >= attack_gap


def pgd_broken_under_fgsm(pgd_acc: float, fgsm_acc: float, gap: float = 0.1, ratio: float = 0.5) -> bool:
    """PGD accuracy below ``ratio`` of FGSM accuracy and ``gap`` under it, on the same batch.

    The drop rule needs a good epoch to compare with and a best PGD above ``co_drop``; on CIFAR-10
    at short schedules catastrophic overfitting struck in the first epoch (guard FGSM 29 %, PGD 2 %)
    and at a best PGD of 16 % (FGSM 12 %, PGD 0.8 %), where it saw nothing. FGSM is one step of the
    PGD attack, so on a model whose loss surface is not distorted the two stay within a few points
    (at most 3.5 points in the 76 healthy epochs of 13 logged ResNet20 runs); the ``gap`` keeps
    near-chance models out.
    """
    return pgd_acc < ratio * fgsm_acc and fgsm_acc - pgd_acc >= gap


@dataclass
class CatastrophicOverfittingGuard:
    """Best-so-far PGD accuracy on the guard batch, the state it was reached with, and events."""

    co_drop: float = 0.2
    fgsm_tolerance: float = 0.05
    best_pgd: float = -1.0
    fgsm_at_best: float = 0.0
    best_epoch: int | None = None
    best_state: dict | None = None
    fired: int = 0

    def observe(self, epoch: int, pgd_acc: float, fgsm_acc: float, state_fn: Callable[[], dict],
                train_adv_acc: float | None = None) -> bool:
        """True on catastrophic overfitting; otherwise remember ``state_fn()`` if this is a new best."""
        if is_catastrophic_overfitting(pgd_acc, fgsm_acc, self.best_pgd, self.fgsm_at_best, self.co_drop,
                                       self.fgsm_tolerance, train_adv_acc):
            self.fired += 1
            return True
        if pgd_acc >= self.best_pgd:
            self.best_pgd, self.fgsm_at_best, self.best_epoch = pgd_acc, fgsm_acc, epoch
            self.best_state = state_fn()
        return False

    def reset(self) -> None:
        """Forget the best: after the architecture changed, earlier states are not comparable."""
        self.best_pgd, self.fgsm_at_best, self.best_epoch, self.best_state = -1.0, 0.0, None, None

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best_pgd", "fgsm_at_best", "best_epoch", "best_state", "fired")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# the trainer


def train(config: TrainConfig, bundle, model: nn.Module, *, out_dir: str | Path | None,
          resume: bool = False, log: Callable[[str], None] = print) -> TrainResult:
    """Train ``model`` on ``bundle`` as ``config`` says; see the module docstring for the method.

    Under torchrun (WORLD_SIZE > 1) this joins the process group and trains data-parallel.
    """
    return _Trainer(config, bundle, model, out_dir, log).run(resume)


class _Trainer:
    def __init__(self, config: TrainConfig, bundle, model: nn.Module, out_dir, log):
        config.validate()
        self.cfg, self.bundle, self.log = config, bundle, distributed.main_only(log)
        self.world = distributed.init(distributed.resolve_device(config.device))
        self.device = torch.device(distributed.resolve_device(distributed.device_for(config.device, self.world)))
        self._check_world()
        torch.manual_seed(config.seed)
        self.train_set = bundle.split("train")
        self.steps_per_epoch = len(self._loader(0))
        self.total_steps = config.epochs * self.steps_per_epoch
        self.pruner = self._pruner(model.to(self.device))
        self.model = self.pruner.model if self.pruner is not None else model
        self.masks = self.pruner.masks if self.pruner is not None else None
        self.cost = self.pruner.cost if self.pruner is not None else None
        self.controller = self.pruner.controller if self.pruner is not None else None
        self.masked = self.model  # the MaskedModel, also once self.model is the slim network
        self.pruned_channels: list | None = None  # the removals once slim (slim_at_freeze)
        self.net = self.model  # the DistributedDataParallel wrapper once run() starts
        self.amp, self.channels_last = config.amp and self.device.type == "cuda", self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = self._optimizer()
        self.guard = CatastrophicOverfittingGuard(config.co_drop)
        self.ckpt = CheckpointManager(Path(out_dir) / "checkpoints", warn=log) if out_dir is not None else None
        self.global_step, self.epoch, self.stopped = 0, 0, False
        self.attack = config.attack
        self.lr_factor = 1.0  # halved by the guard's last rung (see _on_overfitting)
        self.history: list[EpochLog] = []
        self.co_events: list[str] = []
        self.returned_epoch: int | None = None
        self.guard_batch = _stack(_subset(self.train_set, GUARD_SIZE, config.seed))
        self.val_set = _subset(bundle.split("val"), config.eval_size, config.seed)

    # ---------------------------------------------------------------- setup
    def _check_world(self) -> None:
        if self.cfg.batch_size < self.world.size:
            raise ConfigError(f"batch_size {self.cfg.batch_size} is smaller than the {self.world.size} ranks; "
                              "it is the global batch, shared among the ranks", key="batch_size")
        if self.cfg.amp and self.device.type != "cuda":
            self.log("amp: mixed precision is CUDA only; training in fp32")

    def _wrap_ddp(self) -> None:
        """(Re)wrap for data parallelism: DDP reduces only parameters that train, so again once masks freeze."""
        self.net = self.model  # drop the previous wrapper (and its gradient hooks) first
        self.net = distributed.wrap(self.model, self.device)
        self._ddp_masks_learning = self.pruner is not None and self.pruner.learning

    def _sync_ddp(self) -> None:
        """Wrap again when the masks started or froze since the last wrap (the pruner's step does
        both): training data-parallel, DDP reduces only the parameters that train."""
        if self.net is not self.model and self.pruner is not None and self.pruner.learning != self._ddp_masks_learning:
            self._wrap_ddp()

    def _pruner(self, model: nn.Module):
        """The masks, budget and per-step mask rules of in-train pruning (:class:`rcomp.pruner.InTrainPruner`,
        the object the Python API gives users), from this run's config; None for a dense run."""
        from rcomp.budget import latency_constraints
        from rcomp.masks import MaskedModel
        from rcomp.pruner import InTrainPruner

        if self.cfg.regularity is None and not isinstance(model, MaskedModel):
            return None
        c = self.cfg
        budget = {"ops": c.target_ops, "params": c.target_params, "mops": c.mops, "param_count": c.params}
        return InTrainPruner(
            model, torch.zeros(1, *self.bundle.input_shape, device=self.device), budget,
            total_steps=self.total_steps, regularity=c.regularity or model.masks.regularity,
            channel_multiple=c.channel_multiple, min_keep=c.min_keep, min_keep_stream=c.min_keep_stream,
            mask_start=c.mask_start, mask_init=c.mask_init, warmup=c.warmup_fraction, freeze_at=c.freeze_fraction,
            max_switch_off=c.max_switch_off, cost_exponent=c.cost_exponent, penalty_weight=c.penalty_weight,
            dual_lr=c.dual_lr, dual_reset=c.dual_reset, mask_weight_decay=c.mask_weight_decay,
            extra_constraints=lambda cost: latency_constraints(cost, c), log=self.log)

    @property
    def frozen(self) -> bool:
        """Whether the masks are projected and frozen (the pruner's state)."""
        return self.pruner is not None and self.pruner.frozen

    @property
    def start_step(self) -> int:
        """The step the masks start learning at (``mask_start`` of the steps)."""
        return self.pruner.start_step if self.pruner is not None else 0

    @property
    def projection(self) -> dict | None:
        """The freeze's projection report, once the masks froze."""
        return self.pruner.projection if self.pruner is not None else None

    def _optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        if self.pruner is not None:
            slim = self.model.parameters() if self.pruned_channels is not None else None
            groups = self.pruner.param_groups(weight_decay=c.weight_decay, weights=slim)
        else:
            groups = [{"params": list(self.model.parameters())}]
        return torch.optim.SGD(groups, lr=c.lr_max, momentum=c.momentum, weight_decay=c.weight_decay,
                               nesterov=c.nesterov and c.momentum > 0)

    def _loader(self, epoch: int):
        from rcomp.data import make_loader

        return make_loader(self.train_set, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed, epoch=epoch,
                           num_workers=self._workers(), pin_memory=self.device.type == "cuda",
                           rank=self.world.rank, world_size=self.world.size)

    def _workers(self) -> int:
        """``num_workers`` as given; on CUDA with images decoded per batch, a few so decoding overlaps the GPU."""
        if self.cfg.num_workers or self.device.type != "cuda" or hasattr(self.train_set, "get_batch"):
            return self.cfg.num_workers
        return min(4, max(1, (os.cpu_count() or 1) // self.world.size))

    def _seed(self, epoch: int, stream: int) -> int:
        """Training streams differ per rank (rank 0 keeps the single-process seeds): shards get independent draws."""
        return stream_seed(self.cfg.seed, epoch, stream + 1000 * self.world.rank)

    # ---------------------------------------------------------------- main loop
    def run(self, resume: bool) -> TrainResult:
        started = time.perf_counter()
        resumed_from = self._resume() if resume else None
        self._wrap_ddp()
        while self.epoch < self.cfg.epochs and not self.stopped:
            self._run_epoch(self.epoch + 1)
        self._finish()
        return TrainResult(self.model, self.history, self.returned_epoch, self.co_events,
                           self.controller.status() if self.controller else None, self.projection,
                           time.perf_counter() - started, resumed_from, self.pruned_channels)

    def _run_epoch(self, epoch: int) -> None:
        t0 = time.perf_counter()
        before = self.masks.snapshot() if self.masks is not None else None
        stats = self._train_epoch(epoch)
        flipped = float((self.masks.snapshot() != before).float().mean()) if before is not None else 0.0
        record = self._epoch_record(epoch, stats, flipped)
        record.guard = self._guard(epoch, record)
        record.seconds = time.perf_counter() - t0
        self.history.append(record)
        self.epoch = epoch
        self.log(_format(record, self.cfg.epochs))
        if self.ckpt is not None and self.world.is_main:
            self.ckpt.save(self._state(), epoch)

    def _train_epoch(self, epoch: int) -> dict:
        from tqdm import tqdm

        loader = self._loader(epoch)
        g_aug = torch.Generator().manual_seed(self._seed(epoch, 1))
        g_att = torch.Generator(device=self.device).manual_seed(self._seed(epoch, 2))
        totals = {"loss": 0.0, "correct": 0, "n": 0, "penalty": 0.0, "steps": 0, "lr": 0.0}
        self.model.train()
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch}/{self.cfg.epochs}", leave=False,
                   disable=not self.cfg.progress or not self.world.is_main, unit="batch")
        for step, (x, y) in enumerate(bar, start=1):
            x = self._augment(x.to(self.device, non_blocking=True), g_aug)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self._step(x, y.to(self.device, non_blocking=True), epoch, step, g_att, totals)
        bar.close()
        distributed.average_buffers(self.model)
        totals["loss"], totals["correct"], totals["n"] = distributed.all_reduce_sum(
            [totals["loss"], totals["correct"], totals["n"]])  # the epoch log covers every rank's examples
        return totals

    def _augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not getattr(self.bundle, "augment", False):
            return x
        from rcomp.data import augment_batch

        return augment_batch(x, padding=max(1, round(x.shape[-1] / 8)), flip=self.cfg.hflip, generator=generator)

    def _step(self, x, y, epoch: int, step: int, g_att, totals: dict) -> None:
        """One optimizer step; the masks' part of it (budget term, switch-off limit, clipping,
        multipliers, start and freeze) is the pruner's, as in a user's own loop."""
        self._sync_ddp()
        lr = lr_at_step(self.cfg, self.global_step + 1, self.total_steps) * self.lr_factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        attack = ATTACKS[self.attack]
        with self._autocast():
            x_in = attack(self.model, x, y, eps=self.cfg.eps, alpha=self._alpha(), generator=g_att,
                          predicted_labels=self.cfg.attack_labels == "predicted") if attack else x
            logits = self.net(x_in)  # through DDP: this backward all-reduces the gradients
            loss = F.cross_entropy(logits, y)
        penalty = self.pruner.penalty() if self.pruner is not None else torch.zeros((), device=self.device)
        total = loss + penalty
        self._check_finite(total, "loss", epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        self._backward(total)
        self._clip_and_check(epoch, step)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        projection = self.pruner.step() if self.pruner is not None else None
        _accumulate(totals, lr, loss, penalty, logits, y)
        if projection is not None:
            self._freeze(f"at step {self.global_step}/{self.total_steps}", projection)

    def _autocast(self):
        """fp16 autocast for the training forwards (attack and loss) with ``amp`` on CUDA; evaluation stays fp32."""
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else contextlib.nullcontext()

    def _backward(self, total: torch.Tensor) -> None:
        """One backward of ``loss + penalty``: the budget term carries each mask's budget gradient,
        already scaled by its cost share (:meth:`InTrainPruner.penalty`).

        Under DDP this backward averages every gradient over the ranks, the masks' included; the
        budget gradient depends on the masks alone and is the same on every rank, so its average
        is itself and the ranks stay identical.
        """
        self.scaler.scale(total).backward()
        self.scaler.unscale_(self.optimizer)

    def _alpha(self) -> float | None:
        # after a guard switch to N-FGSM, a step size chosen for FGSM-RS no longer applies
        return self.cfg.alpha if self.attack == self.cfg.attack else None

    def _masks_learning(self) -> bool:
        """Whether the step being taken trains the masks (derived from the step: resumes need no flag)."""
        return self.global_step >= self.start_step

    def _check_finite(self, value: torch.Tensor, what: str, epoch: int, step: int) -> None:
        """Raise on a non-finite value on any rank: every rank stops at the same step, none waits forever."""
        if not distributed.all_true(bool(torch.isfinite(value).all())):
            where = f"epoch {epoch}, step {step} (global step {self.global_step + 1})"
            last = f"; last good checkpoint: epoch {self.epoch}" if self.ckpt is not None and self.epoch else ""
            raise NumericalError(f"non-finite {what} ({float(value.detach()):g}) at {where}{last}")

    def _clip_and_check(self, epoch: int, step: int) -> None:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        limit = self.cfg.grad_clip if self.cfg.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        if not self.amp:  # under AMP an overflow is the GradScaler's to handle: it skips the step
            self._check_finite(norm, "gradient norm", epoch, step)

    def _freeze(self, when: str, projection: dict | None = None) -> None:
        """After the masks are projected onto the budget and frozen (by the pruner's step, or here
        at the end of training): the architecture is final."""
        p = projection if projection is not None else self.pruner.freeze()
        if self.net is not self.model:  # still training data-parallel: the frozen masks leave DDP
            self._wrap_ddp()
        self.guard.reset()
        self.log(f"masks projected and frozen {when}: ops {p['ops_before']:,} -> {p['ops_after']:,}, "
                 f"params {p['params_before']:,} -> {p['params_after']:,}, {p['units_changed']} units changed")
        if self.cfg.slim_at_freeze:
            self._slim()

    def _slim(self, pruned_channels: list | None = None) -> None:
        """Train on from here without the channels the frozen masks switch off.

        After the freeze a masked network still computes every channel and zeroes the switched-off ones;
        removing them is what the shipped model gets anyway (:func:`rcomp.surgery.remove_channels`),
        done now so the remaining steps cost what the slim network costs. The momentum of each
        weight is cut by the same removals, so SGD goes on as if nothing happened. With
        ``pruned_channels`` (a resume) the removals are replayed instead of read off the masks,
        and the optimizer state then comes from the checkpoint.
        """
        from rcomp.surgery import apply_pruning, plain_copy, removed_channels

        resuming = pruned_channels is not None
        pruned_channels = pruned_channels if resuming else removed_channels(self.masks)
        example = torch.zeros(1, *self.bundle.input_shape, device=self.device)
        slim = apply_pruning(plain_copy(self.masked), pruned_channels, example)
        momentum = None if resuming else self._slim_momentum(pruned_channels, example)
        if self.channels_last:
            slim.to(memory_format=torch.channels_last)
        self.model, self.pruned_channels = slim, pruned_channels
        self.optimizer = self._optimizer()
        for p, buf in zip(self.model.parameters(), momentum or []):
            self.optimizer.state[p]["momentum_buffer"] = buf
        if self.net is not self.masked:  # training data-parallel: DDP now reduces the slim network's gradients
            self._wrap_ddp()
        else:
            self.net = self.model
        removed = sum(len(idxs) for _, idxs in pruned_channels)
        self.log(f"slim from here on: {removed} channels removed from {len(pruned_channels)} groups")

    def _slim_momentum(self, pruned_channels: list, example: torch.Tensor) -> list[torch.Tensor]:
        """The weights' momentum buffers, cut by ``pruned_channels``, in the slim network's parameter order.

        torch-pruning cuts parameters, not optimizer state; so the buffers are written into a copy
        of the network in place of its weights and that copy is pruned the same way. A weight
        without a buffer yet gets zeros, which SGD's first update treats as none (no dampening).
        """
        from rcomp.surgery import apply_pruning, plain_copy

        shadow = plain_copy(self.masked)
        with torch.no_grad():
            for held, p in zip(shadow.parameters(), self.masked.model.parameters()):
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                held.copy_(buf if buf is not None else torch.zeros_like(p))
        apply_pruning(shadow, pruned_channels, example)
        return [p.detach().clone() for p in shadow.parameters()]

    # ---------------------------------------------------------------- per-epoch measurements
    def _epoch_record(self, epoch: int, stats: dict, flipped: float) -> EpochLog:
        n = max(stats["n"], 1)
        val_clean = val_pgd = None
        if epoch % self.cfg.eval_every == 0 or epoch == self.cfg.epochs:
            val = self._val(epoch)
            val_clean, val_pgd = val.clean, val.adv
        ops, params, ops_ratio, params_ratio = self._cost()
        return EpochLog(
            epoch=epoch, lr=stats["lr"], train_loss=stats["loss"] / n, train_acc=float("nan"),
            train_adv_acc=stats["correct"] / n, val_clean=val_clean, val_pgd=val_pgd, ops=ops, params=params,
            ops_ratio=ops_ratio, params_ratio=params_ratio,
            mask_density=self.masks.density() if self.masks is not None else 1.0, masks_flipped=flipped,
            penalty=stats["penalty"] / max(stats["steps"], 1), seconds=0.0, attack=self.attack,
            multipliers=list(self.controller.multipliers) if self.controller is not None else None)

    def _val(self, epoch: int):
        from rcomp.data import make_loader

        g = torch.Generator(device=self.device).manual_seed(stream_seed(self.cfg.seed, epoch, 3))
        loader = make_loader(self._shard(self.val_set), max(self.cfg.batch_size, 100), shuffle=False, seed=self.cfg.seed,
                             epoch=0)
        steps = self.cfg.eval_pgd_steps
        return self._evaluate(loader, pgd, eps=self.cfg.eps, alpha=self._pgd_alpha(), steps=steps, generator=g)

    def _shard(self, data):
        """This rank's strided share of an evaluation set: a dataset or an (x, y) pair."""
        if not self.world.active:
            return data
        r, n = self.world.rank, self.world.size
        if isinstance(data, tuple):
            return tuple(t[r::n] for t in data)
        positions = list(range(r, len(data), n))
        return data.subset(positions) if hasattr(data, "subset") else torch.utils.data.Subset(data, positions)

    def _evaluate(self, data, attack=None, **kwargs) -> AccuracyResult:
        """``evaluate`` on this rank's share, counts summed over ranks: the same numbers on every rank."""
        local = evaluate(self.model, data, attack, **kwargs)
        if not self.world.active:
            return local
        clean, adv, n = distributed.all_reduce_sum([local.clean_correct, local.adv_correct or 0, local.n])
        has_adv = attack is not None
        return AccuracyResult(clean / max(n, 1), adv / max(n, 1) if has_adv else None, int(n), int(clean),
                              int(adv) if has_adv else None)

    def _pgd_alpha(self) -> float:
        """eps/4 (PGD-10's usual step); larger for fewer steps (Madry's 2.5*eps/steps) to reach the boundary."""
        return max(self.cfg.eps / 4, 2.5 * self.cfg.eps / max(self.cfg.eval_pgd_steps, 1))

    def _cost(self):
        if self.cost is None:
            params = float(sum(p.numel() for p in self.model.parameters()))
            return None, params, 1.0, 1.0
        with torch.no_grad():
            v = self.cost.values()
        ops, params = float(v["ops"]), float(v["params"])
        return ops, params, ops / self.cost.dense_ops, params / self.cost.dense_params

    def _guard(self, epoch: int, record: EpochLog) -> str | None:
        """Measure the guard batch; on catastrophic overfitting restore the best state."""
        record.train_acc, fgsm_acc, pgd_acc = self._guard_accuracies(epoch)
        if self.attack == "none":
            return None
        record.train_fgsm, record.train_pgd = fgsm_acc, pgd_acc
        if not self.cfg.co_guard or not self.guard.observe(epoch, pgd_acc, fgsm_acc, self._snapshot,
                                                           record.train_adv_acc):
            return None
        return self._on_overfitting(epoch, pgd_acc, fgsm_acc)

    def _guard_accuracies(self, epoch: int) -> tuple[float, float | None, float | None]:
        """(clean, FGSM, PGD) accuracy on the fixed training batch, in eval mode."""
        x, y = (t.to(self.device) for t in self._shard(self.guard_batch))
        if self.attack == "none":
            return self._evaluate((x, y)).clean, None, None
        g = torch.Generator(device=self.device).manual_seed(stream_seed(self.cfg.seed, epoch, 4))
        res_f = self._evaluate((x, y), fgsm, eps=self.cfg.eps)
        res_p = self._evaluate((x, y), pgd, eps=self.cfg.eps, alpha=self._pgd_alpha(),
                               steps=self.cfg.eval_pgd_steps, generator=g)
        return res_p.clean, res_f.adv, res_p.adv

    def _snapshot(self) -> dict:
        """What a guard restore rolls back: the weights (masks included) and the budget multipliers.

        The multipliers belong to the masks they were raised against: restored masks with the
        multipliers of the collapsed epoch would be pushed by a budget pressure they never saw.
        """
        budget = self.controller.state_dict() if self.controller is not None else None
        return {"model": _cpu_state(self.model), "budget": budget}

    def _restore_snapshot(self, snapshot: dict) -> None:
        if "budget" not in snapshot:  # checkpoints before the multipliers were kept hold the weights only
            snapshot = {"model": snapshot, "budget": None}
        self.model.load_state_dict(snapshot["model"])
        if self.controller is not None and snapshot["budget"] is not None:
            self.controller.load_state_dict(snapshot["budget"])

    def _on_overfitting(self, epoch: int, pgd_acc: float, fgsm_acc: float) -> str:
        """Restore the best state (if any) and take one rung down: N-FGSM, then half the LR, then stop."""
        g = self.guard
        if self.attack != "nfgsm":
            action = "continuing with N-FGSM"
        elif self.lr_factor == 1.0:
            action, self.lr_factor = "continuing with N-FGSM at half the learning rate", 0.5
        else:
            action, self.stopped = "stopping (Wong et al. early stop)", True
            self._refuse_an_unusable_stop(epoch, pgd_acc, fgsm_acc)
        if g.best_state is None:
            restored = "no earlier state to restore (kept the weights)"
        else:
            self._restore_snapshot(g.best_state)
            restored = f"best {g.best_pgd:.1%} at epoch {g.best_epoch}; restored epoch {g.best_epoch}'s weights"
            masks_never_started = g.best_epoch * self.steps_per_epoch <= self.start_step
            if self.masks is not None and self._masks_learning() and masks_never_started:
                self.pruner.init_masks()  # start them again from the restored weights, as at mask_start
        message = (f"catastrophic overfitting at epoch {epoch}: guard-batch PGD {pgd_acc:.1%}, FGSM {fgsm_acc:.1%} "
                   f"({restored}), {action}")
        self.log(f"warning: {message}")
        self.co_events.append(message)
        self.optimizer.state.clear()  # momentum points into the collapse
        self.attack = "nfgsm"
        return message

    def _refuse_an_unusable_stop(self, epoch: int, pgd_acc: float, fgsm_acc: float) -> None:
        """Fail instead of stopping when the state to return would not be a trained robust model.

        Wong et al.'s early stop returns the best state so far, which is a finished model only if
        its architecture is final: stopped before the masks froze, the run would project masks that
        never reached the budget onto it and return a pruned network that was never trained in that
        shape (measured: ResNet20 at 0.3 of the ops, 10.1 % clean accuracy). Without any best state,
        only the collapsed weights are left.
        """
        unfrozen = self.controller is not None and not self.frozen
        if not unfrozen and self.guard.best_state is not None:
            return
        why = ("before the masks froze, so no pruned model was trained in its final shape" if unfrozen
               else "with no healthy epoch to return")
        last = f"; last checkpoint: epoch {self.epoch}" if self.ckpt is not None and self.epoch else ""
        raise TrainingCollapse(
            f"catastrophic overfitting again at epoch {epoch} (guard-batch PGD {pgd_acc:.1%}, FGSM {fgsm_acc:.1%}), "
            f"already on N-FGSM at half the learning rate: the run stops {why}; no model written{last}. "
            "Try a lower lr_max, a longer schedule or a later mask_start (another seed draws another init), "
            "in a fresh run: --resume would replay the same collapse, and refuses a changed recipe.")

    # ---------------------------------------------------------------- end of run
    def _finish(self) -> None:
        self.net = self.model  # the DDP wrapper is done; surgery and export see a plain module
        if self.channels_last:
            self.model.to(memory_format=torch.contiguous_format)
        self.returned_epoch = self.epoch
        if self.co_events and self.guard.best_state is not None:
            self._restore_snapshot(self.guard.best_state)
            self.returned_epoch = self.guard.best_epoch
        slim = self.pruned_channels is not None  # its channels are gone: a second projection has nothing to act on
        if self.controller is not None and (not self.frozen or not (slim or self.controller.satisfied())):
            was = self.controller.satisfied()
            self._freeze("at the end of training" + ("" if was else " (budget was not met)"))
        if self.controller is not None:
            s = self.controller.status()
            self.log(f"budget: ops {s['ops_ratio']:.3f}, params {s['params_ratio']:.3f} of dense; "
                     + ("all constraints met" if s["satisfied"] else "NOT met"))

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict:
        return {
            "format": 1, "config": asdict(self.cfg), "epoch": self.epoch, "global_step": self.global_step,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": {"kind": self.cfg.schedule, "total_steps": self.total_steps, "global_step": self.global_step},
            "frozen": self.frozen, "stopped": self.stopped, "attack": self.attack, "lr_factor": self.lr_factor,
            "projection": self.projection,
            "guard": self.guard.state_dict(), "co_events": list(self.co_events),
            "history": [asdict(h) for h in self.history], "rng": capture_rng_state(),
            "budget": self.controller.state_dict() if self.controller is not None else None,
            "scaler": self.scaler.state_dict(),
            "pruned_channels": self.pruned_channels,  # when set, "model" is the slim network and "masks" the masks
            "masks": self.masks.state_dict() if self.pruned_channels is not None else None,
        }

    def _resume(self) -> int | None:
        if self.ckpt is None:
            raise ConfigError("resume needs an output folder (out_dir) to find the checkpoints in")
        found = self.ckpt.load_latest(map_location="cpu") if self.world.is_main else None
        found = distributed.broadcast_object(found)  # every rank resumes from rank 0's file: no shared disk needed
        if found is None:
            self.log(f"no checkpoint in {self.ckpt.directory}; starting from scratch")
            return None
        state, path = found
        self._check_compatible(state, path)
        try:
            if state.get("pruned_channels") is not None:  # slim since the freeze: rebuild that network first
                self.masks.load_state_dict(state["masks"])
                self._slim([(n, list(idxs)) for n, idxs in state["pruned_channels"]])
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{path}: does not fit this model ({str(exc).splitlines()[0]})") from None
        self._restore_progress(state)
        self.log(f"resumed from {path} (epoch {self.epoch}, step {self.global_step})")
        return self.epoch

    def _restore_progress(self, state: dict) -> None:
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.stopped, self.attack = bool(state["stopped"]), state["attack"]
        self.lr_factor = float(state.get("lr_factor", 1.0))  # checkpoints before the LR rung had none
        if self.pruner is not None:
            self.pruner.load_state_dict({"step": self.global_step, "frozen": bool(state["frozen"]),
                                         "projection": state["projection"], "budget": state.get("budget")})
        self.guard.load_state_dict(state["guard"])
        self.co_events = list(state["co_events"])
        self.history = [EpochLog(**h) for h in state["history"]]
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng_state(state["rng"])

    def _check_compatible(self, state: dict, path: Path) -> None:
        saved, now = state.get("config", {}), asdict(self.cfg)
        reject_removed_keys(saved, str(path), only_changed=True)
        defaults = asdict(TrainConfig())  # a field added since the checkpoint was written had its default then
        diff = [k for k in now if k not in MACHINE_FIELDS and saved.get(k, defaults[k]) != now[k]]
        if diff:
            raise CheckpointError(f"{path}: written with a different configuration ({', '.join(diff)} differ); "
                                  "use a new output folder or the same settings")


# --------------------------------------------------------------------------------------------
# small utilities


def _subset(dataset, n: int, seed: int):
    from rcomp.data import fixed_subset

    return fixed_subset(dataset, min(n, len(dataset)), seed)


def _stack(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "get_batch"):
        x, y = dataset.get_batch(list(range(len(dataset))))
        return x.float(), torch.as_tensor(y, dtype=torch.long)
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack([torch.as_tensor(x, dtype=torch.float32) for x in xs]), torch.as_tensor(ys, dtype=torch.long)


def _accumulate(totals: dict, lr: float, loss, penalty, logits, y) -> None:
    n = len(y)
    totals["loss"] += loss.item() * n
    totals["correct"] += int((logits.argmax(1) == y).sum())
    totals["n"] += n
    totals["penalty"] += penalty.item()
    totals["steps"] += 1
    totals["lr"] = lr


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _format(r: EpochLog, epochs: int) -> str:
    parts = [f"epoch {r.epoch}/{epochs}", f"lr {r.lr:.4f}", f"loss {r.train_loss:.3f}",
             f"train adv {_pct(r.train_adv_acc)}", f"val clean {_pct(r.val_clean)}", f"val pgd {_pct(r.val_pgd)}"]
    if r.train_pgd is not None:
        parts.append(f"guard fgsm/pgd {_pct(r.train_fgsm)}/{_pct(r.train_pgd)}")
    if r.ops is not None:
        parts.append(f"ops {r.ops_ratio:.3f} params {r.params_ratio:.3f} density {r.mask_density:.3f} "
                     f"flipped {r.masks_flipped:.3f} penalty {r.penalty:.3f}")
    parts.append(f"{r.seconds:.1f}s")
    return " | ".join(parts) + (f" | {r.guard}" if r.guard else "")
