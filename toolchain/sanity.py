"""Sanity checks on a robustness evaluation (Carlini et al. 2019; AutoAttack's own checks).

A high PGD accuracy means little if the attack could not get gradients: quantized inputs,
saturated softmax or randomness make PGD weak without making the model robust. Each check below
compares attacks whose strengths are ordered in theory; a violation is reported as
"possible gradient masking" rather than as a number to trust.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rcomp.attacks import eval_mode, evaluate_examples, fgsm, pgd, uniform_noise

FLAG = "possible gradient masking"


@dataclass
class SanityRow:
    name: str
    value: float
    expected: str
    passed: bool
    note: str = ""


@dataclass
class SanityReport:
    eps: float
    n: int
    accuracies: dict[str, float] = field(default_factory=dict)
    rows: list[SanityRow] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows)

    def add(self, name: str, value: float, expected: str, passed: bool, note: str = "") -> None:
        self.rows.append(SanityRow(name, float(value), expected, bool(passed), note))
        if not passed:
            self.flags.append(f"{FLAG}: {name} = {value:.4g}, expected {expected}" + (f" ({note})" if note else ""))

    def to_dict(self) -> dict:
        return {"eps": self.eps, "n": self.n, "passed": self.passed, "accuracies": dict(self.accuracies),
                "rows": [asdict(r) for r in self.rows], "flags": list(self.flags)}

    def to_text(self) -> str:
        lines = [f"attack sanity checks (eps={self.eps * 255:.3g}/255, n={self.n}): "
                 + ("passed" if self.passed else f"{len(self.flags)} FAILED")]
        for r in self.rows:
            mark = "ok  " if r.passed else "FAIL"
            lines.append(f"  [{mark}] {r.name}: {r.value:.4g} (expected {r.expected})" + (f"  {r.note}" if r.note else ""))
        lines += [f"  ! {f}" for f in self.flags]
        return "\n".join(lines)


def _chunks(x: torch.Tensor, y: torch.Tensor, size: int):
    for i in range(0, len(y), size):
        yield x[i : i + size], y[i : i + size]


def _run(model, x, y, attack, batch_size: int, **kw) -> tuple[float, float, float, float]:
    """(accuracy, max |delta|, min pixel, max pixel) of ``attack`` over all examples, counted by
    :func:`rcomp.attacks.evaluate_examples`; the attack is watched for the size and range of its examples."""
    seen = {"linf": 0.0, "lo": float(x.min()), "hi": float(x.max())}

    def watched(net, xb, yb):
        xa = attack(net, xb, yb, **kw)
        seen["linf"] = max(seen["linf"], float((xa - xb).abs().max()))
        seen["lo"], seen["hi"] = min(seen["lo"], float(xa.min())), max(seen["hi"], float(xa.max()))
        return xa

    res = evaluate_examples(model, (x, y), {"attack": watched} if attack is not None else None, batch_size=batch_size)
    return res.accuracy("attack" if attack is not None else "clean"), seen["linf"], seen["lo"], seen["hi"]


def _zero_grad_fraction(model, x, y, batch_size: int) -> float:
    """Share of examples whose input gradient is exactly zero: PGD cannot move them at all."""
    zero = 0
    for xb, yb in _chunks(x, y, batch_size):
        xb = xb.clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xb), yb, reduction="sum")
            (g,) = torch.autograd.grad(loss, xb)
        zero += int((g.flatten(1).abs().amax(1) == 0).sum())
    return zero / len(y)


def run_sanity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 8 / 255, *,
               blackbox_acc: float | None = None, restarts: int = 3, large_eps: float = 64 / 255,
               batch_size: int = 256, generator: torch.Generator | None = None) -> SanityReport:
    """Run the checks on ``(x, y)`` (pixels in [0, 1]) in eval mode; the model's mode is restored.

    Orderings allow one example of slack (``1/n``) because a random start can let a weaker attack
    win on a single borderline example by chance.
    """
    device = next(model.parameters()).device
    x, y = x.detach().to(device, torch.float32), y.to(device)
    n = len(y)
    tol = 1.0 / n + 1e-9
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    rep = SanityReport(eps=eps, n=n)
    with eval_mode(model):
        acc = _attack_accuracies(model, x, y, eps, large_eps, restarts, batch_size, g, rep)
        _check_orderings(rep, acc, tol, eps, large_eps, blackbox_acc)
        _check_determinism(model, x[:batch_size], rep)
        zero = _zero_grad_fraction(model, x, y, batch_size)
        rep.add("examples with zero input gradient", zero, "<= 0.1", zero <= 0.1,
                "saturated softmax or non-differentiable input layer")
    return rep


def _attack_accuracies(model, x, y, eps, large_eps, restarts, bs, g, rep) -> dict[str, float]:
    runs = {
        "clean": (None, {}),
        "noise": (lambda m, xb, yb, **kw: uniform_noise(xb, eps, g), {}),
        "fgsm": (fgsm, {"eps": eps}),
        "pgd10": (pgd, {"eps": eps, "alpha": eps / 4, "steps": 10, "generator": g}),
        f"pgd50x{restarts}": (pgd, {"eps": eps, "alpha": eps / 4, "steps": 50, "restarts": restarts, "generator": g}),
        "pgd_large_eps": (pgd, {"eps": large_eps, "alpha": large_eps / 4, "steps": 20, "generator": g}),
    }
    acc, worst_linf, lo, hi = {}, 0.0, 1.0, 0.0
    for name, (attack, kw) in runs.items():
        acc[name], linf, a, b = _run(model, x, y, attack, bs, **kw)
        if name != "pgd_large_eps":
            worst_linf, lo, hi = max(worst_linf, linf), min(lo, a), max(hi, b)
    rep.accuracies = dict(acc)
    rep.add("max |delta|_inf", worst_linf, f"<= eps ({eps:.5f})", worst_linf <= eps + 1e-6, "attack implementation bug if not")
    rep.add("perturbed pixels in [0, 1]", min(lo, 1.0 - hi), ">= 0", lo >= 0.0 and hi <= 1.0)
    return acc


def _check_orderings(rep, acc, tol, eps, large_eps, blackbox_acc) -> None:
    strong = [k for k in acc if k.startswith("pgd50")][0]
    rep.add("clean - FGSM accuracy", acc["clean"] - acc["fgsm"], ">= 0", acc["fgsm"] <= acc["clean"] + tol)
    rep.add("FGSM - PGD-10 accuracy", acc["fgsm"] - acc["pgd10"], ">= 0", acc["pgd10"] <= acc["fgsm"] + tol)
    rep.add(f"PGD-10 - {strong.upper()} accuracy", acc["pgd10"] - acc[strong], ">= 0", acc[strong] <= acc["pgd10"] + tol)
    rep.add(f"PGD accuracy at eps={large_eps * 255:.0f}/255", acc["pgd_large_eps"], "<= 0.05",
            acc["pgd_large_eps"] <= 0.05, "an unbounded attack must win")
    gap = acc["noise"] - acc[strong]
    rep.add("noise - PGD accuracy", gap, ">= 0 (noise hurts less than PGD)", gap >= -tol)
    # PGD no better than noise is also what a genuinely robust model shows; it only counts as
    # masking when PGD cannot break the model at a large eps either
    breaks_at_large_eps = acc["pgd_large_eps"] <= 0.05
    rep.add("PGD advantage over noise", gap, "> 0, unless PGD breaks the model at the large eps",
            gap > tol or acc["clean"] <= tol or breaks_at_large_eps, "PGD no stronger than random noise")
    if blackbox_acc is not None:
        white = min(acc["fgsm"], acc["pgd10"], acc[strong])
        rep.add("black-box - white-box accuracy", blackbox_acc - white, ">= 0", blackbox_acc >= white - tol,
                "a black-box attack beat the gradient attacks")


def _check_determinism(model, x, rep) -> None:
    with torch.no_grad():
        a, b = model(x), model(x)
    diff = float((a - b).abs().max())
    rep.add("repeated forward passes differ by", diff, "== 0", diff == 0.0, "randomized defense: use EOT")
