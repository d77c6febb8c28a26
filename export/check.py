"""The CI gate: judge an ONNX file against every budget and robustness floor of a profile.

Runs on the target board with the light install (onnx, onnxruntime, numpy, pyyaml): no torch.
Everything is measured on the artefact that ships: MACs and parameters from the graph, latency
and accuracies from an onnxruntime session configured like the profile's target.

Rules that make it a gate rather than a report:

* bad input (missing file, not ONNX, wrong input shape, malformed attack set) raises
  :class:`rcomp.errors.RcompError` before anything is measured (CLI exit 2);
* a budget or floor that cannot be evaluated is a row with status ``"not evaluated"`` and counts
  as a failure: a gate that passes because nothing was checked is not a gate;
* adversarial accuracy is per-example worst case over the clean input, the transferred PGD
  example and (optionally) a Square attack run against the ONNX session itself;
* sanity violations (adversarial above clean, black-box beating white-box) are warnings flagged
  as possible gradient masking, not failures: they say the robustness number may be too kind.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rcomp.errors import RcompError
from rcomp.export import runtime
from rcomp.export.onnx_count import count_onnx, input_spec, load_model, read_metadata
from rcomp.export.square import square_attack
from rcomp.reports import render_markdown_table, render_table, write_bytes_atomic, write_json_atomic, write_text_atomic

ATTACK_KEYS = ("x_clean", "y", "x_adv", "eps", "attack")
EPS_TOL = 1e-6  # float32 pixels: 8/255 stored as float32 differs from the float64 value by ~1e-9


# --------------------------------------------------------------------------------------------
# Report types
# --------------------------------------------------------------------------------------------


@dataclass
class CheckRow:
    name: str
    value: float | None
    limit: float | None
    unit: str
    passed: bool | None
    status: str  # "pass" | "fail" | "not evaluated"
    detail: str = ""

    @classmethod
    def compare(cls, name, value, limit, unit, detail="", *, at_least=False) -> "CheckRow":
        """A measured value against a ceiling (budgets) or, with ``at_least``, a floor."""
        ok = bool(value >= limit) if at_least else bool(value <= limit)
        return cls(name, float(value), float(limit), unit, ok, "pass" if ok else "fail", detail)

    @classmethod
    def not_evaluated(cls, name, limit, unit, reason) -> "CheckRow":
        return cls(name, None, float(limit), unit, False, "not evaluated", reason)


@dataclass
class CheckReport:
    onnx_path: str
    profile: str
    rows: list[CheckRow] = field(default_factory=list)
    latency: dict[str, dict] = field(default_factory=dict)  # "model" (and "dense") -> LatencyStats
    flags: list[str] = field(default_factory=list)  # warnings: sanity violations, notes
    metrics: dict[str, object] = field(default_factory=dict)  # everything measured, for the JSON
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.status == "pass" for r in self.rows)

    def to_dict(self) -> dict:
        return {"onnx_path": self.onnx_path, "profile": self.profile, "passed": self.passed,
                "rows": [asdict(r) for r in self.rows], "latency": self.latency, "flags": self.flags,
                "metrics": self.metrics, "metadata": self.metadata}

    def _table(self) -> list[list]:
        return [[r.name, _fmt(r.value), _fmt(r.limit), r.unit, r.status.upper(), r.detail] for r in self.rows]

    def _headline(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        failed = sum(r.status != "pass" for r in self.rows)
        tail = f" ({failed} of {len(self.rows)} checks failed or not evaluated)" if failed else ""
        return f"rcomp check {self.onnx_path} against profile '{self.profile}': {verdict}{tail}"

    def _extras(self) -> list[str]:
        lines = [f"latency {name}: p50 {s['p50_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms "
                 f"({s['runs']} runs)" for name, s in self.latency.items()]
        if "speedup_p50" in self.metrics:
            m = self.metrics
            lines.append(f"vs dense: {m['speedup_p50']:.2f}x faster (p50), {m['speedup_p90']:.2f}x (p90); "
                         f"{m['ops_reduction']:.2f}x fewer MACs")
        return lines + [f"WARNING: {f}" for f in self.flags]

    def to_text(self) -> str:
        headers = ["check", "value", "limit", "unit", "status", "detail"]
        return "\n".join([self._headline(), "", render_table(self._table(), headers), ""] + self._extras())

    def to_markdown(self) -> str:
        headers = ["check", "value", "limit", "unit", "status", "detail"]
        extras = [f"- {line}" for line in self._extras()]
        return "\n".join([f"# {self._headline()}", "", render_markdown_table(self._table(), headers), ""] + extras) + "\n"


def _fmt(v: float | None) -> float | int | None:
    """Counts print in full (272474, not 2.725e+05); the table renders other floats with 4 digits."""
    return int(v) if v is not None and float(v).is_integer() and abs(v) >= 1000 else v


def write_report(report: CheckReport, out_dir) -> tuple[Path, Path]:
    """``report.json`` (machine-readable) and ``report.md`` in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return (write_json_atomic(out / "report.json", report.to_dict()),
            write_text_atomic(out / "report.md", report.to_markdown()))


# --------------------------------------------------------------------------------------------
# Attack sets
# --------------------------------------------------------------------------------------------


@dataclass
class AttackSet:
    x_clean: np.ndarray
    y: np.ndarray
    x_adv: np.ndarray
    eps: float
    attack: str


def make_attack_set(path, x_clean, y, x_adv, eps: float, attack_name: str) -> Path:
    """Write the ``.npz`` that ships with a model: clean inputs, labels, and adversarial examples
    crafted on the PyTorch model (validated here, so a bad set fails where it is made)."""
    aset = AttackSet(np.asarray(x_clean, np.float32), np.asarray(y).astype(np.int64),
                     np.asarray(x_adv, np.float32), float(eps), str(attack_name))
    _validate_attack_set(aset, str(path))
    buf = io.BytesIO()
    np.savez(buf, x_clean=aset.x_clean, y=aset.y, x_adv=aset.x_adv, eps=np.float64(aset.eps), attack=np.str_(aset.attack))
    return write_bytes_atomic(path, buf.getvalue())


def load_attack_set(path, input_shape, eps: float | None) -> AttackSet:
    """Read and validate an attack set against the model's input shape and the profile's eps."""
    name = os.path.basename(os.fspath(path))
    if not os.path.isfile(path):
        raise RcompError(f"{path}: no such attack set")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ATTACK_KEYS if k not in z.files]
            if missing:
                raise RcompError(f"{name}: attack set lacks {', '.join(missing)} (needs {', '.join(ATTACK_KEYS)})")
            aset = AttackSet(z["x_clean"], z["y"], z["x_adv"], float(z["eps"]), str(z["attack"]))
    except RcompError:
        raise
    except Exception as exc:
        raise RcompError(f"{name}: not a readable .npz attack set ({type(exc).__name__})") from None
    _validate_attack_set(aset, name, tuple(input_shape[1:]))
    _check_eps(aset.eps, eps, name)
    return aset


def _validate_attack_set(a: AttackSet, name: str, chw: tuple | None = None) -> None:
    if a.x_clean.ndim != 4 or a.x_clean.shape != a.x_adv.shape or a.y.shape != (len(a.x_clean),):
        raise RcompError(f"{name}: expected x_clean and x_adv [N, C, H, W] and y [N], got "
                         f"{a.x_clean.shape}, {a.x_adv.shape}, {a.y.shape}")
    if not len(a.y) or a.x_clean.dtype != np.float32 or a.x_adv.dtype != np.float32 or a.y.dtype.kind not in "iu":
        raise RcompError(f"{name}: expected N > 0, float32 x_clean/x_adv and integer y, got N={len(a.y)}, "
                         f"{a.x_clean.dtype}/{a.x_adv.dtype}/{a.y.dtype}")
    if chw is not None and a.x_clean.shape[1:] != chw:
        raise RcompError(f"{name}: examples of shape {a.x_clean.shape[1:]} do not fit the model input {chw}")
    if not (np.isfinite(a.x_adv).all() and a.x_adv.min() >= 0 and a.x_adv.max() <= 1 and a.x_clean.min() >= 0 and a.x_clean.max() <= 1):
        raise RcompError(f"{name}: pixels must be finite and in [0, 1]")
    dist = float(np.abs(a.x_adv.astype(np.float64) - a.x_clean).max())
    if dist > a.eps + EPS_TOL:
        raise RcompError(f"{name}: x_adv is {dist:.6g} from x_clean in L-inf, more than its eps {a.eps:.6g}")


def _check_eps(got: float, want: float | None, name: str) -> None:
    """The floor is defined at the profile's eps. A larger eps would fail models unfairly; a
    smaller one would pass weak ones, so both are refused."""
    if want is not None and abs(got - want) > EPS_TOL:
        rel = "larger" if got > want else "smaller"
        raise RcompError(f"{name}: attack set eps {got:.6g} is {rel} than the profile's eps {want:.6g}; "
                         "regenerate it at the profile's eps")


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """Everything validated up front, so a bad input never costs a latency measurement."""

    path: str
    model: object  # onnx.ModelProto, loaded once
    metadata: dict
    aset: AttackSet | None
    x: np.ndarray | None
    y: np.ndarray | None
    dense: str | None


def run_check(
    onnx_path,
    profile,
    *,
    attack_set: str | None = None,
    data_x: np.ndarray | None = None,
    data_y: np.ndarray | None = None,
    square_queries: int = 0,
    square_n: int = 100,
    latency_runs: int = 100,
    dense_onnx: str | None = None,
    seed: int = 0,
) -> CheckReport:
    """Evaluate every budget and floor of ``profile`` on ``onnx_path`` (see the module doc).

    Clean accuracy uses the attack set's ``x_clean`` when given (so clean and adversarial are on
    the same examples), else ``data_x``/``data_y``. Metadata read by the budgets (written by the
    export): ``rcomp.mops`` / ``rcomp.dense_mops`` in MOps (1e6 MACs), ``rcomp.params`` /
    ``rcomp.dense_params`` as PyTorch parameter counts.
    """
    inp = _validate_inputs(onnx_path, profile, attack_set, data_x, data_y, dense_onnx)
    report = CheckReport(onnx_path=inp.path, profile=profile.name, metadata=inp.metadata)
    cost = count_onnx(inp.model)
    report.metrics.update(macs=cost.macs, mops=cost.mops, onnx_params=cost.params, not_counted=cost.not_counted)
    _cost_rows(report, cost, profile.budgets, inp)
    sess, on_target = _session(inp.path, profile.target, report)
    _latency(report, sess, on_target, profile, inp, latency_runs, seed)
    _robustness(report, sess, profile, inp, square_queries, square_n, seed)
    if not report.rows:
        report.rows.append(CheckRow("budgets", None, None, "", False, "not evaluated", "profile sets no budget or floor"))
    return report


def _validate_inputs(onnx_path, profile, attack_set, data_x, data_y, dense_onnx) -> _Inputs:
    path = os.fspath(onnx_path)
    model = load_model(path)
    _check_shape(path, model, profile)
    if dense_onnx is not None:
        _check_shape(os.fspath(dense_onnx), load_model(dense_onnx, load_weights=False), profile)
    eps = profile.robustness.eps if profile.robustness else None
    aset = load_attack_set(attack_set, profile.input_shape, eps) if attack_set else None
    x, y = _check_data(data_x, data_y, profile.input_shape) if data_x is not None else (None, None)
    return _Inputs(path, model, read_metadata(model), aset, x, y, os.fspath(dense_onnx) if dense_onnx else None)


def _check_shape(path: str, model, profile) -> None:
    name, shape = input_spec(model)
    if tuple(shape or ()) != tuple(profile.input_shape):
        raise RcompError(f"{os.path.basename(path)}: input {name!r} has shape {tuple(shape or ())}, "
                         f"profile '{profile.name}' expects {tuple(profile.input_shape)}")


def _check_data(x, y, input_shape):
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if x.ndim != 4 or x.shape[1:] != tuple(input_shape[1:]) or y.shape != (len(x),) or not len(x):
        raise RcompError(f"data: expected x [N>0, {', '.join(map(str, input_shape[1:]))}] and y [N], "
                         f"got {x.shape} and {getattr(y, 'shape', None)}")
    return x, y.astype(np.int64)


def _meta_number(meta: dict, key: str) -> float | None:
    try:
        value = float(meta[key])
    except (KeyError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def _cost_rows(report: CheckReport, cost, budgets, inp: _Inputs) -> None:
    meta = inp.metadata
    meta_mops = _meta_number(meta, "rcomp.mops")
    if meta_mops is not None and abs(meta_mops - cost.mops) > max(0.005 * cost.mops, 1e-3):
        report.flags.append(f"metadata rcomp.mops={meta_mops:.4g} differs from the graph count {cost.mops:.4g} MOps")
    if budgets.mops is not None:
        report.rows.append(CheckRow.compare("mops", cost.mops, budgets.mops, "MOps", "conv+linear MACs from the graph"))
    params, src = _params(cost, meta)
    if budgets.params is not None:
        report.rows.append(CheckRow.compare("params", params, budgets.params, "params", src))
    if budgets.ops_fraction is not None:
        report.rows.append(_ops_fraction(cost, budgets.ops_fraction, meta, inp.dense, report))
    if budgets.params_fraction is not None:
        report.rows.append(_params_fraction(budgets.params_fraction, meta))


def _params(cost, meta: dict) -> tuple[float, str]:
    value = _meta_number(meta, "rcomp.params")
    if value is not None:
        return value, "PyTorch count from metadata rcomp.params (BN affine included)"
    return float(cost.params), "ONNX initializer elements (no rcomp.params in metadata; BN folded)"


def _ops_fraction(cost, limit: float, meta: dict, dense: str | None, report: CheckReport) -> CheckRow:
    dense_mops, src = _meta_number(meta, "rcomp.dense_mops"), "metadata rcomp.dense_mops"
    if dense_mops is None and dense is not None:
        dense_mops, src = count_onnx(dense).mops, f"graph count of {os.path.basename(dense)}"
    if dense_mops is None:
        return CheckRow.not_evaluated("ops_fraction", limit, "of dense",
                                      "needs rcomp.dense_mops in the ONNX metadata (or --dense)")
    report.metrics["dense_mops"] = dense_mops
    return CheckRow.compare("ops_fraction", cost.mops / dense_mops, limit, "of dense", f"dense {dense_mops:.4g} MOps ({src})")


def _params_fraction(limit: float, meta: dict) -> CheckRow:
    """Both counts from the metadata: mixing the PyTorch and initializer conventions would skew it."""
    params, dense = _meta_number(meta, "rcomp.params"), _meta_number(meta, "rcomp.dense_params")
    if params is None or dense is None:
        return CheckRow.not_evaluated("params_fraction", limit, "of dense",
                                      "needs rcomp.params and rcomp.dense_params in the ONNX metadata")
    return CheckRow.compare("params_fraction", params / dense, limit, "of dense", f"{params:.0f} of {dense:.0f} params (PyTorch counts)")


def _session(path: str, target, report: CheckReport):
    """The target's session, or a CPU one (noted) when its provider is missing here: accuracy
    does not depend on the provider's speed, latency does (that row then says so)."""
    threads = runtime.effective_threads(target)
    if threads != target.threads:
        report.flags.append(f"profile asks for {target.threads} threads, this machine has {threads} cores: "
                            f"latency measured with {threads} threads (measure on the target for the real figure)")
    try:
        return runtime.session_for_target(path, target), True
    except RcompError as exc:
        if target.execution_provider == "CPUExecutionProvider":
            raise
        report.flags.append(f"{exc}; accuracy measured with CPUExecutionProvider instead")
        return runtime.make_session(path, threads=target.threads, graph_optimization=target.graph_optimization), False


def _latency(report: CheckReport, sess, on_target: bool, profile, inp: _Inputs, runs: int, seed: int) -> None:
    limit = profile.budgets.latency_p90_ms
    if limit is None and inp.dense is None:
        return
    if not on_target:
        if limit is not None:
            report.rows.append(CheckRow.not_evaluated(
                "latency_p90_ms", limit, "ms", f"{profile.target.execution_provider} is not available on this machine"))
        return
    stats = _measure(report, sess, profile, inp, runs, seed)
    if limit is not None:
        t = profile.target
        detail = f"onnxruntime {t.execution_provider}, threads={runtime.effective_threads(t)}, " \
                 f"optimization={t.graph_optimization}, {stats.runs} runs on this machine"
        report.rows.append(CheckRow.compare("latency_p90_ms", stats.p90_ms, limit, "ms", detail))


def _measure(report: CheckReport, sess, profile, inp: _Inputs, runs: int, seed: int):
    warmup = min(10, runs)
    if inp.dense is None:
        stats = runtime.measure_latency(sess, profile.input_shape, warmup=warmup, runs=runs, seed=seed)
        report.latency["model"] = stats.to_dict()
        return stats
    dense = runtime.session_for_target(inp.dense, profile.target)
    both = runtime.compare_latency({"model": sess, "dense": dense}, profile.input_shape, runs=runs,
                                   warmup=warmup, rounds=min(5, runs), seed=seed)
    report.latency = {k: v.to_dict() for k, v in both.items()}
    m, d = both["model"], both["dense"]
    dense_macs = count_onnx(inp.dense).macs
    report.metrics.update(speedup_p50=d.p50_ms / m.p50_ms, speedup_p90=d.p90_ms / m.p90_ms,
                          dense_macs=dense_macs, ops_reduction=dense_macs / max(report.metrics["macs"], 1))
    return m


# --------------------------------------------------------------------------------------------
# Robustness
# --------------------------------------------------------------------------------------------


def _robustness(report: CheckReport, sess, profile, inp: _Inputs, square_queries: int, square_n: int, seed: int) -> None:
    rob = profile.robustness
    x, y = (inp.aset.x_clean, inp.aset.y) if inp.aset else (inp.x, inp.y)
    clean = adv = None
    if x is not None:
        clean = _correct(sess, x, y)
        source = "attack set x_clean" if inp.aset else "data"
        report.metrics.update(n_examples=len(y), clean_acc=float(clean.mean()), clean_source=source)
    if inp.aset is not None:
        adv = _adversarial(report, sess, inp.aset, clean, rob, square_queries, square_n, seed)
    elif square_queries > 0:
        report.flags.append("Square attack skipped: it refines the transfer examples of an attack set (pass --attack-set)")
    if rob is None:
        return
    if rob.min_clean_acc is not None:
        report.rows.append(_floor_row("clean_acc", clean, rob.min_clean_acc, "pass --attack-set (or data)",
                                      report.metrics.get("clean_source", "")))
    if rob.min_adv_acc is not None:
        detail = f"pass --attack-set (PGD examples at eps {rob.eps:.4g})"
        report.rows.append(_floor_row("adv_acc", adv, rob.min_adv_acc, detail, report.metrics.get("adv_source", "")))


def _floor_row(name: str, correct, limit: float, missing: str, source: str = "") -> CheckRow:
    if correct is None:
        return CheckRow.not_evaluated(name, limit, "fraction", f"no examples: {missing}")
    detail = f"{int(correct.sum())}/{len(correct)} correct" + (f" ({source})" if source else "")
    return CheckRow.compare(name, float(correct.mean()), limit, "fraction", detail, at_least=True)


def _correct(sess, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return runtime.predict(sess, x).argmax(1) == y


def _adversarial(report, sess, aset: AttackSet, clean, rob, square_queries, square_n, seed) -> np.ndarray:
    """Per-example worst case: robust only if correct on clean, transfer and Square inputs."""
    transfer = _correct(sess, aset.x_adv, aset.y)
    robust = clean & transfer
    report.metrics.update(attack=aset.attack, attack_eps=aset.eps, transfer_acc=float(transfer.mean()),
                          adv_source=f"worst case of clean and {aset.attack} transfer")
    if transfer.mean() > clean.mean():
        report.flags.append(f"possible gradient masking: accuracy on {aset.attack} examples "
                            f"({transfer.mean():.3f}) is above clean accuracy ({clean.mean():.3f})")
    if square_queries > 0:
        robust = _with_square(report, sess, aset, robust, rob, square_queries, square_n, seed)
    report.metrics["adv_acc"] = float(robust.mean())
    return robust


def _with_square(report, sess, aset: AttackSet, robust, rob, queries, square_n, seed) -> np.ndarray:
    k = min(square_n, len(aset.y))
    eps = rob.eps if rob is not None else aset.eps
    res = square_attack(lambda z: runtime.predict(sess, z), aset.x_clean[:k], aset.y[:k],
                        eps=eps, n_queries=queries, seed=seed)
    white = float(robust[:k].mean())
    robust = robust.copy()
    robust[:k] &= res.adv_correct
    report.metrics.update(square_acc=res.adv_accuracy, square_n=k, square_queries=queries,
                          transfer_acc_on_square_subset=white,
                          adv_source=f"worst case of clean, {aset.attack} transfer and Square ({queries} queries, first {k})")
    if res.adv_accuracy < white:
        report.flags.append(f"possible gradient masking: black-box Square accuracy ({res.adv_accuracy:.3f}) is below "
                            f"the white-box {aset.attack} accuracy ({white:.3f}) on the same {k} examples")
    return robust
