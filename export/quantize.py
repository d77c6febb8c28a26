"""INT8 static quantization of a float rcomp ONNX model with onnxruntime.quantization.

No torch here: quantizing needs only onnx, onnxruntime and numpy, so it runs in the light install
when the calibration images are given as an array. Loading them from a data spec
(:func:`calibration_sample`) uses :mod:`rcomp.data`, which needs torch.

What is fixed, and why:

* ``quant_pre_process`` first (shape inference and graph clean-up), as onnxruntime asks;
* QDQ format (QuantizeLinear/DequantizeLinear pairs around float ops): the graph stays readable
  by any ONNX importer, and the runtime fuses each pair into an integer kernel when it can;
* per-channel int8 weights: pruned layers have channels of very different magnitudes, and one
  scale per tensor would round the small ones to zero;
* activations uint8 by default (``u8s8``): on x86 with VNNI this is the kernel onnxruntime runs
  fastest (measured in bench/int8.py); ``int8`` (``s8s8``) is the choice for ARM's sdot kernels;
* calibration on a fixed, seeded sample of the *training* split (never the images the check
  judges), with MinMax, Percentile or Entropy ranges.

The quantized file carries, in ``metadata_props`` under ``rcomp.int8.``, the settings, the
calibration sample's description and checksum, and the float model's file name and sha256 so the
check can find the float model beside it and verify it is the one quantized (it never trusts the
metadata otherwise: whether a model is quantized is read from its graph).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from rcomp.errors import RcompError
from rcomp.export.onnx_count import input_spec, load_model
from rcomp.reports import write_bytes_atomic

#: CLI name -> onnxruntime.quantization.CalibrationMethod member.
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
#: CLI name -> onnxruntime.quantization.QuantType member (activations).
ACTIVATION_TYPES = {"uint8": "QUInt8", "int8": "QInt8"}
DEFAULT_CALIBRATION_SIZE = 256
META = "rcomp.int8."
#: Ops that only a quantized graph has: a model holding any of them is not a float model.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool",
    "QLinearAveragePool", "QLinearConcat", "QLinearSigmoid", "QLinearLeakyRelu", "QGemm",
})
_INT8_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


@dataclass
class QuantizeResult:
    path: str
    method: str
    activation_type: str
    calibration_size: int
    size_bytes: int
    float_size_bytes: int
    metadata: dict

    def summary(self) -> str:
        return (f"wrote {self.path} (INT8 QDQ, per-channel int8 weights, {self.activation_type} activations, "
                f"{self.method} calibration on {self.calibration_size} training images): "
                f"{self.size_bytes:,} bytes, {self.size_bytes / self.float_size_bytes:.2f} of the float file; onnx.checker passed")


def is_quantized(model) -> bool:
    """True if the graph itself holds quantization ops or 8-bit weights (metadata is not asked)."""
    m = load_model(model, load_weights=False)
    ops = {n.op_type for n in m.graph.node}
    return bool(ops & QUANTIZED_OPS) or any(i.data_type in _INT8_TYPES for i in m.graph.initializer)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_float_model(path) -> onnx.ModelProto:
    """The model to quantize: a readable ONNX file with one float32 input and no quantization yet."""
    model = load_model(path)
    name = os.path.basename(os.fspath(path))
    if is_quantized(model):
        raise RcompError(f"{name}: already quantized (its graph has quantization ops or 8-bit weights); give the float model")
    inits = {i.name for i in model.graph.initializer}
    inp = [i for i in model.graph.input if i.name not in inits]
    if len(inp) != 1 or inp[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise RcompError(f"{name}: not a float model (needs exactly one float32 input)")
    if not any(i.data_type == onnx.TensorProto.FLOAT for i in model.graph.initializer):
        raise RcompError(f"{name}: not a float model (no float32 weights to quantize)")
    return model


def check_calibration(x, input_shape: tuple) -> np.ndarray:
    """Calibration images as float32 [N, C, H, W] pixels in [0, 1] that fit the model input."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise RcompError(f"calibration set is empty or not [N, C, H, W] (got shape {x.shape})")
    if tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise RcompError(f"calibration images of shape {x.shape[1:]} do not fit the model input {tuple(input_shape)}")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise RcompError("calibration images must be finite pixels in [0, 1] (the model normalizes inside)")
    return x


def _method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    if name not in CALIBRATION_METHODS:
        raise RcompError(f"unknown calibration method {name!r}; choose one of {', '.join(CALIBRATION_METHODS)}")
    return getattr(CalibrationMethod, CALIBRATION_METHODS[name])


def _activation_type(name: str):
    from onnxruntime.quantization import QuantType

    if name not in ACTIVATION_TYPES:
        raise RcompError(f"unknown activation type {name!r}; choose one of {', '.join(ACTIVATION_TYPES)}")
    return getattr(QuantType, ACTIVATION_TYPES[name])


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over an array, one image per feed (the exported
    models have a static batch of 1)."""

    def __init__(self, name: str, x: np.ndarray, batch: int):
        self._feeds = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self._feeds, None)


def quantize_onnx(
    float_path,
    out,
    calibration_x: np.ndarray,
    *,
    method: str = "minmax",
    activation_type: str = "uint8",
    calibration_note: dict | None = None,
) -> QuantizeResult:
    """Quantize ``float_path`` to ``out`` (QDQ, per-channel int8 weights), calibrated on ``calibration_x``.

    ``calibration_note`` describes where the images came from (data spec, split, seed); it goes
    into the metadata next to the images' checksum. Nothing is written to ``out`` unless the result
    passes ``onnx.checker`` and loads in onnxruntime's CPU provider.
    """
    float_path, out = os.fspath(float_path), os.fspath(out)
    check_float_model(float_path)
    calib_method, act_type = _method(method), _activation_type(activation_type)
    name, shape = input_spec(float_path)
    x = check_calibration(calibration_x, shape)
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 32
    x = x[: len(x) - len(x) % batch] if len(x) >= batch else x
    if len(x) % batch:
        raise RcompError(f"calibration set of {len(x)} images is smaller than the model's static batch {batch}")
    meta = _metadata(float_path, out, x, method, activation_type, calibration_note or {})
    data = _quantize_bytes(float_path, _Reader(name, x, batch), calib_method, act_type, meta)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out, data)
    return QuantizeResult(out, method, activation_type, len(x), len(data), os.path.getsize(float_path), meta)


def _quantize_bytes(float_path: str, reader, calib_method, act_type, meta: dict) -> bytes:
    """Run onnxruntime's pre-processing and static quantization in a temporary folder; return the
    checked model's bytes (metadata added)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="rcomp-int8-") as tmp:
        pre, q = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "int8.onnx")
        try:
            quant_pre_process(float_path, pre, skip_symbolic_shape=True)
            quantize_static(pre, q, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act_type, weight_type=QuantType.QInt8, calibrate_method=calib_method)
        except RcompError:
            raise
        except Exception as exc:  # onnxruntime raises plain Exceptions, ValueErrors and pybind errors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise RcompError(f"{os.path.basename(float_path)}: onnxruntime quantization failed: {first}") from None
        model = onnx.load(q)
    for key, value in meta.items():
        _set_meta(model, key, value)
    _drop_unused_domains(model)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString()
    _smoke_test(data, os.path.basename(float_path))
    return data


def _drop_unused_domains(model: onnx.ModelProto) -> None:
    """The quantizer declares opset imports (com.microsoft, ...) that a QDQ graph never uses; an
    importer that does not know a domain may refuse the file for the declaration alone."""
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def _smoke_test(data: bytes, name: str) -> None:
    from rcomp.export.runtime import make_session

    make_session(data, threads=1, graph_optimization="all")  # raises RcompError if ORT cannot load it


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def _metadata(float_path: str, out: str, x: np.ndarray, method: str, activation_type: str, note: dict) -> dict:
    import onnxruntime

    rel = os.path.relpath(os.path.abspath(float_path), os.path.dirname(os.path.abspath(out)))
    calibration = {"n": int(len(x)), "sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(), **note}
    return {
        f"{META}format": "QDQ", f"{META}per_channel": "true", f"{META}weight_type": "int8",
        f"{META}activation_type": activation_type, f"{META}calibration_method": method,
        f"{META}calibration": json.dumps(calibration, sort_keys=True),
        f"{META}float_model": rel, f"{META}float_sha256": sha256_file(float_path),
        f"{META}onnxruntime": onnxruntime.__version__,
    }


def calibration_sample(data_spec: str, input_shape, n: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """``n`` training images (fixed seeded subset) as float32 pixels in [0, 1], the way the exported
    model takes them (it normalizes inside), and their description. Needs torch (rcomp.data)."""
    if n < 1:
        raise RcompError(f"calibration size must be at least 1, got {n}")
    try:
        import torch  # noqa: F401 - rcomp.data needs it
    except ImportError:
        raise RcompError("loading calibration images from a data spec needs torch (the full install)") from None
    from rcomp.data import load_data

    return calibration_from_bundle(load_data(data_spec, tuple(input_shape[1:]), progress=False), n, seed, str(data_spec))


def calibration_from_bundle(bundle, n: int, seed: int, data_spec: str) -> tuple[np.ndarray, dict]:
    """:func:`calibration_sample` from an already loaded :class:`rcomp.data.DataBundle`."""
    import torch

    from rcomp.data import fixed_subset

    train = bundle.split("train")
    if len(train) == 0:
        raise RcompError(f"{data_spec}: the training split is empty; nothing to calibrate on")
    subset = fixed_subset(train, min(n, len(train)), seed=seed)
    x = torch.stack([subset[i][0] for i in range(len(subset))]).numpy().astype(np.float32)
    return x, {"data": data_spec, "split": "train", "seed": int(seed), "subset": "rcomp.data.fixed_subset"}


def quantize_command(onnx_path, profile, data_spec: str, out, *, method: str = "minmax", calibration_size: int = DEFAULT_CALIBRATION_SIZE,
                     activation_type: str = "uint8", seed: int = 0) -> str:
    """``rcomp quantize``: every cheap check (model, method, shape) before the data is loaded."""
    _method(method), _activation_type(activation_type)
    check_float_model(onnx_path)
    _, shape = input_spec(onnx_path)
    if tuple(shape or ()) != tuple(profile.input_shape):
        raise RcompError(f"{os.path.basename(os.fspath(onnx_path))}: input shape {tuple(shape or ())} does not match "
                         f"profile '{profile.name}' {tuple(profile.input_shape)}")
    x, note = calibration_sample(data_spec, profile.input_shape, calibration_size, seed)
    return quantize_onnx(onnx_path, out, x, method=method, activation_type=activation_type, calibration_note=note).summary()
