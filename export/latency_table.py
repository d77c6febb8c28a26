"""Per-layer latency tables measured under onnxruntime, for latency-budgeted pruning (HALP/NetAdapt style).

No torch here: the table is measured on the target board, which has only the light install
(onnx, onnxruntime, numpy). The workflow is split in two files:

``layers.json`` (written on the workstation from a model, :mod:`rcomp.latency`)
    Every convolution of the dense exported ONNX graph as plain data (in/out channels, kernel,
    stride, pads, dilations, group, input feature map, bias, whether a ReLU follows directly,
    which side a channel mask can prune, the torch module name), every other node of the graph as
    a *fixed* op (op type, attributes, input shapes: nothing prunes it), and optionally the dense
    ONNX file next to it for the whole-model calibration.
``table.json`` (written on the board by ``rcomp latency-table --layers``)
    Every convolution's p50 latency at each width it can take (a grid over the multiples of the
    profile's ``channel_multiple``, in and out), the fixed ops' latencies, the per-run overhead of
    a session, and where and how it was measured (host, CPU, onnxruntime version, profile settings
    and their hash). With the dense ONNX file the whole model is measured once too, and the table
    carries a calibration ``scale = measured / predicted`` (fusions and layout transforms across
    layers, memory effects: what a sum of single layers does not see).

Every single-layer graph is built with ``onnx.helper`` (BatchNorm folded into the conv's bias,
the following ReLU when there is one) and run exactly as the profile runs the model: execution
provider, intra-op threads (capped at the machine's cores, see :func:`runtime.effective_threads`),
graph optimization level, batch 1. Each run's time includes ORT's fixed per-``run`` overhead, which
the whole model pays once, not once per layer: a trivial graph is timed in the same interleaved
rounds and its p50 subtracted from every layer's.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
import time
from bisect import bisect_right
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper, shape_inference

from rcomp.errors import RcompError
from rcomp.export import runtime

LAYERS_FORMAT = "rcomp-latency-layers/1"
TABLE_FORMAT = "rcomp-latency-table/1"
#: Widths per side measured at most; a side with more allowed widths gets this many, evenly
#: spaced multiples of ``channel_multiple`` (the smallest and the full width always among them),
#: and the table interpolates between them.
MAX_GRID = 9
#: Prediction error (|predicted / measured - 1|) above which a table's raw sum needs its calibration.
CALIBRATE_ABOVE = 0.05


# --------------------------------------------------------------------------------------------
# reading a model's layers from its ONNX graph
# --------------------------------------------------------------------------------------------


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _consumers(graph) -> dict[str, list]:
    users: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return users


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Static shapes of every value (graph inputs, initializers, inferred intermediates)."""
    inferred = shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [int(d.dim_value) for d in dims]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def describe_onnx(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """The convolutions (in graph order) and the fixed ops of an exported model, as plain data.

    A ReLU that is a conv's only consumer belongs to the conv's layer (onnxruntime fuses the two);
    every other node is a fixed op, timed at the shapes of this (dense) model.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users = _consumers(graph)
    shapes = _shapes(model)
    convs, fixed, absorbed = [], [], set()
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        a = _attrs(node)
        w = inits.get(node.input[1])
        if w is None:
            raise RcompError(f"conv {node.name or node.output[0]}: weight is not a constant; cannot table it")
        out_c, in_per_group, *kernel = (int(d) for d in w.dims)
        group = int(a.get("group", 1))
        nxt = users.get(node.output[0], [])
        relu = len(nxt) == 1 and nxt[0].op_type == "Relu"
        if relu:
            absorbed.add(id(nxt[0]))
        in_shape = shapes.get(node.input[0])
        convs.append({
            "onnx_output": node.output[0], "in": in_per_group * group, "out": out_c, "kernel": kernel,
            "stride": list(a.get("strides", [1] * len(kernel))), "pads": list(a.get("pads", [0] * 2 * len(kernel))),
            "dilations": list(a.get("dilations", [1] * len(kernel))), "group": group,
            "in_hw": in_shape[2:] if in_shape else None, "bias": len(node.input) > 2 and bool(node.input[2]),
            "relu": relu,
        })
    for node in graph.node:
        if node.op_type == "Conv" or id(node) in absorbed:
            continue
        inputs = [_input_spec(n, shapes, inits) for n in node.input if n]
        if any(i["shape"] is None for i in inputs):
            raise RcompError(f"{node.op_type} {node.name or node.output[0]}: input shape unknown; export with static shapes")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in _attrs(node).items()
                 if isinstance(v, (int, float, bytes, list))}
        fixed.append({"op": node.op_type, "inputs": inputs, "attrs": attrs})
    return convs, fixed


def _input_spec(name: str, shapes: dict, inits: dict) -> dict:
    """A fixed op's input: its shape, whether it is a constant, and an integer constant's value
    (a Reshape's target shape must be itself; float constants are timed with random values)."""
    spec = {"shape": shapes.get(name), "const": name in inits}
    if name in inits and inits[name].data_type == TensorProto.INT64:
        spec["int_value"] = numpy_helper.to_array(inits[name]).tolist()
    return spec


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=17)


# --------------------------------------------------------------------------------------------
# single-layer graphs
# --------------------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, inits, opset: int) -> bytes:
    graph = helper.make_graph(nodes, "layer", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="rcomp-latency")
    model.ir_version = min(model.ir_version, 8)  # readable by onnxruntime releases of the last years
    return model.SerializeToString()


def conv_graph(layer: dict, cin: int, cout: int, opset: int) -> tuple[bytes, tuple[int, ...]]:
    """One conv (BatchNorm folded: a bias) with ``cin`` -> ``cout`` channels, plus its ReLU; the input shape."""
    rng = np.random.default_rng(0)
    group = cin if layer["group"] > 1 else 1  # depthwise: group follows the width
    if layer["group"] > 1 and cin != cout:
        raise RcompError("depthwise conv with different in and out widths")
    w = rng.standard_normal((cout, cin // group, *layer["kernel"])).astype(np.float32) * 0.1
    inits = [numpy_helper.from_array(w, "W")]
    names = ["x", "W"]
    if layer["bias"]:
        inits.append(numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "B"))
        names.append("B")
    conv_out = "y" if not layer["relu"] else "c"
    nodes = [helper.make_node("Conv", names, [conv_out], kernel_shape=layer["kernel"], strides=layer["stride"],
                              pads=layer["pads"], dilations=layer["dilations"], group=group)]
    if layer["relu"]:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    shape = (1, cin, *layer["in_hw"])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model(nodes, [x], [y], inits, opset), shape


def fixed_graph(op: dict, opset: int) -> tuple[bytes, list[tuple[int, ...]]]:
    """One non-prunable node (Add, Relu, pooling, Gemm, ...) at its dense shapes; constants random."""
    rng = np.random.default_rng(0)
    inputs, inits, names, feeds = [], [], [], []
    for i, spec in enumerate(op["inputs"]):
        name = f"i{i}"
        names.append(name)
        shape = [int(d) for d in spec["shape"]]
        if spec["const"]:
            if spec.get("int_value") is not None:
                arr = np.asarray(spec["int_value"], dtype=np.int64).reshape(shape)
            else:
                arr = np.asarray(rng.random(shape) + 0.5, dtype=np.float32)
            inits.append(numpy_helper.from_array(arr, name))
        else:
            inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
            feeds.append(tuple(shape))
    node = helper.make_node(op["op"], names, ["y"], **op.get("attrs", {}))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model([node], inputs, [y], inits, opset), feeds


def overhead_graph(opset: int) -> tuple[bytes, list[tuple[int, ...]]]:
    """A graph that computes (almost) nothing: its run time is onnxruntime's per-``run`` overhead."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _model([helper.make_node("Neg", ["x"], ["y"])], [x], [y], [], opset), [(1, 1)]


# --------------------------------------------------------------------------------------------
# widths and interpolation
# --------------------------------------------------------------------------------------------


def width_grid(total: int, multiple: int, prunable: bool, max_points: int = MAX_GRID) -> list[int]:
    """The widths one side of a conv is measured at: every multiple of ``multiple`` up to ``total``
    (and ``total``), thinned to ``max_points`` evenly spaced ones (smallest and full always kept)."""
    if not prunable or total <= 1:
        return [int(total)]
    multiple = max(1, int(multiple))
    widths = sorted({w for w in range(multiple, total + 1, multiple)} | {int(total)})
    if len(widths) <= max_points:
        return widths
    picks = np.linspace(0, len(widths) - 1, max_points).round().astype(int)
    return sorted({widths[i] for i in picks})


def _segment(grid: list[int], x: float) -> tuple[int, int, float]:
    """Indices of the grid points around ``x`` and the weight of the upper one (extrapolates linearly)."""
    if len(grid) == 1:
        return 0, 0, 0.0
    hi = min(max(bisect_right(grid, x), 1), len(grid) - 1)
    lo = hi - 1
    return lo, hi, (x - grid[lo]) / (grid[hi] - grid[lo])


def interpolate(entry: dict, out: float, inn: float) -> float:
    """Bilinear interpolation of a table entry's p50 grid (ms) at ``out`` x ``inn`` active channels."""
    o0, o1, t = _segment(entry["out_widths"], out)
    i0, i1, s = _segment(entry["in_widths"], inn)
    g = entry["p50_ms"]
    value = ((1 - t) * (1 - s) * g[o0][i0] + t * (1 - s) * g[o1][i0]
             + (1 - t) * s * g[o0][i1] + t * s * g[o1][i1])
    return max(0.0, float(value))


# --------------------------------------------------------------------------------------------
# where and how a table is measured
# --------------------------------------------------------------------------------------------


def profile_settings(profile) -> dict:
    """Everything in a profile that changes a layer's latency (and so the table)."""
    t = profile.target
    settings = {"execution_provider": t.execution_provider, "threads": int(t.threads),
                "graph_optimization": t.graph_optimization, "channel_multiple": int(t.channel_multiple),
                "input_shape": [int(d) for d in profile.input_shape], "opset": int(profile.opset)}
    if getattr(t, "precision", "fp32") != "fp32":  # the single-layer graphs are fp32: say what the table is not
        settings["precision"] = t.precision
    return settings


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def host_info() -> dict:
    """The machine a table is measured on: a table is only valid there (or on its twin)."""
    return {"host": socket.gethostname(), "cpu": runtime.cpu_model(), "machine": platform.machine(),
            "cores": os.cpu_count(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "python": platform.python_version()}


def _cache_key(kind: str, spec: dict, settings: dict, host: dict, runs: int) -> str:
    """Same layer shape, profile settings, host, CPU, onnxruntime and number of runs: same measurement."""
    ident = {"kind": kind, "spec": spec, "settings": settings_hash(settings), "host": host["host"],
             "cpu": host["cpu"], "onnxruntime": host["onnxruntime"], "runs": runs}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    base = os.environ.get("RCOMP_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                              os.path.expanduser("~/.cache"), "rcomp")
    return Path(base) / "latency"


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


class _Timer:
    """Sessions for one profile, timed in interleaved rounds with the overhead graph among them."""

    def __init__(self, profile, runs: int, rounds: int, warmup: int):
        self.target, self.opset = profile.target, int(profile.opset)
        self.runs, self.rounds, self.warmup = runs, rounds, warmup
        self.threads = runtime.effective_threads(profile.target)

    def session(self, model_bytes: bytes):
        return runtime.make_session(model_bytes, threads=self.threads, graph_optimization=self.target.graph_optimization,
                                    provider=self.target.execution_provider)

    def p50s(self, graphs: list[tuple[bytes, list[tuple[int, ...]]]]) -> tuple[list[float], float]:
        """p50 (ms) of every graph minus the overhead graph's p50 from the same rounds; and that overhead."""
        graphs = [overhead_graph(self.opset), *graphs]
        rng = np.random.default_rng(0)
        jobs = []
        for model_bytes, shapes in graphs:
            sess = self.session(model_bytes)
            names = [i.name for i in sess.get_inputs()]
            feed = {n: rng.random(s, dtype=np.float32) for n, s in zip(names, shapes)}
            for _ in range(self.warmup):
                sess.run(None, feed)
            jobs.append((sess, feed))
        times = [[] for _ in jobs]
        per_round = max(1, self.runs // self.rounds)
        for r in range(self.rounds):
            order = list(range(len(jobs)))
            order = order[r % len(order):] + order[: r % len(order)]
            for j in order:
                sess, feed = jobs[j]
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    sess.run(None, feed)
                    times[j].append(time.perf_counter() - t0)
        p50 = [float(np.median(t)) * 1e3 for t in times]
        return [max(0.0, p - p50[0]) for p in p50[1:]], p50[0]


def _conv_signature(layer: dict, multiple: int) -> dict:
    keys = ("in", "out", "kernel", "stride", "pads", "dilations", "group", "in_hw", "bias", "relu")
    sig = {k: layer[k] for k in keys}
    depthwise = layer["group"] > 1
    sig["out_widths"] = width_grid(layer["out"], multiple, layer.get("prune_out", True))
    sig["in_widths"] = [0] if depthwise else width_grid(layer["in"], multiple, layer.get("prune_in", True))
    return sig


def _measure_conv(timer: _Timer, sig: dict) -> list[list[float]]:
    if sig["group"] > 1:
        if sig["group"] != sig["in"] or sig["in"] != sig["out"]:
            raise RcompError(f"grouped conv with group={sig['group']} ({sig['in']}->{sig['out']}) is not supported; "
                             "only group 1 and depthwise convs are")
        graphs = [conv_graph(sig, w, w, timer.opset) for w in sig["out_widths"]]
        graphs = [(g, [s]) for g, s in graphs]
        p50, _ = timer.p50s(graphs)
        return [[p] for p in p50]
    graphs = []
    for o in sig["out_widths"]:
        for i in sig["in_widths"]:
            g, s = conv_graph(sig, i, o, timer.opset)
            graphs.append((g, [s]))
    p50, _ = timer.p50s(graphs)
    n_in = len(sig["in_widths"])
    return [p50[k * n_in:(k + 1) * n_in] for k in range(len(sig["out_widths"]))]


def _cached(cache_dir: Path | None, key: str, measure):
    """``measure()`` unless the cache holds ``key``; a hit says so in the returned flag."""
    path = cache_dir / f"{key}.json" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())["value"], True
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is measured again and overwritten
    value = measure()
    if path is not None:
        from rcomp.reports import write_json_atomic

        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"key": key, "value": value})
    return value, False


def read_json(path, what: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RcompError(f"{what} {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise RcompError(f"{what} {path}: not readable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise RcompError(f"{what} {path}: expected a JSON object")
    return doc


def load_layers(path) -> dict:
    doc = read_json(path, "layers file")
    if doc.get("format") != LAYERS_FORMAT:
        raise RcompError(f"layers file {path}: format {doc.get('format')!r}, expected {LAYERS_FORMAT!r} "
                         "(write it with rcomp latency-table --model M --profile P --emit-layers FILE)")
    return doc


def resolve_dense_onnx(layers_path, layers: dict, given: str | None) -> str | None:
    """The dense ONNX for the calibration: ``given`` (``--dense-onnx``), else the file the layers
    file names, looked up beside the layers file (copy both to the board)."""
    if given:
        if not Path(given).is_file():
            raise RcompError(f"--dense-onnx {given}: no such file")
        return given
    name = layers.get("dense_onnx")
    if name and (Path(layers_path).parent / name).is_file():
        return str(Path(layers_path).parent / name)
    return None


def measure_table(layers: dict, profile, *, runs: int = 100, rounds: int = 5, warmup: int = 10,
                  cache_dir: Path | None = None, dense_onnx: str | None = None, log=lambda s: None) -> dict:
    """The latency table of ``layers`` (a layers file's content) under ``profile``, as a JSON-plain dict."""
    if runs < rounds or rounds < 1:
        raise RcompError(f"latency runs ({runs}) must be at least the rounds ({rounds}), and rounds at least 1")
    if list(layers.get("input_shape", [])) != [int(d) for d in profile.input_shape]:
        raise RcompError(f"layers file is for input {layers.get('input_shape')}, profile {profile.name} runs "
                         f"{list(profile.input_shape)}; emit the layers with this profile")
    settings, host = profile_settings(profile), host_info()
    timer = _Timer(profile, runs, rounds, warmup)
    multiple = profile.target.channel_multiple
    entries, signatures, hits = [], {}, 0
    started = time.perf_counter()
    for layer in layers["layers"]:
        sig = _conv_signature(layer, multiple)
        key = _cache_key("conv", sig, settings, host, runs)
        if key not in signatures:
            grid, hit = _cached(cache_dir, key, lambda: _measure_conv(timer, sig))
            signatures[key] = grid
            hits += hit
            log(f"  {layer['name']}: {layer['in']}->{layer['out']} k{layer['kernel']} s{layer['stride']} "
                f"@{layer['in_hw']} {'cached' if hit else 'measured'} ({len(sig['out_widths'])}x{len(sig['in_widths'])} widths)")
        entries.append({"name": layer["name"], "in": layer["in"], "out": layer["out"], "kernel": layer["kernel"],
                        "stride": layer["stride"], "group": layer["group"], "key": key,
                        "out_widths": sig["out_widths"], "in_widths": sig["in_widths"], "p50_ms": signatures[key]})
    fixed_ms, fixed = 0.0, []
    for op in layers.get("fixed", []):
        key = _cache_key("fixed", op, settings, host, runs)
        if key not in signatures:
            value, hit = _cached(cache_dir, key, lambda: timer.p50s([fixed_graph(op, timer.opset)])[0][0])
            signatures[key] = value
            hits += hit
        fixed.append({"op": op["op"], "shapes": [i["shape"] for i in op["inputs"]], "p50_ms": signatures[key]})
        fixed_ms += signatures[key]
    overhead, _ = _cached(cache_dir, _cache_key("overhead", {}, settings, host, runs), lambda: timer.p50s([])[1])
    table = {
        "format": TABLE_FORMAT, "model": layers.get("model"), "input_shape": layers.get("input_shape"),
        "profile": {"name": profile.name, "settings": settings, "settings_hash": settings_hash(settings)},
        "measured_on": {**host, "threads_used": timer.threads,
                        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
        "method": {"runs": runs, "rounds": rounds, "warmup": warmup, "statistic": "p50 minus the overhead graph's p50",
                   "max_grid": MAX_GRID, "cache_hits": hits, "seconds": round(time.perf_counter() - started, 2)},
        "overhead_ms": overhead, "fixed_ms": fixed_ms, "fixed": fixed, "layers": entries, "calibration": None,
    }
    if dense_onnx:
        table["calibration"] = calibrate(table, dense_onnx, profile, runs=max(runs, 200), warmup=max(warmup, 20))
    return table


def measure_whole(onnx_path, profile, *, runs: int = 200, warmup: int = 20) -> runtime.LatencyStats:
    """One whole model under the profile's settings (p50, p90 over ``runs`` single inferences)."""
    sess = runtime.session_for_target(str(onnx_path), profile.target)
    return runtime.measure_latency(sess, profile.input_shape, warmup=warmup, runs=runs)


def calibrate(table: dict, onnx_path, profile, *, runs: int = 200, warmup: int = 20) -> dict:
    """The whole dense model measured once: ``scale = measured p50 / the table's sum``, and p90/p50.

    A sum of single layers misses what happens between them (the NCHWc transformer reorders once
    per model, not once per conv; fused Conv+Add; caches warm from the previous layer), so the
    table's raw sum can be off by a constant factor for a given model; this one measurement fixes it.
    """
    stats = measure_whole(onnx_path, profile, runs=runs, warmup=warmup)
    raw = predict_onnx(table, onnx_path, calibrated=False)
    return {"dense_onnx": os.path.basename(str(onnx_path)), "measured_p50_ms": stats.p50_ms,
            "measured_p90_ms": stats.p90_ms, "predicted_raw_ms": raw, "scale": stats.p50_ms / raw,
            "p90_over_p50": stats.p90_ms / stats.p50_ms, "raw_error": raw / stats.p50_ms - 1.0,
            "applied": abs(raw / stats.p50_ms - 1.0) > CALIBRATE_ABOVE}


# --------------------------------------------------------------------------------------------
# using a table
# --------------------------------------------------------------------------------------------


def load_table(path) -> dict:
    doc = read_json(path, "latency table")
    if doc.get("format") != TABLE_FORMAT:
        raise RcompError(f"latency table {path}: format {doc.get('format')!r}, expected {TABLE_FORMAT!r}")
    return doc


def check_table(table: dict, profile=None, *, source: str = "latency table") -> None:
    """Refuse a table measured under another onnxruntime or another profile (exit 2).

    A latency table is a measurement of one runtime build with one set of session settings; other
    kernels or settings have other costs per width, so training against it would optimize for the
    wrong machine without any sign of it.
    """
    have = table.get("measured_on", {}).get("onnxruntime")
    if have != ort.__version__:
        raise RcompError(f"{source} was measured with onnxruntime {have}, this is onnxruntime {ort.__version__}; "
                         "measure the table again with the runtime you deploy")
    if profile is not None:
        settings = profile_settings(profile)
        want = (profile.name, settings_hash(settings))
        got = (table["profile"]["name"], table["profile"]["settings_hash"])
        if want != got:
            raise RcompError(f"{source} was measured for profile {got[0]} (settings {got[1]}), this run uses "
                             f"profile {want[0]} (settings {want[1]}); measure a table for this profile")


def scale_of(table: dict) -> float:
    """The calibration factor the table applies (1 without one, or when the raw sum was close enough)."""
    cal = table.get("calibration")
    return float(cal["scale"]) if cal and cal.get("applied") else 1.0


def predict_widths(table: dict, widths: dict[str, tuple[float, float]], *, calibrated: bool = True) -> float:
    """Predicted p50 (ms) of the model with ``widths[name] = (out, in)`` active channels per conv
    (a conv not named keeps its dense widths)."""
    total = float(table["overhead_ms"]) + float(table["fixed_ms"])
    for e in table["layers"]:
        out, inn = widths.get(e["name"], (e["out"], e["in"]))
        total += interpolate(e, out, inn if e["group"] == 1 else 0)
    return total * (scale_of(table) if calibrated else 1.0)


def onnx_widths(table: dict, onnx_path) -> dict[str, tuple[int, int]]:
    """The (out, in) widths of an exported model's convs, matched to the table's layers in graph order."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    convs = _conv_widths(model)
    layers = table["layers"]
    if len(convs) != len(layers):
        raise RcompError(f"{onnx_path} has {len(convs)} convolutions, the latency table's model "
                         f"{table.get('model')} has {len(layers)}: the table is for another architecture")
    out = {}
    for e, (o, i, kernel, stride) in zip(layers, convs):
        if list(kernel) != list(e["kernel"]) or list(stride) != list(e["stride"]) or o > e["out"] or i > e["in"]:
            raise RcompError(f"{onnx_path}: conv {e['name']} is {i}->{o} k{kernel} s{stride}, the latency table has "
                             f"{e['in']}->{e['out']} k{e['kernel']} s{e['stride']}: another architecture")
        out[e["name"]] = (o, i)
    return out


def _conv_widths(model: onnx.ModelProto) -> list[tuple[int, int, list[int], list[int]]]:
    inits = {i.name: i for i in model.graph.initializer}
    convs = []
    for node in model.graph.node:
        if node.op_type == "Conv":
            a = _attrs(node)
            w = inits[node.input[1]]
            o, ipg, *kernel = (int(d) for d in w.dims)
            convs.append((o, ipg * int(a.get("group", 1)), kernel, list(a.get("strides", [1] * len(kernel)))))
    return convs


def predict_onnx(table: dict, onnx_path, *, calibrated: bool = True) -> float:
    """Predicted p50 (ms) of an exported (pruned or dense) model of the table's architecture."""
    return predict_widths(table, onnx_widths(table, onnx_path), calibrated=calibrated)


def dense_ms(table: dict, *, calibrated: bool = True) -> float:
    return predict_widths(table, {}, calibrated=calibrated)


def summary(table: dict) -> str:
    """A few lines for the terminal: where, what, the dense prediction and the calibration."""
    m = table["measured_on"]
    lines = [f"latency table: {table.get('model')} under profile {table['profile']['name']} "
             f"({table['profile']['settings_hash']}), {len(table['layers'])} convs, {len(table['fixed'])} fixed ops",
             f"measured on {m['host']} ({m['cpu']}), onnxruntime {m['onnxruntime']}, {m['threads_used']} thread(s)",
             f"dense model predicted p50 {dense_ms(table, calibrated=False):.3f} ms (sum of layers "
             f"+ fixed {table['fixed_ms']:.3f} + overhead {table['overhead_ms']:.3f})"]
    cal = table.get("calibration")
    if cal:
        lines.append(f"whole dense model measured p50 {cal['measured_p50_ms']:.3f} ms: sum is off by "
                     f"{100 * cal['raw_error']:+.1f} %, calibration x{cal['scale']:.3f} "
                     f"{'applied' if cal['applied'] else 'not needed (within 5 %)'}")
    else:
        lines.append("no whole-model calibration (no dense ONNX given)")
    return "\n".join(lines)
