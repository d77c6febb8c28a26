"""ONNX Runtime latency of pruned ResNet20s next to their ops ratios, measured side by side in one run.

The physical limit of channel pruning's speed-up is the ops ratio; this benchmark asks how close
onnxruntime's CPU latency comes to it (aim: latency ratio within 1.25x of the ops ratio).
Latency does not depend on the weights, so besides the models of ``bench/models/r20-*.pt`` (the
CIFAR sweep's, committed) the benchmark builds pruned architectures itself: masks scored
by weight magnitude and projected onto the ops target with rcomp's own budget projection, then
removed with torch-pruning — exactly the path a trained model takes. The ``-x8`` models are
projected with ``channel_multiple`` 8 (every group keeps a multiple of 8 channels, or all), the
widths onnxruntime's blocked (NCHWc) CPU convolutions are made for.

    python bench/latency.py                     # ops 1.0 / 0.5 / 0.3, threads 1 and 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cifar10_table import commit, conv_widths, machine  # noqa: E402
from render import replace_section  # noqa: E402

from rcomp.count import count_model  # noqa: E402
from rcomp.export.onnx_export import export_onnx  # noqa: E402
from rcomp.export.runtime import compare_latency, make_session  # noqa: E402
from rcomp.models import create_model  # noqa: E402
from rcomp.posttrain import prune_by_magnitude  # noqa: E402
from rcomp.reports import write_json_atomic  # noqa: E402
from rcomp.surgery import load_pruned  # noqa: E402
from rcomp.train import TrainConfig  # noqa: E402

SHAPE = (1, 3, 32, 32)
RESULTS = HERE / "results" / "latency.json"


def pruned_resnet20(target: float | None, channel_multiple: int = 1) -> torch.nn.Module:
    """ResNet20 (seeded random weights) magnitude-pruned to ``target`` of the ops: ``--method posttrain``'s prune step."""
    torch.manual_seed(0)
    model = create_model("resnet20").eval()
    if target is None:
        return model
    config = TrainConfig(target_ops=target, channel_multiple=channel_multiple)
    return prune_by_magnitude(model, config, torch.rand(SHAPE))[0].model.eval()


def models_to_measure() -> dict[str, torch.nn.Module]:
    models = {f"magnitude-{t}": pruned_resnet20(None if t == 1.0 else t) for t in (1.0, 0.5, 0.3)}
    for t in (0.5, 0.3):  # the same targets with every width a multiple of 8 (--channel-multiple 8)
        models[f"magnitude-{t}-x8"] = pruned_resnet20(t, channel_multiple=8)
    for ckpt in sorted((HERE / "models").glob("r20-*.pt")):  # the CIFAR sweep's models, committed
        models[f"trained:{ckpt.stem}"] = load_pruned(ckpt)[0].eval()
    return models


LAYOUT_MODELS = ("magnitude-1.0", "magnitude-0.5", "magnitude-0.5-x8")


def layout_check(paths: dict[str, Path], runs: int) -> dict[str, dict]:
    """The same models with onnxruntime's layout optimizations off ("extended") and on ("all").

    Level "all" adds the NCHWc transformer, which runs convolutions in blocked kernels only where
    the channel counts are multiples of the CPU's block; if odd widths lose their speed-up there
    and only there, the slow odd-width models are explained by that kernel choice.
    """
    out: dict[str, dict] = {}
    for level in ("extended", "all"):
        sessions = {n: make_session(str(pth), threads=1, graph_optimization=level) for n, pth in paths.items()}
        stats = compare_latency(sessions, SHAPE, runs=runs, warmup=50, rounds=10)
        out[level] = {n: s.p50_ms for n, s in stats.items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=400)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--note", default="", help="what else the machine was doing, for the results file")
    args = p.parse_args()
    models = models_to_measure()
    dense_macs = count_model(models["magnitude-1.0"], SHAPE).macs
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, model in models.items():
            paths[name] = Path(tmp) / f"{name.replace(':', '_')}.onnx"
            export_onnx(model, SHAPE, paths[name], opset=17, metadata={})
            macs = count_model(model, SHAPE).macs
            rows[name] = {"macs": macs, "ops_ratio": macs / dense_macs,
                          "conv_widths": conv_widths(model)}
        for threads in (int(t) for t in args.threads.split(",")):
            sessions = {n: make_session(str(pth), threads=threads, graph_optimization="all") for n, pth in paths.items()}
            stats = compare_latency(sessions, SHAPE, runs=args.runs, warmup=50, rounds=10)
            dense = stats["magnitude-1.0"]
            for name, s in stats.items():
                rows[name][f"threads{threads}"] = {
                    "p50_ms": s.p50_ms, "p90_ms": s.p90_ms, "p99_ms": s.p99_ms,
                    "latency_ratio_p50": s.p50_ms / dense.p50_ms, "latency_ratio_p90": s.p90_ms / dense.p90_ms,
                }
        layout = layout_check({n: paths[n] for n in LAYOUT_MODELS}, args.runs)
    doc = {"command": " ".join(["python"] + sys.argv), "commit": commit(), "machine": machine(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": args.runs,
           "shape": list(SHAPE), "note": args.note, "models": rows, "layout": layout}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(RESULTS, doc)
    render(doc)


def render(doc: dict) -> None:
    threads = sorted({k for r in doc["models"].values() for k in r if k.startswith("threads")})
    head = "| model | ops ratio | convs of width 8k | " + " | ".join(f"p50 ms ({t[7:]} thr) | latency ratio p50 ({t[7:]} thr) | latency / ops" for t in threads) + " |"
    lines = [head, "|---|---:|---:|" + "---:|---:|---:|" * len(threads)]
    for name, r in doc["models"].items():
        widths = r.get("conv_widths")
        multiples = f"{sum(w % 8 == 0 for w in widths)} of {len(widths)}" if widths else "n/a"
        cells = [name, f"{r['ops_ratio']:.3f}", multiples]
        for t in threads:
            m = r[t]
            cells += [f"{m['p50_ms']:.3f}", f"{m['latency_ratio_p50']:.3f}", f"{m['latency_ratio_p50'] / r['ops_ratio']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if doc.get("layout"):
        levels = list(doc["layout"])
        lines += ["", "| model (1 thread) | " + " | ".join(f"p50 ms, optimization {lv}" for lv in levels)
                  + " | speed-up from the layout pass |", "|---|" + "---:|" * (len(levels) + 1)]
        for name in doc["layout"][levels[0]]:
            ms = [doc["layout"][lv][name] for lv in levels]
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in ms) + f" | {ms[0] / ms[-1]:.2f}x |")
    m = doc["machine"]
    lines += ["", f"_Source: [`bench/results/latency.json`](bench/results/latency.json), command `{doc['command']}`, "
              f"commit `{doc['commit'][:10]}`, {m['cpus']} CPUs ({m['processor']}), {doc['date']}; "
              f"{doc['runs']} runs per model, interleaved in rounds, batch 1, ORT CPU provider, graph optimization all"
              + (f"; {doc['note']}" if doc.get("note") else "") + "._"]
    replace_section("latency", "\n".join(lines))


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"done in {time.time() - started:.0f} s; results in {RESULTS}")
