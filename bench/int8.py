"""INT8 vs float for the shipped models: accuracy under each attack, latency, file size, per calibration.

For every model (the main job's, if given, and the committed CIFAR-10 ResNet20s) and every
calibration method (MinMax, Percentile, Entropy) of ``rcomp quantize``:

* float: clean, white-box PGD-10 on the PyTorch model (judged by the float ONNX session), Square on
  the float session, and the per-image minimum;
* INT8: clean, (a) the float PGD examples replayed (transfer), (b) Square on the INT8 session,
  (c) PGD-10 through the fake-quant twin (judged by the INT8 session), the per-image minimum, and
  top-1 agreement with the float model;
* the drop float -> INT8 under the strongest attack (each side's per-image minimum, on the images
  all attacks ran on), latency p50 at batch 1 of INT8, float and dense measured interleaved in one
  process (compare_latency), at graph optimization "all" and "basic", and the file sizes.

Sizes are kept small so the whole run fits in well under an hour on 2 shared cores with
OMP_NUM_THREADS=1: ``--n`` validation images (fixed seeded subset) for clean and transfer, the
first ``--attack-n`` of them for Square and twin PGD, ``--calibration-size`` training images.

    OMP_NUM_THREADS=1 python bench/int8.py --main-job /tmp/mj          # all models
    OMP_NUM_THREADS=1 python bench/int8.py --only r20-dense            # one model (rows merge into the results)
    python bench/int8.py --render                                      # only re-render docs/int8.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from cifar10_table import commit, machine  # noqa: E402

from rcomp.reports import write_json_atomic, write_text_atomic  # noqa: E402

RESULTS = HERE / "results" / "int8.json"
DOC = REPO / "docs" / "int8.md"
CIFAR = "imagefolder:/work/shared/datasets/cifar10-jpeg"
CIFAR_MODELS = ("r20-intrain-0.5", "r20-intrain-0.3", "r20-posttrain-0.5", "r20-posttrain-0.3", "r20-dense")
METHODS = ("minmax", "percentile", "entropy")
SHAPE = (1, 3, 32, 32)
EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def model_list(main_job: str | None) -> dict[str, tuple[Path, str]]:
    """name -> (checkpoint, data spec)."""
    models = {}
    if main_job:
        train = json.loads((Path(main_job) / "train.json").read_text())
        models["main-job"] = (Path(main_job) / "model.pt", train["data"])
    for name in CIFAR_MODELS:
        models[name] = (HERE / "models" / f"{name}.pt", CIFAR)
    return models


def tensors(dataset, n: int, seed: int = 0):
    from rcomp.data import fixed_subset

    subset = fixed_subset(dataset, min(n, len(dataset)), seed=seed)
    xs, ys = zip(*(subset[i] for i in range(len(subset))))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def correct(sess, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from rcomp.export.runtime import predict

    return predict(sess, x).argmax(1) == y


def square_correct(sess, x, y, queries: int) -> np.ndarray:
    from rcomp.export.runtime import predict
    from rcomp.export.square import square_attack

    return square_attack(lambda z: predict(sess, z), x, y, eps=EPS, n_queries=queries, seed=0).adv_correct


def twin_correct(int8_path, sess, x, y) -> tuple[np.ndarray, float]:
    from rcomp.attacks import pgd
    from rcomp.export.qdq_twin import build_twin
    from rcomp.export.square import project_linf

    twin = build_twin(int8_path)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        agree = float(np.mean(twin(xt).argmax(1).numpy() == correct_pred(sess, x)))
    x_adv = pgd(twin, xt, yt, eps=EPS, alpha=ALPHA, steps=STEPS, generator=torch.Generator().manual_seed(0))
    return correct(sess, project_linf(x_adv.numpy(), x, EPS), y), agree


def correct_pred(sess, x):
    from rcomp.export.runtime import predict

    return predict(sess, x).argmax(1)


def latency(paths: dict[str, str], runs: int) -> dict:
    from rcomp.export.runtime import compare_latency, make_session

    out = {}
    for level in ("all", "basic"):
        sessions = {k: make_session(p, threads=1, graph_optimization=level) for k, p in paths.items()}
        stats = compare_latency(sessions, SHAPE, runs=runs, warmup=20, rounds=10)
        out[level] = {k: {"p50_ms": s.p50_ms, "p90_ms": s.p90_ms} for k, s in stats.items()}
    return out


_BUNDLES: dict = {}


def bench_model(name: str, ckpt: Path, data: str, args, tmp: Path) -> dict:
    """Every figure of one model: float once, INT8 per calibration method."""
    from rcomp.attacks import pgd
    from rcomp.data import load_data
    from rcomp.export.quantize import quantize_onnx
    from rcomp.export.runtime import make_session
    from rcomp.pipeline import export_command
    from rcomp.surgery import load_pruned

    t0 = time.perf_counter()
    model, meta = load_pruned(ckpt)
    model.eval()
    fp32 = tmp / f"{name}.fp32.onnx"
    export_command(str(ckpt), None, str(fp32), 17, None, 8)
    dense = tmp / f"{name}.dense.onnx"
    export_command(str(HERE / "models" / "r20-dense.pt"), None, str(dense), 17, None, 8)
    key = (data, tuple(meta["input_shape"]))
    if key not in _BUNDLES:  # cache=False: decode only the images used
        _BUNDLES[key] = load_data(data, key[1], progress=False, cache=False)
    bundle = _BUNDLES[key]
    xv, yv = tensors(bundle.split("val"), args.n)
    xc, _ = tensors(bundle.split("train"), args.calibration_size)
    x_adv = pgd(model, xv, yv, eps=EPS, alpha=ALPHA, steps=STEPS, generator=torch.Generator().manual_seed(0))
    x, y, xa, xcal = xv.numpy(), yv.numpy(), x_adv.numpy(), xc.numpy()
    k = min(args.attack_n, len(y))
    fsess = make_session(str(fp32), threads=1, graph_optimization="all")
    f_clean, f_pgd = correct(fsess, x, y), correct(fsess, xa, y)
    f_square = square_correct(fsess, x[:k], y[:k], args.square_queries)
    f_min = f_clean[:k] & f_pgd[:k] & f_square
    row = {"checkpoint": str(ckpt.relative_to(REPO)) if ckpt.is_relative_to(REPO) else str(ckpt), "data": data,
           "n": int(len(y)), "attack_n": k, "float_bytes": fp32.stat().st_size,
           "float": {"clean": f_clean.mean(), "pgd_whitebox": f_pgd.mean(), "pgd_whitebox_attack_n": f_pgd[:k].mean(),
                     "square": f_square.mean(), "min": f_min.mean()}, "int8": {}}
    for method in args.methods:
        q = tmp / f"{name}.{method}.onnx"
        quantize_onnx(fp32, q, xcal, method=method, calibration_note={"data": data, "split": "train", "seed": 0})
        sess = make_session(str(q), threads=1, graph_optimization="all")
        clean, transfer = correct(sess, x, y), correct(sess, xa, y)
        square = square_correct(sess, x[:k], y[:k], args.square_queries)
        twin, agree_twin = twin_correct(q, sess, x[:k], y[:k])
        per_image = clean[:k] & transfer[:k] & square & twin
        attacks = {"transfer": transfer[:k].mean(), "square": square.mean(), "twin_pgd": twin.mean()}
        row["int8"][method] = {
            "clean": clean.mean(), "transfer": transfer.mean(), "transfer_attack_n": transfer[:k].mean(),
            "square": square.mean(), "twin_pgd": twin.mean(), "min": per_image.mean(),
            "strongest_single": min(attacks, key=attacks.get),
            "drop_min_points": 100 * (row["float"]["min"] - per_image.mean()),
            "robust_float_only": int((f_min & ~per_image).sum()), "robust_int8_only": int((per_image & ~f_min).sum()),
            "drop_clean_points": 100 * (row["float"]["clean"] - clean.mean()),
            "agreement_with_float": float(np.mean(correct_pred(sess, x) == correct_pred(fsess, x))),
            "twin_session_agreement": agree_twin, "bytes": q.stat().st_size,
            "latency": latency({"int8": str(q), "float": str(fp32), "dense": str(dense)}, args.runs),
        }
        lat = row["int8"][method]["latency"]["all"]
        row["int8"][method]["latency_ratio_int8_float"] = lat["int8"]["p50_ms"] / lat["float"]["p50_ms"]
        print(f"{name} {method}: clean {clean.mean():.3f} min {per_image.mean():.3f} (float {f_min.mean():.3f}) "
              f"lat int8/float {row['int8'][method]['latency_ratio_int8_float']:.2f}", flush=True)
    row["seconds"] = time.perf_counter() - t0
    return json.loads(json.dumps(row, default=float))


def qdq_overhead(runs: int) -> dict:
    """Why INT8 is (not) faster here: one 3x3 conv at 32x32 (batch 1), float vs QDQ INT8, by width.

    At small widths the (de)quantize steps and the integer kernel's fixed costs outweigh the
    cheaper multiply-adds; at large widths the integer GEMM's 4x narrower data pays."""
    from rcomp.export.onnx_export import export_onnx
    from rcomp.export.quantize import quantize_onnx
    from rcomp.export.runtime import compare_latency, make_session

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for width in (16, 32, 64, 128, 256):
            torch.manual_seed(0)
            conv = torch.nn.Sequential(torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.ReLU())
            shape = (1, width, 32, 32)
            f = Path(tmp) / f"c{width}.onnx"
            q = Path(tmp) / f"c{width}.int8.onnx"
            export_onnx(conv.eval(), shape, f, opset=17, metadata={}, check_n=1)
            quantize_onnx(f, q, np.random.default_rng(0).random((16, *shape[1:]), dtype=np.float32))
            sessions = {"float": make_session(str(f), threads=1, graph_optimization="all"),
                        "int8": make_session(str(q), threads=1, graph_optimization="all")}
            stats = compare_latency(sessions, shape, runs=runs, warmup=20, rounds=10)
            out[str(width)] = {"macs": width * width * 9 * 32 * 32, "float_p50_ms": stats["float"].p50_ms,
                               "int8_p50_ms": stats["int8"].p50_ms, "ratio": stats["int8"].p50_ms / stats["float"].p50_ms}
            print(f"conv width {width}: int8/float {out[str(width)]['ratio']:.2f}", flush=True)
    return out


def fusion(runs: int) -> dict:
    """Which kernels the INT8 graph runs at each optimization level, and its latency there.

    At "basic" onnxruntime keeps every DequantizeLinear -> float Conv -> QuantizeLinear; from
    "extended" on it fuses them into QLinearConv/QLinearAdd/QGemm (integer kernels). The op counts of
    the optimized graph (``optimized_model_filepath``) say which one ran."""
    import collections

    import onnx
    import onnxruntime as ort

    from rcomp.export.quantize import quantize_onnx
    from rcomp.export.runtime import GRAPH_OPTIMIZATION, compare_latency, make_session
    from rcomp.pipeline import export_command

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        f, q = Path(tmp) / "f.onnx", Path(tmp) / "q.onnx"
        export_command(str(HERE / "models" / "r20-intrain-0.5.pt"), None, str(f), 17, None, 8)
        quantize_onnx(f, q, np.random.default_rng(0).random((32, *SHAPE[1:]), dtype=np.float32))
        for level in ("basic", "extended", "all"):
            so = ort.SessionOptions()
            so.graph_optimization_level = GRAPH_OPTIMIZATION[level]
            so.optimized_model_filepath = str(Path(tmp) / f"opt-{level}.onnx")
            ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
            ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
            sessions = {k: make_session(str(p), threads=1, graph_optimization=level) for k, p in (("float", f), ("int8", q))}
            stats = compare_latency(sessions, SHAPE, runs=runs, warmup=20, rounds=10)
            out[level] = {"int8_ops": dict(ops), "float_p50_ms": stats["float"].p50_ms, "int8_p50_ms": stats["int8"].p50_ms,
                          "ratio": stats["int8"].p50_ms / stats["float"].p50_ms}
            print(f"fusion {level}: int8/float {out[level]['ratio']:.2f}, ops {dict(ops)}", flush=True)
    return {"model": "bench/models/r20-intrain-0.5.pt (weights irrelevant: random calibration)", "levels": out}


def merge(update: dict) -> dict:
    """Read-modify-write of the results under a lock: runs of --only merge their models' rows."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        doc = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}
        models = {**doc.get("models", {}), **update.pop("models", {})}
        doc.update(update)
        doc["models"] = models
        write_json_atomic(RESULTS, doc)
    return doc


def _p(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def render(doc: dict) -> None:
    head = ("| model | n / attacked | calibration | float clean | INT8 clean | float min (PGD, Square) | INT8 transfer | INT8 Square | "
            "INT8 twin PGD | INT8 min | drop (points) | agree | INT8/float p50 (all) | INT8/float p50 (basic) | INT8/dense float p50 (all) | size INT8/float |")
    lines = [head, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in doc.get("models", {}).items():
        f = r["float"]
        for method, q in r["int8"].items():
            lat = q["latency"]
            basic = lat["basic"]["int8"]["p50_ms"] / lat["basic"]["float"]["p50_ms"]
            lines.append(f"| {name} | {r['n']} / {r['attack_n']} | {method} | {_p(f['clean'])} | {_p(q['clean'])} | {_p(f['min'])} "
                         f"({_p(f['pgd_whitebox_attack_n'])}, {_p(f['square'])}) | {_p(q['transfer_attack_n'])} | {_p(q['square'])} | "
                         f"{_p(q['twin_pgd'])} | {_p(q['min'])} | {q['drop_min_points']:+.1f} | {_p(q['agreement_with_float'])} | "
                         f"{q['latency_ratio_int8_float']:.2f} | {basic:.2f} | {lat['all']['int8']['p50_ms'] / lat['all']['dense']['p50_ms']:.2f} | "
                         f"{q['bytes'] / r['float_bytes']:.2f} |")
    over = doc.get("qdq_overhead", {})
    if over:
        lines += ["", "One 3x3 convolution (+ReLU) at 32x32, batch 1, 1 thread, optimization all: INT8 (QDQ, u8s8) / float p50", "",
                  "| width | MMACs | float ms | INT8 ms | INT8/float |", "|---:|---:|---:|---:|---:|"]
        lines += [f"| {w} | {o['macs'] / 1e6:.1f} | {o['float_p50_ms']:.3f} | {o['int8_p50_ms']:.3f} | {o['ratio']:.2f} |"
                  for w, o in over.items()]
    fu = doc.get("fusion", {}).get("levels", {})
    if fu:
        lines += ["", "ResNet20 (r20-intrain-0.5) INT8 by graph optimization level: the kernels onnxruntime runs and p50 INT8/float", "",
                  "| level | INT8 graph after optimization | float ms | INT8 ms | INT8/float |", "|---|---|---:|---:|---:|"]
        lines += [f"| {lv} | {', '.join(f'{k} {v}' for k, v in sorted(o['int8_ops'].items(), key=lambda kv: -kv[1]))} | "
                  f"{o['float_p50_ms']:.3f} | {o['int8_p50_ms']:.3f} | {o['ratio']:.2f} |" for lv, o in fu.items()]
    m = doc.get("machine", {})
    by_command: dict[str, set] = {}
    for r in doc.get("models", {}).values():
        by_command.setdefault(r.get("command", "?"), set()).add(str(r.get("commit", "?"))[:10])
    commands = [f"`{c}` (HEAD at the rows' writing: {', '.join(sorted(v))})" for c, v in sorted(by_command.items())]
    lines += ["", f"_Source: `bench/results/int8.json`; rows by {', '.join(commands)}; the single-conv table by "
                  f"`{doc.get('qdq_overhead_command', '?')}`, the fusion table by `{doc.get('fusion_command', '?')}`; {m.get('cpus', '?')} CPUs ({m.get('cpu_model', '?')}), shared with other jobs "
                  f"(load average 12-17 during the runs), {doc.get('date', '?')}. n = validation images (fixed seeded subset) for clean and transfer, "
                  "attacked = the first of them, on which every attack ran and the minima and drop are computed. Square: 200 queries; eps 8/255; PGD-10, step 2/255; calibration 256 training images (seed 0)._"]
    body = "\n".join(lines) + "\n"
    text = DOC.read_text() if DOC.exists() else "<!-- bench:int8 -->\n<!-- /bench:int8 -->\n"
    pattern = re.compile(r"(<!-- bench:int8 -->\n).*?(<!-- /bench:int8 -->)", re.S)
    write_text_atomic(DOC, pattern.sub(lambda mt: mt.group(1) + body + mt.group(2), text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--main-job", default=None, help="output folder of `rcomp prune --profile profiles/jetson.yaml`")
    p.add_argument("--only", default="", help="comma-separated model names")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--attack-n", type=int, default=50)
    p.add_argument("--square-queries", type=int, default=200)
    p.add_argument("--calibration-size", type=int, default=256)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--overhead", action="store_true", help="also the single-conv QDQ overhead by width")
    p.add_argument("--suffix", default="", help="appended to the model names in the results (a second run at other sizes)")
    p.add_argument("--fusion", action="store_true", help="also which kernels run at each optimization level")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    if args.render:
        render(json.loads(RESULTS.read_text()))
        return
    args.methods = args.methods.split(",")
    torch.set_num_threads(1)
    models = model_list(args.main_job)
    names = args.only.split(",") if args.only else list(models)
    rows = {}
    command = " ".join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?"), "python"] + sys.argv)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            key = name + args.suffix
            rows[key] = bench_model(name, *models[name], args, Path(tmp))
            rows[key].update(command=command, commit=commit(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                             sizes={"n": args.n, "attack_n": args.attack_n, "square_queries": args.square_queries,
                                    "calibration_size": args.calibration_size, "latency_runs": args.runs})
            merge({"models": {key: rows[key]}})
    update = {"command": command,
              "commit": commit(), "machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "sizes": {"n": args.n, "attack_n": args.attack_n, "square_queries": args.square_queries,
                        "calibration_size": args.calibration_size, "latency_runs": args.runs, "eps": "8/255",
                        "pgd": f"{STEPS} steps of 2/255"}, "models": {}}
    if args.overhead:
        update.update(qdq_overhead=qdq_overhead(args.runs), qdq_overhead_command=command)
    if args.fusion:
        update.update(fusion=fusion(args.runs), fusion_command=command)
    render(merge(update))


if __name__ == "__main__":
    main()
