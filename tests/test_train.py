"""Training: budgets met for both regularities, baselines, numerical faults, the CO guard, kill/resume."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from rcomp.checkpoint import CheckpointManager
from rcomp.data import load_data
from rcomp.errors import CheckpointError, ConfigError, NumericalError, TrainingCollapse
from rcomp.masks import MaskedModel, MaskSet
from rcomp.models import create_model
from rcomp.surgery import remove_channels
from rcomp.train import (
    CatastrophicOverfittingGuard,
    TrainConfig,
    _Trainer,
    is_catastrophic_overfitting,
    lr_at,
    lr_at_step,
    train,
)

SHAPE = (1, 12, 12)
FAST = dict(batch_size=64, lr_max=0.1, eval_size=100, eval_pgd_steps=3, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", SHAPE)


def _model(bundle):
    torch.manual_seed(0)
    return create_model("tiny_cnn", bundle.num_classes, SHAPE[0], bundle.mean, bundle.std)


def _quiet(_line):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("regularity", ["channel", "weight"])
def test_pruned_run_meets_the_ops_target_and_learns(digits, regularity):
    config = TrainConfig(epochs=4, regularity=regularity, target_ops=0.5, **FAST)
    result = train(config, digits, _model(digits), out_dir=None, log=_quiet)
    assert isinstance(result.model, MaskedModel)
    assert result.budget_status["satisfied"] and result.budget_status["ops_ratio"] <= 0.5
    assert result.budget_status["ops_ratio"] > 0.4  # projection lands close below the limit
    assert result.projection is not None and all(not p.requires_grad for p in result.model.masks.params)
    last = result.history[-1]
    assert last.ops_ratio <= 0.5 and last.mask_density < 1.0
    assert last.val_clean >= 0.6 and last.val_pgd >= 0.3  # chance is 0.1
    assert [h.epoch for h in result.history] == [1, 2, 3, 4] and result.co_events == []


@pytest.mark.slow
def test_masks_wait_dense_until_mask_start_then_start_from_magnitude(digits):
    """Through train() alone: the epoch before mask_start keeps every mask on and still, with no budget
    pressure (ops 1.0 of dense); the masks then start from the channels' magnitudes and meet the budget."""
    config = TrainConfig(epochs=2, regularity="channel", target_ops=0.5, mask_start=0.5, mask_init="magnitude",
                         warmup_fraction=0.2, **FAST)
    lines = []
    result = train(config, digits, _model(digits), out_dir=None, log=lines.append)
    started = next(line for line in lines if line.startswith("masks start learning at step"))
    step, total = (int(v) for v in started.split("at step ")[1].split(" ")[0].split("/"))
    assert 0 < step < total and "magnitude init" in started
    dense_epoch = result.history[0]
    assert (dense_epoch.masks_flipped, dense_epoch.mask_density, dense_epoch.ops_ratio) == (0.0, 1.0, 1.0)
    after = torch.cat([p.detach().flatten() for p in result.model.masks.params])
    assert len(set(after.abs().tolist())) > 1  # masks differ: they started from the channels' magnitudes
    assert result.budget_status["satisfied"] and result.budget_status["ops_ratio"] <= 0.5
    dense = train(TrainConfig(epochs=1, **FAST), digits, _model(digits), out_dir=None, log=_quiet).history
    assert dense[0].multipliers is None


@pytest.mark.parametrize("bad", [dict(mask_init="random"), dict(mask_start=0.8), dict(mask_start=-0.1)])
def test_bad_mask_schedule_is_a_config_error(digits, bad):
    with pytest.raises(ConfigError):
        train(TrainConfig(epochs=1, regularity="channel", target_ops=0.5, **bad, **FAST), digits, _model(digits),
              out_dir=None, log=_quiet)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["fgsm-rs", "nfgsm", "none"])
def test_dense_baselines_go_through_the_same_loop(digits, attack):
    model = _model(digits)
    result = train(TrainConfig(epochs=2, attack=attack, **FAST), digits, model, out_dir=None, log=_quiet)
    assert result.model is model and result.budget_status is None and result.projection is None
    last = result.history[-1]
    assert last.val_clean >= 0.5 and last.ops_ratio == 1.0
    assert (last.train_pgd is None) == (attack == "none")


def test_exploding_lr_raises_numerical_error_naming_epoch_and_step(digits):
    with pytest.raises(NumericalError, match=r"epoch 1, step \d+"):
        train(TrainConfig(epochs=1, **{**FAST, "lr_max": 1e9}), digits, _model(digits), out_dir=None, log=_quiet)


@pytest.mark.slow
def test_nan_loss_keeps_the_last_good_checkpoint(digits, tmp_path, monkeypatch):
    import rcomp.train as train_module

    calls = {"n": 0}
    real = train_module.F.cross_entropy
    steps_per_epoch = math.ceil(len(digits.split("train")) / FAST["batch_size"])

    def cross_entropy(logits, y, *args, **kwargs):
        calls["n"] += 1
        loss = real(logits, y, *args, **kwargs)
        return loss * float("nan") if calls["n"] == steps_per_epoch + 3 else loss

    monkeypatch.setattr(train_module, "F", types.SimpleNamespace(cross_entropy=cross_entropy))
    with pytest.raises(NumericalError, match="epoch 2, step 3"):
        train(TrainConfig(epochs=3, **FAST), digits, _model(digits), out_dir=tmp_path, log=_quiet)
    state, path = CheckpointManager(tmp_path / "checkpoints").load_latest()
    assert state["epoch"] == 1 and path.name == "ckpt-epoch0001.pt"


def test_schedules():
    cyclic = TrainConfig(lr_max=0.2, peak_fraction=0.4)
    assert lr_at(cyclic, 0.0) == 0.0 and lr_at(cyclic, 0.4) == pytest.approx(0.2) and lr_at(cyclic, 1.0) == 0.0
    assert lr_at(cyclic, 0.2) == pytest.approx(0.1) and lr_at(cyclic, 0.7) == pytest.approx(0.1)
    cosine = TrainConfig(lr_max=0.2, schedule="cosine")
    assert lr_at(cosine, 0.0) == pytest.approx(0.2) and lr_at(cosine, 0.5) == pytest.approx(0.1)


def test_budget_without_regularity_is_a_config_error(digits):
    with pytest.raises(ConfigError, match="regularity"):
        train(TrainConfig(target_ops=0.5, **FAST), digits, _model(digits), out_dir=None, log=_quiet)


# --------------------------------------------------------------------------------------------
# catastrophic-overfitting guard


def test_detection_needs_pgd_to_collapse_while_fgsm_holds():
    assert is_catastrophic_overfitting(0.10, 0.60, best_pgd=0.45, fgsm_at_best=0.50, co_drop=0.2)
    assert not is_catastrophic_overfitting(0.30, 0.60, best_pgd=0.45, fgsm_at_best=0.50, co_drop=0.2)  # drop 15 < 20
    assert not is_catastrophic_overfitting(0.10, 0.15, best_pgd=0.45, fgsm_at_best=0.50, co_drop=0.2)  # both fell


@pytest.mark.parametrize("pgd_acc, fgsm_acc, broken", [
    (0.020, 0.293, True),    # CIFAR-10 ResNet20, first epoch of an in-train run: no best to drop from
    (0.008, 0.121, True),    # in-train 0.7, epoch 2: best PGD 15.6 %, the drop rule could not fire
    (0.188, 0.203, False),   # the healthy twin of the first case
    (0.332, 0.367, False),   # the widest healthy gap seen (3.5 points)
    (0.125, 0.125, False),   # eval-mode BatchNorm lag after heavy pruning: both low together
    (0.000, 0.080, False),   # near chance: FGSM barely above PGD
])
def test_pgd_far_below_fgsm_is_overfitting_without_a_best(pgd_acc, fgsm_acc, broken):
    assert is_catastrophic_overfitting(pgd_acc, fgsm_acc, best_pgd=-1.0, fgsm_at_best=0.0) is broken
    guard = CatastrophicOverfittingGuard()
    assert guard.observe(1, pgd_acc, fgsm_acc, dict) is broken and (guard.best_state is None) is broken


@pytest.mark.parametrize("pgd_acc, fgsm_acc, train_adv_acc, broken", [
    (0.000, 0.098, 0.420, True),   # CIFAR-10 ResNet20 seed 0, dense N-FGSM at peak LR 0.15, epoch 2: both FGSM rules missed it
    (0.039, 0.246, 0.397, True),   # the in-train twin at peak LR 0.2 (the FGSM rule caught this one too)
    (0.016, 0.195, 0.509, True),   # in-train 0.7 of the table, epoch 3 (validation PGD 0.4 %), trained before both rules
    (0.180, 0.242, 0.161, False),  # the healthy epoch before both
    (0.285, 0.305, 0.305, False),  # the widest healthy gap logged (2.4 points)
    (0.109, 0.273, 0.257, True),   # ambiguous (pruning damage or CO): left to the FGSM rule, which fires
    (0.109, 0.150, 0.257, False),  # the same without the FGSM signal: pruning epochs end below their running mean
    (0.000, 0.050, 0.120, False),  # near chance: too small a gap to mean anything
    (0.164, 0.164, 0.833, False),  # the main job (digits), an epoch that pruned ops 0.81 -> 0.41: broken as a whole
])
def test_pgd_far_below_the_training_attack_is_overfitting(pgd_acc, fgsm_acc, train_adv_acc, broken):
    assert is_catastrophic_overfitting(pgd_acc, fgsm_acc, best_pgd=0.18, fgsm_at_best=0.242,
                                       train_adv_acc=train_adv_acc) is broken


@pytest.mark.slow
def test_guard_passes_the_epochs_training_attack_accuracy(digits, tmp_path, monkeypatch):
    """Epoch 2: PGD and FGSM both near zero ("both fell" to the FGSM rules) while training learns."""
    _scripted_guard(monkeypatch, [(0.5, 0.5, 0.40), (0.5, 0.09, 0.0), (0.6, 0.6, 0.45)])
    config = TrainConfig(epochs=3, attack="nfgsm", **{**FAST, "eval_pgd_steps": 1, "eval_size": 20})
    assert not is_catastrophic_overfitting(0.0, 0.09, best_pgd=0.40, fgsm_at_best=0.5)
    result = train(config, digits, _model(digits), out_dir=None, log=_quiet)
    assert result.history[1].train_adv_acc >= 0.15  # the premise: the training attack is resisted
    assert len(result.co_events) == 1 and "epoch 2" in result.co_events[0]


def test_guard_over_a_sequence_remembers_the_best_state():
    # (pgd, fgsm) per epoch, FastAT-like: robustness climbs, then PGD collapses while FGSM soars
    sequence = [(0.20, 0.25), (0.35, 0.40), (0.41, 0.47), (0.38, 0.46), (0.12, 0.71), (0.05, 0.85)]
    guard = CatastrophicOverfittingGuard(co_drop=0.2)
    fired = [guard.observe(e, p, f, lambda e=e: {"epoch": e}) for e, (p, f) in enumerate(sequence, start=1)]
    assert fired == [False, False, False, False, True, True]
    assert guard.best_epoch == 3 and guard.best_state == {"epoch": 3} and guard.best_pgd == 0.41
    unstable = CatastrophicOverfittingGuard(co_drop=0.2)  # everything collapses: not CO
    assert not any(unstable.observe(e, p, f, dict) for e, (p, f) in enumerate([(0.4, 0.5), (0.1, 0.12)], 1))


def _scripted_guard(monkeypatch, values):
    """Replace the guard's measurement by (clean, fgsm, pgd) per epoch."""
    monkeypatch.setattr(_Trainer, "_guard_accuracies", lambda self, epoch: values[epoch - 1])


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["fgsm-rs", "nfgsm"])
def test_guard_restores_the_best_state_and_steps_down(digits, tmp_path, monkeypatch, attack):
    _scripted_guard(monkeypatch, [(0.5, 0.5, 0.40), (0.6, 0.6, 0.50), (0.7, 0.8, 0.10), (0.7, 0.8, 0.45)])
    monkeypatch.setattr("rcomp.train.lr_at_step", lambda config, step, total: 0.05)  # a flat schedule
    config = TrainConfig(epochs=4, attack=attack, **{**FAST, "eval_pgd_steps": 1, "eval_size": 20})
    result = train(config, digits, _model(digits), out_dir=tmp_path, log=_quiet)
    assert len(result.co_events) == 1 and "epoch 3" in result.co_events[0]
    assert result.history[2].guard is not None and result.best_epoch == 2
    assert len(result.history) == 4 and result.history[3].attack == "nfgsm"  # continued after restoring
    halved = attack == "nfgsm"  # already on N-FGSM: the next rung is half the learning rate
    assert result.history[2].lr == 0.05 and result.history[3].lr == (0.025 if halved else 0.05)
    # epoch 3's checkpoint was written after the restore: it holds epoch 2's state
    state = torch.load(tmp_path / "checkpoints" / "ckpt-epoch0003.pt", weights_only=True)
    assert all(torch.equal(v, state["model"][k]) for k, v in result.model.state_dict().items())
    assert state["lr_factor"] == (0.5 if halved else 1.0)  # a resumed run keeps the rung


@pytest.mark.slow
def test_guard_restore_rolls_the_budget_multipliers_back_with_the_masks(digits, tmp_path, monkeypatch):
    # masks learn from step 0 and freeze at 0.8 of 4 epochs: epoch 3 overfits while they still move
    _scripted_guard(monkeypatch, [(0.5, 0.5, 0.40), (0.6, 0.6, 0.50), (0.7, 0.8, 0.10), (0.7, 0.8, 0.45)])
    taken, rollbacks = [], []
    snapshot, restore = _Trainer._snapshot, _Trainer._restore_snapshot

    def taking(self):
        taken.append(list(self.controller.multipliers))
        return snapshot(self)

    def restoring(self, state):
        before = list(self.controller.multipliers)
        restore(self, state)
        rollbacks.append((before, list(self.controller.multipliers)))

    monkeypatch.setattr(_Trainer, "_snapshot", taking)
    monkeypatch.setattr(_Trainer, "_restore_snapshot", restoring)
    config = TrainConfig(epochs=4, attack="nfgsm", regularity="channel", target_ops=0.5,
                         **{**FAST, "eval_pgd_steps": 1, "eval_size": 20})
    train(config, digits, _model(digits), out_dir=None, log=_quiet)
    at_best = taken[1]  # epochs 1 and 2 were each a new best
    before, after = rollbacks[0]  # the restore after epoch 3 (the end of the run restores again)
    assert after == at_best and before != after


def test_guard_restores_a_weights_only_best_state_of_an_older_checkpoint(digits):
    trainer = _Trainer(TrainConfig(epochs=1, regularity="channel", target_ops=0.5, **FAST), digits, _model(digits),
                       None, _quiet)
    weights = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in trainer.model.state_dict().items()}
    trainer.controller.multipliers = [0.3]
    trainer._restore_snapshot(weights)  # what the guard kept before it kept the multipliers too
    assert all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items())
    assert trainer.controller.multipliers == [0.3]


def test_guard_stops_at_the_bottom_of_the_ladder_and_without_a_best_keeps_the_weights(digits, monkeypatch):
    # epoch 1 overfits with nothing to restore; epoch 3 again, already at half the LR: stop
    _scripted_guard(monkeypatch, [(0.3, 0.3, 0.02), (0.5, 0.4, 0.38), (0.6, 0.6, 0.05), (0.6, 0.6, 0.5)])
    config = TrainConfig(epochs=4, attack="nfgsm", **{**FAST, "eval_pgd_steps": 1, "eval_size": 20})
    result = train(config, digits, _model(digits), out_dir=None, log=_quiet)
    assert len(result.co_events) == 2 and "no earlier state to restore" in result.co_events[0]
    assert "half the learning rate" in result.co_events[0] and "stopping" in result.co_events[1]
    assert len(result.history) == 3 and result.best_epoch == 2


@pytest.mark.slow
def test_a_second_collapse_before_the_masks_froze_fails_the_run_instead_of_returning_an_untrained_shape(
        digits, tmp_path, monkeypatch):
    # N-FGSM: epoch 2 overfits (half the LR), epoch 3 again, the masks freeze only at 0.8 of 4 epochs
    _scripted_guard(monkeypatch, [(0.5, 0.5, 0.40), (0.6, 0.6, 0.05), (0.6, 0.6, 0.05), (0.6, 0.6, 0.45)])
    config = TrainConfig(epochs=4, attack="nfgsm", regularity="channel", target_ops=0.5,
                         **{**FAST, "eval_pgd_steps": 1, "eval_size": 20})
    with pytest.raises(TrainingCollapse, match="epoch 3 .* before the masks froze.*last checkpoint: epoch 2"):
        train(config, digits, _model(digits), out_dir=tmp_path, log=_quiet)


def test_a_second_collapse_without_a_healthy_epoch_fails_the_run(digits, monkeypatch):
    _scripted_guard(monkeypatch, [(0.3, 0.3, 0.02), (0.3, 0.3, 0.02), (0.6, 0.6, 0.5)])
    config = TrainConfig(epochs=3, attack="nfgsm", **{**FAST, "eval_pgd_steps": 1, "eval_size": 20})
    with pytest.raises(TrainingCollapse, match="no healthy epoch to return"):
        train(config, digits, _model(digits), out_dir=None, log=_quiet)


@pytest.mark.slow
def test_rcomp_train_exits_3_on_a_collapse_and_publishes_no_model(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from rcomp.cli import cli

    _scripted_guard(monkeypatch, [(0.5, 0.5, 0.40), (0.6, 0.6, 0.05), (0.6, 0.6, 0.05), (0.6, 0.6, 0.45)])
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", "tiny_cnn", "--data", "digits", "--epochs", "4",
                                      "--attack", "nfgsm", "--target-ops", "0.5", "--batch-size", "64",
                                      "--no-progress", "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert "error: catastrophic overfitting again at epoch 3" in result.output
    assert not out.exists() and any(out.with_name("run.partial").glob("checkpoints/ckpt-epoch0002.pt"))


@pytest.mark.slow
def test_a_state_restored_from_before_mask_start_gets_its_masks_started_again(digits, monkeypatch):
    # the masks start in epoch 2 (mask_start 0.4 of 3 epochs); epoch 2 overfits; the best is epoch 1
    _scripted_guard(monkeypatch, [(0.5, 0.5, 0.40), (0.6, 0.6, 0.05), (0.6, 0.6, 0.45)])
    starts = []
    original = MaskSet.init_from_scores
    monkeypatch.setattr(MaskSet, "init_from_scores", lambda self, scores: starts.append(scores) or original(self, scores))
    config = TrainConfig(epochs=3, attack="nfgsm", regularity="channel", target_ops=0.5, mask_start=0.4,
                         mask_init="magnitude", **{**FAST, "eval_pgd_steps": 1, "eval_size": 20})
    result = train(config, digits, _model(digits), out_dir=None, log=_quiet)
    assert len(result.co_events) == 1 and "restored epoch 1" in result.co_events[0]
    assert len(starts) == 2  # at mask_start, and again from epoch 1's weights after the restore
    assert result.budget_status["satisfied"]


# --------------------------------------------------------------------------------------------
# slim at the freeze


@pytest.mark.slow
def test_slim_at_freeze_trains_the_network_the_masked_run_would_ship(digits):
    """Removing the switched-off channels at the freeze changes the arithmetic, not the model.

    The slim run must end where the masked run's shipped copy does, up to float rounding: the same
    removals, the same shapes, the same logged accuracies. Dropping the momentum at the cut (or
    cutting it by other channels than the weights) moves the weights far more than 1e-3 (0.26 here).

    Trained without an attack: the slim and the masked convolutions sum in different orders, and
    FGSM's sign() turns a rounding-sized gradient difference into a whole eps step on that pixel.
    On one CI host that moved the weights by 0.015 by the end of the run; this host stayed below 1e-6.
    Even without the attack the rounding compounds over the steps: 2.9e-4 on an AMD EPYC host, so
    the bound is 1e-3, still 260x below the momentum bug's 0.26. There the drift is spread over every
    layer (weights 1e-5 to 1.3e-4, BatchNorm's running statistics up to 2.8e-4, which average the
    activations that carry the rounding), not one tensor a cut got wrong.
    The evaluation PGD still uses sign(), so its accuracy may differ by one example.
    """
    base = dict(epochs=3, regularity="channel", target_ops=0.5, freeze_fraction=0.5, attack="none", **FAST)
    masked = train(TrainConfig(**base), digits, _model(digits), out_dir=None, log=_quiet)
    lines = []
    slim = train(TrainConfig(slim_at_freeze=True, **base), digits, _model(digits), out_dir=None, log=lines.append)
    shipped = remove_channels(masked.model, torch.zeros(1, *SHAPE))
    assert not isinstance(slim.model, MaskedModel) and masked.pruned_channels is None
    assert slim.pruned_channels and slim.pruned_channels == shipped.pruned_channels
    a, b = shipped.model.state_dict(), slim.model.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    drift = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a}
    worst = max(drift, key=drift.get)
    assert drift[worst] < 1e-3, f"{worst} moved {drift[worst]:.2e}"
    assert [(h.val_clean, h.ops_ratio) for h in slim.history] == [(h.val_clean, h.ops_ratio) for h in masked.history]
    one_example = 1 / FAST["eval_size"]
    assert [h.val_pgd for h in slim.history] == pytest.approx([h.val_pgd for h in masked.history], abs=one_example)
    assert sum("slim from here on" in line for line in lines) == 1


@pytest.mark.slow
def test_a_slim_run_that_ends_over_budget_is_not_cut_again(digits, monkeypatch):
    """The end of training projects again when the budget is not met; a slim network has no masked
    channels left to project, and cutting it again from the masked copy would throw away every step
    since the freeze."""
    from rcomp.budget import BudgetController

    config = TrainConfig(epochs=2, regularity="channel", target_ops=0.5, freeze_fraction=0.5, slim_at_freeze=True,
                         **FAST)
    honest = train(config, digits, _model(digits), out_dir=None, log=_quiet)
    monkeypatch.setattr(BudgetController, "satisfied", lambda self: False)
    lines = []
    drifted = train(config, digits, _model(digits), out_dir=None, log=lines.append)
    assert sum("slim from here on" in line for line in lines) == 1
    assert not any("at the end of training" in line for line in lines)
    a, b = honest.model.state_dict(), drifted.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("regularity", ["weight", None])
def test_slim_at_freeze_needs_channel_masks(digits, regularity):
    config = TrainConfig(regularity=regularity, slim_at_freeze=True, **FAST)
    with pytest.raises(ConfigError, match="slim_at_freeze"):
        train(config, digits, _model(digits), out_dir=None, log=_quiet)


# --------------------------------------------------------------------------------------------
# kill and resume


def _whole_and_resumed_from_epoch_2(config, digits, tmp_path):
    """The run uninterrupted, and again from its epoch-2 checkpoint alone (as if killed during epoch 3)."""
    whole = train(config, digits, _model(digits), out_dir=tmp_path / "a", log=_quiet)
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    for name in ("ckpt-epoch0002.pt", "ckpt-epoch0002.pt.sha256"):
        shutil.copy(tmp_path / "a" / "checkpoints" / name, tmp_path / "b" / "checkpoints" / name)
    return whole, train(config, digits, _model(digits), out_dir=tmp_path / "b", resume=True, log=_quiet)


@pytest.mark.slow
def test_resume_after_the_masks_froze_replays_exactly(digits, tmp_path):
    config = TrainConfig(epochs=3, regularity="channel", target_ops=0.5, freeze_fraction=0.5,
                         **FAST)  # frozen during epoch 2
    whole, resumed = _whole_and_resumed_from_epoch_2(config, digits, tmp_path)
    assert resumed.resumed_from == 2 and resumed.projection == whole.projection
    assert all(not p.requires_grad for p in resumed.model.masks.params)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_the_slim_freeze_rebuilds_the_slim_network_and_replays_exactly(digits, tmp_path):
    config = TrainConfig(epochs=3, regularity="channel", target_ops=0.5, freeze_fraction=0.5, slim_at_freeze=True,
                         **FAST)  # slim since epoch 2
    whole, resumed = _whole_and_resumed_from_epoch_2(config, digits, tmp_path)
    assert resumed.resumed_from == 2 and resumed.pruned_channels == whole.pruned_channels
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("mask_start, warmup", [(0.34, 0.2), (0.7, 0.05)])  # the epoch-2 checkpoint: after / before
def test_resume_around_mask_start_replays_exactly(digits, tmp_path, mask_start, warmup):
    config = TrainConfig(epochs=3, regularity="channel", target_ops=0.5, mask_start=mask_start, mask_init="magnitude",
                         warmup_fraction=warmup, **FAST)
    whole, resumed = _whole_and_resumed_from_epoch_2(config, digits, tmp_path)
    assert resumed.resumed_from == 2 and resumed.budget_status["satisfied"]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_recipe(digits, tmp_path):
    train(TrainConfig(epochs=1, **FAST), digits, _model(digits), out_dir=tmp_path, log=_quiet)
    with pytest.raises(CheckpointError, match="lr_max"):
        train(TrainConfig(epochs=1, **{**FAST, "lr_max": 0.05}), digits, _model(digits), out_dir=tmp_path,
              resume=True, log=_quiet)


@pytest.mark.parametrize("old_key, value, refused", [("lr_restart", True, True), ("lr_restart", False, False),
                                                      ("mask_norm_stats", "running", True)])
def test_resume_of_a_checkpoint_that_used_a_removed_option_is_refused(digits, tmp_path, old_key, value, refused):
    """A checkpoint written before an option was removed holds its key: at its "off" value the run
    trained as rcomp does now and resumes; with the option on it is refused, naming the commit."""
    config = TrainConfig(epochs=2, **FAST)
    train(dataclasses.replace(config, epochs=1), digits, _model(digits), out_dir=tmp_path, log=_quiet)
    manager = CheckpointManager(tmp_path / "checkpoints")
    state, _ = manager.load_latest(map_location="cpu")
    state["config"] = {**state["config"], "epochs": 2, old_key: value}
    manager.save(state, 1)
    if refused:
        with pytest.raises(ConfigError, match=f"{old_key}: was removed .*commit 6311216"):
            train(config, digits, _model(digits), out_dir=tmp_path, resume=True, log=_quiet)
    else:
        assert train(config, digits, _model(digits), out_dir=tmp_path, resume=True, log=_quiet).resumed_from == 1


def _run(out: Path, *args: str) -> subprocess.Popen:
    script = Path(__file__).with_name("resume_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout}s"
        time.sleep(0.05)


def _finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_final_weights(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = _run(whole)
    victim = _run(broken, "--sleep", "0.02")
    _wait_for(broken / "checkpoints" / "ckpt-epoch0001.pt.sha256", victim)
    time.sleep(0.4)  # well inside epoch 2 (an epoch takes > 1 s with the sleeps)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL and not (broken / "final.pt").exists()
    log = _finished(_run(broken, "--resume"))
    assert "resumed from" in log
    resumed = json.loads((broken / "result.json").read_text())
    assert resumed["resumed_from"] >= 1 and resumed["epochs"] == [1, 2, 3, 4]  # history came back too
    _finished(reference)
    a = torch.load(whole / "final.pt", weights_only=True)
    b = torch.load(broken / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


@pytest.mark.slow
def test_the_trainer_builds_its_attack_from_the_configured_labels(digits, monkeypatch):
    import rcomp.attacks

    seen = []

    def recording(model, x, y, **kw):
        seen.append(kw["predicted_labels"])
        return rcomp.attacks.nfgsm(model, x, y, **kw)

    monkeypatch.setitem(rcomp.train.ATTACKS, "nfgsm", recording)
    for labels in ("predicted", "true"):
        seen.clear()
        config = TrainConfig(epochs=1, attack="nfgsm", attack_labels=labels, co_guard=False, **FAST)
        train(config, digits, _model(digits), out_dir=None, log=_quiet)
        assert seen and set(seen) == {labels == "predicted"}


# --------------------------------------------------------------------------------------------
# the residual streams' own floor


@pytest.mark.slow
@pytest.mark.parametrize("target", [0.6, 0.4])
def test_min_keep_stream_holds_the_residual_stream_through_in_train_pruning(digits, target):
    """The stream floor reaches the masks and the projection: without it the same runs cut the stream."""
    def stream_widths(min_keep_stream):
        config = TrainConfig(epochs=2, regularity="channel", target_ops=target, min_keep_stream=min_keep_stream, **FAST)
        result = train(config, digits, _model(digits), out_dir=None, log=_quiet)
        assert result.budget_status["satisfied"] and result.budget_status["ops_ratio"] <= target
        masks = result.model.masks
        return [(int(masks.hard()[i].sum()), g.size) for i, g in enumerate(masks.groups) if g.is_stream]

    assert all(kept == size for kept, size in stream_widths(1.0))
    assert any(kept < size for kept, size in stream_widths(None))


@pytest.mark.slow
def test_every_epoch_records_the_budget_multipliers(digits):
    """The multiplier's path is what tells a lagging controller from a wound-up one afterwards."""
    config = TrainConfig(epochs=2, regularity="channel", target_ops=0.5, target_params=0.8, dual_reset=True, **FAST)
    history = train(config, digits, _model(digits), out_dir=None, log=_quiet).history
    assert all(len(r.multipliers) == 2 and all(math.isfinite(m) for m in r.multipliers) for r in history)
    assert any(m != 0.0 for r in history for m in r.multipliers)
    dense = train(TrainConfig(epochs=1, **FAST), digits, _model(digits), out_dir=None, log=_quiet).history
    assert dense[0].multipliers is None


@pytest.mark.parametrize("mask_weight_decay, masks_decay", [(None, True), (0.0, False)])
def test_mask_weight_decay_overrides_the_weights_decay_for_the_masks_only(digits, mask_weight_decay, masks_decay):
    """With no gradient, one step is the decay alone: the weights shrink, the masks only when they share it."""
    config = TrainConfig(epochs=1, regularity="channel", target_ops=0.5, weight_decay=0.5,
                         mask_weight_decay=mask_weight_decay, **FAST)
    trainer = _Trainer(config, digits, _model(digits), None, _quiet)
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    masks_before = [m.detach().clone() for m in trainer.masks.parameters()]
    weight = next(iter(trainer.model.weight_parameters()))
    weight_before = weight.detach().clone()
    trainer.optimizer.step()
    assert weight.abs().sum() < weight_before.abs().sum()
    moved = [not torch.equal(m, b) for m, b in zip(trainer.masks.parameters(), masks_before)]
    assert all(moved) if masks_decay else not any(moved)


@pytest.mark.parametrize("value, regularity", [(0.0, "channel"), (1.5, "channel"), (0.5, "weight")])
def test_min_keep_stream_must_be_a_fraction_of_channel_groups(digits, value, regularity):
    config = TrainConfig(regularity=regularity, target_ops=0.5, min_keep_stream=value, **FAST)
    with pytest.raises(ConfigError, match="min_keep_stream"):
        train(config, digits, _model(digits), out_dir=None, log=_quiet)
