"""Render benchmark results files into the docs' tables and plots (no doc holds hand-typed figures).

A rendered section sits between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in any of
``DOC_FILES`` (docs/results.md holds every table; README.md the main job and the headline rows), and
every file that holds the marker is updated. Links are written relative to the file they land in.

    python bench/render.py            # re-render every results file that exists
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from rcomp.reports import write_text_atomic

HERE = Path(__file__).resolve().parent
#: The repository whose docs are rendered into; tests point it at a copy.
ROOT = HERE.parent
#: The files that may hold rendered sections, relative to ROOT.
DOC_FILES = ("README.md", "docs/results.md")
#: Draw the plots (tests that re-render into a copy turn this off and keep the committed images).
PLOTS = True


def replace_section(marker: str, body: str) -> None:
    """Swap the text between ``<!-- bench:marker -->`` and ``<!-- /bench:marker -->`` in every doc that holds it."""
    pattern = re.compile(rf"(<!-- bench:{marker} -->\n).*?(<!-- /bench:{marker} -->)", re.S)
    found = False
    for name in DOC_FILES:
        doc = ROOT / name
        text = doc.read_text() if doc.exists() else ""
        if not pattern.search(text):
            continue
        found = True
        local = relative_links(body, Path(name).parent)
        write_text_atomic(doc, pattern.sub(lambda m: m.group(1) + local.rstrip() + "\n" + m.group(2), text))
    if not found:
        raise SystemExit(f"none of {', '.join(DOC_FILES)} has a <!-- bench:{marker} --> section")


def relative_links(body: str, folder: Path) -> str:
    """Markdown links and images written from the repository root, re-pointed from ``folder`` (docs/ → ``../``)."""
    if folder == Path("."):
        return body
    up = "../" * len(folder.parts)
    return re.sub(r"\]\((?![a-z]+:|#|/|\.\./)", "](" + up, body)


def _pct(v, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def _provenance(doc: dict, path: Path) -> str:
    m = doc.get("machine", {})
    return (f"_Source: [`{path.relative_to(HERE.parent)}`]({path.relative_to(HERE.parent)}), "
            f"command `{doc.get('command', '?')}`, commit `{str(doc.get('commit', '?'))[:10]}`, "
            f"{m.get('cpus', '?')} CPUs ({m.get('processor', '?')}{', ' + m['cpu_model'] if m.get('cpu_model') else ''}), "
            f"{doc.get('date', '?')}._")


def _worst(row: dict) -> str:
    """The per-image worst case over the row's attacks, for rows evaluated since rcomp eval reports it."""
    return "" if row.get("pgd_worst") is None else f"; worst {_pct(row['pgd_worst'])}"


def cifar10_table(doc: dict) -> str:
    poster = doc.get("poster", {})
    rows = ["| run | method | target | epochs | clean % | PGD-10 % | PGD-50×r % (PGD-10, same n) | ops ratio | "
            "params ratio | wall time | × dense FastAT | of it: prune / search | ONNX latency ratio | poster clean / PGD |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in _in_table_order(doc["runs"]):
        lat = r.get("latency_ratio_p50")
        ref = poster.get(name)
        rows.append(
            f"| {name} | {_method(r)} | {_target(r)} | {_epochs(r)} | {_pct(r['clean'])} | {_pct(r['pgd10'])} | "
            f"{_pct(r['pgd50'])} ({_pct(r.get('pgd10_same_n'))}, n={r['pgd50_n']}{_worst(r)}) | {r['ops_ratio']:.3f} | {r['params_ratio']:.3f} | "
            f"{_wall(r)} | {_cost(r)} | {_search(r)} | "
            f"{'–' if lat is None else f'{lat:.2f}'} | {_poster(ref)} |"
        )
    return "\n".join(rows)


def methods_side_by_side(doc: dict, model: str = "resnet20") -> str:
    """One line per ops target: every method's clean / PGD-10 and cost, next to the poster's."""
    runs = [r for r in doc["runs"].values() if r["model"] == model and not _variant(r)]
    poster = doc.get("poster", {})
    prefix = model.replace("resnet", "r")
    targets = sorted({r["target_ops"] for r in runs if r["target_ops"]}, reverse=True)
    dense = next((r for r in runs if r["method"] == "dense"), None)
    head = ("| ops target | in-train (ours) | post-train, magnitude | post-train, RL (AMC + KL) | poster in-train | poster RL |",
            "|---:|---|---|---|---|---|")
    lines = list(head)
    if dense:
        ref = poster.get(f"{prefix}-dense")
        cell = f"{_pct(dense['clean'])} / {_pct(dense['pgd10'])}"
        lines.append(f"| 1.0 (dense) | {cell} | {cell} | {cell} | {_poster(ref)} | {_poster(ref)} |")
    for t in targets:
        cells = []
        for method in ("intrain", "posttrain", "rl"):
            r = next((r for r in runs if r["method"] == method and r["target_ops"] == t), None)
            cells.append("–" if r is None else f"{_pct(r['clean'])} / {_pct(r['pgd10'])} ({_cost(r)})")
        lines.append(f"| {t} | {' | '.join(cells)} | {_poster(poster.get(f'{prefix}-intrain-{t}'))} | "
                     f"{_poster(poster.get(f'{prefix}-rl-{t}'))} |")
    lines += ["", "clean % / PGD-10 % on the validation split (× = wall time over dense FastAT for the same epochs, "
              "search and fine-tuning included); the poster's columns are its CIFAR-10 table (full GPU schedules)."]
    return "\n".join(lines)


def _variant(r: dict) -> bool:
    """A row that changes one thing of its method (widths in multiples of N, the method's own
    schedule): listed after the method's row, not in the method summary."""
    return (r.get("channel_multiple") or 1) > 1 or bool(r.get("finetune_epochs"))


def _method(r: dict) -> str:
    if r.get("finetune_epochs"):
        return f"{r['method']}, own schedule"
    return f"{r['method']}, widths ×{r['channel_multiple']}" if _variant(r) else r["method"]


def _epochs(r: dict) -> str:
    """An own-schedule row trains ``epochs`` dense, then fine-tunes: both counts."""
    return f"{r['epochs']} + {r['finetune_epochs']}" if r.get("finetune_epochs") else str(r["epochs"])


def _target(r: dict) -> str:
    """The ops fraction a row was pruned to, or its params fraction for a row held to a params budget."""
    if r.get("target_ops") is None and r.get("target_params") is not None:
        return f"params {r['target_params']}"
    return str(r["target_ops"] or 1.0)


def _poster(ref) -> str:
    """Clean / PGD; a third entry names the poster's attack where it is not the table's PGD-10."""
    if ref is None:
        return "–"
    return f"{ref[0]:.2f} / {ref[1]:.2f}" + (f" ({ref[2]})" if len(ref) > 2 else "")


def _in_table_order(runs: dict) -> list[tuple[str, dict]]:
    """Model by model: dense first, then each method from the mildest target to the tightest."""
    methods = ["dense", "intrain", "posttrain", "rl"]
    def key(item):
        r = item[1]
        rank = methods.index(r["method"]) if r["method"] in methods else len(methods)
        return (r["model"] != "resnet20", r["model"], rank, -(r["target_ops"] or 1.0), _variant(r))
    return sorted(runs.items(), key=key)


def _wall(r: dict) -> str:
    """Minutes of the whole method, unless the collection said its runs were not timed alike (``--untimed``)."""
    return "untimed" if r.get("untimed") else f"{r['wall_seconds'] / 60:.0f} min"


def _cost(r: dict) -> str:
    """Wall time over dense FastAT's for the same epochs, timed in the same sweep (see ``add_cost_ratios``)."""
    return "–" if r.get("cost_vs_dense") is None else f"{r['cost_vs_dense']:.2f}×"


def _search(r: dict) -> str:
    phases = r.get("phase_seconds") or {}
    seconds = phases.get("search", phases.get("prune"))
    if seconds is None:
        return "–"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def plot_cifar10(doc: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "clean", "clean accuracy"), (axes[1], "pgd10", "PGD-10 accuracy")):
        for method, marker in (("dense", "*"), ("intrain", "o"), ("posttrain", "s"), ("rl", "^")):
            pts = sorted((r["ops_ratio"], 100 * r[key]) for r in doc["runs"].values()
                         if r["method"] == method and r["model"] == "resnet20" and not _variant(r))
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"rcomp {method}")
        variants: dict[str, list] = {}  # one legend entry per kind of variant
        for r in doc["runs"].values():
            if r["model"] == "resnet20" and _variant(r):
                variants.setdefault(_method(r), []).append((r["ops_ratio"], 100 * r[key]))
        for (label, pts), marker in zip(sorted(variants.items()), "DPXh"):
            ax.plot(*zip(*sorted(pts)), marker=marker, linestyle="none", label=f"rcomp {label}")
        poster = doc.get("poster", {})
        for prefix, marker, label in (("r20-intrain", "x", "poster in-train"), ("r20-rl", "+", "poster RL post-train")):
            pts = sorted((float(n.rsplit("-", 1)[1]), v[0 if key == "clean" else 1]) for n, v in poster.items() if n.startswith(prefix))
            if "r20-dense" in poster:
                pts.append((1.0, poster["r20-dense"][0 if key == "clean" else 1]))
            if pts:
                ax.plot(*zip(*sorted(pts)), marker=marker, linestyle=":", label=label)
        ax.set_xlabel("ops ratio (pruned / dense MACs)")
        ax.set_ylabel(f"{title} [%]")
        ax.set_title(f"ResNet20, CIFAR-10 validation: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def render_cifar10(path: Path, table: str = "cifar10_table") -> None:
    """The table, plot and notes into section ``table``, the methods side by side into
    ``cifar10_methods`` (the main table) or ``<table>_methods``."""
    if not path.exists():
        return
    doc = json.loads(path.read_text())
    png = path.with_suffix(".png")
    body = [cifar10_table(doc), "", _provenance(doc, path) + " Each row's own sweep is listed below the notes."]
    if (PLOTS and plot_cifar10(doc, png)) or (not PLOTS and png.exists()):
        body += ["", f"![accuracy vs ops]({png.relative_to(HERE.parent)})"]
    notes = doc.get("notes")
    if notes:
        body += [""] + [f"- {n}" for n in notes]
    body += [""] + _row_provenance(doc)
    replace_section(table, "\n".join(body))
    replace_section("cifar10_methods" if table == "cifar10_table" else f"{table}_methods", methods_side_by_side(doc))


def _row_provenance(doc: dict) -> list[str]:
    """Rows come from several sweeps: say which command, commit and date produced each group."""
    groups: dict[str, list[str]] = {}
    for name, r in doc["runs"].items():
        c = r["collected"]
        key = json.dumps([c.get("command"), str(c.get("commit"))[:10], c.get("date"), r.get("notes") or []])
        groups.setdefault(key, []).append(name)
    lines = []
    for key, names in groups.items():
        command, commit, date, notes = json.loads(key)
        trained = {str(s["commit"])[:10] + (" + uncommitted changes" if s.get("dirty") else "")
                   for n in names for s in doc["runs"][n].get("trained_by") or []}
        line = f"- {', '.join(names)}: collected by `{command}` at commit `{commit}`, {date}"
        line += f"; trained at commit {', '.join(f'`{t}`' for t in sorted(trained))}" if trained else ""
        lines.append(line + "".join(f"; note: {n}" for n in notes) + ".")
    return lines


#: The table whose ResNet20 rows are the headline (README "Results in short", docs/results.md): the
#: aims' reference recipe (attacks from the predicted label, seed 0, every method from one init).
HEADLINE = HERE / "results" / "cifar10_table_predicted.json"


def headline_table(doc: dict, path: Path) -> str:
    """One line per ResNet20 method and ops target of ``doc``: accuracy, budget, cost, latency and the model file."""
    table = path.stem
    models = HERE / "models" / ("" if table == "cifar10_table" else table)
    lines = ["| method | ops target | clean % | PGD-10 % | ops of dense | params of dense | × dense FastAT | "
             "ONNX latency of dense | model |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in _in_table_order(doc["runs"]):
        if r["model"] != "resnet20" or _variant(r):
            continue
        model = models / f"{name}.pt"
        link = f"[`{name}.pt`]({model.relative_to(HERE.parent).as_posix()})" if model.exists() else "–"
        lat = r.get("latency_ratio_p50")
        lines.append(f"| {_method(r)} | {_target(r)} | {_pct(r['clean'])} | {_pct(r['pgd10'])} | {r['ops_ratio']:.3f} | "
                     f"{r['params_ratio']:.3f} | {_cost(r)} | {'–' if lat is None else f'{lat:.2f}'} | {link} |")
    m = doc.get("machine", {})
    lines += ["", f"ResNet20 on CIFAR-10, {doc['runs'][next(iter(doc['runs']))]['epochs']} epochs of N-FGSM, "
              "seed 0, every row from the same initial weights; clean and PGD-10 (eps 8/255) accuracy on the "
              f"5,000-image validation split. _Source: [`{path.relative_to(HERE.parent).as_posix()}`]"
              f"({path.relative_to(HERE.parent).as_posix()}), {m.get('cpus', '?')} CPUs; each row's command "
              "and commit are listed under its full table in docs/results.md._"]
    return "\n".join(lines)


def render_headline(path: Path = HEADLINE) -> None:
    if path.exists():
        replace_section("headline", headline_table(json.loads(path.read_text()), path))


def render_all() -> None:
    """Every section this script and the scripts it imports render, from the results files that exist."""
    render_cifar10(HERE / "results" / "cifar10_table.json")
    for extra in sorted((HERE / "results").glob("cifar10_table_*.json")):  # tables of other recipes
        render_cifar10(extra, extra.stem)
    render_headline()
    from aims import render_aims  # the aims' pairs draw on every table

    render_aims()
    from main_job import RESULTS as MAIN_JOB, render_table as main_job_table

    if MAIN_JOB.exists():
        replace_section("main_job", main_job_table(json.loads(MAIN_JOB.read_text())))


if __name__ == "__main__":
    render_all()
