"""The README's main job, run exactly as the README writes it, its figures kept with the commit and host.

The README's "Run the main job" section promises what ``rcomp prune --profile profiles/jetson.yaml``
does on the default data; this is the record behind that promise. Each invocation runs the command
once in a fresh output folder (``--out`` under the gitignored ``bench/runs/``; the folder does not
change what is trained) and appends one row to ``bench/results/main_job.json``: exit code and
verdict, every check of the report, the ops and params of the shipped model, clean and PGD-10
accuracy under onnxruntime, the ops and validation accuracy of every epoch, and the wall time. A
row is never rewritten, so the file is the command's history across commits and hosts (the same
seed's floats, and so the widths, differ between CPU models and thread counts).

    python bench/main_job.py --note "nothing else running"   # run it once, append a row, render
    python bench/main_job.py --render                         # only re-render the README section
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from cifar10_table import commit, dirty, machine  # noqa: E402
from render import _pct, _provenance, replace_section  # noqa: E402

from rcomp.reports import write_json_atomic  # noqa: E402

RESULTS = HERE / "results" / "main_job.json"
#: The command of the README's "Run the main job" section (tests/test_bench.py holds the two together).
COMMAND = ("rcomp", "prune", "--profile", "profiles/jetson.yaml")
OUT = Path("bench/runs/main_job")
#: What a job that failed before writing its report (exit 2 bad input, 3 training failed) leaves out.
NO_REPORT = "no report: the job stopped before its check"


def run_once(out: Path = OUT) -> dict:
    """The command in a fresh ``out`` (relative to the repository), timed; its figures as one row."""
    folder = REPO / out
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(folder.with_name(folder.name + ".partial"), ignore_errors=True)
    command = [*COMMAND, "--out", out.as_posix(), "--no-progress"]
    started = time.perf_counter()
    exit_code = subprocess.call(command, cwd=REPO)
    wall = time.perf_counter() - started
    return {"rcomp_command": " ".join(command), "exit_code": exit_code, "wall_seconds": round(wall, 1),
            **job_figures(folder)}


def job_figures(folder: Path) -> dict:
    """What the job's own files say: the report's checks and accuracies, train.json's epochs."""
    report_path, train_path = folder / "report.json", folder / "train.json"
    if not report_path.is_file() or not train_path.is_file():
        return {"verdict": NO_REPORT}
    report, train = json.loads(report_path.read_text()), json.loads(train_path.read_text())
    metrics = report["metrics"]
    history = train["history"]
    return {
        "verdict": "PASS" if report["passed"] else "FAIL",
        "checks": [{k: row[k] for k in ("name", "value", "limit", "unit", "status")} for row in report["rows"]],
        "mops": train["macs"] / 1e6, "ops_ratio": train["macs"] / train["dense_macs"],
        "params_ratio": train["params"] / train["dense_params"],
        "onnx_clean_acc": metrics.get("clean_acc"), "onnx_adv_acc": metrics.get("adv_acc"),
        "adv_source": metrics.get("adv_source"), "n_examples": metrics.get("n_examples"),
        "epochs": len(history),
        "ops_ratio_per_epoch": [round(h["ops_ratio"], 3) for h in history],
        "val_clean_per_epoch": [h["val_clean"] for h in history],
        "flags": report.get("flags", []),
    }


def record(row: dict, note: str, results: Path = RESULTS) -> dict:
    """Append ``row`` with its provenance; earlier rows stay as they are."""
    doc = json.loads(results.read_text()) if results.exists() else {"runs": []}
    doc["runs"].append({**row, "command": " ".join(["python"] + sys.argv), "commit": commit(), "dirty": dirty(),
                        "machine": machine(), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "note": note})
    write_json_atomic(results, doc)
    return doc


def render_table(doc: dict) -> str:
    """One line per run, oldest first, then the newest run's epochs; the source named is the committed file."""
    lines = ["| commit | date | host | exit | verdict | epochs | MOps (of dense) | params of dense | "
             "clean / PGD-10 % under onnxruntime (n) | wall |",
             "|---|---|---|---:|---|---:|---:|---:|---|---:|"]
    for r in doc["runs"]:
        host = r["machine"].get("cpu_model") or r["machine"].get("processor", "?")
        code = f"`{r['commit'][:7]}`" + (" + uncommitted code" if r.get("dirty") else "")
        head = f"| {code} | {r['date'][:10]} | {host}, {r['machine'].get('cpus', '?')} CPUs | {r['exit_code']} | "
        if r["verdict"] == NO_REPORT:
            lines.append(head + f"{NO_REPORT} | – | – | – | – | {r['wall_seconds'] / 60:.1f} min |")
            continue
        lines.append(head + f"{r['verdict']} | {r['epochs']} | {r['mops']:.2f} ({r['ops_ratio']:.3f}) | "
                     f"{r['params_ratio']:.3f} | {_pct(r['onnx_clean_acc'], 1)} / {_pct(r['onnx_adv_acc'], 1)} "
                     f"({r['n_examples']}) | {r['wall_seconds'] / 60:.1f} min |")
    newest = doc["runs"][-1]
    lines += ["", _provenance(newest, RESULTS) + f" The newest row ran `{newest['rcomp_command']}`"
              + (f"; note: {newest['note']}." if newest.get("note") else ".")]
    if newest["verdict"] != NO_REPORT:
        lines += ["", "Newest run, epoch by epoch: ops of dense "
                  + ", ".join(f"{v:.2f}" for v in newest["ops_ratio_per_epoch"]) + "; validation clean accuracy "
                  + ", ".join(_pct(v, 1) for v in newest["val_clean_per_epoch"]) + " %."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--note", default="", help="what else the machine was doing (wall times are only comparable alike)")
    p.add_argument("--render", action="store_true", help="only re-render the README section from the results file")
    args = p.parse_args()
    if not args.render:
        record(run_once(), args.note)
    replace_section("main_job", render_table(json.loads(RESULTS.read_text())))


if __name__ == "__main__":
    main()
