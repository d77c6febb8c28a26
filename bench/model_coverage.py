"""Coverage: every torchvision classification builder through rcomp's whole path, one row per model.

Stages, each timed, the first failure recorded with a one-line reason:

1. ``build``   ``create_model("torchvision:NAME", 10 classes, 3 channels)``, random init, at the smallest
   of ``SIZES`` its forward pass and torch's ONNX exporter accept (the exporter takes an adaptive
   pool only when its output divides its input: AlexNet and VGG need 224); ViTs are built with
   ``image_size`` = that size;
2. ``masks``   channel masks on torch-pruning's coupled groups (unsafe groups are left alone, counted);
3. ``train``   ``STEPS`` SGD steps on random images, cross-entropy + the budget penalty
   (``--target-ops 0.5``), gradients clipped to norm ``GRAD_CLIP``, then rcomp's projection onto the budget and BatchNorm statistics
   re-estimated on 64 random images (``rcomp.rl.recalibrate_bn``), so eval-mode logits are O(1);
4. ``remove``  channel removal (torch-pruning) and its exactness: the pruned model must compute what
   the masked one did, both in float64 (max |logit diff| within ``1e-4 + 1e-5 * max |logit|``);
5. ``count``   fvcore MACs of the pruned model ≤ 0.5 × the dense model's;
6. ``export``  ONNX (opset 17, onnx-simplifier without its own raw-vs-simplified check, which took
   minutes on large models: stage 7 compares the final graph with PyTorch; onnx.checker);
7. ``parity``  onnxruntime vs PyTorch on PARITY_N seeded inputs: top-1 identical and max |logit diff|
   ≤ 1e-4 absolute (and rcomp's own ``rcomp.export.onnx_export.parity`` rule).

Every model runs in its own process with a timeout, so a crash or a hang is one row, not the run.

    OMP_NUM_THREADS=1 python bench/model_coverage.py                 # every model
    OMP_NUM_THREADS=1 python bench/model_coverage.py --only resnet18,regnet_x_400mf
    python bench/model_coverage.py --render                          # table from the results file
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results" / "model_coverage.json"
DOC = REPO / "docs" / "model-coverage.md"

SIZES = (32, 64, 96, 128, 224)
TARGET_OPS = 0.5
STEPS = 2
BATCH = 2
NUM_CLASSES = 10
GRAD_CLIP = 5.0
PARITY_N = 4
#: The issue's parity bar: top-1 identical and max |logit diff| at most this, absolute.
PARITY_ABS = 1e-4
#: Models with attention blocks: the rest are the "convolutional classifiers" the aim counts.
ATTENTION_PREFIXES = ("vit_", "swin_", "maxvit")


def one_line(exc: BaseException, limit: int = 220) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


class StageFailure(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage, self.reason = stage, reason


def _build(name: str):
    """The model at the smallest input it accepts (ViT: its image_size set to that input)."""
    import torch

    from rcomp.models import create_model
    from rcomp.models.reference import check_logits

    last = None
    for size in SIZES:
        kwargs = {"image_size": size} if name.startswith("vit_") else None
        try:
            torch.manual_seed(0)
            model = create_model(f"torchvision:{name}", NUM_CLASSES, 3, factory_kwargs=kwargs)
            check_logits(model, (3, size, size), NUM_CLASSES, name)
            _exportable_pools(model, size)
            return model, size, kwargs
        except Exception as exc:  # noqa: BLE001 - the next size, or the reason of the last
            last = one_line(exc)
    raise StageFailure("build", str(last))


def _exportable_pools(model, size: int) -> None:
    """torch's ONNX exporter takes an adaptive pool only when its output size divides its input size."""
    import torch
    from torch import nn

    bad = []

    def hook(module, inputs, output):
        if any(i % o for i, o in zip(inputs[0].shape[2:], output.shape[2:])):
            bad.append(f"{type(module).__name__} {list(inputs[0].shape[2:])} -> {list(output.shape[2:])}")

    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, pools)]
    try:
        with torch.no_grad():
            model.eval()(torch.rand(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise ValueError(f"ONNX export needs an adaptive pool's output to divide its input: {bad[0]}")


def _train_masks(model, x_example, rows: dict):
    """STEPS SGD steps with the budget penalty, then rcomp's projection onto TARGET_OPS."""
    import torch
    import torch.nn.functional as F

    from rcomp.budget import BudgetController, CostModel, constraints_from_targets
    from rcomp.masks import attach_masks
    from rcomp.rl import recalibrate_bn

    masked = attach_masks(model, "channel", x_example)
    rows["groups"] = len(masked.masks.groups)
    rows["skipped_groups"] = len(masked.masks.skipped)
    rows["skipped_examples"] = [f"{n}: {r}" for n, r in masked.masks.skipped[:3]]
    cost = CostModel.build(masked, x_example)
    controller = BudgetController(cost, constraints_from_targets(cost, target_ops=TARGET_OPS), warmup_fraction=1.0)
    opt = torch.optim.SGD(masked.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    masked.train()
    for step in range(STEPS):
        x = torch.rand((BATCH, *x_example.shape[1:]), generator=gen)
        y = torch.randint(0, NUM_CLASSES, (BATCH,), generator=gen)
        progress = (step + 1) / STEPS
        loss = F.cross_entropy(masked(x), y) + controller.penalty(progress)
        opt.zero_grad()
        loss.backward()
        # as rcomp's trainer does: BatchNorm over 2 images of 1x1 maps gave gradients of 1e9 (EfficientNetV2)
        torch.nn.utils.clip_grad_norm_(masked.parameters(), GRAD_CLIP)
        opt.step()
        masked.masks.clip_()
        controller.update(progress)
    masked.eval()
    projection = controller.project()
    with torch.no_grad():  # BatchNorm statistics of the projected network (EagleEye's adaptive BN): with the
        # few steps' running averages, random-init logits at eval reach 1e9 and no parity figure means anything
        recalibrate_bn(masked, torch.rand((64, *x_example.shape[1:]), generator=gen), chunk=64)
    rows["cost_model_ops_ratio"] = projection["ops_after"] / cost.dense_ops if cost.dense_ops else None
    return masked, cost


def run_one(name: str) -> dict:
    """Every stage for one torchvision model; the row records where it stopped and why."""
    import torch

    from rcomp.count import count_model
    from rcomp.export.onnx_export import ExportError, export_onnx, parity
    from rcomp.surgery import remove_channels

    torch.set_num_threads(1)
    row: dict = {"model": name, "convolutional": not name.startswith(ATTENTION_PREFIXES), "seconds": {}}
    stage = "build"
    t0 = time.perf_counter()

    def done(s: str):
        nonlocal t0
        row["seconds"][s] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    try:
        model, size, kwargs = _build(name)
        row["input"] = [1, 3, size, size]
        row["model_kwargs"] = kwargs
        shape = (1, 3, size, size)
        x_example = torch.rand(shape, generator=torch.Generator().manual_seed(0))
        dense = count_model(model, shape)
        row["dense_mmacs"], row["dense_params"] = dense.macs / 1e6, dense.params
        done("build")
        stage = "masks+train"
        masked, cost = _train_masks(model, x_example, row)
        done("train")
        stage = "remove"
        pruned = remove_channels(masked, x_example).model.eval()
        probe = torch.rand((4, 3, size, size), generator=torch.Generator().manual_seed(2)).double()
        with torch.no_grad():  # in float64: random-init nets at 32 px amplify float32 rounding by 1e5 and more
            ref, got = copy.deepcopy(masked).double()(probe), copy.deepcopy(pruned).double()(probe)
        diff = float((ref - got).abs().max())
        tol = 1e-4 + 1e-5 * float(ref.abs().max())
        row["removal_max_diff"] = diff
        if not diff <= tol or not torch.equal(ref.argmax(1), got.argmax(1)):
            raise StageFailure("remove", f"the pruned model computes other logits than the masked one "
                                         f"(max |diff| {diff:.3g} > {tol:.3g}): a coupling torch-pruning did not follow")
        done("remove")
        stage = "count"
        pc = count_model(pruned, shape)
        row["pruned_mmacs"], row["pruned_params"] = pc.macs / 1e6, pc.params
        row["ops_ratio"] = pc.macs / dense.macs
        if abs(pc.macs - cost.ops().item()) > 0.5 and row.get("cost_model_ops_ratio") is not None:
            row["cost_model_mismatch_macs"] = pc.macs - float(cost.ops().item())
        if pc.macs > TARGET_OPS * dense.macs:
            raise StageFailure("count", f"fvcore counts {pc.macs / dense.macs:.4f} of the dense ops, over the {TARGET_OPS} budget "
                                        f"(rcomp's cost model said {row.get('cost_model_ops_ratio') or 0:.4f})")
        done("count")
        stage = "export"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            try:
                # onnxsim's own raw-vs-simplified check is skipped (check_n=0: minutes on the 50M-parameter
                # models here); the parity stage compares the final graph under onnxruntime with PyTorch instead
                export_onnx(pruned, shape, path, opset=17, metadata={"base_model": name}, check_n=0)
            except ExportError as exc:
                if type(exc).__name__ == "ParityError":
                    raise StageFailure("parity", one_line(exc)) from None
                raise
            row["onnx_mb"] = round(path.stat().st_size / 1e6, 2)
            done("export")
            stage = "parity"
            x = torch.rand((PARITY_N, 3, size, size), generator=torch.Generator().manual_seed(3))
            with torch.no_grad():
                logits = pruned(x)
            try:
                par = parity(pruned, path, x)
            except ExportError as exc:
                raise StageFailure("parity", one_line(exc)) from None
            row["parity_max_abs_diff"] = par.max_abs_diff
            row["parity_top1_agreement"] = par.top1_agreement
            row["max_abs_logit"] = float(logits.abs().max())
            if par.max_abs_diff > PARITY_ABS:
                raise StageFailure("parity", f"max |logit diff| {par.max_abs_diff:.3g} > {PARITY_ABS:g} "
                                             f"(max |logit| {row['max_abs_logit']:.3g})")
            done("parity")
        row.update(status="pass", stage=None, reason=None)
    except StageFailure as exc:
        row.update(status="fail", stage=exc.stage, reason=exc.reason)
    except Exception as exc:  # noqa: BLE001 - any failure is a row with its stage and reason
        row.update(status="fail", stage=stage, reason=one_line(exc), trace=traceback.format_exc(limit=-3)[-1500:])
    return row


def run_subprocess(name: str, timeout: float) -> dict:
    """``run_one`` in a child process: a crash, an out-of-memory kill or a hang is this model's row."""
    started = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"model": name, "convolutional": not name.startswith(ATTENTION_PREFIXES), "status": "timeout",
                "stage": None, "reason": f"no result within {timeout:.0f} s", "wall_seconds": round(timeout, 1)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
        row = {"model": name, "convolutional": not name.startswith(ATTENTION_PREFIXES), "status": "fail",
               "stage": "process", "reason": f"the process died (exit {proc.returncode}): {tail[:200]}"}
    else:
        row = json.loads(lines[-1])
    row["wall_seconds"] = round(time.perf_counter() - started, 1)
    return row


def summary(rows: list[dict]) -> dict:
    conv = [r for r in rows if r.get("convolutional")]
    return {
        "models": len(rows), "passed": sum(r["status"] == "pass" for r in rows),
        "convolutional": len(conv), "convolutional_passed": sum(r["status"] == "pass" for r in conv),
        "convolutional_pass_rate": (sum(r["status"] == "pass" for r in conv) / len(conv)) if conv else None,
        "parity_within_1e-4_abs": sum(1 for r in rows if r["status"] == "pass" and r.get("parity_max_abs_diff", 1) <= 1e-4),
        "not_run": sum(r["status"] == "not run" for r in rows),
        "convolutional_through_export": sum(r["status"] == "pass" or r.get("stage") == "parity" for r in conv),
    }


def _mark_not_run(doc: dict, when: str) -> None:
    """A row for every builder the stopped run did not reach: not run is not a pass."""
    import torchvision

    done = {r["model"] for r in doc["rows"]}
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        if name not in done:
            doc["rows"].append({"model": name, "convolutional": not name.startswith(ATTENTION_PREFIXES),
                                "status": "not run", "stage": None,
                                "reason": f"not reached: the run was stopped at {when} (session deadline)"})
    doc["rows"].sort(key=lambda r: r["model"])
    doc["stopped"] = when


def render(doc: dict) -> str:
    s = doc["summary"]
    lines = [
        "# Model coverage: every torchvision classifier through rcomp",
        "",
        "Rendered by `python bench/model_coverage.py --render` from `bench/results/model_coverage.json`; do not edit by hand.",
        "",
        f"Command: `{doc['command']}`  ",
        f"Commit {doc['commit'][:10]}, {doc['date']}, {doc['machine'].get('cpu_model') or doc['machine'].get('processor')}, "
        f"torch {doc['versions']['torch']}, torchvision {doc['versions']['torchvision']}, torch-pruning {doc['versions']['torch_pruning']}.",
        "",
        "Each model: built by `create_model(\"torchvision:NAME\")` (random init, 10 classes) at the smallest of "
        f"{', '.join(map(str, SIZES))} px its forward and torch's ONNX exporter accept (ViTs get `image_size` = that size); channel masks on "
        f"torch-pruning's coupled groups; {STEPS} SGD steps (batch {BATCH}, random images) with the budget penalty (gradient norm clipped to {GRAD_CLIP:g}) for "
        f"`--target-ops {TARGET_OPS}`; rcomp's projection onto the budget; BatchNorm statistics re-estimated on 64 random images; channel removal, checked in float64 to compute the masked "
        f"model's logits (|diff| ≤ 1e-4 + 1e-5·max|logit|); fvcore count ≤ the budget; ONNX export (opset 17, onnx-simplifier, onnx.checker); onnxruntime parity on {PARITY_N} inputs "
        "(top-1 identical, max |logit diff| ≤ 1e-4 absolute; the maximum is in the table). Each model runs in its own "
        f"process with a {doc['timeout']:.0f} s timeout.",
        *[f"Rerun {i + 1} ({r['date']}, commit {r['commit'][:10]}): `{r['command']}`; those rows are marked rerun {i + 1}."
          for i, r in enumerate(doc.get("reruns", []))],
        "",
        f"**Convolutional classifiers: {s['convolutional_passed']} of {s['convolutional']} pass every stage "
        f"({100 * (s['convolutional_pass_rate'] or 0):.1f} %).** All models (with the attention ones: ViT, Swin, MaxViT): "
        f"{s['passed']} of {s['models']}." + (f" **{s['not_run']} models were not run** (the run was stopped at the "
        "session's deadline; they are the largest, run last) and count as not passing." if s.get("not_run") else "")
        + (f" Convolutional classifiers that passed masks, training, exact removal, the fvcore budget and the ONNX export "
           f"(failing at most the parity bar): {s['convolutional_through_export']}." if "convolutional_through_export" in s else ""),
        "",
        "Groups left alone are coupled channel groups rcomp does not prune because masking and removing them would "
        "not be exact (grouped convolutions, LayerNorm, attention, channel shuffle / permutes): they keep every channel "
        "and the rest of the network is pruned to the budget.",
        "",
        "| model | input | result | ops ratio (fvcore) | groups pruned / left alone | removal diff | ONNX parity max diff | seconds | reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        res = "pass" if r["status"] == "pass" else (r["status"] if r["status"] in ("timeout", "not run")
                                                     else f"fail: {r.get('stage')}")
        fmt = lambda v, f: (f.format(v) if isinstance(v, (int, float)) else "")  # noqa: E731
        groups = f"{r['groups']} / {r['skipped_groups']}" if "groups" in r else ""
        inp = "x".join(map(str, r["input"][-2:])) if r.get("input") else ""
        reason = (r.get("reason") or "").replace("|", "\\|")
        res += f" (rerun {r['rerun']})" if r.get("rerun") else ""
        lines.append(f"| {r['model']} | {inp} | {res} | {fmt(r.get('ops_ratio'), '{:.3f}')} | {groups} | "
                     f"{fmt(r.get('removal_max_diff'), '{:.1e}')} | {fmt(r.get('parity_max_abs_diff'), '{:.1e}')} | "
                     f"{fmt(r.get('wall_seconds'), '{:.0f}')} | {reason} |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict:
    sys.path.insert(0, str(HERE))
    from cifar10_table import machine

    return machine()


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=REPO, text=True).strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def versions() -> dict:
    import torch
    import torch_pruning
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "torch_pruning": torch_pruning.__version__}


def write(doc: dict) -> None:
    from rcomp.reports import write_json_atomic, write_text_atomic

    doc["summary"] = summary(doc["rows"])
    write_json_atomic(RESULTS, doc)
    write_text_atomic(DOC, render(doc))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--only", default="", help="comma-separated torchvision names [all]")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per model")
    p.add_argument("--jobs", type=int, default=1, help="models run at the same time (one thread each)")
    p.add_argument("--merge", action="store_true", help="with --only: run those models again and replace their rows")
    p.add_argument("--render", action="store_true", help="only re-render docs/model-coverage.md from the results file")
    p.add_argument("--stopped", default=None, help="with --render: the run was stopped at this time (UTC); models "
                   "without a row get one saying they were not run")
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)), flush=True)
        return
    if args.render:
        doc = json.loads(RESULTS.read_text())
        if args.stopped:
            _mark_not_run(doc, args.stopped)
        write(doc)
        return
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        names = [n for n in names if n in wanted]
    if args.merge:
        doc = json.loads(RESULTS.read_text())
        rerun = {"command": "OMP_NUM_THREADS=1 python bench/model_coverage.py --merge --only " + ",".join(names)
                 + f" --timeout {args.timeout:g} --jobs {args.jobs}", "commit": commit(),
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "models": names}
        doc.setdefault("reruns", []).append(rerun)
        doc["rows"] = [r for r in doc["rows"] if r["model"] not in names]
    else:
        doc = None
    doc = doc or {"command": "OMP_NUM_THREADS=1 python bench/model_coverage.py" + (f" --only {args.only}" if args.only else "")
           + (f" --timeout {args.timeout:g}" if args.timeout != 900.0 else "") + (f" --jobs {args.jobs}" if args.jobs != 1 else ""),
           "commit": commit(), "machine": machine_info(), "versions": versions(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "timeout": args.timeout,
           "target_ops": TARGET_OPS, "steps": STEPS, "sizes": list(SIZES), "rows": []}
    from concurrent.futures import ThreadPoolExecutor, as_completed

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each model is its own process
        futures = [pool.submit(run_subprocess, name, args.timeout) for name in sorted(names, key=_size_rank)]
        for future in as_completed(futures):
            row = future.result()
            if args.merge:
                row["rerun"] = len(doc["reruns"])
            doc["rows"] = sorted(doc["rows"] + [row], key=lambda r: r["model"])
            print(f"{row['model']:22s} {row['status']:7s} {row.get('stage') or '':8s} {row.get('wall_seconds', 0):6.1f}s "
                  f"{row.get('reason') or ''}", flush=True)
            write(doc)


#: Name parts of the largest builders: they run last, so a short run covers the most models.
_LARGE = ("128gf", "32gf", "16gf", "vit_h", "vit_l", "_large", "_l", "152", "101", "_b7", "_b6", "_b5", "v2_m",
          "convnext_base", "vgg", "wide_", "_b", "8gf")


def _size_rank(name: str) -> tuple[int, str]:
    """The order the models run in: by torchvision's parameter count (its weights' metadata, nothing is
    downloaded), smallest first, so a run stopped early has covered the most builders."""
    from torchvision.models import get_model_weights

    try:
        return (int(list(get_model_weights(name))[0].meta["num_params"]), name)
    except Exception:  # noqa: BLE001 - a builder without weight metadata runs last
        return (1 << 62, name)


if __name__ == "__main__":
    main()
