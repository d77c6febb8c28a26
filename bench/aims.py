"""The issue's three aims, as the measured pairs of rows behind each, rendered from the results files.

Every figure the aims table of docs/results.md shows is a difference between two rows of ``bench/results/``
(a row under test and its reference, e.g. in-train 0.5 against dense of the same schedule, seed and
machine), so the table is declared here as those pairs and rendered, never typed. A pair whose rows
are not in the results yet (a run still training) is left out until they are.

    python bench/aims.py        # also part of python bench/render.py
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from render import HERE, _pct, replace_section

RESULTS = HERE / "results"

#: The aims, as the issue states them.
AIMS = {
    1: "in-train 0.5 within 1.5 points of dense, clean and PGD",
    2: "in-train beats post-train clean accuracy at 0.3 by a clear margin",
    3: "in-train costs ≤ 1.2× dense FastAT of the same epochs",
}
#: The results files the pairs draw from (N-FGSM; ResNet20 unless a pair names another model; attacks from
#: the predicted label except in ``cifar10_table``, the table's first recipe).
MAIN, PREDICTED, SEED1, E15, ABLATION = (
    "cifar10_table", "cifar10_table_predicted", "cifar10_table_predicted_s1", "cifar10_table_e15", "intrain_ablation")


@dataclass(frozen=True)
class Pair:
    """A row under test against its reference row, each named as (results file stem, row name)."""

    aim: int
    what: str  # what sets this pair apart from the aim's other pairs: schedule, seed, machine, baseline
    row: tuple[str, str]
    ref: tuple[str, str]
    group: str | None = None  # pairs of one recipe (other seeds or machines) whose gaps are averaged
    timed_together: bool = False  # trained side by side on one machine: against dense, their wall ratio is a cost ratio


PAIRS = [
    Pair(1, "6 epochs, seed 0", (PREDICTED, "r20-intrain-0.5"), (PREDICTED, "r20-dense"), "6 epochs"),
    Pair(1, "6 epochs, seed 1", (SEED1, "r20-intrain-0.5"), (SEED1, "r20-dense"), "6 epochs"),
    Pair(1, "6 epochs, seed 0 again on a second machine", (ABLATION, "r20-intrain-0.5-rerun-predicted"),
         (ABLATION, "r20-dense-rerun-predicted"), "6 epochs"),
    Pair(1, "6 epochs, seed 2, against the AMD EPYC dense row (2026-12-06)", (ABLATION, "r20-intrain-0.5-seed2-predicted"),
         (ABLATION, "r20-dense-seed2-epyc"), "6 epochs"),
    Pair(1, "15 epochs, masks frozen at epoch 12 (0.8)", (E15, "r20-intrain-0.5"), (E15, "r20-dense")),
    Pair(1, "15 epochs, masks frozen at epoch 9 (0.6), seed 0", (ABLATION, "r20-intrain-0.5-e15-freeze0.6"),
         (E15, "r20-dense"), "15 epochs, frozen at 0.6"),
    Pair(1, "15 epochs, masks frozen at epoch 9 (0.6), seed 1", (ABLATION, "r20-intrain-0.5-e15-freeze0.6-seed1"),
         (ABLATION, "r20-dense-e15-seed1"), "15 epochs, frozen at 0.6", timed_together=True),
    Pair(1, "15 epochs, masks frozen at epoch 9 (0.6), seed 1, the channels cut out at the freeze (slim_at_freeze)",
         (ABLATION, "r20-intrain-0.5-e15-freeze0.6-seed1-slim"), (ABLATION, "r20-dense-e15-seed1-rerun"),
         timed_together=True),
    Pair(1, "30 epochs, masks frozen at epoch 18 (0.6), seed 0", (ABLATION, "r20-intrain-0.5-e30-freeze0.6"),
         (ABLATION, "r20-dense-e30"), timed_together=True),
    Pair(1, "6 epochs, seed 0, masks frozen at epoch 3.6 (0.6, not 4.8), both on the Intel Xeon host (2026-12-06)",
         (ABLATION, "r20-intrain-0.5-freeze0.6-predicted"), (ABLATION, "r20-dense-rerun-xeon"), "6 epochs, frozen at 0.6",
         timed_together=True),
    Pair(1, "6 epochs, seed 1, masks frozen at epoch 3.6 (0.6, not 4.8), both on the AMD EPYC host (2026-12-06)",
         (ABLATION, "r20-intrain-0.5-freeze0.6-seed1-predicted"), (ABLATION, "r20-dense-seed1-epyc"),
         "6 epochs, frozen at 0.6", timed_together=True),
    Pair(1, "6 epochs, seed 1, masks frozen at epoch 3 (0.5, when the ramp reaches the target), against the AMD EPYC dense row",
         (ABLATION, "r20-intrain-0.5-freeze0.5-seed1-predicted"), (ABLATION, "r20-dense-seed1-epyc"),
         "6 epochs, frozen at 0.5"),
    Pair(1, "6 epochs, seed 0, masks frozen at epoch 3 (0.5), both on the AMD EPYC host (2026-12-06)",
         (ABLATION, "r20-intrain-0.5-freeze0.5-predicted"), (ABLATION, "r20-dense-epyc"), "6 epochs, frozen at 0.5",
         timed_together=True),
    Pair(1, "6 epochs, seed 2, masks frozen at epoch 3 (0.5), both on the AMD EPYC host (2026-12-06)",
         (ABLATION, "r20-intrain-0.5-freeze0.5-seed2-predicted"), (ABLATION, "r20-dense-seed2-epyc"),
         "6 epochs, frozen at 0.5", timed_together=True),
    Pair(1, "6 epochs, seed 3, masks frozen at epoch 3 (0.5), both on the AMD EPYC host (2026-12-07)",
         (ABLATION, "r20-intrain-0.5-freeze0.5-seed3-predicted"), (ABLATION, "r20-dense-seed3-epyc"),
         "6 epochs, frozen at 0.5", timed_together=True),
    Pair(1, "6 epochs, seed 0, masks frozen at 0.5, their task gradient from a second pass on running statistics "
            "(mask-pass), against the AMD EPYC dense row",
         (ABLATION, "r20-intrain-0.5-freeze0.5-maskpass-predicted"), (ABLATION, "r20-dense-epyc")),
    Pair(1, "6 epochs, seed 0, masks frozen at 0.5, a removal-based width signal (width_probe_every 10), against "
            "the AMD EPYC dense row",
         (ABLATION, "r20-intrain-0.5-freeze0.5-probe-predicted"), (ABLATION, "r20-dense-epyc")),
    Pair(1, "6 epochs, seed 0, masks frozen at epoch 2.4 (0.4, halfway up the ramp), against the AMD EPYC dense row",
         (ABLATION, "r20-intrain-0.5-freeze0.4-predicted"), (ABLATION, "r20-dense-epyc"), "6 epochs, frozen at 0.4"),
    Pair(1, "6 epochs, seed 1, masks frozen at epoch 2.4 (0.4), against the AMD EPYC dense row",
         (ABLATION, "r20-intrain-0.5-freeze0.4-seed1-predicted"), (ABLATION, "r20-dense-seed1-epyc"),
         "6 epochs, frozen at 0.4"),
    Pair(1, "no pruning: in-train 0.5's widths trained from scratch, 6 epochs", (ABLATION, "r20-scratch-intrain-0.5"),
         (ABLATION, "r20-dense-rerun-predicted")),
    Pair(1, "no pruning: magnitude post-train 0.5's widths from scratch, 6 epochs", (ABLATION, "r20-scratch-posttrain-0.5"),
         (ABLATION, "r20-dense-rerun-predicted")),
    Pair(1, "no pruning: the widths of in-train 0.5 frozen at 0.5 (seed 0) from scratch, 6 epochs, AMD EPYC host",
         (ABLATION, "r20-scratch-intrain-0.5-freeze0.5"), (ABLATION, "r20-dense-epyc")),
    Pair(1, "no pruning: the widths of in-train 0.5 frozen at 0.5 (seed 1) from scratch, 6 epochs, AMD EPYC host",
         (ABLATION, "r20-scratch-intrain-0.5-freeze0.5-seed1"), (ABLATION, "r20-dense-seed1-epyc")),
    Pair(1, "no pruning: uniform widths at 0.5 from scratch, 6 epochs", (ABLATION, "r20-scratch-uniform-0.5"),
         (ABLATION, "r20-dense-rerun-predicted")),
    Pair(2, "vs magnitude, 6 epochs, seed 0", (PREDICTED, "r20-intrain-0.3"), (PREDICTED, "r20-posttrain-0.3"), "vs magnitude"),
    Pair(2, "vs magnitude, 6 epochs, seed 1", (SEED1, "r20-intrain-0.3"), (SEED1, "r20-posttrain-0.3"), "vs magnitude"),
    Pair(2, "vs magnitude, 6 epochs, seed 0 again on a second machine", (ABLATION, "r20-intrain-0.3-rerun-predicted"),
         (ABLATION, "r20-posttrain-0.3-rerun-predicted"), "vs magnitude"),
    Pair(2, "vs magnitude, 6 epochs, seed 0 again on a third host (2026-12-05)", (ABLATION, "r20-intrain-0.3-rerun-streams"),
         (ABLATION, "r20-posttrain-0.3-rerun-streams"), "vs magnitude"),
    Pair(2, "vs magnitude, 6 epochs, seed 1 again, both on the AMD EPYC host (2026-12-06)",
         (ABLATION, "r20-intrain-0.3-seed1-epyc"), (ABLATION, "r20-posttrain-0.3-seed1-epyc"), "vs magnitude"),
    Pair(2, "vs magnitude, 6 epochs, seed 0, the residual streams held at half width (min_keep_stream 0.5), third host",
         (ABLATION, "r20-intrain-0.3-streams0.5"), (ABLATION, "r20-posttrain-0.3-rerun-streams")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, anti-windup for the budget's multiplier (dual_reset), third host",
         (ABLATION, "r20-intrain-0.3-dualreset"), (ABLATION, "r20-posttrain-0.3-rerun-streams")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, no weight decay on the masks (mask_weight_decay 0), third host",
         (ABLATION, "r20-intrain-0.3-maskwd0"), (ABLATION, "r20-posttrain-0.3-rerun-streams")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, masks frozen at epoch 3 (0.5), on the AMD EPYC host, which repeats the second machine",
         (ABLATION, "r20-intrain-0.3-freeze0.5-predicted"), (ABLATION, "r20-posttrain-0.3-rerun-predicted"),
         "vs magnitude, frozen at 0.5"),
    Pair(2, "vs magnitude, 6 epochs, seed 1, masks frozen at epoch 3 (0.5), both on the AMD EPYC host (2026-12-06)",
         (ABLATION, "r20-intrain-0.3-freeze0.5-seed1-predicted"), (ABLATION, "r20-posttrain-0.3-seed1-epyc"),
         "vs magnitude, frozen at 0.5"),
    Pair(2, "vs magnitude, 6 epochs, seed 2, masks frozen at epoch 3 (0.5), both on the AMD EPYC host (2026-12-06)",
         (ABLATION, "r20-intrain-0.3-freeze0.5-seed2-predicted"), (ABLATION, "r20-posttrain-0.3-seed2-predicted"),
         "vs magnitude, frozen at 0.5"),
    Pair(2, "vs magnitude, 6 epochs, seed 3, masks frozen at epoch 3 (0.5), both on the AMD EPYC host (2026-12-07)",
         (ABLATION, "r20-intrain-0.3-freeze0.5-seed3-predicted"), (ABLATION, "r20-posttrain-0.3-seed3-predicted"),
         "vs magnitude, frozen at 0.5"),
    Pair(2, "vs magnitude, 6 epochs, seed 0, masks frozen at 0.5, BatchNorm on running statistics while the masks "
            "learn, on the AMD EPYC host, which repeats the second machine",
         (ABLATION, "r20-intrain-0.3-freeze0.5-bnrunning-predicted"), (ABLATION, "r20-posttrain-0.3-rerun-predicted")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, masks frozen at 0.5, their task gradient from a second pass on running "
            "statistics (mask-pass), on the AMD EPYC host, which repeats the second machine",
         (ABLATION, "r20-intrain-0.3-freeze0.5-maskpass-predicted"), (ABLATION, "r20-posttrain-0.3-rerun-predicted")),
    Pair(2, "vs magnitude, 6 epochs, seed 1, masks frozen at 0.5, their task gradient from a second pass on running "
            "statistics (mask-pass), both on the AMD EPYC host",
         (ABLATION, "r20-intrain-0.3-freeze0.5-maskpass-seed1-predicted"), (ABLATION, "r20-posttrain-0.3-seed1-epyc")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, masks frozen at 0.5, the mask pass blind to the logits' scale "
            "(mask-pass-direction), on the AMD EPYC host, which repeats the second machine",
         (ABLATION, "r20-intrain-0.3-freeze0.5-maskdir-predicted"), (ABLATION, "r20-posttrain-0.3-rerun-predicted")),
    Pair(2, "vs magnitude, 6 epochs, seed 1, masks frozen at 0.5, the mask pass blind to the logits' scale "
            "(mask-pass-direction), both on the AMD EPYC host",
         (ABLATION, "r20-intrain-0.3-freeze0.5-maskdir-seed1-predicted"), (ABLATION, "r20-posttrain-0.3-seed1-epyc")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, masks frozen at 0.5, a removal-based width signal (width_probe_every "
            "10), on the AMD EPYC host, which repeats the second machine",
         (ABLATION, "r20-intrain-0.3-freeze0.5-probe-predicted"), (ABLATION, "r20-posttrain-0.3-rerun-predicted")),
    Pair(2, "vs magnitude, 6 epochs, seed 1, masks frozen at 0.5, a removal-based width signal (width_probe_every "
            "10), both on the AMD EPYC host",
         (ABLATION, "r20-intrain-0.3-freeze0.5-probe-seed1-predicted"), (ABLATION, "r20-posttrain-0.3-seed1-epyc")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, masks frozen at epoch 3.6 (0.6, not 4.8), third host",
         (ABLATION, "r20-intrain-0.3-freeze0.6-predicted"), (ABLATION, "r20-posttrain-0.3-rerun-streams")),
    Pair(2, "vs magnitude, 6 epochs, seed 1, masks frozen at epoch 3.6 (0.6, not 4.8)",
         (ABLATION, "r20-intrain-0.3-freeze0.6-seed1-predicted"), (SEED1, "r20-posttrain-0.3")),
    Pair(2, "vs magnitude, 15 epochs, masks frozen at epoch 9 (0.6), seed 0", (ABLATION, "r20-intrain-0.3-e15-freeze0.6"),
         (ABLATION, "r20-posttrain-0.3-e15"), timed_together=True),
    Pair(2, "vs RL post-train (AMC + KL), 6 epochs, seed 0", (PREDICTED, "r20-intrain-0.3"), (PREDICTED, "r20-rl-0.3")),
    Pair(2, "ResNet56 vs magnitude, 6 epochs, seed 0, attacks from the true label (the table's first recipe)",
         (MAIN, "r56-intrain-0.3"), (ABLATION, "r56-posttrain-0.3")),
    Pair(2, "ResNet56 vs magnitude, the table's in-train command again on magnitude's CPU model (2026-12-05)",
         (ABLATION, "r56-intrain-0.3-rerun-streams"), (ABLATION, "r56-posttrain-0.3")),
    Pair(2, "ResNet56 vs magnitude, the residual streams held at half width (min_keep_stream 0.5), true-label attacks",
         (ABLATION, "r56-intrain-0.3-streams0.5"), (ABLATION, "r56-posttrain-0.3")),
    Pair(2, "ResNet56 vs magnitude, the residual streams held at half width, attacks from the predicted label (the aims' recipe)",
         (ABLATION, "r56-intrain-0.3-streams0.5-predicted"), (ABLATION, "r56-posttrain-0.3-predicted")),
    Pair(2, "ResNet56 vs magnitude, the table's in-train recipe, attacks from the predicted label (the aims' recipe)",
         (ABLATION, "r56-intrain-0.3-predicted"), (ABLATION, "r56-posttrain-0.3-predicted")),
    Pair(2, "ResNet56 vs magnitude, streams at half width and block channels at 0.4 (min_keep 0.4), predicted label",
         (ABLATION, "r56-intrain-0.3-minkeep0.4-predicted"), (ABLATION, "r56-posttrain-0.3-predicted")),
    Pair(2, "ResNet56 vs magnitude, streams at half width, masks frozen at epoch 3.6 (0.6, not 4.8), predicted label",
         (ABLATION, "r56-intrain-0.3-streams0.5-freeze0.6-predicted"), (ABLATION, "r56-posttrain-0.3-predicted"),
         "ResNet56, frozen at 0.6"),
    Pair(2, "ResNet56 vs magnitude, streams at half width, masks frozen at 0.6, predicted label, seed 1, both on the AMD EPYC host",
         (ABLATION, "r56-intrain-0.3-streams0.5-freeze0.6-seed1-predicted"), (ABLATION, "r56-posttrain-0.3-seed1-predicted"),
         "ResNet56, frozen at 0.6", timed_together=True),
    Pair(2, "ResNet56 vs magnitude, streams at half width, masks frozen at 0.6, predicted label, seed 2, both on the AMD EPYC host",
         (ABLATION, "r56-intrain-0.3-streams0.5-freeze0.6-seed2-predicted"), (ABLATION, "r56-posttrain-0.3-seed2-predicted"),
         "ResNet56, frozen at 0.6", timed_together=True),
    Pair(2, "vs magnitude, 6 epochs, seed 0, the hinge on the budget's excess at half weight (penalty_weight 0.5), third host",
         (ABLATION, "r20-intrain-0.3-penalty0.5"), (ABLATION, "r20-posttrain-0.3-rerun-streams")),
    Pair(2, "vs magnitude, 6 epochs, seed 0, the hinge on the budget's excess at twice its weight (penalty_weight 2.0), third host",
         (ABLATION, "r20-intrain-0.3-penalty2"), (ABLATION, "r20-posttrain-0.3-rerun-streams")),
    Pair(2, "vs magnitude on its own schedule (6 + 2 epochs), seed 0", (PREDICTED, "r20-intrain-0.3"),
         (PREDICTED, "r20-posttrain-0.3-natural")),
]


def load_rows() -> dict[str, dict]:
    """Every results file's rows by file stem (an absent file has none)."""
    return {stem: json.loads(path.read_text())["runs"] for stem in {p.row[0] for p in PAIRS} | {p.ref[0] for p in PAIRS}
            if (path := RESULTS / f"{stem}.json").exists()}


def _row(rows: dict, key: tuple[str, str]) -> dict | None:
    return rows.get(key[0], {}).get(key[1])


def cost_ratio(pair: Pair, row: dict, ref: dict) -> float | None:
    """The row's wall time over dense FastAT's of the same epochs: the table's own ratio (against its
    dense row, timed in the same sweep), or the two rows' ratio when they trained side by side."""
    if pair.timed_together and ref["method"] == "dense":
        return row["wall_seconds"] / ref["wall_seconds"]
    return row.get("cost_vs_dense")


def gaps(pair: Pair, rows: dict) -> dict | None:
    """Clean, PGD-10 and (where both rows have it, on the same images) PGD-50 differences; None
    while either row is missing."""
    row, ref = _row(rows, pair.row), _row(rows, pair.ref)
    if row is None or ref is None:
        return None
    pgd50 = (row["pgd50"] - ref["pgd50"]) if row.get("pgd50") is not None and ref.get("pgd50") is not None \
        and row.get("pgd50_n") == ref.get("pgd50_n") else None
    return {"row": row, "ref": ref, "clean": row["clean"] - ref["clean"], "pgd10": row["pgd10"] - ref["pgd10"],
            "pgd50": pgd50, "cost": cost_ratio(pair, row, ref)}


def _signed(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:+.2f}"


def _rows_cell(pair: Pair) -> str:
    """Which rows were compared, and in which results files."""
    if pair.row[0] == pair.ref[0]:
        return f"{pair.row[1]} vs {pair.ref[1]} (`{pair.row[0]}`)"
    return f"{pair.row[1]} (`{pair.row[0]}`) vs {pair.ref[1]} (`{pair.ref[0]}`)"


def render_table(rows: dict) -> str:
    """One line per measured pair; after a group's last measured pair, the group's mean if it has
    more than one."""
    lines = ["| aim | pair | rows compared (results file) | row: clean / PGD-10 % | reference: clean / PGD-10 % | "
             "Δ clean | Δ PGD-10 | Δ PGD-50 (n=500) | row's wall × dense |",
             "|---:|---|---|---|---|---:|---:|---:|---:|"]
    measured = [(pair, g) for pair in PAIRS if (g := gaps(pair, rows)) is not None]
    for i, (pair, g) in enumerate(measured):
        cost = "–" if g["cost"] is None else f"{g['cost']:.2f}×"
        lines.append(f"| {pair.aim} | {pair.what} | {_rows_cell(pair)} | {_pct(g['row']['clean'])} / {_pct(g['row']['pgd10'])} | "
                     f"{_pct(g['ref']['clean'])} / {_pct(g['ref']['pgd10'])} | {_signed(g['clean'])} | "
                     f"{_signed(g['pgd10'])} | {_signed(g['pgd50'])} | {cost} |")
        group = [h for p, h in measured if pair.group and (p.aim, p.group) == (pair.aim, pair.group)]
        last_of_group = not any((p.aim, p.group) == (pair.aim, pair.group) for p, _ in measured[i + 1:])
        if len(group) > 1 and last_of_group:
            mean = {k: sum(h[k] for h in group) / len(group) for k in ("clean", "pgd10")}
            lines.append(f"| {pair.aim} | **mean of {len(group)}: {pair.group}** | | | | **{_signed(mean['clean'])}** | "
                         f"**{_signed(mean['pgd10'])}** | | |")
    return "\n".join(lines)


def render_aims() -> None:
    rows = load_rows()
    aims = "; ".join(f"{n}: {text}" for n, text in AIMS.items())
    body = (f"Aims — {aims}. Δ = row − reference, in points, on the 5,000-image validation split; aim 3 is "
            "the last column (the table's ratio against its dense row timed in the same sweep, or the two rows' "
            "ratio where they trained side by side).\n\n" + render_table(rows) + "\n\n"
            f"_Rendered by `python bench/aims.py` from {', '.join(f'`bench/results/{s}.json`' for s in sorted(rows))}._")
    replace_section("aims", body)


if __name__ == "__main__":
    render_aims()
