"""The INT8 part of ``rcomp check``: robustness measured on the quantized model itself.

Replaying the float model's PGD examples against an INT8 model overstates its robustness:
attacks crafted at one precision transfer poorly to another (Double-Win Quant, ICML 2021), and
quantization can mask gradients (Bernhard et al., 2019). So for a model whose *graph* is quantized
(QuantizeLinear/DequantizeLinear or integer ops; the metadata is not asked) the adversarial
accuracy is the per-image minimum over three attacks, each judged by the INT8 onnxruntime session:

(a) transfer: the shipped attack set, crafted on the float model (what the check always runs);
(b) Square: the check's own black-box attack (on by default), which queries the INT8 session
    itself (no gradients to mask);
(c) twin PGD: PGD through a fake-quantized PyTorch twin of the INT8 graph
    (:mod:`rcomp.export.qdq_twin`, straight-through rounding), only where torch is installed;
    without torch it is reported "not evaluated" and the minimum is over (a) and (b).

It also reports the top-1 agreement with the float model and the latency of INT8 vs float (vs
dense), measured interleaved, when the float model is found beside the INT8 one: the file named in
``rcomp.int8.float_model``, used only if its sha256 equals ``rcomp.int8.float_sha256``.

Hooked into :mod:`rcomp.export.check` at a few lines marked "INT8 hook"; everything else is here.
"""

from __future__ import annotations

import os

import numpy as np

from rcomp.errors import RcompError
from rcomp.export import runtime
from rcomp.export.quantize import META, is_quantized, sha256_file

#: Below this twin/session agreement on clean images the twin's gradients are not the session's.
TWIN_AGREEMENT_FLOOR = 0.98

__all__ = ["is_quantized", "with_twin_pgd", "describe", "compare_with_float", "summary_lines"]


def with_twin_pgd(report, sess, aset, robust: np.ndarray, rob, seed: int) -> np.ndarray:
    """Hook before the check's Square attack: ``robust`` (clean and transfer, per image) and (c).

    A no-op for a float graph. The check's Square attack then runs on this very session and is
    folded into the same per-image array, so the adv_acc row is the per-image minimum of all three.
    """
    if not is_quantized(report.onnx_path):
        return robust
    eps = rob.eps if rob is not None else aset.eps
    info = report.metrics.setdefault("int8", {})
    twin = _twin_pgd(report.onnx_path, sess, aset, eps, rob, seed)
    if isinstance(twin, str):
        info.update(twin_pgd_acc=None, twin_pgd=f"not evaluated: {twin}")
        report.flags.append(f"INT8 twin PGD not evaluated ({twin}): adversarial accuracy is the minimum of transfer and Square only")
        return robust
    correct, agreement, steps = twin
    info.update(twin_pgd_acc=float(correct.mean()), twin_pgd_steps=steps, twin_session_agreement=agreement)
    return robust & correct


def describe(report, adv):
    """Hook after the check's adversarial figure: record each attack and the minimum for INT8
    graphs, and say in the row's detail that twin PGD is part of the minimum."""
    info = report.metrics.get("int8")
    if info is None or adv is None:
        return adv
    value, detail = adv
    info.update(transfer_acc=report.metrics.get("transfer_acc"), square_acc=report.metrics.get("square_acc"),
                square_n=report.metrics.get("square_n"), square_queries=report.metrics.get("square_queries"),
                adv_acc_min=value)
    if info["square_acc"] is None:
        report.flags.append("INT8 model checked without the Square attack (--square-queries 0): attack (b) on the INT8 session not evaluated")
    _twin_flags(report, info)
    twin = (f"twin PGD-{info['twin_pgd_steps']} {info['twin_pgd_acc']:.3f}" if info.get("twin_pgd_acc") is not None
            else "twin PGD not evaluated")
    return value, f"INT8, {twin} included: {detail}"


def _twin_pgd(model, sess, aset, eps, rob, seed):
    """(c) PGD through the fake-quant twin; the examples are judged by the INT8 session.

    Returns ``(correct [N], twin/session top-1 agreement on x_clean, steps)`` or the reason it
    could not run (torch missing, an op the twin does not support)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed (light install)"
    from rcomp.attacks import pgd
    from rcomp.export.qdq_twin import build_twin

    try:
        twin = build_twin(model)
    except RcompError as exc:
        return str(exc)
    steps = rob.pgd_steps if rob is not None else 10
    alpha = rob.pgd_step_size if rob is not None and rob.pgd_step_size else eps / 4
    x, y = torch.from_numpy(aset.x_clean), torch.from_numpy(aset.y)
    with torch.no_grad():
        twin_pred = torch.cat([twin(x[i:i + 256]) for i in range(0, len(x), 256)]).argmax(1).numpy()
    agreement = float(np.mean(twin_pred == runtime.predict(sess, aset.x_clean).argmax(1)))
    gen = torch.Generator().manual_seed(seed)
    x_adv = torch.cat([pgd(twin, x[i:i + 256], y[i:i + 256], eps=eps, alpha=alpha, steps=steps, generator=gen)
                       for i in range(0, len(x), 256)])
    from rcomp.export.square import project_linf

    x_adv = project_linf(x_adv.numpy(), aset.x_clean, eps)  # float32 rounding stays inside the ball
    correct = runtime.predict(sess, x_adv).argmax(1) == aset.y
    return correct, agreement, steps


def _twin_flags(report, info: dict) -> None:
    if info.get("twin_pgd_acc") is None:
        return
    if info["twin_session_agreement"] < TWIN_AGREEMENT_FLOOR:
        report.flags.append(f"INT8 twin agrees with the onnxruntime session on only {info['twin_session_agreement']:.1%} "
                            "of clean images: its gradients may not be the session's")
    if info["transfer_acc"] is not None and info["twin_pgd_acc"] > info["transfer_acc"]:
        report.flags.append(f"possible gradient masking in INT8: white-box twin PGD accuracy ({info['twin_pgd_acc']:.3f}) "
                            f"is above the float model's transfer accuracy ({info['transfer_acc']:.3f})")


# --------------------------------------------------------------------------------------------
# INT8 vs float: agreement and latency
# --------------------------------------------------------------------------------------------


def float_beside(int8_path: str, metadata: dict) -> tuple[str | None, str]:
    """The float model the INT8 one was quantized from, if it is still beside it, unchanged."""
    rel = metadata.get(f"{META}float_model")
    want = metadata.get(f"{META}float_sha256")
    if not rel or not want:
        return None, "no rcomp.int8.float_model/float_sha256 in the metadata"
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(int8_path)), rel))
    if not os.path.isfile(path):
        return None, f"float model {rel} not found beside the INT8 model"
    if sha256_file(path) != want:
        return None, f"{rel} is not the model this one was quantized from (sha256 differs)"
    return path, rel


def compare_with_float(report, sess, profile, inp, latency_runs: int, seed: int) -> None:
    """Top-1 agreement with the float model and latency INT8 / float (/ dense), interleaved."""
    info = report.metrics.setdefault("int8", {})
    info["precision"] = "int8"
    fpath, why = float_beside(inp.path, inp.metadata)
    if fpath is None:
        info["float_model"] = f"not evaluated: {why}"
        report.flags.append(f"INT8 vs float not compared: {why}")
        return
    info["float_model"] = why
    fsess = runtime.session_for_target(fpath, profile.target)
    x = inp.aset.x_clean if inp.aset is not None else inp.x
    if x is not None:
        info["float_top1_agreement"] = float(np.mean(runtime.predict(sess, x).argmax(1) == runtime.predict(fsess, x).argmax(1)))
    sessions = {"int8": sess, "float": fsess}
    if inp.dense is not None:
        sessions["dense"] = runtime.session_for_target(inp.dense, profile.target)
    stats = runtime.compare_latency(sessions, profile.input_shape, runs=latency_runs, warmup=min(10, latency_runs),
                                    rounds=min(5, latency_runs), seed=seed)
    info["latency_p50_ms"] = {k: v.p50_ms for k, v in stats.items()}
    info["latency_ratio_int8_float_p50"] = stats["int8"].p50_ms / stats["float"].p50_ms
    report.latency[f"float ({why})"] = stats["float"].to_dict()
    if profile.target.graph_optimization in ("disable", "basic"):
        report.flags.append(f"graph_optimization '{profile.target.graph_optimization}': onnxruntime fuses the QDQ pairs into "
                            "integer kernels only from 'extended' on, so this INT8 model runs as float ops plus (de)quantization")


def summary_lines(report) -> list[str]:
    """The INT8 figures for the text and markdown reports."""
    info = report.metrics.get("int8")
    if not info:
        return []
    lines = []
    if "adv_acc_min" in info:
        twin = (f"{info['twin_pgd_acc']:.3f}" if info.get("twin_pgd_acc") is not None else info.get("twin_pgd", "n/a"))
        square = (f"{info['square_acc']:.3f} (on {info['square_n']} images)" if info.get("square_acc") is not None
                  else "not evaluated")
        lines.append(f"INT8 adversarial accuracy: transfer {info['transfer_acc']:.3f}, Square {square}, "
                     f"twin PGD {twin}; per-image minimum {info['adv_acc_min']:.3f}")
    if "float_top1_agreement" in info:
        lines.append(f"INT8 top-1 agreement with the float model: {info['float_top1_agreement']:.2%}")
    if "latency_p50_ms" in info:
        lat = ", ".join(f"{k} {v:.3f} ms" for k, v in info["latency_p50_ms"].items())
        lines.append(f"INT8 latency p50 (interleaved): {lat}; INT8/float {info['latency_ratio_int8_float_p50']:.2f}")
    return lines
