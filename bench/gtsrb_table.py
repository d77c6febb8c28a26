"""GTSRB traffic signs: dense FastAT's learning curve, then the in-train vs post-train table at its plateau.

The users of rcomp ship traffic-sign classifiers; GTSRB (43 classes, 32x32, validation split by
track) is small enough to train to convergence on this machine, which CIFAR-10 was not. Two parts:

1. ``--curve 10,20``: dense N-FGSM ResNet20 at several schedule lengths, side by side. The cyclic
   learning rate ends every run at zero, so one run's per-epoch curve does not show a plateau; the
   final figures of runs of different lengths do. The table's schedule is the shortest whose final
   figures the next longer run does not beat by more than about a point.
2. ``--epochs E``: the table at that schedule: dense; in-train at 0.5 and 0.3 of the ops; magnitude
   post-train and RL (AMC + KL) post-train at the same targets and the same total epochs (2/3 dense,
   1/3 fine-tuning); three seeds for every pruned row at 0.3.

Every run is an ``rcomp train`` subprocess into ``bench/runs/gtsrb/<run>/``, resumable (``--resume``
from the last epoch checkpoint), and a finished run is never retrained. The post-train rows of one
seed share their dense phase (the same recipe, seed and epoch split, so the same network): the
first one trains it, the others start from a copy of its checkpoint. Each finished model is
evaluated on the validation split by ``rcomp eval``: clean and PGD-10 on all 4,410 images, and
AutoAttack (APGD-CE + APGD-T) with PGD-10 beside it on a fixed subset, per-class accuracy included.
Finished models are copied to ``bench/models/gtsrb/<run>.pt`` so the held-out test split can be
evaluated with one command each: ``rcomp eval bench/models/gtsrb/<run>.pt --data
imagefolder:ROOT --split test --autoattack fast``.

Usage::

    python bench/gtsrb_table.py --curve 10,20 --jobs 2           # the learning curve
    python bench/gtsrb_table.py --epochs 20 --jobs 2              # the table at 20 epochs
    python bench/gtsrb_table.py --render                          # docs/gtsrb.md from the results file
    python bench/gtsrb_table.py --carry                           # keep unfinished runs for the next session
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from cifar10_table import (  # noqa: E402 - the sweep machinery both tables share
    _copy_checkpoint,
    _latest_checkpoint,
    commit,
    epochs_log,
    machine,
    method_seconds,
    record_provenance,
    run_lock,
)

RESULTS = HERE / "results" / "gtsrb_table.json"
RUNS_DIR = HERE / "runs" / "gtsrb"
MODELS = HERE / "models" / "gtsrb"
SHARED = HERE / "shared" / "gtsrb"
DOC = REPO / "docs" / "gtsrb.md"
DATA = "imagefolder:../shared/datasets/gtsrb32"  # relative to the repository: the command a user types
RECIPE = "bench/recipes/gtsrb.yaml"               # no horizontal flips (a mirrored sign is another class)
INTRAIN_RECIPE = "bench/recipes/gtsrb-intrain.yaml"  # the CIFAR-10 in-train recipe, without flips
POST_METHODS = ("posttrain", "rl")
PRUNED_SEEDS_AT_03 = (0, 1, 2)
CARRIED = SHARED / "unfinished"  # the last checkpoint of each unfinished run, committed at a session's end


@dataclass(frozen=True)
class Run:
    """One row: what ``rcomp train`` is asked for."""

    method: str
    target: float | None
    epochs: int
    seed: int = 0

    @property
    def name(self) -> str:
        what = self.method if self.target is None else f"{self.method}-{self.target:g}"
        return f"r20-{what}-e{self.epochs}" + (f"-s{self.seed}" if self.seed else "")


def curve_runs(lengths: list[int]) -> list[Run]:
    return [Run("dense", None, e) for e in lengths]


def table_runs(epochs: int) -> list[Run]:
    runs = [Run("dense", None, epochs)]
    for method in ("intrain", "posttrain", "rl"):
        runs.append(Run(method, 0.5, epochs))
        runs += [Run(method, 0.3, epochs, seed) for seed in PRUNED_SEEDS_AT_03]
    return runs


def train_command(run: Run, args) -> list[str]:
    """The ``rcomp train`` command of a row: the CIFAR-10 benchmark's recipe (N-FGSM, attacks from the
    predicted label, peak LR 0.2) on GTSRB, without flips."""
    out = RUNS_DIR / run.name
    cmd = [sys.executable, "-m", "rcomp", "train", "--model", "resnet20", "--data", args.data,
           "--epochs", str(run.epochs), "--attack", "nfgsm", "--attack-labels", "predicted", "--lr", "0.2",
           "--seed", str(run.seed), "--method", run.method,
           "--recipe", INTRAIN_RECIPE if run.method == "intrain" else RECIPE,
           "--out", str(out.relative_to(REPO)), "--no-progress"]
    if run.target is not None:
        cmd[cmd.index("--recipe"):cmd.index("--recipe")] = ["--target-ops", str(run.target)]
    if out.with_name(out.name + ".partial").exists():
        cmd.append("--resume")
    return cmd


def _env(threads: int) -> dict:
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def train_one(run: Run, args) -> None:
    """Train ``run`` unless it is finished or another process holds its lock."""
    out = RUNS_DIR / run.name
    restore_unfinished(run)
    if (out / "model.pt").exists():
        return
    with run_lock(run.name, RUNS_DIR) as mine:
        if not mine:
            print(f"[{run.name}] trained by another process; skipped", flush=True)
            return
        share_dense_phase(run)
        cmd = train_command(run, args)
        record_provenance(run.name, cmd, RUNS_DIR)
        print(f"[{run.name}] {' '.join(cmd[1:])}", flush=True)
        with open(RUNS_DIR / f"{run.name}.log", "a") as log:
            status = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(args.threads), cwd=REPO)
        print(f"[{run.name}] exit {status}", flush=True)
        keep_dense_phase(run)


def carry_unfinished() -> list[str]:
    """Keep what the next session needs of every run not yet collected, in bench/shared/gtsrb/unfinished/
    (to commit): a session's work tree is not kept, and a GTSRB epoch takes minutes. A run still
    training keeps its last checkpoint; a finished one its whole folder (model.pt, train.json, ...)."""
    carried = []
    for name in sorted({p.name.removesuffix(".partial") for p in RUNS_DIR.iterdir() if p.is_dir()}):
        final, partial = RUNS_DIR / name, RUNS_DIR / f"{name}.partial"
        dest = CARRIED / name
        if dest.exists():
            shutil.rmtree(dest)
        if (final / "model.pt").exists():
            shutil.copytree(final, dest / "final", ignore=shutil.ignore_patterns("checkpoints"))
            what = "finished"
        elif (latest := _latest_checkpoint(partial / "checkpoints")) is not None:
            _copy_checkpoint(latest, dest)
            what = latest.name
        else:
            continue
        for extra in (RUNS_DIR / f"{name}.log", RUNS_DIR / f"{name}.provenance.json"):
            if extra.exists():
                shutil.copy2(extra, dest / extra.name)
        carried.append(f"{name}: {what}")
    return carried


def restore_unfinished(run: Run) -> None:
    """Continue a carried run when this work tree has none of its own: a finished one is put back
    whole (to be evaluated and collected), an unfinished one resumes from its last checkpoint."""
    source, partial, final = CARRIED / run.name, RUNS_DIR / f"{run.name}.partial", RUNS_DIR / run.name
    if not source.exists() or partial.exists() or final.exists():
        return
    if (source / "final").exists():
        shutil.copytree(source / "final", final)
    elif (latest := _latest_checkpoint(source)) is not None:
        _copy_checkpoint(latest, partial / "checkpoints")
    else:
        return
    for extra in (f"{run.name}.log", f"{run.name}.provenance.json"):
        if (source / extra).exists() and not (RUNS_DIR / extra).exists():
            shutil.copy2(source / extra, RUNS_DIR / extra)
    print(f"[{run.name}] restored from {source}", flush=True)


def _phase_dir(run: Run) -> Path:
    return SHARED / f"r20-e{run.epochs}-seed{run.seed}"


def share_dense_phase(run: Run) -> None:
    """A post-train row starts from its seed's finished dense phase when one exists (bench/shared/gtsrb)."""
    target = RUNS_DIR / f"{run.name}.partial" / "dense" / "checkpoints"
    latest = _latest_checkpoint(_phase_dir(run))
    if run.method in POST_METHODS and latest is not None and not target.exists():
        _copy_checkpoint(latest, target)
        (target.parent.parent / "dense-phase-from.txt").write_text(f"{_phase_dir(run).relative_to(REPO)}\n")


def keep_dense_phase(run: Run) -> None:
    """Keep a post-train row's finished dense phase (its last checkpoint) for the other rows of its seed."""
    if run.method not in POST_METHODS or _phase_dir(run).exists():
        return
    for folder in (RUNS_DIR / run.name, RUNS_DIR / f"{run.name}.partial"):
        latest = _latest_checkpoint(folder / "dense" / "checkpoints")
        if latest is not None and (folder / f"{run.method}-pruned.pt").exists():
            _copy_checkpoint(latest, _phase_dir(run))
            return


def evaluate_one(run: Run, args) -> dict | None:
    """``rcomp eval`` on the validation split: PGD-10 on all of it, AutoAttack + PGD-10 on a subset."""
    ckpt = RUNS_DIR / run.name / "model.pt"
    if not ckpt.exists():
        return None
    full, subset = RUNS_DIR / run.name / "eval-val.json", RUNS_DIR / run.name / "eval-val-aa.json"
    base = [sys.executable, "-m", "rcomp", "eval", str(ckpt), "--data", args.data, "--split", "val", "--no-progress"]
    with open(RUNS_DIR / f"{run.name}.log", "a") as log:
        if not full.exists():
            subprocess.check_call(base + ["--json", str(full)], env=_env(args.threads), cwd=REPO, stdout=log, stderr=log)
        if not subset.exists():
            subprocess.check_call(base + ["--n", str(args.aa_n), "--autoattack", "fast", "--json", str(subset)],
                                  env=_env(args.threads), cwd=REPO, stdout=log, stderr=log)
    MODELS.mkdir(parents=True, exist_ok=True)
    (MODELS / f"{run.name}.pt").write_bytes(ckpt.read_bytes())
    return {"val": json.loads(full.read_text()), "val_aa": json.loads(subset.read_text())}


def row_of(run: Run, args) -> dict | None:
    """The figures of one finished row, from its train.json and its evaluations."""
    train_json = RUNS_DIR / run.name / "train.json"
    ev = evaluate_one(run, args)
    if ev is None or not train_json.exists():
        return None
    t = json.loads(train_json.read_text())
    acc, aa = ev["val"]["accuracy"], ev["val_aa"]["accuracy"]
    per_class = ev["val"].get("per_class") or {}
    worst = min(per_class.items(), key=lambda kv: kv[1]["clean"]) if per_class else None
    provenance = RUNS_DIR / f"{run.name}.provenance.json"
    return {
        "method": run.method, "target_ops": run.target, "epochs": run.epochs, "seed": run.seed,
        "clean": acc["clean"], "pgd10": acc["pgd-10"], "val_n": ev["val"]["n"],
        "autoattack": aa["autoattack-fast"], "pgd10_same_n": aa["pgd-10"], "aa_n": ev["val_aa"]["n"],
        "aa_subset": ev["val_aa"].get("subset"),
        "worst_class": {"class": worst[0], **worst[1]} if worst else None,
        "ops_ratio": t["macs"] / t["dense_macs"], "params_ratio": t["params"] / t["dense_params"],
        "macs": t["macs"], "params": t["params"], "wall_seconds": method_seconds(t),
        "epochs_log": epochs_log(t["history"]), "recipe": t["recipe"], "co_events": t["co_events"],
        "trained_by": json.loads(provenance.read_text()) if provenance.exists() else None,
    }


def collect(runs: list[Run], section: str, args) -> None:
    """Add the finished rows to ``section`` ('curve' or 'table') of the results file."""
    rows = {r.name: row for r in runs if (row := row_of(r, args)) is not None}
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    stamp = {"command": " ".join(["python"] + sys.argv), "commit": commit(), "machine": machine(),
             "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "notes": list(args.note)}
    for row in rows.values():
        row["collected"] = stamp
    results.setdefault(section, {}).update(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, RESULTS)
    print(f"{len(rows)} rows of {len(runs)} collected into {RESULTS.relative_to(REPO)} [{section}]")


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def render_curve(rows: dict) -> list[str]:
    lines = ["| run | epochs | clean % | PGD-10 % (n) | AutoAttack % | PGD-10 same images % (n) | worst class (clean %) | wall h |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["epochs"]):
        worst = r.get("worst_class") or {}
        lines.append(f"| `{name}` | {r['epochs']} | {_pct(r['clean'])} | {_pct(r['pgd10'])} ({r['val_n']}) | "
                     f"{_pct(r['autoattack'])} | {_pct(r['pgd10_same_n'])} ({r['aa_n']}) | "
                     f"{worst.get('class', '–')} ({_pct(worst.get('clean'))}) | {r['wall_seconds'] / 3600:.2f} |")
    lines.append("")
    lines.append("Validation subset (500 images) by epoch, clean / PGD-10 %:")
    lines.append("")
    for name, r in sorted(rows.items(), key=lambda kv: kv[1]["epochs"]):
        curve = ", ".join(f"{_pct(e['val_clean'])}/{_pct(e['val_pgd'])}" for e in r["epochs_log"])
        lines.append(f"- `{name}`: {curve}")
    return lines


def render(results: dict) -> None:
    """Rewrite the generated block of docs/gtsrb.md from the results file."""
    start, end = "<!-- bench:gtsrb_curve -->", "<!-- /bench:gtsrb_curve -->"
    block = render_curve(results.get("curve", {}))
    any_row = next(iter(results.get("curve", {}).values()), None)
    if any_row:
        c = any_row["collected"]
        block += ["", f"_Source: [`bench/results/gtsrb_table.json`](../bench/results/gtsrb_table.json), command "
                      f"`{c['command']}`, commit `{c['commit'][:10]}`, {c['machine']['cpus']} CPUs "
                      f"({c['machine'].get('cpu_model')}), {c['date']}._"]
    text = DOC.read_text()
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(head + start + "\n" + "\n".join(block) + "\n" + end + tail)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--curve", default="", help="comma-separated schedule lengths of the dense learning curve")
    p.add_argument("--epochs", type=int, default=None, help="the table's schedule (chosen from the curve)")
    p.add_argument("--only", default="", help="comma-separated run names")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at the same time (one thread each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=DATA)
    p.add_argument("--aa-n", type=int, default=1000, help="validation images AutoAttack runs on (fixed subset)")
    p.add_argument("--note", action="append", default=[], help="a provenance note kept with the rows")
    p.add_argument("--render", action="store_true", help="only re-render docs/gtsrb.md")
    p.add_argument("--carry", action="store_true",
                   help="only copy unfinished runs' last checkpoints to bench/shared/gtsrb/unfinished/ (to commit)")
    args = p.parse_args()
    if args.carry:
        print("\n".join(carry_unfinished()) or "no unfinished run")
        return
    if not args.render:
        section, runs = ("curve", curve_runs([int(e) for e in args.curve.split(",") if e])) if args.curve else \
            ("table", table_runs(args.epochs) if args.epochs else [])
        if args.only:
            runs = [r for r in runs if r.name in args.only.split(",")]
        if not runs:
            p.error("nothing to run: give --curve LENGTHS or --epochs E")
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda r: train_one(r, args), runs))
        collect(runs, section, args)
    render(json.loads(RESULTS.read_text()))


if __name__ == "__main__":
    main()
