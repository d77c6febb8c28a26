"""AutoAttack (Croce & Hein, 2020) on a PyTorch model, through the ``pyautoattack`` package.

AutoAttack is the yardstick the adversarial-pruning benchmarks (Piras et al., 2024; RobustBench)
rank models by: parameter-free APGD on two losses, so a model that only masks the gradients of a
fixed-step PGD does not look robust. A PGD figure more than a couple of points above the
AutoAttack figure on the same images is the sign of such masking.

Two versions:

- ``fast``: APGD-CE + APGD-T (targeted, DLR loss), the two attacks that decide almost every
  image in RobustBench's standard runs, at a fraction of ``standard``'s cost;
- ``standard``: the full standard suite (APGD-CE, APGD-T, FAB-T, Square with 5,000 queries).

The package's own default eps is MNIST's 0.3, so eps is always passed explicitly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rcomp.errors import RcompError

VERSIONS = ("fast", "standard")
_FAST_ATTACKS = ["apgd-ce", "apgd-t"]


def _require_package():
    """The package, or a one-line error that says how to install it."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:  # pragma: no cover - it is a dependency of rcomp
        raise RcompError("AutoAttack needs the pyautoattack package: pip install pyautoattack") from None
    return AutoAttack


def build_autoattack(model: nn.Module, eps: float, *, num_classes: int, version: str = "fast", seed: int = 0,
                     device: str | torch.device = "cpu"):
    """A configured ``pyautoattack.AutoAttack`` for ``model`` (eval mode, logits out, inputs in [0, 1]).

    APGD-T attacks the ``n_target_classes`` highest non-true classes; with fewer than ten classes
    there are fewer of them than its default nine, so the count is capped by the class count.
    """
    if version not in VERSIONS:
        raise RcompError(f"AutoAttack version {version!r}: expected one of {', '.join(VERSIONS)}")
    if not (eps > 0 and eps == eps):
        raise RcompError(f"AutoAttack eps must be a positive number, got {eps!r}")
    AutoAttack = _require_package()
    if version == "standard":
        attack = AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=seed, device=device)
    else:
        attack = AutoAttack(model, eps=eps, norm="Linf", version="custom", attacks=list(_FAST_ATTACKS),
                            seed=seed, device=device)
        attack.apgd.n_restarts = 1
        attack.apgd_targeted.n_restarts = 1
    targets = max(1, min(9, num_classes - 1))
    attack.apgd_targeted.n_target_classes = targets
    attack.fab.n_target_classes = targets
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    return attack


def autoattack_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, num_classes: int,
                        version: str = "fast", seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """AutoAttack's adversarial examples for ``(x, y)``: the clean image where every attack failed.

    The examples are checked against eps and for finiteness, so a broken attack cannot report
    success with an out-of-ball example. Usable as an attack of ``rcomp.attacks.evaluate_examples``.
    """
    was_training = model.training
    model.eval()
    try:
        attack = build_autoattack(model, eps, num_classes=num_classes, version=version, seed=seed, device=x.device)
        x_adv, _ = attack.run_standard_evaluation(x, y, batch_size=batch_size)
    finally:
        model.train(was_training)
    linf = (x_adv - x).abs().flatten(1).amax(1)
    if bool((linf > eps + 1e-5).any()) or not bool(torch.isfinite(x_adv).all()):
        raise RcompError("AutoAttack returned examples outside the eps-ball or non-finite; not a valid evaluation")
    return x_adv


def autoattack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, num_classes: int,
                       version: str = "fast", seed: int = 0, batch_size: int = 250) -> torch.Tensor:
    """Per image: is it still classified correctly after AutoAttack? (bool tensor, on ``x``'s device)

    An image misclassified clean counts as not robust (AutoAttack returns it unchanged).
    """
    x_adv = autoattack_examples(model, x, y, eps, num_classes=num_classes, version=version, seed=seed,
                                batch_size=batch_size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(x_adv[i:i + batch_size]).argmax(1) == y[i:i + batch_size]
                              for i in range(0, len(x_adv), batch_size)])
    finally:
        model.train(was_training)
