"""Latency as the budget: how well per-layer latency tables predict whole models, and (``--train``)
ResNet20 trained in-train to latency targets next to the ops-budgeted models.

Part 1, prediction (minutes; what the committed results hold): for each profile's settings (jetson:
2 of its 4 threads on this 2-core machine, graph optimization "all"; automotive-ecu: 1 thread,
"basic"), ``rcomp latency-table --model resnet20`` builds the table (with its whole-model
calibration), then the table's prediction is compared with the measured p50 of every model, all
measured interleaved in one process (``runtime.compare_latency``: rounds, rotating order):

* ResNet20 dense and the committed pruned models ``bench/models/r20-*.pt`` (trained with
  ``--target-ops``, widths at any integer: off the jetson table's multiples-of-8 grid);
* ResNet20 pruned by magnitude (seeded random weights: latency does not depend on the values) with
  rcomp's projection to the ops targets at ``channel_multiple`` 8 (``-x8``), and to the *latency*
  targets 0.7 / 0.5 / 0.3 by the table (``latency-T``): the measured latency ratio of the latter is
  what the budget promised, or not.

Part 2, training (``--train``; hours on CIFAR-10, not run in the committed results unless they say
so): ``rcomp train --latency-table T --target-latency F`` subprocesses (resumable: a run with
checkpoints continues with ``--resume``, a finished one is not retrained) into
``bench/runs/latency_budget/``; rows then add clean / PGD accuracy from each run's train.json.

    python bench/latency_budget.py                                 # part 1, both profiles
    python bench/latency_budget.py --train --data imagefolder:/work/shared/datasets/cifar10-jpeg --epochs 15
    python bench/latency_budget.py --train --data digits --epochs 3 --targets 0.5   # a short check
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from cifar10_table import commit, machine  # noqa: E402

from rcomp.errors import RcompError  # noqa: E402

RESULTS = HERE / "results" / "latency_budget.json"
RUNS = HERE / "runs" / "latency_budget"
DOC = REPO / "docs" / "latency.md"
SHAPE = (1, 3, 32, 32)
TARGETS = (0.7, 0.5, 0.3)


def build_table(profile_name: str, runs: int, reuse: bool = False) -> tuple[dict, Path]:
    """The profile's ResNet20 table, through the CLI a user runs (layers + dense ONNX in RUNS).
    ``reuse``: the table the training runs were given, as it is (a new build re-measures the calibration)."""
    out = RUNS / f"table-{profile_name}.json"
    if reuse and out.exists():
        return json.loads(out.read_text()), out
    RUNS.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "rcomp", "latency-table", "--model", "resnet20", "--profile", profile_name,
           "--out", str(out), "--runs", str(runs), "--cache", str(RUNS / "cache")]
    subprocess.check_call(cmd, cwd=REPO, env=_env())
    return json.loads(out.read_text()), out


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def models_for(table_path: Path, channel_multiple: int) -> tuple[dict, dict]:
    """name -> (torch model, ops target or None, latency target or None); and the latency targets
    the projection cannot reach (name -> its error: the floors' minimum latency is above the target)."""
    import torch

    from rcomp.models import create_model
    from rcomp.posttrain import prune_by_magnitude
    from rcomp.surgery import load_pruned
    from rcomp.train import TrainConfig

    def magnitude(**kw):
        torch.manual_seed(0)
        model = create_model("resnet20").eval()
        return prune_by_magnitude(model, TrainConfig(**kw), torch.rand(SHAPE))[0].model.eval()

    models = {"dense": (load_pruned(HERE / "models" / "r20-dense.pt")[0].eval(), None, None)}
    for ckpt in sorted((HERE / "models").glob("r20-*.pt")):
        if ckpt.stem != "r20-dense":
            models[ckpt.stem] = (load_pruned(ckpt)[0].eval(), None, None)
    unreachable = {}
    for t in TARGETS:
        models[f"magnitude-ops-{t}-x8"] = (magnitude(target_ops=t, channel_multiple=8), t, None)
        try:
            models[f"magnitude-latency-{t}"] = (magnitude(target_latency=t, latency_table=str(table_path),
                                                          channel_multiple=channel_multiple), None, t)
        except RcompError as exc:
            unreachable[f"magnitude-latency-{t}"] = str(exc)
    return models, unreachable


def on_grid(table: dict, widths: dict) -> bool:
    """Every conv's widths are points the table measured (no interpolation between grid points)."""
    return all(o in e["out_widths"] and (e["group"] != 1 or i in e["in_widths"])
               for e in table["layers"] for o, i in [widths[e["name"]]])


def measure_profile(profile_name: str, args) -> dict:
    from rcomp.config import resolve_profile
    from rcomp.count import count_model
    from rcomp.export import latency_table as lt
    from rcomp.export import runtime
    from rcomp.export.onnx_export import export_onnx

    profile = resolve_profile(profile_name)
    table, table_path = build_table(profile_name, args.table_runs, reuse=args.train)
    models, unreachable = models_for(table_path, profile.target.channel_multiple)
    models.update(trained_models(profile_name, args))
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        dense_macs = count_model(models["dense"][0], SHAPE).macs
        for name, (model, ops_t, lat_t, *_) in models.items():
            paths[name] = Path(tmp) / f"{name}.onnx"
            export_onnx(model, SHAPE, paths[name], opset=profile.opset, metadata={})
            widths = lt.onnx_widths(table, paths[name])
            rows[name] = {"ops_ratio": count_model(model, SHAPE).macs / dense_macs, "ops_target": ops_t,
                          "latency_target": lat_t, "on_grid": on_grid(table, widths),
                          "predicted_raw_ms": lt.predict_onnx(table, paths[name], calibrated=False),
                          "predicted_ms": lt.predict_onnx(table, paths[name])}
        sessions = {n: runtime.session_for_target(str(p), profile.target) for n, p in paths.items()}
        repeats = [runtime.compare_latency(sessions, profile.input_shape, runs=args.runs, warmup=50, rounds=args.rounds)
                   for _ in range(args.repeats)]
    p50 = {n: statistics.median(rep[n].p50_ms for rep in repeats) for n in sessions}
    pred_dense = rows["dense"]["predicted_ms"]
    for name in sessions:
        r = rows[name]
        m = p50[name]
        r.update(measured_p50_ms=m, measured_p50_each_ms=[rep[name].p50_ms for rep in repeats],
                 measured_p90_ms=statistics.median(rep[name].p90_ms for rep in repeats),
                 measured_latency_ratio=m / p50["dense"], predicted_latency_ratio=r["predicted_ms"] / pred_dense,
                 error=r["predicted_ms"] / m - 1.0, raw_error=r["predicted_raw_ms"] / m - 1.0)
        if r["latency_target"] is not None:
            r["meets_target"] = r["measured_latency_ratio"] <= r["latency_target"]
        r.update(models[name][3] if len(models[name]) > 3 else {})
    return {"profile": profile_name, "settings": table["profile"], "table": _table_summary(table),
            "threads_used": table["measured_on"]["threads_used"], "models": rows, "unreachable": unreachable}


def _table_summary(table: dict) -> dict:
    return {"measured_on": table["measured_on"], "method": table["method"], "calibration": table["calibration"],
            "overhead_ms": table["overhead_ms"], "fixed_ms": table["fixed_ms"], "convs": len(table["layers"])}


# ------------------------------------------------------------------------------------------------
# part 2: training to latency targets


def run_name(kind: str, profile: str, target: float, data: str, epochs: int) -> str:
    """``r20-latency-0.5-jetson-digits-e3`` (budget kind, target, the table's profile, data, epochs)."""
    where = data.split(":", 1)[0] if not data.startswith("imagefolder") else Path(data.split(":", 1)[1]).name
    return f"r20-{kind}-{target}-{profile}-{where}-e{epochs}"


def train_runs(args) -> None:
    """``rcomp train`` per (profile, target): skipped when finished, resumed when interrupted.

    The runs take the table but not ``--profile``: the profile's ops and params budgets would join
    the latency budget and the tightest would bind (on digits the automotive-ecu profile's 12.5 MOps
    did), while the comparison is between one latency budget and one ops budget. ``--ops-targets``
    trains the ops-budgeted runs to set beside them (the same recipe, ``--target-ops``)."""
    for profile in args.profiles:
        table_path = RUNS / f"table-{profile}.json"
        if not table_path.exists():
            build_table(profile, args.table_runs)
        budgets = [("latency", t, ["--latency-table", str(table_path), "--target-latency", str(t)]) for t in args.targets]
        budgets += [("ops", t, ["--target-ops", str(t)]) for t in args.ops_targets]
        for kind, t, flags in budgets:
            out = RUNS / run_name(kind, profile, t, args.data, args.epochs)
            if (out / "model.pt").exists():
                print(f"[{out.name}] done, not retrained", flush=True)
                continue
            cmd = [sys.executable, "-m", "rcomp", "train", "--model", "resnet20", "--data", args.data,
                   "--epochs", str(args.epochs), *flags, "--channel-multiple", str(args.channel_multiple[profile]),
                   "--out", str(out), "--no-progress"]
            if (out / "checkpoints").exists():
                cmd.append("--resume")
            print(f"[{out.name}] {' '.join(cmd)}", flush=True)
            with open(RUNS / f"{out.name}.log", "a") as fh:
                status = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
            print(f"[{out.name}] exit {status}", flush=True)


def trained_models(profile: str, args) -> dict:
    """The latency-budgeted runs that finished, with their accuracy from train.json."""
    from rcomp.surgery import load_pruned

    out = {}
    for run in sorted(RUNS.glob(f"r20-*-{profile}-*")):
        if not (run / "model.pt").exists() or not run.is_dir():
            continue
        doc = json.loads((run / "train.json").read_text())
        last = doc["history"][-1]
        kind, value = re.match(r"r20-(latency|ops)-([0-9.]+)-", run.name).groups()
        extra = {"trained": True, "data": doc.get("data"), "epochs": len(doc["history"]),
                 "val_clean": last.get("val_clean"), "val_pgd": last.get("val_pgd"),
                 "constraints": [{k: c[k] for k in ("metric", "limit", "value", "source")}
                                 for c in doc["budget"]["constraints"]],
                 "train_latency_ratio_by_table": doc["budget"].get("latency_ratio")}
        ops_t, lat_t = (float(value), None) if kind == "ops" else (None, float(value))
        out[run.name] = (load_pruned(run / "model.pt")[0].eval(), ops_t, lat_t, extra)
    return out


# ------------------------------------------------------------------------------------------------


def render(doc: dict) -> None:
    """The prediction table into docs/latency.md, between its bench markers."""
    lines = ["| profile | model | on grid | ops ratio | predicted ms | measured p50 ms | error | raw error "
             "| latency ratio (measured) | target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for p in doc["profiles"]:
        for name, r in p["models"].items():
            target = "" if r["latency_target"] is None else f"{r['latency_target']:g} " + (
                "met" if r.get("meets_target") else "**missed**")
            lines.append(f"| {p['profile']} | {name} | {'yes' if r['on_grid'] else 'no'} | {r['ops_ratio']:.3f} | "
                         f"{r['predicted_ms']:.3f} | {r['measured_p50_ms']:.3f} | {100 * r['error']:+.1f} % | "
                         f"{100 * r['raw_error']:+.1f} % | {r['measured_latency_ratio']:.3f} | {target} |")
    for p in doc["profiles"]:
        for name, why in p.get("unreachable", {}).items():
            lines.append(f"| {p['profile']} | {name} | | | | | | | | not reachable: {why.split(': ', 1)[-1]} |")
    body = "\n".join(lines)
    pattern = re.compile(r"(<!-- bench:latency_budget -->\n).*?(<!-- /bench:latency_budget -->)", re.S)
    text = DOC.read_text() if DOC.exists() else ""
    if pattern.search(text):
        from rcomp.reports import write_text_atomic

        write_text_atomic(DOC, pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profiles", default="jetson,automotive-ecu")
    p.add_argument("--runs", type=int, default=400, help="timed runs per model (whole models, interleaved)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3, help="interleaved measurements of all models; the median p50 is kept")
    p.add_argument("--table-runs", type=int, default=100, help="timed runs per layer and width")
    p.add_argument("--train", action="store_true", help="part 2: train to the latency targets first")
    p.add_argument("--data", default="imagefolder:/work/shared/datasets/cifar10-jpeg")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--targets", default=",".join(map(str, TARGETS)), help="latency targets (fractions of dense)")
    p.add_argument("--ops-targets", default="", help="also train ops-budgeted runs at these fractions, for the comparison")
    p.add_argument("--note", default="", help="what else the machine was doing")
    p.add_argument("--results", default=str(RESULTS), help="results file (docs/latency.md shows the default one)")
    args = p.parse_args()
    args.profiles = args.profiles.split(",")
    args.targets = [float(t) for t in args.targets.split(",") if t]
    args.ops_targets = [float(t) for t in args.ops_targets.split(",") if t]
    from rcomp.config import resolve_profile

    args.channel_multiple = {p: resolve_profile(p).target.channel_multiple for p in args.profiles}
    if args.train:
        train_runs(args)
    profiles = [measure_profile(name, args) for name in args.profiles]
    doc = {"command": " ".join(["python"] + sys.argv), "commit": commit(), "machine": machine(),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "runs": args.runs,
           "rounds": args.rounds, "repeats": args.repeats, "note": args.note,
           "load_average_at_end": list(os.getloadavg()), "profiles": profiles}
    from rcomp.reports import write_json_atomic

    write_json_atomic(args.results, doc)
    if Path(args.results).resolve() == RESULTS.resolve():
        render(doc)
    for prof in profiles:
        errs = [abs(r["error"]) for r in prof["models"].values()]
        grid = [abs(r["error"]) for r in prof["models"].values() if r["on_grid"]]
        print(f"{prof['profile']}: |error| max {100 * max(errs):.1f} % over {len(errs)} models; "
              f"on the table's grid max {100 * max(grid or [0]):.1f} % over {len(grid)}")


if __name__ == "__main__":
    main()
