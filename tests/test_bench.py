"""The CIFAR-10 sweep's bookkeeping: run locks, the shared dense phase, cost ratios (no training here)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def table(tmp_path, monkeypatch, load_bench):
    """bench/cifar10_table.py with its folders moved into tmp_path."""
    module = load_bench("cifar10_table")
    for name, sub in (("RUNS_DIR", "runs"), ("MODELS", "models"), ("SHARED", "shared")):
        monkeypatch.setattr(module, name, tmp_path / sub)
    (tmp_path / "runs").mkdir()
    return module


@pytest.fixture
def render(load_bench):
    """bench/render.py, loaded from its file (bench/ is no package)."""
    return load_bench("render")


ARGS = SimpleNamespace(epochs=6, attack="nfgsm", lr=0.2, seed=0)


def _finished_dense_phase(folder: Path, method: str, epochs=(3, 4)) -> None:
    checkpoints = folder / "dense" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for e in epochs:
        (checkpoints / f"ckpt-epoch{e:04d}.pt").write_bytes(f"weights {e}".encode())
        (checkpoints / f"ckpt-epoch{e:04d}.pt.sha256").write_text(f"sum {e}\n")
    (folder / f"{method}-pruned.pt").write_bytes(b"stage")


def test_a_resumed_runs_method_time_counts_its_epochs_before_the_resume(table):
    history = [{"seconds": 100.0}, {"seconds": 100.0}, {"seconds": 50.0}]
    older = {"wall_seconds": 60.0, "resumed_from": 2, "history": history}  # the last process's share only
    assert table.method_seconds(older) == 260.0
    newer = {**older, "wall_seconds": 260.0, "process_seconds": 60.0}  # rcomp already added them
    assert table.method_seconds(newer) == 260.0
    assert table.method_seconds({"wall_seconds": 250.0, "resumed_from": None, "history": history}) == 250.0


def test_a_held_lock_is_refused_and_a_dead_holders_lock_is_taken_over(table):
    with table.run_lock("r20-rl-0.3") as first:
        with table.run_lock("r20-rl-0.3") as second:
            assert first and not second
    assert not (table.RUNS_DIR / "r20-rl-0.3.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (table.RUNS_DIR / "r20-rl-0.3.lock").write_text(str(dead.pid))
    with table.run_lock("r20-rl-0.3") as mine:
        assert mine and (table.RUNS_DIR / "r20-rl-0.3.lock").read_text() == str(os.getpid())


def test_post_train_runs_share_the_latest_dense_checkpoint_of_a_finished_sibling(table):
    _finished_dense_phase(table.partial_dir("r20-posttrain-0.5"), "posttrain")
    assert table.share_dense_phase("r20-rl-0.3", ARGS) == "r20-posttrain-0.5"
    copied = table.partial_dir("r20-rl-0.3") / "dense" / "checkpoints"
    assert sorted(p.name for p in copied.iterdir()) == ["ckpt-epoch0004.pt", "ckpt-epoch0004.pt.sha256"]
    assert (copied / "ckpt-epoch0004.pt").read_bytes() == b"weights 4"
    assert "r20-posttrain-0.5" in (table.partial_dir("r20-rl-0.3") / "dense-phase-from.txt").read_text()
    assert table.share_dense_phase("r20-rl-0.3", ARGS) is None  # already seeded: left alone
    assert table.share_dense_phase("r20-intrain-0.3", ARGS) is None  # in-train has no dense phase


def test_an_unfinished_dense_phase_is_not_shared(table):
    checkpoints = table.partial_dir("r20-posttrain-0.5") / "dense" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "ckpt-epoch0002.pt").write_bytes(b"half-way")  # no posttrain-pruned.pt yet
    assert table.share_dense_phase("r20-posttrain-0.3", ARGS) is None
    assert not table.partial_dir("r20-posttrain-0.3").exists()


def test_a_kept_dense_phase_seeds_a_later_sweep_of_the_same_recipe_only(table):
    _finished_dense_phase(table.run_dir("r20-posttrain-0.5"), "posttrain")
    table.keep_dense_phase("r20-posttrain-0.5", ARGS)
    kept = table.SHARED / "resnet20-e6-nfgsm-lr0.2-seed0"
    assert sorted(p.name for p in kept.iterdir()) == ["ckpt-epoch0004.pt", "ckpt-epoch0004.pt.sha256"]
    shutil.rmtree(table.run_dir("r20-posttrain-0.5"))  # a fresh checkout: only bench/shared is left
    assert table.share_dense_phase("r20-rl-0.5", SimpleNamespace(**{**vars(ARGS), "epochs": 9})) is None
    assert table.share_dense_phase("r20-rl-0.5", ARGS).endswith("resnet20-e6-nfgsm-lr0.2-seed0")


def test_cost_ratio_uses_a_dense_epoch_of_the_same_sweep(table):
    rows = {
        "r20-intrain-0.3": {"method": "intrain", "epochs": 6, "wall_seconds": 660.0, "epoch_seconds": [110.0] * 6},
        "r20-posttrain-0.3": {"method": "posttrain", "epochs": 6, "wall_seconds": 630.0, "epoch_seconds": [100.0] * 2,
                              "dense_phase_epoch_seconds": [100.0] * 4},
    }
    table.add_cost_ratios(rows)
    assert rows["r20-intrain-0.3"]["cost_vs_dense"] == pytest.approx(1.1)
    assert rows["r20-posttrain-0.3"]["cost_vs_dense"] == pytest.approx(1.05)
    rows["r20-dense"] = {"method": "dense", "epochs": 6, "wall_seconds": 1200.0, "epoch_seconds": [200.0] * 6}
    table.add_cost_ratios(rows)  # a dense row of the sweep takes precedence
    assert rows["r20-intrain-0.3"]["cost_vs_dense"] == pytest.approx(0.55)
    assert "dense row" in rows["r20-intrain-0.3"]["cost_reference"]
    rows = {"vgg16-dense": {"model": "vgg16", "method": "dense", "epochs": 6, "wall_seconds": 6000.0,
                            "epoch_seconds": [1000.0] * 6},
            "r20-intrain-0.3": {"model": "resnet20", "method": "intrain", "epochs": 6, "wall_seconds": 660.0,
                                "epoch_seconds": [110.0] * 6}}
    table.add_cost_ratios(rows)  # another model's dense row is no reference
    assert "cost_vs_dense" not in rows["r20-intrain-0.3"] and rows["vgg16-dense"]["cost_vs_dense"] == 1.0


def test_an_untimed_collection_shows_no_wall_time_and_no_ratio(table, render):
    """--untimed: runs paused or resumed under other load keep their seconds in the file, not in the table."""
    row = dict(model="resnet20", method="intrain", target_ops=0.3, epochs=6, clean=0.63, pgd10=0.27, pgd50=0.28,
               pgd50_n=500, ops_ratio=0.3, params_ratio=0.37, wall_seconds=9600.0, epoch_seconds=[1600.0] * 6)
    rows = {"r20-intrain-0.3": dict(row), "r20-dense": dict(row, method="dense", target_ops=None, wall_seconds=7200.0,
                                                            epoch_seconds=[1200.0] * 6)}
    table.add_timing(rows, untimed=True)
    assert all(r["untimed"] and "cost_vs_dense" not in r for r in rows.values())
    cells = render.cifar10_table({"runs": rows}).splitlines()[2].split(" | ")
    assert cells[9:11] == ["untimed", "–"] and "160 min" not in render.cifar10_table({"runs": rows})
    assert "63.00 / 27.00 (–)" in render.methods_side_by_side({"runs": rows})
    timed = {n: {k: v for k, v in r.items() if k != "untimed"} for n, r in rows.items()}
    table.add_timing(timed, untimed=False)
    assert timed["r20-intrain-0.3"]["cost_vs_dense"] == pytest.approx(9600 / 7200)
    assert render.cifar10_table({"runs": timed}).splitlines()[2].split(" | ")[9:11] == ["120 min", "1.00×"]


def test_a_dense_phase_taken_over_from_another_sweep_is_no_cost_reference(table):
    """Its epoch times were measured under another sweep's load: no ratio beats a wrong one."""
    rows = {
        "r20-intrain-0.5-x8": {"method": "intrain", "epochs": 6, "wall_seconds": 540.0 * 6, "epoch_seconds": [540.0] * 6},
        "r20-rl-0.5": {"method": "rl", "epochs": 6, "wall_seconds": 4000.0, "epoch_seconds": [350.0] * 2,
                       "dense_phase_epoch_seconds": [635.0] * 4, "dense_phase_shared": True},
    }
    table.add_cost_ratios(rows)
    assert all("cost_vs_dense" not in r for r in rows.values())
    rows["r20-posttrain-0.5"] = {"method": "posttrain", "epochs": 6, "wall_seconds": 3000.0, "epoch_seconds": [300.0] * 2,
                                 "dense_phase_epoch_seconds": [600.0] * 4, "dense_phase_shared": None}
    table.add_cost_ratios(rows)  # a sibling that trained its dense phase in this sweep is one
    assert rows["r20-intrain-0.5-x8"]["cost_vs_dense"] == pytest.approx(0.9)


@pytest.fixture
def ablation(tmp_path, monkeypatch, load_bench):
    """bench/intrain_ablation.py with its run folder moved into tmp_path."""
    module = load_bench("intrain_ablation")
    monkeypatch.setattr(module, "RUNS_DIR", tmp_path / "ablation")
    monkeypatch.setattr(module, "PARKED", tmp_path / "parked")
    monkeypatch.setattr(module, "MODELS", tmp_path / "models")
    return module


def test_collecting_keeps_the_rows_of_variants_this_copy_does_not_know(ablation):
    """Two sweeps from different commits write one results file: the older must not drop the newer's rows."""
    first, second = list(ablation.VARIANTS)[:2]
    rows = {"from-a-newer-commit": {"clean": 0.5}, second: {"clean": 0.6}, first: {"clean": 0.7}}
    assert list(ablation.ordered_rows(rows)) == [first, second, "from-a-newer-commit"]
    assert ablation.ordered_rows(rows)["from-a-newer-commit"] == {"clean": 0.5}


def test_every_ablation_changes_one_thing_through_a_recipe_rcomp_accepts(ablation):
    from rcomp.pipeline import load_recipe

    table = ablation.table_intrain_recipe()
    assert table and load_recipe(str(ablation.INTRAIN_RECIPE)) == table  # the table's in-train rows' recipe
    for name, variant in ablation.VARIANTS.items():
        cmd = ablation.train_command(name, "digits")
        assert cmd[cmd.index("--seed") + 1] == str(variant.seed)
        assert cmd[cmd.index("--method") + 1] == variant.method
        full = variant.full_recipe()
        if full:
            assert load_recipe(cmd[cmd.index("--recipe") + 1]) == full  # unknown keys or bad values would raise
        else:
            assert "--recipe" not in cmd
        assert cmd[cmd.index("--model") + 1] == variant.model
        assert ("--target-params" in cmd) == (variant.params_m is not None)
        reference = variant.reference()
        if reference is None:  # the dense baseline of a schedule no table has
            assert variant.sweep.table is None and variant.method == "dense" and not full, name
            assert "--arch-from" not in cmd and "--resume" not in cmd
            continue
        table_rows = json.loads(variant.sweep.results().read_text())["runs"] if variant.sweep.table else {}
        assert reference in ablation.VARIANTS or reference in table_rows, (name, reference)
        assert reference != name
        other = ablation.VARIANTS.get(reference)
        if other is not None and other.method == "dense" != variant.method:  # a pair: the method is the change
            changes = (variant.seed != other.seed) + (variant.sweep != other.sweep) + 1
        elif other is None and table_rows[reference]["method"] == "dense" != variant.method:  # against a table's dense row
            changes = (variant.seed != ablation.recorded(table_rows[reference], "seed", 0)) + 1
        elif other is not None and variant.arch == f"{ablation.ABLATION_MODELS}/{reference}.pt":  # that variant's widths
            changes = (variant.seed != other.seed) + (variant.sweep != other.sweep) + 1  # from scratch, no masks
        elif other is not None:  # one change against that variant: its recipe, its seed or its widths, same method
            changes = ((full != other.full_recipe()) + (variant.seed != other.seed) + (variant.method != other.method)
                       + (variant.arch != other.arch) + (variant.sweep != other.sweep))
        else:  # one change: a recipe key, or the seed, or (the -fromstart rows) the whole bench recipe,
            # or (the -scratch rows) the reference row's own widths trained densely instead of pruned to
            whole_recipe = variant.method == "intrain" and variant.base == "defaults"
            changes = (bool(variant.recipe) + (variant.seed != ablation.recorded(table_rows[reference], "seed", 0)) + whole_recipe
                       + (variant.arch is not None))
        if variant.arch is not None:
            if other is None:  # the reference row's own widths (against a scratch row: other widths, counted above)
                assert variant.arch == f"bench/models/{variant.sweep.table}/{reference}.pt", name
            assert (ablation.REPO / variant.arch).is_file() and variant.method == "dense", name
            assert "--target-ops" not in cmd
            assert cmd[cmd.index("--arch-from") + 1] == str(ablation.REPO / variant.arch)
        else:
            assert "--arch-from" not in cmd
        assert changes == (0 if variant.repeat else 1), name
        assert "--resume" not in cmd  # nothing started yet


def test_an_ablation_of_another_sweep_trains_with_its_epochs_and_labels_and_names_its_table(ablation):
    """A variant of the 15-epoch pair is compared with that pair's row, so it trains as that row did."""
    e15 = next(n for n, v in ablation.VARIANTS.items() if v.sweep.table == "cifar10_table_e15")
    cmd = ablation.train_command(e15, "digits")
    assert cmd[cmd.index("--epochs") + 1] == "15" and cmd[cmd.index("--attack-labels") + 1] == "predicted"
    main = ablation.train_command("r20-intrain-0.3-start0.5", "digits")
    assert main[main.index("--epochs") + 1] == "6" and "--attack-labels" not in main

    row = {"reference": "r20-intrain-0.5", "reference_table": "cifar10_table_e15", "epochs": 15}
    assert ablation._reference_label(row, {}) == "r20-intrain-0.5 of cifar10_table_e15, 15 epochs"
    assert ablation._reference_label({**row, "reference": e15}, {e15: {}}) == e15  # a variant needs no table
    assert ablation._reference_label({"reference": "r20-intrain-0.5", "epochs": 6}, {}) == "r20-intrain-0.5"

    stacked = next(n for n, v in ablation.VARIANTS.items() if v.ref == e15)
    rows = {n: {"reference": ablation.VARIANTS[n].reference(), "recipe_change": ablation.VARIANTS[n].recipe}
            for n in (e15, stacked)}
    assert ablation._own_change(rows[stacked], rows) == {"warmup_fraction": 0.1}  # not the freeze it builds on
    assert ablation._own_change(rows[e15], rows) == {"freeze_fraction": 0.6}


def test_a_pair_without_a_table_reads_its_in_train_row_against_its_dense_row(ablation):
    """The 30-epoch pair has no table row: its dense row is the baseline, the in-train row's change is the method."""
    pair = {n: v for n, v in ablation.VARIANTS.items() if v.sweep.table is None}
    dense = next(n for n, v in pair.items() if v.method == "dense")
    pruned = next(n for n, v in pair.items() if v.method == "intrain")
    assert pair[dense].reference() is None and pair[pruned].reference() == dense
    dense_cmd, pruned_cmd = (ablation.train_command(n, "digits") for n in (dense, pruned))
    assert dense_cmd[dense_cmd.index("--epochs") + 1] == pruned_cmd[pruned_cmd.index("--epochs") + 1] == "30"

    dense_row = {"method": "dense", "reference": None, "epochs": 30, "recipe_change": {}}
    pruned_row = {"method": "intrain", "target_ops": 0.5, "recipe_base": "table", "recipe_change": {"freeze_fraction": 0.6},
                  "reference": dense}
    assert ablation._reference_label(dense_row, {}) == "none"
    assert ablation._whole_recipe_change(dense_row) == "the dense baseline of its 30-epoch pair"
    assert ablation._method_change(dense_row, None, "") is None
    assert ablation._own_change(pruned_row, {dense: dense_row}) == {"freeze_fraction": 0.6}  # the keys render passes on
    assert (ablation._method_change(pruned_row, dense_row, "freeze_fraction 0.6")
            == "intrain at 0.5 of the ops (bench recipe, freeze_fraction 0.6)")
    scratch = {"method": "dense", "recipe_change": {}}  # trained from an in-train row's widths: not a method change
    assert ablation._method_change(scratch, {**pruned_row, "method": "intrain"}, "") is None
    assert ablation._method_change(pruned_row, dense_row, "") == "intrain at 0.5 of the ops (bench recipe)"


def test_an_interrupted_ablation_resumes(ablation):
    name = next(iter(ablation.VARIANTS))
    (ablation.RUNS_DIR / f"{name}.partial").mkdir(parents=True)
    assert ablation.train_command(name, "digits")[-1] == "--resume"


def test_a_parked_run_resumes_in_a_fresh_checkout_from_its_newest_good_checkpoint(ablation, monkeypatch):
    from rcomp.checkpoint import load_checked, save_atomic

    name = next(n for n, v in ablation.VARIANTS.items() if v.method == "intrain")
    checkpoints = ablation.RUNS_DIR / f"{name}.partial" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for epoch in (3, 4):
        save_atomic({"epoch": epoch}, checkpoints / f"ckpt-epoch{epoch:04d}.pt")
    (checkpoints / "ckpt-epoch0004.pt").write_bytes(b"cut short")  # a save killed half-way
    (ablation.RUNS_DIR / f"{name}.log").write_text("epoch 3\n")
    assert ablation.park([name, "r20-dense"]) == [name]

    shutil.rmtree(ablation.RUNS_DIR)  # the next session's checkout has no bench/runs/
    commands = []
    monkeypatch.setattr(ablation.DEADLINE, "call", lambda cmd, **k: commands.append(cmd))
    ablation.run(name, "digits")
    restored = ablation.RUNS_DIR / f"{name}.partial" / "checkpoints" / "ckpt-epoch0003.pt"
    assert load_checked(restored)["epoch"] == 3 and commands[0][-1] == "--resume"
    assert (ablation.RUNS_DIR / f"{name}.log").read_text() == "epoch 3\n"


def test_a_parked_post_train_run_resumes_in_the_phase_it_was_in(ablation):
    """A post-train run keeps its checkpoints per phase: dense/ until its prune step saves the stage,
    then the stage (pruned network, dense history) and finetune/; a parking holds what that phase needs."""
    from rcomp.checkpoint import load_checked, save_atomic

    name = next(n for n, v in ablation.VARIANTS.items() if v.method == "posttrain")
    partial = ablation.RUNS_DIR / f"{name}.partial"
    (partial / "dense" / "checkpoints").mkdir(parents=True)
    for epoch in (1, 2):
        save_atomic({"epoch": epoch}, partial / "dense" / "checkpoints" / f"ckpt-epoch{epoch:04d}.pt")
    assert ablation.park([name]) == [name]
    shutil.rmtree(ablation.RUNS_DIR)
    assert ablation.unpark(name)
    assert load_checked(partial / "dense" / "checkpoints" / "ckpt-epoch0002.pt")["epoch"] == 2

    save_atomic({"stage": 1}, partial / "posttrain-pruned.pt")  # the prune step done, fine-tuning begun
    (partial / "finetune" / "checkpoints").mkdir(parents=True)
    save_atomic({"epoch": 1}, partial / "finetune" / "checkpoints" / "ckpt-epoch0001.pt")
    assert ablation.park([name]) == [name]
    shutil.rmtree(ablation.RUNS_DIR)
    assert ablation.unpark(name)
    assert sorted(str(p.relative_to(partial)) for p in partial.rglob("*.pt")) == [
        "finetune/checkpoints/ckpt-epoch0001.pt", "posttrain-pruned.pt"]  # the dense phase is in the stage


def test_a_finished_run_keeps_its_model_drops_its_parking_and_a_local_partial_is_not_overwritten(ablation, monkeypatch):
    from rcomp.checkpoint import save_atomic

    name = next(iter(ablation.VARIANTS))
    (ablation.PARKED / name).mkdir(parents=True)
    save_atomic({"epoch": 1}, ablation.PARKED / name / "ckpt-epoch0001.pt")
    (ablation.RUNS_DIR / f"{name}.partial").mkdir(parents=True)  # this checkout's own, newer run
    assert not ablation.unpark(name)
    (ablation.RUNS_DIR / name).mkdir()
    (ablation.RUNS_DIR / name / "model.pt").write_bytes(b"")
    (ablation.RUNS_DIR / name / "eval.json").write_text("{}")
    ablation.run(name, "digits")
    assert not (ablation.PARKED / name).exists() and (ablation.MODELS / f"{name}.pt").exists()  # kept for other splits


def test_a_sweep_past_its_deadline_stops_its_trainer_and_starts_nothing(ablation, monkeypatch):
    import time

    name = next(iter(ablation.VARIANTS))
    monkeypatch.setattr(ablation, "train_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setattr(ablation, "DEADLINE", ablation.Deadline(1.0))
    started = time.monotonic()
    ablation.run(name, "digits")  # the "trainer" would sleep a minute
    assert time.monotonic() - started < 30 and ablation.DEADLINE.passed()
    assert (ablation.RUNS_DIR / f"{name}.provenance.json").exists()  # it had started
    calls = []
    monkeypatch.setattr(ablation.subprocess, "Popen", lambda *a, **k: calls.append(a))
    ablation.run(next(n for n in ablation.VARIANTS if n != name), "digits")
    assert calls == []  # past the deadline: not started


def test_an_ablation_another_process_trains_is_skipped_not_started_twice(ablation, monkeypatch):
    name = next(iter(ablation.VARIANTS))
    ablation.RUNS_DIR.mkdir(parents=True)
    (ablation.RUNS_DIR / f"{name}.lock").write_text(str(os.getpid()))  # a live holder
    started = []
    monkeypatch.setattr(ablation.DEADLINE, "call", lambda *a, **k: started.append(a))
    ablation.run(name, "digits")
    assert started == [] and not (ablation.RUNS_DIR / f"{name}.provenance.json").exists()


def test_a_params_budget_variant_shows_the_params_it_was_steered_by(ablation):
    ops_row = dict(target_params=None, ops_ratio=0.5, params_ratio=0.62, ops_ratio_per_epoch=[1.0, 0.5],
                   params_ratio_per_epoch=[1.0, 0.62])
    assert ablation.budget_cells(ops_row) == ("0.500", "1.00 → 0.50")
    params_row = {**ops_row, "target_params": 0.374, "ops_ratio": 0.242, "params_ratio": 0.3741}
    assert ablation.budget_cells(params_row) == ("0.242 (params 0.374)", "params 1.00 → 0.62")
    older = {k: v for k, v in params_row.items() if k != "params_ratio_per_epoch"}  # rows collected before the key
    assert ablation.budget_cells(older)[1] == "–"


def test_a_repeated_row_says_where_it_was_trained_again(ablation):
    """A rerun changes no key, so the change column must say what differs: when or where it ran."""
    here = ablation.VARIANTS["r20-intrain-0.5-rerun-predicted"]
    row = {"recipe_base": "table", "repeat": here.repeat}
    assert ablation._whole_recipe_change(row) == f"nothing: the same command, {here.repeat}"
    collected_before_the_key = {"recipe_base": "table"}
    assert "after the seed fix" in ablation._whole_recipe_change(collected_before_the_key)
    assert ablation.VARIANTS["r20-intrain-0.5-cost0.5"].reference() == "r20-intrain-0.5-rerun-predicted"


def test_a_variant_of_a_seed_1_row_shows_its_recipe_change_not_the_seed(ablation):
    """The slim variant and its reference are both seed 1: the seed is what they share, not the change."""
    slim = "r20-intrain-0.5-e15-freeze0.6-seed1-slim"
    variants = {n: {"reference": ablation.VARIANTS[n].reference(), "recipe_change": ablation.VARIANTS[n].recipe}
                for n in (slim, "r20-intrain-0.5-e15-freeze0.6-seed1")}
    row = {**variants[slim], "seed": 1, "method": "intrain", "recipe_base": "table"}
    reference = {"seed": 1, "method": "intrain"}
    assert ablation.change_cell(row, reference, variants) == "slim_at_freeze True"
    assert ablation.change_cell(row, {"seed": 0, "method": "intrain"}, variants) == "seed 1"
    assert ablation.change_cell(row, {"method": "intrain"}, variants) == "seed 1"  # a table row has seed 0 and no key


def test_a_variant_from_the_other_attack_label_shows_that_label_as_its_change(ablation):
    """ResNet56's predicted-label rows repeat their true-label twins' recipes: the label is the change,
    and a table row from before the option (no key in its recipe) ascended the true label."""
    name = "r56-intrain-0.3-streams0.5-predicted"
    variants = {name: {"reference": ablation.VARIANTS[name].reference(), "recipe_change": ablation.VARIANTS[name].recipe}}
    row = {**variants[name], "seed": 0, "method": "intrain", "recipe_base": "table", "attack_labels": "predicted"}
    twin = {"seed": 0, "method": "intrain", "recipe_change": {"min_keep_stream": 0.5}, "attack_labels": "true"}
    assert ablation.change_cell(row, twin, variants) == "attack labels: predicted"
    assert ablation.change_cell(row, {"seed": 0, "method": "intrain", "recipe": {}}, variants) == "attack labels: predicted"
    same = {"seed": 0, "method": "intrain", "recipe": {"attack_labels": "predicted"}}
    assert ablation.change_cell(row, same, variants) == "min_keep_stream 0.5"


def test_a_resumed_launch_says_so(ablation):
    launch = {"command": "-m rcomp train --epochs 15 --out runs/x", "commit": "0123456789abcdef", "started": "today"}
    assert ablation.launch_line(launch) == "trained by `-m rcomp train --epochs 15 --out runs/x` at commit `0123456789`, today."
    resumed = ablation.launch_line({**launch, "command": launch["command"] + " --resume", "dirty": True})
    assert resumed.startswith("resumed by `") and "(uncommitted changes)" in resumed
    assert ablation.launch_line({**launch, "cpu": "AMD EPYC"}).endswith(", today on AMD EPYC.")


def test_dense_phases_trained_from_other_attack_labels_are_not_shared(table):
    true_labels = table._phase_key("r20-posttrain-0.3", ARGS)
    assert true_labels == "resnet20-e6-nfgsm-lr0.2-seed0"  # the phases already in bench/shared keep their names
    assert table._phase_key("r20-posttrain-0.3", SimpleNamespace(**vars(ARGS), attack_labels="true")) == true_labels
    predicted = table._phase_key("r20-rl-0.5", SimpleNamespace(**vars(ARGS), attack_labels="predicted"))
    assert predicted == true_labels + "-labels-predicted"


def test_a_width_variant_trains_with_its_option_and_renders_beside_its_base_row(table, render):
    """r20-intrain-0.5-x8 is r20-intrain-0.5 with --channel-multiple 8; the table names it, the method summary skips it."""
    args = SimpleNamespace(**vars(ARGS), data="imagefolder:x", attack_labels=None, rl_episodes=None)
    base, variant = table.train_command("r20-intrain-0.5", args), table.train_command("r20-intrain-0.5-x8", args)
    assert "--channel-multiple" not in base
    assert variant[variant.index("--channel-multiple") + 1] == "8"
    assert [a for a in variant if a not in ("--channel-multiple", "8")] == [a.replace("r20-intrain-0.5", "r20-intrain-0.5-x8") for a in base]

    row = dict(model="resnet20", method="intrain", target_ops=0.5, epochs=6, clean=0.66, pgd10=0.27, pgd50=0.28,
               pgd50_n=500, ops_ratio=0.5, params_ratio=0.6, wall_seconds=600.0)
    doc = {"runs": {"r20-intrain-0.5-x8": dict(row, clean=0.65, channel_multiple=8), "r20-intrain-0.5": row}}
    lines = render.cifar10_table(doc).splitlines()[2:]
    assert [line.split(" | ")[:2] for line in lines] == [["| r20-intrain-0.5", "intrain"],
                                                         ["| r20-intrain-0.5-x8", "intrain, widths ×8"]]
    summary = render.methods_side_by_side(doc)
    assert "66.00 / 27.00" in summary and "65.00" not in summary


def test_an_own_schedule_row_fine_tunes_the_dense_row_and_never_lends_its_longer_phase(table):
    """r20-posttrain-0.3-natural: the dense row's whole training is its dense phase, then the split rows' 2 epochs."""
    args = SimpleNamespace(**vars(ARGS), data="imagefolder:x", attack_labels=None, rl_episodes=None)
    cmd = table.train_command("r20-posttrain-0.3-natural", args)
    assert cmd[cmd.index("--finetune-epochs") + 1] == "2" and cmd[cmd.index("--epochs") + 1] == "6"
    assert "--finetune-epochs" not in table.train_command("r20-posttrain-0.3", args)

    assert table.share_dense_phase("r20-posttrain-0.3-natural", ARGS) is None  # the dense row is not finished
    dense = table.run_dir("r20-dense")
    _finished_dense_phase(dense, "posttrain", epochs=(5, 6))
    shutil.move(dense / "dense" / "checkpoints", dense / "checkpoints")
    (dense / "model.pt").write_bytes(b"dense model")
    _finished_dense_phase(table.run_dir("r20-posttrain-0.5"), "posttrain")  # a split sibling: 4 epochs, not 6
    assert table.share_dense_phase("r20-posttrain-0.3-natural", ARGS) == "r20-dense"
    copied = table.partial_dir("r20-posttrain-0.3-natural") / "dense" / "checkpoints"
    assert (copied / "ckpt-epoch0006.pt").read_bytes() == b"weights 6"

    _finished_dense_phase(table.run_dir("r20-posttrain-0.5-natural"), "posttrain", epochs=(6,))
    shutil.rmtree(table.run_dir("r20-posttrain-0.5"))
    assert table.share_dense_phase("r20-rl-0.3", ARGS) is None  # a natural row's 6-epoch phase is no donor
    table.keep_dense_phase("r20-posttrain-0.5-natural", ARGS)
    assert not table.SHARED.exists()  # nor is it kept as the split rows' shared phase


def test_an_own_schedule_row_renders_as_a_variant_with_both_epoch_counts(render):
    row = dict(model="resnet20", method="posttrain", target_ops=0.3, epochs=6, clean=0.63, pgd10=0.26, pgd50=0.26,
               pgd50_n=500, ops_ratio=0.3, params_ratio=0.34, wall_seconds=600.0)
    doc = {"runs": {"r20-posttrain-0.3-natural": dict(row, clean=0.64, finetune_epochs=2), "r20-posttrain-0.3": row}}
    lines = render.cifar10_table(doc).splitlines()[2:]
    assert [line.split(" | ")[:4] for line in lines] == [["| r20-posttrain-0.3", "posttrain", "0.3", "6"],
                                                         ["| r20-posttrain-0.3-natural", "posttrain, own schedule", "0.3", "6 + 2"]]
    assert "64.00" not in render.methods_side_by_side(doc)


def test_a_params_budget_row_asks_for_the_posters_absolute_count_and_renders_its_target(table, render):
    """vgg16-intrain-5.51M: the poster's VGG-16 row is 5.51 M params, no ops target; the command asks
    for that many of this VGG-16's params (a fraction rounded down), the table shows it as the row's target."""
    args = SimpleNamespace(**vars(ARGS), data="imagefolder:x", attack_labels=None, rl_episodes=None)
    cmd = table.train_command("vgg16-intrain-5.51M", args)
    fraction = float(cmd[cmd.index("--target-params") + 1])
    assert "--target-ops" not in cmd and cmd[cmd.index("--model") + 1] == "vgg16"
    from rcomp.count import count_model
    from rcomp.models import create_model

    dense = count_model(create_model("vgg16", num_classes=10), (3, 32, 32)).params
    assert 5.51e6 - 0.0001 * dense < fraction * dense <= 5.51e6

    row = dict(model="vgg16", method="intrain", target_ops=None, target_params=fraction, epochs=6, clean=0.6,
               pgd10=0.3, pgd50=0.3, pgd50_n=500, ops_ratio=0.4, params_ratio=0.37, wall_seconds=600.0)
    doc = {"runs": {"vgg16-intrain-5.51M": row}, "poster": {"vgg16-intrain-5.51M": [82.54, 38.36, "PGD-50"]}}
    cells = render.cifar10_table(doc).splitlines()[2].split(" | ")
    assert cells[2] == f"params {fraction}" and cells[-1] == "82.54 / 38.36 (PGD-50) |"


def test_the_uniform_architecture_keeps_one_fraction_of_every_group_within_the_ops_target(ablation, tmp_path):
    """The no-search baseline: its widths come from one fraction, and it spends nearly all of the target."""
    import torch

    from rcomp.count import count_model
    from rcomp.masks import find_channel_groups
    from rcomp.models import create_model
    from rcomp.surgery import load_pruned

    path = ablation.uniform_architecture("tiny_cnn", 0.5, tmp_path)
    model, meta = load_pruned(path)
    dense = create_model("tiny_cnn")
    ratio = count_model(model, (1, 3, 32, 32)).macs / count_model(dense, (1, 3, 32, 32)).macs
    assert 0.4 < ratio <= 0.5
    sizes = {g.name: g.size for g in find_channel_groups(dense, torch.zeros(1, 3, 32, 32))}
    kept = {name: sizes[name] - len(removed) for name, removed in meta["pruned_channels"]}
    assert set(kept) == set(sizes)  # every group was cut
    fractions = [kept[name] / sizes[name] for name in sizes]
    assert max(fractions) - min(fractions) <= max(1 / size for size in sizes.values())  # one fraction, rounded
    assert ablation.uniform_architecture("tiny_cnn", 0.5, tmp_path) == path  # written once, then reused


@pytest.fixture
def aims(load_bench):
    """bench/aims.py, loaded from its file; it imports bench/render.py by name."""
    return load_bench("aims")


def test_every_aim_pair_names_a_collected_row_or_an_ablation_variant_still_to_run(aims, ablation):
    rows = aims.load_rows()
    for pair in aims.PAIRS:
        for stem, name in (pair.row, pair.ref):
            assert name in rows.get(stem, {}) or (stem == aims.ABLATION and name in ablation.VARIANTS), (stem, name)


def test_the_aims_table_leaves_out_a_pair_still_training_and_averages_a_group_after_its_last_pair(aims, monkeypatch):
    Pair = aims.Pair
    row = lambda clean, pgd, wall=None, cost=None, method="dense": {  # noqa: E731
        "clean": clean, "pgd10": pgd, "wall_seconds": wall, "cost_vs_dense": cost, "method": method}
    monkeypatch.setattr(aims, "PAIRS", [
        Pair(1, "seed 0", ("t", "in0"), ("t", "d0"), "g"),
        Pair(1, "seed 1", ("a", "in1"), ("a", "d1"), "g", timed_together=True),
        Pair(1, "still training", ("a", "in2"), ("a", "d2"), "g"),
        Pair(2, "other", ("t", "in0"), ("a", "d1")),
        Pair(2, "vs post-train", ("a", "in1"), ("a", "post"), timed_together=True),
    ])
    rows = {"t": {"in0": row(0.60, 0.30, cost=1.04), "d0": row(0.63, 0.31)},
            "a": {"in1": row(0.62, 0.29, wall=210.0), "d1": row(0.63, 0.32, wall=200.0), "d2": row(0.7, 0.4),
                  "post": row(0.61, 0.30, wall=100.0, method="posttrain")}}
    lines = aims.render_table(rows).splitlines()[2:]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert [c[1] for c in cells] == ["seed 0", "seed 1", "**mean of 2: g**", "other", "vs post-train"]
    assert cells[4][8] == "–"  # side by side, but against post-train: no cost over dense
    assert cells[0][5:9] == ["-3.00", "-1.00", "–", "1.04×"]  # a table's own cost ratio
    assert cells[1][5:9] == ["-1.00", "-3.00", "–", "1.05×"]  # two rows trained side by side
    assert cells[2][5:7] == ["**-2.00**", "**-2.00**"]
    assert "still training" not in aims.render_table(rows)


def test_the_mask_overhead_benchmark_times_one_function_in_every_state(load_bench):
    """Its networks with masks all on compute the plain network's logits, and the slim one the frozen one's,
    so their timings compare like with like."""
    import torch

    module = load_bench("mask_overhead")
    nets = module.networks()
    assert list(nets) == [*module.STATES, module.SLIM]
    x = torch.rand(4, 3, 32, 32)
    logits = {s: net(x) for s, net in nets.items()}
    assert all(torch.equal(logits["plain"], logits[s]) for s in module.STATES[:3])  # masks all on
    assert not torch.equal(logits["plain"], logits[module.STATES[3]])  # half the channels off
    assert torch.allclose(logits[module.SLIM], logits[module.STATES[3]], atol=1e-5)  # and those removed
    size = {s: sum(p.numel() for p in nets[s].parameters()) for s in ("plain", module.SLIM)}
    assert size[module.SLIM] < 0.3 * size["plain"]
    assert logits["learning"].requires_grad and all(p.requires_grad for p in nets["learning"].masks.params)
    assert not any(p.requires_grad for s in module.STATES[2:] for p in nets[s].masks.params)


def test_the_mask_overhead_benchmark_interleaves_the_states_and_drops_the_warm_up_round(load_bench, monkeypatch):
    """``measure`` on a fake clock: every round visits every state once, in order; round 0 (warm-up) is
    not counted; each state's figure is the median of its rounds."""
    module = load_bench("mask_overhead")
    states = ["plain", "learning", "slim"]
    nets = {s: object() for s in states}
    clock, visits = [0.0], []
    cost = {"plain": [9.0, 1.0, 3.0, 2.0], "learning": [9.0, 4.0, 4.0, 8.0], "slim": [9.0, 0.5, 0.7, 0.6]}

    def fake_step(net, x, y, generator):
        state = next(s for s, n in nets.items() if n is net)
        clock[0] += cost[state][sum(v == state for v in visits)]
        visits.append(state)

    monkeypatch.setattr(module, "networks", lambda: nets)
    monkeypatch.setattr(module, "training_step", fake_step)
    monkeypatch.setattr(module.time, "perf_counter", lambda: clock[0])
    seconds = module.measure(rounds=3, batch=2)
    assert visits == states * 4
    assert seconds == pytest.approx({"plain": 2.0, "learning": 4.0, "slim": 0.6})  # medians of rounds 1-3, not the 9 s warm-up


def test_the_main_job_benchmark_runs_the_command_the_readme_gives(load_bench):
    module = load_bench("main_job")
    readme = (BENCH.parent / "README.md").read_text()
    section = readme.split("## Run the main job", 1)[1]
    command = section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert command == " ".join(module.COMMAND)
