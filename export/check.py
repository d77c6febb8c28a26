"""The CI gate: judge an ONNX file against every budget and robustness floor of a profile.

Runs on the target board with the light install (onnx, onnxruntime, numpy, pyyaml): no torch.
Everything is measured on the artefact that ships: MACs and parameters from the graph, latency
and accuracies from an onnxruntime session configured like the profile's target.

Rules that make it a gate rather than a report:

* bad input (missing file, not ONNX, wrong input shape, malformed attack set, a baseline report
  measured under other conditions) raises :class:`rcomp.errors.RcompError` before anything is
  measured (CLI exit 2);
* every figure judged is measured from the graph (or from a reference the user passes, ``--dense``),
  never read from the file's metadata: metadata exists to be forged. Where the file's ``rcomp.*``
  figures disagree with the graph, the ``metadata`` row fails; an opset above the profile's fails;
* a budget or floor that cannot be evaluated is a row with status ``"not evaluated"`` and counts
  as a failure: a gate that passes because nothing was checked is not a gate;
* the attack set is verified, not trusted: finite eps equal to the profile's, perturbations
  within it and actually used, labels within the model's classes, its size read from the .npy
  headers and capped before a byte is decompressed;
* adversarial accuracy is per-example worst case over the clean input, the transferred PGD
  example and, by default, a Square attack the gate runs itself against the ONNX session (a
  replayed set alone certifies nothing: its images could be unperturbed or weak);
* sanity violations (adversarial above clean, black-box beating white-box) are warnings flagged
  as possible gradient masking, not failures: they say the robustness number may be too kind.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
import zipfile
from dataclasses import asdict, dataclass, field
from math import prod
from pathlib import Path

import numpy as np

from rcomp.errors import RcompError
from rcomp.export import int8_check, runtime
from rcomp.export.onnx_count import COUNTED_OPS, count_onnx, input_spec, load_model, output_classes, read_metadata
from rcomp.export.square import square_attack
from rcomp.reports import render_markdown_table, render_table, write_bytes_atomic, write_json_atomic, write_text_atomic

ATTACK_KEYS = ("x_clean", "y", "x_adv", "eps", "attack")
EPS_TOL = 1e-6  # float32 pixels: 8/255 stored as float32 differs from the float64 value by ~1e-9
MAX_ATTACK_SET_BYTES = 1 << 30  # arrays of an attack set, uncompressed: 10,000 CIFAR pairs are 0.25 GiB
# An example counts as perturbed when its mean |x_adv - x_clean| is at least this share of eps
# (PGD/FGSM/Square move most pixels by eps; pixels clipped at 0 or 1 do not move); at least
# MIN_PERTURBED_FRACTION of the set must be, or it is not an attack set.
PERTURBED_MEAN = 0.1
MIN_PERTURBED_FRACTION = 0.5
# The gate's own attack, on by default and kept modest so the main job and a CI stay fast: at most
# 100 queries x 64 images = 6,400 batch-1 inferences (robust images use every query, broken ones
# stop). A dense ResNet20 took 5.4 ms per inference on this 2-core machine under load (two trainings
# running), so a half-pruned one costs up to ~20 s here; raise --square-queries for a release.
DEFAULT_SQUARE_QUERIES = 100
DEFAULT_SQUARE_N = 64


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
    status: str  # "pass" | "fail" | "not evaluated" | "skipped" (regression rows only)
    detail: str = ""
    bound: str = "max"  # "max": a ceiling (budgets), "min": a floor (accuracies)

    @classmethod
    def compare(cls, name, value, limit, unit, detail="", *, at_least=False) -> "CheckRow":
        """A measured value against a ceiling (budgets) or, with ``at_least``, a floor."""
        ok = bool(value >= limit) if at_least else bool(value <= limit)
        return cls(name, float(value), float(limit), unit, ok, "pass" if ok else "fail", detail, "min" if at_least else "max")

    @classmethod
    def not_evaluated(cls, name, limit, unit, reason, *, at_least=False) -> "CheckRow":
        return cls(name, None, None if limit is None else float(limit), unit, False, "not evaluated", reason,
                   "min" if at_least else "max")

    def summary(self, regression: bool = False) -> str:
        """``mops: 30.1 MOps, limit <= 24 MOps (detail)``: one failing check on one line."""
        name = f"{self.name} vs baseline" if regression else self.name
        if self.status == "not evaluated":
            return f"{name}: not evaluated ({self.detail})"
        op = ">=" if self.bound == "min" else "<="
        num = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
        return f"{name}: {num(self.value)} {self.unit}, limit {op} {num(self.limit)} {self.unit}" + \
               (f" ({self.detail})" if self.detail else "")


@dataclass
class CheckReport:
    onnx_path: str
    profile: str
    rows: list[CheckRow] = field(default_factory=list)
    latency: dict[str, dict] = field(default_factory=dict)  # "model" (and "dense") -> LatencyStats
    flags: list[str] = field(default_factory=list)  # warnings: sanity violations, notes
    metrics: dict[str, object] = field(default_factory=dict)  # everything measured, for the JSON
    metadata: dict[str, str] = field(default_factory=dict)  # shown, never judged (see the module doc)
    context: dict = field(default_factory=dict)  # what a later --baseline must share with this report
    sanity: list[dict] = field(default_factory=list)  # {"name", "ok", "detail"}: warnings, not failures
    regression: dict | None = None  # {"baseline", "rows", "notes"} with --baseline

    @property
    def regression_rows(self) -> list[CheckRow]:
        return [CheckRow(**r) for r in self.regression["rows"]] if self.regression else []

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.status == "pass" for r in self.rows) \
            and all(r.status in ("pass", "skipped") for r in self.regression_rows)

    def failing(self) -> list[str]:
        """One line per failed or unevaluated check, regressions included (the PR comment's list)."""
        return [r.summary() for r in self.rows if r.status != "pass"] + \
               [r.summary(True) for r in self.regression_rows if r.status not in ("pass", "skipped")]

    def to_dict(self) -> dict:
        return {"onnx_path": self.onnx_path, "profile": self.profile, "passed": self.passed,
                "failing": self.failing(), "rows": [asdict(r) for r in self.rows], "regression": self.regression,
                "latency": self.latency, "flags": self.flags, "sanity": self.sanity, "metrics": self.metrics,
                "metadata": self.metadata, "context": self.context}

    def _table(self) -> list[list]:
        return [[r.name, _fmt(r.value), _fmt(r.limit), r.unit, r.status.upper(), r.detail] for r in self.rows]

    def _regression_table(self) -> list[list]:
        return [[r.name, _fmt(r.value), _fmt(r.limit), r.unit, r.status.upper(), r.detail] for r in self.regression_rows]

    def _counts(self) -> tuple[int, int]:
        checks = len(self.rows) + len(self.regression_rows)
        return len(self.failing()), checks

    def _headline(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        failed, checks = self._counts()
        tail = f" ({failed} of {checks} checks failed or not evaluated)" if failed else ""
        return f"rcomp check {self.onnx_path} against profile '{self.profile}': {verdict}{tail}"

    def _extras(self) -> list[str]:
        lines = [f"latency {name}: p50 {s['p50_ms']:.3f} ms, p90 {s['p90_ms']:.3f} ms, p99 {s['p99_ms']:.3f} ms "
                 f"({s['runs']} runs)" for name, s in self.latency.items()]
        if "speedup_p50" in self.metrics:
            m = self.metrics
            lines.append(f"vs dense: {m['speedup_p50']:.2f}x faster (p50), {m['speedup_p90']:.2f}x (p90); "
                         f"{m['ops_reduction']:.2f}x fewer MACs")
        worst = self.metrics.get("worst_class")
        if worst:
            lines.append(f"worst class: {worst['class']} ({worst['n']} images): clean {worst['clean_acc']:.2%} "
                         f"(of {worst['classes_checked']} classes checked)")
        lines += int8_check.summary_lines(self)  # INT8 hook (issue 51): each attack, the minimum, vs float
        return lines + [f"WARNING: {f}" for f in self.flags]

    def to_text(self) -> str:
        headers = ["check", "value", "limit", "unit", "status", "detail"]
        lines = [self._headline()] + [f"  FAILED {line}" for line in self.failing()]
        lines += ["", render_table(self._table(), headers), ""]
        if self.regression is not None:
            lines += [f"regression against {self.regression['baseline']}:", "",
                      render_table(self._regression_table(), headers) if self.regression["rows"] else "(no figure compared)",
                      ""]
        return "\n".join(lines + self._extras())

    def to_markdown(self) -> str:
        """Verdict and failing checks first, so the top of the file is a pull-request comment."""
        headers = ["check", "value", "limit", "unit", "status", "detail"]
        failed, checks = self._counts()
        model = f"`{os.path.basename(self.onnx_path)}` against profile `{self.profile}`"
        if self.passed:
            top = [f"# rcomp check: PASS", "", f"All {checks} checks pass: {model}."]
        else:
            top = [f"# rcomp check: FAIL", "", f"{failed} of {checks} checks failed: {model}.", ""]
            top += [f"- **{line.split(':', 1)[0]}**:{line.split(':', 1)[1]}" for line in self.failing()]
        parts = top + ["", f"{self._headline()}", "", render_markdown_table(self._table(), headers), ""]
        if self.regression is not None:
            parts += [f"## Regression against `{self.regression['baseline']}`", ""]
            parts += [render_markdown_table(self._regression_table(), headers) if self.regression["rows"]
                      else "(no figure compared)", ""]
        return "\n".join(parts + [f"- {line}" for line in self._extras()]) + "\n"


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
    perturbed_fraction: float | None = None  # set by validation

    def fingerprint(self) -> dict:
        """What a baseline's accuracies must share with this check's: the clean images, labels, eps."""
        h = hashlib.sha256(np.ascontiguousarray(self.x_clean, "<f4").tobytes())
        h.update(np.ascontiguousarray(self.y, "<i8").tobytes())
        return {"images_sha256": h.hexdigest(), "n": int(len(self.y)), "eps": float(self.eps), "attack": self.attack,
                "perturbed_fraction": self.perturbed_fraction}


def make_attack_set(path, x_clean, y, x_adv, eps: float, attack_name: str) -> Path:
    """Write the ``.npz`` that ships with a model: clean inputs, labels, and adversarial examples
    crafted on the PyTorch model (validated here, so a bad set fails where it is made)."""
    aset = AttackSet(np.asarray(x_clean, np.float32), np.asarray(y).astype(np.int64),
                     np.asarray(x_adv, np.float32), float(eps), str(attack_name))
    _validate_attack_set(aset, str(path))
    buf = io.BytesIO()
    np.savez(buf, x_clean=aset.x_clean, y=aset.y, x_adv=aset.x_adv, eps=np.float64(aset.eps), attack=np.str_(aset.attack))
    return write_bytes_atomic(path, buf.getvalue())


def load_attack_set(path, input_shape, eps: float | None, num_classes: int | None = None,
                    max_bytes: int = MAX_ATTACK_SET_BYTES) -> AttackSet:
    """Read and validate an attack set against the model's input shape, classes and the profile's eps.

    The arrays' shapes and dtypes are read from the .npy headers inside the zip first: a set that
    would expand beyond ``max_bytes`` (a zip bomb, or a header that lies) is refused before
    anything is decompressed or allocated.
    """
    name = os.path.basename(os.fspath(path))
    if not os.path.isfile(path):
        raise RcompError(f"{path}: no such attack set")
    chw = tuple(input_shape[1:])
    _check_npz_headers(path, name, chw, max_bytes)
    try:
        with np.load(path, allow_pickle=False) as z:
            aset = AttackSet(z["x_clean"], z["y"], z["x_adv"], float(z["eps"]), str(z["attack"]))
    except RcompError:
        raise
    except Exception as exc:
        raise RcompError(f"{name}: not a readable .npz attack set ({type(exc).__name__})") from None
    _validate_attack_set(aset, name, chw)
    _check_eps(aset.eps, eps, name)
    _check_labels(aset.y, num_classes, name)
    return aset


def _npy_headers(path, name: str) -> dict[str, tuple[tuple, np.dtype, int]]:
    """{key: (shape, dtype, stored size)} of the attack set's members, from headers only."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            missing = [k for k in ATTACK_KEYS if f"{k}.npy" not in infos]
            if missing:
                raise RcompError(f"{name}: attack set lacks {', '.join(missing)} (needs {', '.join(ATTACK_KEYS)})")
            for key in ATTACK_KEYS:
                info = infos[f"{key}.npy"]
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                    if version not in read:
                        raise RcompError(f"{name}: {key} is a .npy of version {version}, expected 1.0 or 2.0")
                    shape, _, dtype = read[version](f)
                headers[key] = (tuple(shape), np.dtype(dtype), info.file_size)
    except RcompError:
        raise
    except Exception as exc:  # BadZipFile, a header numpy refuses (objects, too long), ...
        raise RcompError(f"{name}: not a readable .npz attack set ({type(exc).__name__})") from None
    return headers


def _check_npz_headers(path, name: str, chw: tuple, max_bytes: int) -> None:
    size = os.path.getsize(path)
    if size > max_bytes:
        raise RcompError(f"{name}: {size / 2**30:.2f} GiB on disk, above the {max_bytes / 2**30:.3g} GiB cap for an attack set")
    headers = _npy_headers(path, name)
    if any(dtype.hasobject for _, dtype, _ in headers.values()):
        raise RcompError(f"{name}: attack set holds Python objects; only plain arrays are read")
    total = sum(prod(shape) * dtype.itemsize for shape, dtype, _ in headers.values())
    if total > max_bytes:
        shapes = ", ".join(f"{k} {list(s)} {d}" for k, (s, d, _) in headers.items() if prod(s) > 1)
        raise RcompError(f"{name}: its arrays expand to {total / 2**30:.2f} GiB ({shapes}), above the "
                         f"{max_bytes / 2**30:.3g} GiB cap for an attack set")
    (xs, _, _), (ys, _, _), (xa, _, _) = headers["x_clean"], headers["y"], headers["x_adv"]
    if len(xs) != 4 or xs != xa or ys != xs[:1]:
        raise RcompError(f"{name}: expected x_clean and x_adv [N, C, H, W] and y [N], got {xs}, {xa}, {ys}")
    if xs[1:] != chw:
        raise RcompError(f"{name}: examples of shape {xs[1:]} do not fit the model input {chw}")
    if prod(headers["eps"][0]) != 1:
        raise RcompError(f"{name}: eps must be one number, got an array of shape {headers['eps'][0]}")


def _validate_attack_set(a: AttackSet, name: str, chw: tuple | None = None) -> None:
    if a.x_clean.ndim != 4 or a.x_clean.shape != a.x_adv.shape or a.y.shape != (len(a.x_clean),):
        raise RcompError(f"{name}: expected x_clean and x_adv [N, C, H, W] and y [N], got "
                         f"{a.x_clean.shape}, {a.x_adv.shape}, {a.y.shape}")
    if not len(a.y) or a.x_clean.dtype != np.float32 or a.x_adv.dtype != np.float32 or a.y.dtype.kind not in "iu":
        raise RcompError(f"{name}: expected N > 0, float32 x_clean/x_adv and integer y, got N={len(a.y)}, "
                         f"{a.x_clean.dtype}/{a.x_adv.dtype}/{a.y.dtype}")
    if chw is not None and a.x_clean.shape[1:] != chw:
        raise RcompError(f"{name}: examples of shape {a.x_clean.shape[1:]} do not fit the model input {chw}")
    if not (math.isfinite(a.eps) and a.eps > 0):
        raise RcompError(f"{name}: eps must be a finite number > 0, got {a.eps!r}")
    if not (np.isfinite(a.x_adv).all() and np.isfinite(a.x_clean).all() and a.x_adv.min() >= 0 and a.x_adv.max() <= 1
            and a.x_clean.min() >= 0 and a.x_clean.max() <= 1):
        raise RcompError(f"{name}: pixels must be finite and in [0, 1]")
    delta = np.abs(a.x_adv - a.x_clean).reshape(len(a.y), -1)
    dist = float(delta.max())
    if dist > a.eps + EPS_TOL:
        raise RcompError(f"{name}: x_adv is {dist:.6g} from x_clean in L-inf, more than its eps {a.eps:.6g}")
    a.perturbed_fraction = float((delta.mean(1, dtype=np.float64) >= PERTURBED_MEAN * a.eps).mean())
    if a.perturbed_fraction < MIN_PERTURBED_FRACTION:
        raise RcompError(f"{name}: only {a.perturbed_fraction:.0%} of the x_adv differ from x_clean by a mean of "
                         f"{PERTURBED_MEAN:g} eps or more (at least {MIN_PERTURBED_FRACTION:.0%} must): "
                         "the adversarial examples are (nearly) the clean images, not an attack")


def _check_eps(got: float, want: float | None, name: str) -> None:
    """The floor is defined at the profile's eps. A larger eps would fail models unfairly; a
    smaller one would pass weak ones, so both are refused (a NaN compares unequal too)."""
    if want is not None and not abs(got - want) <= EPS_TOL:
        rel = "larger" if got > want else "smaller" if got < want else "not comparable"
        raise RcompError(f"{name}: attack set eps {got:.6g} is {rel} than the profile's eps {want:.6g}; "
                         "regenerate it at the profile's eps")


def _check_labels(y: np.ndarray, num_classes: int | None, name: str) -> None:
    """Labels outside the model's outputs would count as wrong (or crash the indexing): bad input."""
    if num_classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise RcompError(f"{name}: labels range over [{int(y.min())}, {int(y.max())}], the model has "
                         f"{num_classes} classes (0..{num_classes - 1})")


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
    dense_model: object = None  # the --dense reference's onnx.ModelProto (weights not loaded)


def run_check(
    onnx_path,
    profile,
    *,
    attack_set: str | None = None,
    data_x: np.ndarray | None = None,
    data_y: np.ndarray | None = None,
    square_queries: int = DEFAULT_SQUARE_QUERIES,
    square_n: int = DEFAULT_SQUARE_N,
    latency_runs: int = 100,
    dense_onnx: str | None = None,
    seed: int = 0,
    baseline=None,
    max_regression: str | None = None,
) -> CheckReport:
    """Evaluate every budget and floor of ``profile`` on ``onnx_path`` (see the module doc).

    Clean accuracy uses the attack set's ``x_clean`` when given (so clean and adversarial are on
    the same examples), else ``data_x``/``data_y``. MOps and parameters are counted from the graph;
    the ``*_fraction`` budgets divide by the graph count of ``dense_onnx`` (the file's own
    ``rcomp.dense_*`` metadata is checked against it, never used). ``baseline`` (a path to an
    earlier report.json, or a :class:`rcomp.export.baseline.Baseline`) adds the regression rows,
    with ``max_regression`` tolerances (``adv_acc=0.01,latency_p90_ms=5%``).
    """
    bl = _load_baseline(baseline, max_regression)
    inp = _validate_inputs(onnx_path, profile, attack_set, data_x, data_y, dense_onnx)
    report = CheckReport(onnx_path=inp.path, profile=profile.name, metadata=inp.metadata)
    report.context = _context(profile, inp, square_queries, square_n, seed)
    if bl is not None:
        from rcomp.export.baseline import check_context

        check_context(bl, report.context)  # refused before anything is measured
    seconds = report.metrics.setdefault("seconds", {})
    t0 = time.perf_counter()
    report.rows.append(_opset_row(inp.model, profile))
    cost = count_onnx(inp.model)
    report.metrics.update(macs=cost.macs, mops=cost.mops, onnx_params=cost.params, not_counted=cost.not_counted)
    _cost_rows(report, cost, profile.budgets, inp)
    seconds["cost"] = time.perf_counter() - t0
    sess, on_target = _session(inp.path, profile.target, report)
    t0 = time.perf_counter()
    _latency(report, sess, on_target, profile, inp, latency_runs, seed)
    seconds["latency"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _robustness(report, sess, profile, inp, square_queries, square_n, seed)
    seconds["robustness"] = time.perf_counter() - t0
    if int8_check.is_quantized(inp.model):  # INT8 hook (issue 51): agreement and latency vs the float model
        int8_check.compare_with_float(report, sess, profile, inp, latency_runs, seed)
    if all(r.name in ("opset", "metadata") for r in report.rows):
        report.rows.append(CheckRow("budgets", None, None, "", False, "not evaluated", "profile sets no budget or floor"))
    if bl is not None:
        _regression(report, bl)
    return report


def _load_baseline(baseline, max_regression):
    if baseline is None:
        if max_regression is not None:
            raise RcompError("--max-regression needs --baseline (the released model's report.json)")
        return None
    from rcomp.export.baseline import Baseline, load_baseline

    return baseline if isinstance(baseline, Baseline) else load_baseline(baseline, max_regression)


def _regression(report: CheckReport, bl) -> None:
    from rcomp.export.baseline import compare

    rows, notes = compare(bl, report.to_dict())
    report.regression = {"baseline": bl.path, "tolerances": {k: str(v) for k, v in bl.tolerances.items()},
                         "rows": rows, "notes": notes}
    report.flags.extend(notes)


def _context(profile, inp: _Inputs, square_queries: int, square_n: int, seed: int) -> dict:
    """The conditions of the measurement: a later ``--baseline`` must share them to be compared."""
    rob = profile.robustness
    eps = rob.eps if rob is not None else (inp.aset.eps if inp.aset is not None else None)
    return {"profile": profile.name, "input_shape": list(profile.input_shape), "opset": profile.opset, "eps": eps,
            "attack_set": inp.aset.fingerprint() if inp.aset is not None else None,
            "square": {"queries": square_queries, "n": square_n, "seed": seed},
            "host": runtime.host_info(profile.target)}


def _validate_inputs(onnx_path, profile, attack_set, data_x, data_y, dense_onnx) -> _Inputs:
    path = os.fspath(onnx_path)
    model = load_model(path)
    _check_shape(path, model, profile)
    dense_model = None
    if dense_onnx is not None:
        dense_model = load_model(dense_onnx, load_weights=False)
        _check_shape(os.fspath(dense_onnx), dense_model, profile)
    eps = profile.robustness.eps if profile.robustness else None
    classes = output_classes(model)
    aset = load_attack_set(attack_set, profile.input_shape, eps, classes) if attack_set else None
    x, y = _check_data(data_x, data_y, profile.input_shape) if data_x is not None else (None, None)
    if y is not None:
        _check_labels(y, classes, "data")
    return _Inputs(path, model, read_metadata(model), aset, x, y, os.fspath(dense_onnx) if dense_onnx else None,
                   dense_model)


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


# --------------------------------------------------------------------------------------------
# Integrity and cost: the graph's figures, the metadata checked against them
# --------------------------------------------------------------------------------------------


def _opset_row(model, profile) -> CheckRow:
    """A graph that needs a newer opset than the profile's runtime supports will not load there."""
    versions = {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import}
    others = ", ".join(f"{d} v{v}" for d, v in sorted(versions.items()) if d != "ai.onnx")
    detail = "default ONNX domain" + (f"; also imports {others}" if others else "")
    if "ai.onnx" not in versions:
        return CheckRow.not_evaluated("opset", profile.opset, "opset", "the model imports no default-domain opset")
    return CheckRow.compare("opset", versions["ai.onnx"], profile.opset, "opset", detail)


def _cost_rows(report: CheckReport, cost, budgets, inp: _Inputs) -> None:
    dense_cost = count_onnx(inp.dense) if inp.dense is not None else None
    if dense_cost is not None:
        report.metrics.update(dense_mops=dense_cost.mops, dense_onnx_params=dense_cost.params)
    meta_row = _metadata_row(inp, cost, dense_cost)
    if meta_row is not None:
        report.rows.append(meta_row)
    if budgets.mops is not None:
        report.rows.append(CheckRow.compare("mops", cost.mops, budgets.mops, "MOps", "conv+linear MACs from the graph"))
    if budgets.params is not None:
        report.rows.append(CheckRow.compare("params", cost.params, budgets.params, "params",
                                            "weight elements stored in the graph (BatchNorm folded)"))
    if budgets.ops_fraction is not None:
        report.rows.append(_fraction_row("ops_fraction", cost.mops, dense_cost and dense_cost.mops,
                                         budgets.ops_fraction, "MOps", inp.dense))
    if budgets.params_fraction is not None:
        report.rows.append(_fraction_row("params_fraction", cost.params, dense_cost and dense_cost.params,
                                         budgets.params_fraction, "params", inp.dense))


def _fraction_row(name: str, value: float, dense: float | None, limit: float, unit: str, dense_path) -> CheckRow:
    """Both counts from graphs, one convention: the dense reference is the one the user passes."""
    if dense is None:
        return CheckRow.not_evaluated(name, limit, "of dense", "needs --dense, the dense reference model's ONNX "
                                      "(figures stored in the model file are not trusted)")
    return CheckRow.compare(name, value / dense, limit, "of dense",
                            f"{value:.6g} of {dense:.6g} {unit}, both counted from the graphs "
                            f"(dense: {os.path.basename(dense_path)})")


def _metadata_row(inp: _Inputs, cost, dense_cost) -> CheckRow | None:
    """The file's own ``rcomp.*`` figures against the graph: any disagreement is a FAIL.

    Nothing is judged from them, but a file whose labels lie is not one to ship. ``rcomp.params``
    is the PyTorch count (BatchNorm affine, no folding), so it is checked against bounds derived
    from the graph: at least the conv/linear weight elements, at most the stored elements plus
    two per output channel (a folded BatchNorm's gamma and beta).
    """
    meta, problems, checked = inp.metadata, [], []
    mops = {"rcomp.mops": cost.mops, "rcomp.dense_mops": dense_cost.mops if dense_cost else None}
    params = {"rcomp.params": _pytorch_params_bounds(inp.model, cost.params),
              "rcomp.dense_params": _pytorch_params_bounds(inp.dense_model, dense_cost.params) if dense_cost else None}
    for key, graph in mops.items():
        if key in meta:
            claimed = _meta_float(meta[key])
            if graph is None:
                continue  # the dense reference is not here: unverifiable, and not used
            checked.append(key)
            if claimed is None or abs(claimed - graph) > max(0.005 * graph, 1e-3):
                problems.append(f"{key}={meta[key]!r} but the graph counts {graph:.6g} MOps")
    for key, bounds in params.items():
        if key in meta and bounds is not None:
            claimed, (low, high) = _meta_float(meta[key]), bounds
            checked.append(key)
            if claimed is None or not low <= claimed <= high:
                problems.append(f"{key}={meta[key]!r} but the graph implies {low}..{high} PyTorch parameters")
    if not checked:
        return None
    detail = "; ".join(problems) if problems else f"{', '.join(checked)} match the graph"
    return CheckRow.compare("metadata", len(problems), 0, "mismatches", detail)


def _meta_float(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _pytorch_params_bounds(model, stored: int) -> tuple[int, int]:
    """(fewest, most) PyTorch parameters a graph with these weights can come from."""
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    weights = channels = 0
    for node in model.graph.node:
        if node.op_type in COUNTED_OPS and len(node.input) > 1 and node.input[1] in inits:
            dims = inits[node.input[1]]
            weights += prod(dims)
            channels += max(dims[0], dims[1] if len(dims) > 1 else 0)
    return weights, stored + 2 * channels


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
    clean = None
    adv: tuple[float, str] | None = None
    if x is not None:
        clean = _correct(sess, x, y)
        source = "attack set x_clean" if inp.aset else "data"
        report.metrics.update(n_examples=len(y), clean_acc=float(clean.mean()), clean_source=source,
                              worst_class=worst_class(clean, y))
    if inp.aset is not None:
        adv = _adversarial(report, sess, inp.aset, clean, rob, square_queries, square_n, seed)
        adv = int8_check.describe(report, adv)  # INT8 hook (issue 51): the row names the three attacks
    if rob is None:
        return
    if rob.min_clean_acc is not None:
        clean_fig = None if clean is None else (float(clean.mean()), f"{int(clean.sum())}/{len(clean)} correct "
                                                                     f"({report.metrics['clean_source']})")
        report.rows.append(_floor_row("clean_acc", clean_fig, rob.min_clean_acc, "pass --attack-set (or data)"))
    if rob.min_adv_acc is not None:
        report.rows.append(_floor_row("adv_acc", adv, rob.min_adv_acc,
                                      f"pass --attack-set (PGD examples at eps {rob.eps:.4g})"))


def worst_class(correct: np.ndarray, y: np.ndarray) -> dict | None:
    """The class (label index) with the lowest clean accuracy among the checked images.

    On imbalanced data (43 traffic-sign classes, 210 to 2,250 training images each) a good mean can
    hide a class the model gets wrong; the report names it. None for a single-class set.
    """
    labels = np.unique(y)
    if len(labels) < 2:
        return None
    acc = {int(c): float(correct[y == c].mean()) for c in labels}
    cls = min(acc, key=lambda c: (acc[c], c))
    return {"class": cls, "n": int((y == cls).sum()), "clean_acc": acc[cls], "classes_checked": len(labels)}


def _floor_row(name: str, figure: tuple[float, str] | None, limit: float, missing: str) -> CheckRow:
    if figure is None:
        return CheckRow.not_evaluated(name, limit, "fraction", f"no examples: {missing}", at_least=True)
    return CheckRow.compare(name, figure[0], limit, "fraction", figure[1], at_least=True)


def _correct(sess, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    logits = runtime.predict(sess, x)
    _check_labels(y, logits.shape[1], "labels")  # graphs without a static output shape get here unchecked
    return logits.argmax(1) == y


def _adversarial(report, sess, aset: AttackSet, clean, rob, square_queries, square_n, seed) -> tuple[float, str]:
    """Per-example worst case: robust only if correct on clean, transfer and Square inputs."""
    transfer = _correct(sess, aset.x_adv, aset.y)
    robust = clean & transfer
    robust = int8_check.with_twin_pgd(report, sess, aset, robust, rob, seed)  # INT8 hook (issue 51): no-op on float graphs
    report.metrics.update(attack=aset.attack, attack_eps=aset.eps, attack_perturbed_fraction=aset.perturbed_fraction,
                          transfer_acc=float(transfer.mean()), adv_acc_transfer=float(robust.mean()))
    masked = transfer.mean() > clean.mean()
    report.sanity.append({"name": "transfer accuracy not above clean", "ok": not masked,
                          "detail": f"{aset.attack} examples {transfer.mean():.4f}, clean {clean.mean():.4f}"})
    if masked:
        report.flags.append(f"possible gradient masking: accuracy on {aset.attack} examples "
                            f"({transfer.mean():.3f}) is above clean accuracy ({clean.mean():.3f})")
    if square_queries > 0:
        value, detail = _with_square(report, sess, aset, robust, rob, square_queries, square_n, seed)
    else:
        value = float(robust.mean())
        detail = f"{int(robust.sum())}/{len(robust)} correct (worst case of clean and {aset.attack} transfer; " \
                 "no attack of the gate's own: --square-queries 0)"
        report.flags.append("adv_acc is the replayed attack set's alone (--square-queries 0): the gate ran no attack "
                            "of its own, so a weak or doctored set would pass")
    report.metrics.update(adv_acc=value, adv_source=detail)
    return value, detail


def _with_square(report, sess, aset: AttackSet, robust, rob, queries, square_n, seed) -> tuple[float, str]:
    """The gate's own attack on a seeded subset; the floor is judged on the lower of the whole set's
    per-image worst case and the attacked subset's, so the transfer set alone cannot carry it."""
    n = len(aset.y)
    k = min(square_n, n)
    idx = np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    eps = rob.eps if rob is not None else aset.eps
    t0 = time.perf_counter()
    res = square_attack(lambda z: runtime.predict(sess, z), aset.x_clean[idx], aset.y[idx],
                        eps=eps, n_queries=queries, seed=seed)
    seconds = time.perf_counter() - t0
    subset = robust[idx] & res.adv_correct
    whole = robust.copy()
    whole[idx] &= res.adv_correct
    white = float(robust[idx].mean())
    value = min(float(whole.mean()), float(subset.mean()))
    report.metrics.update(square_acc=res.adv_accuracy, square_n=k, square_queries=queries, square_seconds=seconds,
                          square_queries_spent=int(res.queries.sum()), transfer_acc_on_square_subset=white,
                          adv_acc_whole_set=float(whole.mean()), adv_acc_square_subset=float(subset.mean()))
    masked = res.adv_accuracy < white
    report.sanity.append({"name": "Square accuracy not below transfer", "ok": not masked,
                          "detail": f"black-box Square {res.adv_accuracy:.4f}, white-box {aset.attack} {white:.4f} "
                                    f"on the same {k} images"})
    if masked:
        report.flags.append(f"possible gradient masking: black-box Square accuracy ({res.adv_accuracy:.3f}) is below "
                            f"the white-box {aset.attack} accuracy ({white:.3f}) on the same {k} examples")
    detail = (f"per-image worst case of clean, {aset.attack} transfer and the gate's Square attack ({queries} queries "
              f"on {k} of {n} images, {seconds:.1f} s): the lower of all {n} images ({int(whole.sum())} correct) and "
              f"the attacked {k} ({int(subset.sum())} correct)")
    return value, detail
