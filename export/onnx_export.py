"""PyTorch → ONNX with a static input shape, a pinned opset, onnxsim and a numerical parity check.

Exporter choice: the legacy TorchScript exporter (``dynamo=False``). In torch 2.14 the default
``torch.onnx.export`` is the torch.export-based one, which needs ``onnxscript`` (not a dependency
of rcomp) and may emit a newer opset than asked and convert afterwards. The legacy exporter writes
the requested opset directly, with static shapes unless ``dynamic_axes`` is given, and handles
every zoo model. Its deprecation warnings are silenced here on purpose.

Nothing reaches ``out_path`` until every check has passed: the graph is built in memory and
written with :func:`rcomp.reports.write_bytes_atomic`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from dataclasses import dataclass

import numpy as np
import onnx
import onnxsim
import torch
from torch import nn

import rcomp
from rcomp.export import runtime
from rcomp.reports import write_bytes_atomic

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
META_PREFIX = "rcomp."


class ExportError(RuntimeError):
    """The exported graph is invalid or disagrees numerically with the PyTorch model (a bug, not bad input)."""


class ParityError(ExportError):
    """ONNX Runtime and PyTorch disagree beyond the tolerance; the message carries the numbers."""


@dataclass
class ExportResult:
    path: str
    opset: int
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    simplified: bool
    max_abs_diff_vs_torch: float
    metadata: dict[str, str]


@dataclass
class ParityResult:
    max_abs_diff: float
    top1_agreement: float
    n: int
    passed: bool


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    out_path,
    *,
    opset: int,
    metadata: dict[str, str],
    check_n: int = 3,
    example_inputs: torch.Tensor | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (eval, fp32) and write it atomically to ``out_path``.

    ``check_n`` random inputs are compared by onnxsim between the raw and the simplified graph
    (``check_n=0`` would only run the checker). Independently, the final graph is run with
    onnxruntime on ``example_inputs`` and compared with PyTorch (:func:`parity`, ``atol``).
    """
    input_shape = tuple(int(d) for d in input_shape)
    x = _export_input(input_shape, example_inputs)
    with _eval_fp32(model) as m:
        onnx_model = simplify(_torch_export(m, x, opset), check_n=check_n)
        _validate(onnx_model, opset, input_shape)
        meta = _set_metadata(onnx_model, metadata, input_shape, opset)
        data = onnx_model.SerializeToString()
        result = parity(m, data, _parity_inputs(x), atol=atol)
    write_bytes_atomic(out_path, data)
    return ExportResult(
        path=str(out_path), opset=opset, input_name=INPUT_NAME, output_name=OUTPUT_NAME,
        input_shape=input_shape, simplified=True, max_abs_diff_vs_torch=result.max_abs_diff,
        metadata=meta,
    )


def _export_input(input_shape: tuple[int, ...], example_inputs: torch.Tensor | None) -> torch.Tensor:
    """Pixels in [0, 1] of exactly the static shape the file will declare (seeded: reproducible)."""
    if example_inputs is None:
        from rcomp.count import example_input

        return example_input(input_shape)
    if tuple(example_inputs.shape) != input_shape:
        raise ValueError(f"example_inputs shape {tuple(example_inputs.shape)} != input_shape {input_shape}")
    return example_inputs.detach().float().cpu()


def _parity_inputs(x: torch.Tensor, extra: int = 3) -> torch.Tensor:
    """The example plus a few seeded random batches: one input can hide a wrong branch."""
    gen = torch.Generator().manual_seed(1)
    return torch.cat([x] + [torch.rand(x.shape, generator=gen) for _ in range(extra)])


@contextlib.contextmanager
def _eval_fp32(model: nn.Module):
    """Eval mode for the export, restoring the caller's mode; a non-fp32 model is copied, not cast."""
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if any(t.dtype != torch.float32 for t in floats):
        model = copy.deepcopy(model).float()
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _torch_export(model: nn.Module, x: torch.Tensor, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message="The feature will be removed.*")
        torch.onnx.export(
            model, (x,), buf, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamo=False, do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def simplify(model: onnx.ModelProto, *, check_n: int) -> onnx.ModelProto:
    """onnxsim with a real numerical check; raises :class:`ExportError` when the check fails.

    onnxsim prints its progress ("Checking 0/3...") to stdout; it is captured so that the CLI's
    output stays readable, and shown in the error when the check fails.
    """
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        simplified, ok = onnxsim.simplify(model, check_n=check_n)
    if not ok:
        raise ExportError(f"onnxsim: simplified graph differs from the exported one ({check_n} random inputs)\n{log.getvalue()}")
    return simplified


def _validate(model: onnx.ModelProto, opset: int, input_shape: tuple[int, ...]) -> None:
    """Full ONNX check plus what a target needs: the pinned opset and the static input shape."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected the exported graph: {exc}") from None
    got = {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    if got != {opset}:
        raise ExportError(f"exported opset {sorted(got)} != requested opset {opset}")
    inputs = [(i.name, tuple(d.dim_value for d in i.type.tensor_type.shape.dim)) for i in model.graph.input]
    if inputs != [(INPUT_NAME, input_shape)] or [o.name for o in model.graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"unexpected graph interface: inputs {inputs}, outputs {[o.name for o in model.graph.output]}")


def _set_metadata(model: onnx.ModelProto, metadata: dict, input_shape, opset: int) -> dict[str, str]:
    """Write ``rcomp.*`` keys (the prefix is added when missing); values must be str, int or float."""
    meta = {"rcomp.version": rcomp.__version__}
    for key, value in metadata.items():
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise TypeError(f"metadata {key!r}: expected str, int or float, got {type(value).__name__}")
        meta[key if key.startswith(META_PREFIX) else META_PREFIX + key] = str(value)
    # Facts of the file itself always win over what the caller passed.
    meta.update({"rcomp.input_shape": "x".join(map(str, input_shape)), "rcomp.opset": str(opset)})
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    return meta


def parity(model: nn.Module, onnx_path, x: torch.Tensor, *, atol: float = 1e-4, rtol: float = 1e-5) -> ParityResult:
    """Compare PyTorch and ONNX Runtime logits on ``x``; raise :class:`ParityError` beyond the tolerance.

    The tolerance is ``atol + rtol * max |logit|``, as in ``numpy.allclose``: float32 rounding
    grows with the logits, and a deep network with untrained BatchNorm statistics has logits in
    the thousands (random-weight ResNet56s here: up to 2,549, and ONNX Runtime's fused kernels
    differed from PyTorch by up to 0.0017, about 1e-6 of that). Top-1 agreement must be 100 %:
    with logits within the tolerance only a near tie could flip it, and a flipped prediction on the
    target is exactly what this check exists to catch. ``onnx_path`` may also be the serialized
    model (bytes).
    """
    x = x.detach().float().cpu()
    with _eval_fp32(model) as m, torch.no_grad():
        ref = m(x).numpy()
    sess = runtime.make_session(onnx_path, threads=1, graph_optimization="all")
    got = runtime.predict(sess, x.numpy(), batch_size=len(x))
    diff = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    tolerance = atol + rtol * (float(np.max(np.abs(ref))) if ref.size else 0.0)
    agree = float(np.mean(got.argmax(1) == ref.argmax(1))) if len(ref) else 1.0
    result = ParityResult(max_abs_diff=diff, top1_agreement=agree, n=len(x), passed=diff <= tolerance and agree == 1.0)
    if not result.passed:
        raise ParityError(
            f"ONNX Runtime vs PyTorch: max |logit diff| {diff:.3g} (tolerance {tolerance:.3g} = {atol:g} + {rtol:g} "
            f"x max |logit|), top-1 agreement {agree:.1%} on {len(x)} inputs"
        )
    return result
