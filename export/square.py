"""Square attack, L∞ (Andriushchenko et al., ECCV 2020), in numpy only.

Why here: it needs nothing but a ``predict_fn`` returning logits, so ``rcomp check`` can attack
the ONNX Runtime session that ships, on a board without torch. A gradient-free attack also
catches gradient masking: if it beats the white-box PGD examples, the PGD numbers were too kind.

Follows the authors' reference code: vertical-stripe init, margin loss, one square of side
``s ≈ sqrt(p · H · W)`` per iteration filled with ±eps per channel, ``p`` halved on the schedule
defined for 10,000 queries and rescaled to ``n_queries``. Initially misclassified examples are
not attacked (0 queries). Every returned ``x_adv`` satisfies ``|x_adv - x| ≤ eps`` and
``0 ≤ x_adv ≤ 1`` exactly in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# (upper bound of the iteration index on a 10,000-query scale, divisor of p_init)
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
             (6000, 128), (8000, 256), (10000, 512))


@dataclass
class SquareResult:
    x_adv: np.ndarray        # float32, same shape as x
    clean_correct: np.ndarray  # bool [N]: correct before the attack
    adv_correct: np.ndarray    # bool [N]: correct on x_adv (False wherever clean_correct is False)
    success: np.ndarray        # bool [N]: clean_correct and not adv_correct
    queries: np.ndarray        # int [N]: model queries spent on each example

    @property
    def adv_accuracy(self) -> float:
        return float(self.adv_correct.mean()) if len(self.adv_correct) else float("nan")


def p_schedule(p_init: float, it: int, n_queries: int) -> float:
    """Fraction of pixels changed at iteration ``it`` (the paper's piecewise-constant halving)."""
    scaled = int(it / n_queries * 10000)
    for bound, div in _SCHEDULE:
        if scaled <= bound:
            return p_init / div
    return p_init


def margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Correct-class logit minus the best other one: > 0 means still correctly classified."""
    logits = np.asarray(logits, dtype=np.float64)
    idx = np.arange(len(y))
    correct = logits[idx, y].copy()
    others = logits.copy()
    others[idx, y] = -np.inf
    return correct - others.max(1)


def project_linf(x_adv: np.ndarray, x: np.ndarray, eps: float) -> np.ndarray:
    """Clip to the eps-ball and [0, 1], then step float32 rounding overshoots back by one ulp.

    The bound is the largest float32 ≤ eps, so the check holds whether it is computed in float32
    or float64 (x + eps rounded to float32 can land one ulp outside the ball otherwise).
    """
    bound = _eps32(eps)
    x = x.astype(np.float32)
    out = np.clip(np.clip(x_adv, x - bound, x + bound), 0.0, 1.0).astype(np.float32)
    for _ in range(4):
        bad = np.abs(out.astype(np.float64) - x.astype(np.float64)) > float(bound)
        if not bad.any():
            break
        out[bad] = np.nextafter(out[bad], x[bad])
    return out


def _eps32(eps: float) -> np.float32:
    e = np.float32(eps)
    return np.nextafter(e, np.float32(0)) if float(e) > eps else e


def square_attack(
    predict_fn: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    n_queries: int = 5000,
    p_init: float = 0.05,
    seed: int = 0,
) -> SquareResult:
    """Untargeted L∞ Square attack on ``x`` [N, C, H, W] (float32 in [0, 1]) with labels ``y``."""
    x, y = _check_inputs(x, y, eps, n_queries)
    rng = np.random.default_rng(seed)
    clean_correct = margin(predict_fn(x), y) > 0
    x_adv, queries = x.copy(), np.zeros(len(x), dtype=np.int64)
    idx = np.flatnonzero(clean_correct)
    if len(idx) and n_queries > 0:
        x_adv[idx], queries[idx], _ = _attack(predict_fn, x[idx], y[idx], _eps32(eps), n_queries, p_init, rng)
    x_adv = project_linf(x_adv, x, eps)
    adv_correct = clean_correct & (margin(predict_fn(x_adv), y) > 0)
    return SquareResult(x_adv, clean_correct, adv_correct, clean_correct & ~adv_correct, queries)


def _check_inputs(x, y, eps, n_queries):
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y).astype(np.int64)
    if x.ndim != 4 or len(y) != len(x):
        raise ValueError(f"expected x [N, C, H, W] and y [N], got {x.shape} and {y.shape}")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must be pixels in [0, 1]")
    if not eps > 0 or n_queries < 0:
        raise ValueError(f"need eps > 0 and n_queries >= 0, got {eps} and {n_queries}")
    return x, y


def _attack(predict_fn, x, y, eps, n_queries, p_init, rng):
    """The search on correctly classified examples; returns (x_best, queries, margins)."""
    n, c, h, w = x.shape
    x_best = np.clip(x + rng.choice([-eps, eps], size=(n, c, 1, w)).astype(np.float32), 0, 1)
    best = margin(predict_fn(x_best), y)
    queries = np.ones(n, dtype=np.int64)
    for it in range(n_queries - 1):
        active = np.flatnonzero(best > 0)
        if not len(active):
            break
        s = int(round(np.sqrt(p_schedule(p_init, it, n_queries) * h * w)))
        s = min(max(s, 1), max(h - 1, 1), max(w - 1, 1))
        x_new = np.stack([_propose(x[i], x_best[i], s, eps, rng) for i in active])
        loss = margin(predict_fn(x_new), y[active])
        better = loss < best[active]
        x_best[active[better]] = x_new[better]
        best[active[better]] = loss[better]
        queries[active] += 1
    return x_best, queries, best


def _propose(x, x_best, s, eps, rng, max_tries: int = 100):
    """Change one s×s window of the current perturbation to a fresh ±eps per channel.

    As in the reference code, a draw that leaves the window unchanged (after clipping to [0, 1])
    is redrawn, so no query is wasted on the same point.
    """
    c, h, w = x.shape
    top, left = rng.integers(0, max(h - s, 1)), rng.integers(0, max(w - s, 1))
    win = (slice(None), slice(top, top + s), slice(left, left + s))
    delta = x_best - x
    for _ in range(max_tries):
        delta[win] = rng.choice([-eps, eps], size=(c, 1, 1)).astype(np.float32)
        if np.any(np.abs(np.clip(x[win] + delta[win], 0, 1) - x_best[win]) >= 1e-7):
            break
    return np.clip(x + delta, 0, 1).astype(np.float32)
