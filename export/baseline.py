"""Regression against the released model: this check's figures against an earlier ``report.json``.

Why: the question a release gate often asks is relative (did this change make the model slower,
bigger or less robust than the one we ship?), and a fixed budget cannot ask it. Each figure has
a direction: accuracies are worse when lower; MOps, parameters and latency are worse when higher.
A tolerance is absolute (``adv_acc=0.01``: at most one point lower) or relative to the baseline's
value (``latency_p90_ms=5%``); ``mops=0`` allows no increase at all.

Two reports are only comparable when they measured the same thing, so a baseline written under
another profile, input shape or eps, or on other evaluation images (the attack set's ``x_clean``
and ``y``), is refused with :class:`RcompError` (exit 2) before anything is measured. Latency also
depends on the machine: measured on another host (CPU model, core count, onnxruntime version or
session settings differ) its rows are *skipped* and say so; they are never compared silently.
No torch here: this runs in the light CI install.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from rcomp.errors import RcompError

MAX_BASELINE_BYTES = 16 << 20  # a report.json is a few kB; anything this large is not one
# Host keys that change a latency figure. The hostname is recorded but not compared: CI runners of
# one machine type get a fresh hostname per job and measure alike.
HOST_KEYS = ("machine", "cpu_model", "cpus", "onnxruntime", "provider", "threads", "graph_optimization")
DEFAULT_MAX_REGRESSION = "mops=0,params=0,clean_acc=0.01,adv_acc=0.01,latency_p90_ms=10%"
_FLOAT_SLACK = 1e-9  # 0.45 - 0.01 is 0.44000000000000006 in binary: do not fail 0.44 on it


@dataclass(frozen=True)
class Figure:
    """One comparable figure of a report and where ``report.json`` keeps it."""

    name: str
    unit: str
    lower_is_worse: bool
    path: tuple[str, ...]
    latency: bool = False
    accuracy: bool = False


FIGURES = {f.name: f for f in (
    Figure("mops", "MOps", False, ("metrics", "mops")),
    Figure("params", "params", False, ("metrics", "onnx_params")),
    Figure("clean_acc", "fraction", True, ("metrics", "clean_acc"), accuracy=True),
    Figure("adv_acc", "fraction", True, ("metrics", "adv_acc"), accuracy=True),
    Figure("transfer_acc", "fraction", True, ("metrics", "transfer_acc"), accuracy=True),
    Figure("square_acc", "fraction", True, ("metrics", "square_acc"), accuracy=True),
    Figure("latency_p50_ms", "ms", False, ("latency", "model", "p50_ms"), latency=True),
    Figure("latency_p90_ms", "ms", False, ("latency", "model", "p90_ms"), latency=True),
    Figure("latency_p99_ms", "ms", False, ("latency", "model", "p99_ms"), latency=True),
)}


@dataclass(frozen=True)
class Tolerance:
    """How much worse a figure may get: an absolute amount, or a percentage of the baseline."""

    amount: float
    relative: bool

    def allowed(self, base: float) -> float:
        return self.amount / 100.0 * abs(base) if self.relative else self.amount

    def __str__(self) -> str:
        return f"{self.amount:g}%" if self.relative else f"{self.amount:g}"


def parse_max_regression(text: str) -> dict[str, Tolerance]:
    """``adv_acc=0.01,latency_p90_ms=5%,mops=0`` → {figure: Tolerance}; a one-line error otherwise."""
    out: dict[str, Tolerance] = {}
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or name not in FIGURES:
            raise RcompError(f"--max-regression {part!r}: expected FIGURE=AMOUNT or FIGURE=PCT% with FIGURE one of "
                             f"{', '.join(FIGURES)}")
        if name in out:
            raise RcompError(f"--max-regression: {name} given twice")
        relative = value.endswith("%")
        try:
            amount = float(value[:-1] if relative else value)
        except ValueError:
            raise RcompError(f"--max-regression {part!r}: {value!r} is not a number (or a percentage)") from None
        if not math.isfinite(amount) or amount < 0:
            raise RcompError(f"--max-regression {part!r}: the tolerance must be a finite number >= 0")
        out[name] = Tolerance(amount, relative)
    if not out:
        raise RcompError("--max-regression: no figure given")
    return out


@dataclass
class Baseline:
    """A released model's report and the tolerances it is compared with."""

    path: str
    report: dict
    tolerances: dict[str, Tolerance]
    explicit: bool  # tolerances named by the user: a figure missing on either side fails


def load_baseline(path, max_regression: str | None = None) -> Baseline:
    """Read ``OLD/report.json``; bad JSON, a report without the context this version writes, or
    a bad ``--max-regression`` are bad input (exit 2)."""
    path = os.fspath(path)
    tolerances = parse_max_regression(max_regression or DEFAULT_MAX_REGRESSION)
    if not os.path.isfile(path):
        raise RcompError(f"{path}: no such baseline report")
    if os.path.getsize(path) > MAX_BASELINE_BYTES:
        raise RcompError(f"{path}: {os.path.getsize(path)} bytes is not a report.json (limit {MAX_BASELINE_BYTES})")
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RcompError(f"{path}: not a readable report.json ({type(exc).__name__})") from None
    ok = isinstance(report, dict) and all(isinstance(report.get(k), dict) for k in ("context", "metrics"))
    if not ok:
        raise RcompError(f"{path}: not a report.json of rcomp check with a 'context' section "
                         "(re-check the released model with this version to get one)")
    return Baseline(path, report, tolerances, explicit=max_regression is not None)


def check_context(baseline: Baseline, context: dict) -> None:
    """Refuse (exit 2) a baseline that measured something else than this check will."""
    old = baseline.report["context"]
    name = os.path.basename(baseline.path)
    for key, what in (("profile", "profile"), ("input_shape", "input shape"), ("eps", "eps")):
        if not _same(old.get(key), context.get(key)):
            raise RcompError(f"{name}: baseline measured with {what} {old.get(key)!r}, this check uses "
                             f"{context.get(key)!r}: the figures are not comparable")
    if any(FIGURES[f].accuracy for f in baseline.tolerances):
        a, b = _images(old.get("attack_set")), _images(context.get("attack_set"))
        if a != b:
            raise RcompError(f"{name}: baseline accuracies were measured on other images (attack set "
                             f"{_describe(old.get('attack_set'))}, now {_describe(context.get('attack_set'))}): "
                             "not comparable")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)
    return (list(a) if isinstance(a, (list, tuple)) else a) == (list(b) if isinstance(b, (list, tuple)) else b)


def _images(attack_set) -> tuple | None:
    """What makes two accuracy figures comparable: the same clean images, labels and eps."""
    if not isinstance(attack_set, dict):
        return None
    return attack_set.get("images_sha256"), attack_set.get("n"), round(float(attack_set.get("eps", float("nan"))), 9)


def _describe(attack_set) -> str:
    if not isinstance(attack_set, dict):
        return "none"
    return f"{attack_set.get('n')} images, sha256 {str(attack_set.get('images_sha256'))[:12]}, eps {attack_set.get('eps')}"


def host_difference(old: dict | None, new: dict | None) -> list[str]:
    """The host keys that differ (``[]`` when latency is comparable)."""
    old, new = old or {}, new or {}
    return [f"{k} {old.get(k)!r} vs {new.get(k)!r}" for k in HOST_KEYS if old.get(k) != new.get(k)]


def _lookup(report: dict, path: tuple[str, ...]) -> float | None:
    value = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def compare(baseline: Baseline, new: dict) -> tuple[list[dict], list[str]]:
    """Rows (fields of :class:`rcomp.export.check.CheckRow`) and notes: one row per compared figure."""
    old = baseline.report
    moved = host_difference(old["context"].get("host"), new.get("context", {}).get("host"))
    rows, notes = [], []
    if moved and any(FIGURES[f].latency for f in baseline.tolerances):
        notes.append("baseline latency was measured on another host (" + "; ".join(moved) + "): latency not compared")
    for name, tol in baseline.tolerances.items():
        fig = FIGURES[name]
        a, b = _lookup(old, fig.path), _lookup(new, fig.path)
        if fig.latency and moved and a is not None:
            rows.append(_row(fig, b, None, "skipped", None, f"baseline {a:.4g} ms measured on another host: not compared"))
        elif a is None or b is None:
            if baseline.explicit:
                side = "the baseline" if a is None else "this check"
                rows.append(_row(fig, b, None, "not evaluated", False, f"{side} has no {name} (tolerance {tol})"))
        else:
            rows.append(_judge(fig, a, b, tol))
    return rows, notes


def _judge(fig: Figure, base: float, value: float, tol: Tolerance) -> dict:
    allowed = tol.allowed(base)
    slack = _FLOAT_SLACK * max(1.0, abs(base))
    limit = base - allowed if fig.lower_is_worse else base + allowed
    ok = value >= limit - slack if fig.lower_is_worse else value <= limit + slack
    change = value - base
    rel = f", {change / abs(base):+.1%}" if base else ""
    kind = "relative" if tol.relative else "absolute"
    detail = f"baseline {base:.6g}, now {value:.6g} (change {change:+.4g}{rel}); tolerance {tol} ({kind}), " \
             f"{'lower' if fig.lower_is_worse else 'higher'} is worse"
    return _row(fig, value, limit, "pass" if ok else "fail", ok, detail)


def _row(fig: Figure, value, limit, status: str, passed, detail: str) -> dict:
    return {"name": fig.name, "value": value, "limit": limit, "unit": fig.unit, "passed": passed, "status": status,
            "detail": detail, "bound": "min" if fig.lower_is_worse else "max"}
