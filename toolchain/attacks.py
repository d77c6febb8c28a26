"""L-inf attacks for training (FGSM-RS, N-FGSM) and evaluation (FGSM, PGD with restarts, noise).

Conventions every function here keeps, because training, evaluation and the sanity checks rely on them:

* Pixels live in [0, 1] and ``eps`` is in pixel units; the model carries its own normalization.
* Gradients are taken with ``torch.autograd.grad`` w.r.t. the perturbation only, so attack
  generation never leaves anything in a parameter's (or a mask's) ``.grad``.
* Attacks never change the model: train/eval mode is left as the caller set it (FastAT crafts its
  examples in train mode), and BatchNorm running statistics are put back after the attack's
  forward passes, so a training step updates them once, from the batch it actually learns on.
* All randomness comes from an optional ``torch.Generator``; with one, an attack is reproducible
  and leaves the global RNG untouched (which exact resume depends on).
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from rcomp import recipe

DEFAULT_EPS = 8 / 255


# --------------------------------------------------------------------------------------------
# helpers


def _uniform(shape, low: float, high: float, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(low, high) drawn on the generator's device, so a CPU generator also drives CUDA attacks."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return (low + (high - low) * u).to(device=like.device, dtype=like.dtype)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Put every buffer (BatchNorm running stats, counters) back as it was on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor,
                predicted_labels: bool = False) -> torch.Tensor:
    """d CE(model(x + delta), y) / d delta, without touching any parameter's ``.grad``.

    With ``predicted_labels`` the loss is taken against the model's own prediction at
    ``x + delta`` instead of ``y`` (Kurakin et al. 2017), from the same forward pass.
    """
    delta = delta.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x + delta)
        target = logits.argmax(1).detach() if predicted_labels else y
        loss = F.cross_entropy(logits, target, reduction="sum")
        (grad,) = torch.autograd.grad(loss, delta)
    return grad


def _project(x: torch.Tensor, delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Clip ``delta`` to the eps-ball and so that ``x + delta`` stays in [0, 1]."""
    delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0.0, 1.0) - x


def _prepare(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.detach(), y.detach()


# --------------------------------------------------------------------------------------------
# attacks


def uniform_noise(x: torch.Tensor, eps: float = DEFAULT_EPS, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random L-inf noise: the baseline any gradient attack must beat (a sanity check)."""
    x = x.detach()
    return (x + _uniform(x.shape, -eps, eps, x, generator)).clamp(0.0, 1.0)


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = DEFAULT_EPS,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """One signed step of size eps from the clean input (no random start: the classic FGSM)."""
    x, y = _prepare(x, y)
    with preserved_buffers(model):
        grad = _input_grad(model, x, y, torch.zeros_like(x))
    return (x + _project(x, eps * grad.sign(), eps)).detach()


def fgsm_rs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = DEFAULT_EPS,
            alpha: float | None = None, generator: torch.Generator | None = None,
            predicted_labels: bool = False) -> torch.Tensor:
    """FastAT (Wong et al. 2020): uniform start in the eps-ball, one step of alpha, project back.

    ``alpha`` defaults to Wong et al.'s 1.25 * eps (10/255 at eps = 8/255), so a smaller eps
    does not get a step that overshoots the ball by a factor of several.
    """
    alpha = 1.25 * eps if alpha is None else alpha
    x, y = _prepare(x, y)
    delta = _project(x, _uniform(x.shape, -eps, eps, x, generator), eps)
    with preserved_buffers(model):
        grad = _input_grad(model, x, y, delta, predicted_labels)
    return (x + _project(x, delta + alpha * grad.sign(), eps)).detach()


def nfgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = DEFAULT_EPS,
          noise: float | None = None, alpha: float | None = None,
          generator: torch.Generator | None = None, predicted_labels: bool = False) -> torch.Tensor:
    """N-FGSM (de Jorge et al. 2022): noise in [-2eps, 2eps], step eps, NO projection to the ball.

    Skipping the projection is the point: the larger effective perturbation is what keeps
    single-step training away from catastrophic overfitting. Only [0, 1] is enforced.
    ``predicted_labels``: see :data:`ATTACK_LABELS`.
    """
    noise = 2 * eps if noise is None else noise
    alpha = eps if alpha is None else alpha
    x, y = _prepare(x, y)
    delta = _uniform(x.shape, -noise, noise, x, generator)
    with preserved_buffers(model):
        grad = _input_grad(model, x, y, delta, predicted_labels)
    return (x + delta + alpha * grad.sign()).clamp(0.0, 1.0).detach()


def _pgd_once(model, x, y, eps, alpha, steps, random_start, generator) -> torch.Tensor:
    delta = _uniform(x.shape, -eps, eps, x, generator) if random_start else torch.zeros_like(x)
    delta = _project(x, delta, eps)
    for _ in range(steps):
        grad = _input_grad(model, x, y, delta)
        delta = _project(x, delta + alpha * grad.sign(), eps)
    return x + delta


def _per_example_loss(model, x_adv, y) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        logits = model(x_adv)
    return F.cross_entropy(logits, y, reduction="none"), logits.argmax(1) != y


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = DEFAULT_EPS, alpha: float = 2 / 255,
        steps: int = 10, restarts: int = 1, random_start: bool = True,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """PGD with restarts, keeping each example's worst case.

    An example that any restart fools stays fooled (robust = survives every restart); among
    restarts that all fail, the highest-loss point is kept so the result is the strongest found.
    """
    x, y = _prepare(x, y)
    best, best_loss, best_fooled = None, None, None
    with preserved_buffers(model):
        for _ in range(max(1, restarts)):
            cand = _pgd_once(model, x, y, eps, alpha, steps, random_start, generator)
            loss, fooled = _per_example_loss(model, cand, y)
            if best is None:
                best, best_loss, best_fooled = cand, loss, fooled
                continue
            take = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(take.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_loss = torch.where(take, loss, best_loss)
            best_fooled = best_fooled | fooled
    return best.detach()


#: Training attacks by the name ``TrainConfig.attack`` uses; ``None`` = plain (non-robust) training.
ATTACKS: dict[str, Callable | None] = {"fgsm-rs": fgsm_rs, "nfgsm": nfgsm, "none": None}

#: Which label a training attack ascends the loss of. ``true``: the ground truth, as FastAT and
#: N-FGSM do. ``predicted``: the model's own prediction at the noisy start (Kurakin et al. 2017,
#: against label leaking): a one-step perturbation built from the true label encodes that label in
#: its sign pattern, and a weak network can learn to read it. Measured (``bench/label_leaking.py``,
#: CIFAR-10 ResNet20, seed 0, epoch 2 of a collapsed N-FGSM run, 512 validation images): 45.1 %
#: accuracy on N-FGSM examples built from the true label, 26.8 % from the predicted label, 23.6 %
#: under the noise alone, 15.6 % clean, 0.0 % under PGD-10.
ATTACK_LABELS = recipe.ATTACK_LABELS


# --------------------------------------------------------------------------------------------
# evaluation


@dataclass
class AccuracyResult:
    """Clean and adversarial accuracy over ``n`` examples (``adv`` is None without an attack)."""

    clean: float
    adv: float | None
    n: int
    clean_correct: int = 0
    adv_correct: int | None = None

    def to_dict(self) -> dict:
        return {"clean": self.clean, "adv": self.adv, "n": self.n}


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration, then the caller's mode back (per module, not just the root)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _fp32(model: nn.Module) -> nn.Module:
    """The model itself if it is fp32, else an fp32 copy: evaluation must not run in low precision."""
    floats = [p for p in model.parameters() if p.is_floating_point()]
    if all(p.dtype == torch.float32 for p in floats):
        return model
    return copy.deepcopy(model).float()


def _batches(loader_or_batches, device) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(loader_or_batches, tuple) and len(loader_or_batches) == 2 and torch.is_tensor(loader_or_batches[0]):
        loader_or_batches = [loader_or_batches]
    for x, y in loader_or_batches:
        yield x.to(device=device, dtype=torch.float32), y.to(device)


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class Correctness:
    """Which examples a model classifies correctly, clean and under each attack, in data order.

    ``correct`` maps ``"clean"`` and every attack's name to an (n,) bool tensor; ``labels`` are the
    (n,) true labels, so per-class figures come from the same run (:meth:`per_class`). With
    ``keep_logits`` the logits of every example are kept under the same names (CPU tensors).
    """

    labels: torch.Tensor
    correct: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor] | None = None

    @property
    def n(self) -> int:
        return len(self.labels)

    def count(self, name: str = "clean") -> int:
        return int(self.correct[name].sum())

    def accuracy(self, name: str = "clean") -> float:
        return self.count(name) / max(self.n, 1)

    def all_of(self, names: Iterable[str] | None = None) -> torch.Tensor:
        """Correct under every one of ``names`` (default: clean and every attack): the per-example worst case."""
        names = list(self.correct) if names is None else list(names)
        return torch.stack([self.correct[k] for k in names]).all(0)

    def per_class(self, name: str = "clean", num_classes: int | None = None) -> list[float | None]:
        """Accuracy of each class (None for a class with no example here)."""
        k = int(num_classes if num_classes is not None else (int(self.labels.max()) + 1 if self.n else 0))
        seen = torch.bincount(self.labels, minlength=k)
        hits = torch.bincount(self.labels[self.correct[name]], minlength=k)
        return [float(h) / int(s) if s else None for h, s in zip(hits.tolist(), seen.tolist())]


def evaluate_examples(model: nn.Module, data, attacks: dict[str, Callable] | None = None, *,
                      batch_size: int | None = None, max_examples: int | None = None, keep_logits: bool = False,
                      progress: bool = False, desc: str = "eval") -> Correctness:
    """rcomp's one evaluation loop: per example, clean and attacked correctness, in eval mode and fp32.

    ``data`` is a DataLoader or any iterable of ``(x, y)`` batches, one ``(x, y)`` pair (cut into
    ``batch_size`` chunks when given), or a Dataset (read in batches of ``batch_size``, 256 by
    default). ``attacks`` maps a name to ``attack(model, x, y) -> x_adv`` (e.g. a
    ``functools.partial`` of :func:`pgd` with its ``generator``); each batch is attacked in the
    order given, so a seeded generator makes the run repeatable. The model's train/eval mode is
    restored afterwards. Why one loop: training's validation and guard, ``rcomp eval``, the
    RL search's reward and the sanity checks count the same way, on the same precision.
    """
    from tqdm import tqdm

    net, attacks = _fp32(model), dict(attacks or {})
    device = _model_device(net)
    device_type = device.type if device.type in ("cpu", "cuda") else "cpu"
    labels, correct = [], {k: [] for k in ("clean", *attacks)}
    logits: dict[str, list] | None = {k: [] for k in correct} if keep_logits else None
    n = 0
    batches = _batches(_as_batches(data, batch_size), device)
    with eval_mode(net), torch.autocast(device_type=device_type, enabled=False):
        for x, y in tqdm(batches, desc=desc, unit="batch", disable=not progress, total=_num_batches(data, batch_size)):
            if max_examples is not None:
                x, y = x[: max_examples - n], y[: max_examples - n]
                if len(y) == 0:
                    break
            n += len(y)
            labels.append(y.cpu())
            for name, x_in in _inputs(net, x, y, attacks):
                with torch.no_grad():
                    out = net(x_in)
                correct[name].append((out.argmax(1) == y).cpu())
                if logits is not None:
                    logits[name].append(out.float().cpu())
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0)  # noqa: E731
    return Correctness(cat(labels).long(), {k: cat(v).bool() for k, v in correct.items()},
                       {k: cat(v) for k, v in logits.items()} if logits is not None else None)


def _inputs(net, x, y, attacks: dict[str, Callable]):
    """The clean batch, then each attack's examples, crafted as they are needed."""
    yield "clean", x
    for name, attack in attacks.items():
        yield name, attack(net, x, y)


def _as_batches(data, batch_size: int | None):
    """A Dataset read in batches (``get_batch`` when it has one), a pair cut into chunks, else ``data`` as is."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return _dataset_batches(data, batch_size or 256)
    if isinstance(data, tuple) and len(data) == 2 and torch.is_tensor(data[0]):
        x, y = data
        size = batch_size or max(len(y), 1)
        return [(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)]
    return data


def _dataset_batches(dataset, batch_size: int):
    for start in range(0, len(dataset), batch_size):
        idx = list(range(start, min(start + batch_size, len(dataset))))
        if hasattr(dataset, "get_batch"):
            yield dataset.get_batch(idx)
        else:
            items = [dataset[i] for i in idx]
            yield torch.stack([torch.as_tensor(x) for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _num_batches(data, batch_size: int | None) -> int | None:
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return -(-len(data) // (batch_size or 256))
    return len(data) if hasattr(data, "__len__") and not isinstance(data, tuple) else None


def evaluate(model: nn.Module, loader_or_batches, attack: Callable | None = None, *,
             max_examples: int | None = None, **attack_kwargs) -> AccuracyResult:
    """Clean (and attacked) accuracy: :func:`evaluate_examples` with one attack, as counts.

    ``attack(model, x, y, **attack_kwargs)`` returns adversarial inputs, e.g. ``pgd`` with
    ``eps=8/255, steps=10, generator=g``.
    """
    attacks = {"adv": lambda m, x, y: attack(m, x, y, **attack_kwargs)} if attack is not None else None
    res = evaluate_examples(model, loader_or_batches, attacks, max_examples=max_examples)
    adv = res.count("adv") if attack is not None else None
    return AccuracyResult(res.accuracy(), adv / max(res.n, 1) if adv is not None else None, res.n, res.count(), adv)
