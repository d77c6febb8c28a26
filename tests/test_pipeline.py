"""The whole job, end to end on tiny settings: artifacts, the CI gate's exit codes, no half-written folders."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from rcomp.cli import cli

LENIENT = Path(__file__).resolve().parent / "data" / "profiles" / "test-lenient.yaml"
ARTIFACTS = ("model.pt", "model.onnx", "dense.onnx", "adv.npz", "count.json", "train.json", "report.json", "report.md")
FAST = ["--model", "tiny_cnn", "--data", "digits", "--epochs", "4", "--batch-size", "32", "--no-progress",
        "--attack-set-size", "64", "--latency-runs", "5"]


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune") / "run"
    code, output = run("prune", "--profile", LENIENT, "--out", out, "--target-ops", "0.5", *FAST)
    return out, code, output


@pytest.mark.slow
def test_prune_leaves_every_artifact_and_passes(job):
    out, code, output = job
    assert code == 0, output
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    assert (out / "checkpoints").is_dir()
    assert not out.with_name(out.name + ".partial").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert report["training"]["macs"] <= 0.5 * report["training"]["dense_macs"]
    assert "sanity" in report and "rows" in report["sanity"]
    assert report["onnx_path"] == str(out / "model.onnx")  # the published file, not OUT.partial/
    assert "verdict: PASS" in output


@pytest.mark.slow
def test_the_shipped_model_meets_the_budget_and_learned(job):
    out, _, _ = job
    t = json.loads((out / "train.json").read_text())
    assert t["macs"] <= 0.5 * t["dense_macs"]
    assert t["history"][-1]["val_clean"] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_the_shipped_model_keeps_the_profiles_channel_multiple(job):
    """The lenient profile asks for multiples of 8: every pruned conv keeps 8, 16, 24 ... channels (or all)."""
    from rcomp.models import create_model
    from rcomp.surgery import load_pruned

    out, _, _ = job
    assert json.loads((out / "train.json").read_text())["recipe"]["channel_multiple"] == 8
    pruned = [m.out_channels for m in load_pruned(out / "model.pt")[0].modules() if isinstance(m, torch.nn.Conv2d)]
    dense = [m.out_channels for m in create_model("tiny_cnn", 10, 1).modules() if isinstance(m, torch.nn.Conv2d)]
    assert pruned != dense
    assert all(p % 8 == 0 or p == d for p, d in zip(pruned, dense)), pruned


@pytest.mark.slow
def test_a_run_that_slims_at_the_freeze_ships_the_network_it_trained(tmp_path):
    """With ``slim_at_freeze`` training already removed the channels: the job ships that network as
    it is (the last checkpoint's weights), it does not cut it again."""
    from rcomp.surgery import load_pruned

    recipe = tmp_path / "slim.yaml"
    recipe.write_text("slim_at_freeze: true\n")
    out = tmp_path / "run"
    code, output = run("prune", "--profile", LENIENT, "--out", out, "--target-ops", "0.5", "--recipe", recipe, *FAST)
    assert code == 0, output
    assert "slim from here on" in output and "verdict: PASS" in output
    shipped = load_pruned(out / "model.pt")[0].state_dict()
    trained = torch.load(out / "checkpoints" / "ckpt-epoch0004.pt", weights_only=True)["model"]
    assert shipped.keys() == trained.keys() and all(torch.equal(shipped[k], trained[k]) for k in trained)
    t = json.loads((out / "train.json").read_text())
    assert t["recipe"]["slim_at_freeze"] is True and t["macs"] <= 0.5 * t["dense_macs"]


@pytest.mark.parametrize("opts, regularity, expected", [
    ({}, None, 8),                            # the profile's
    ({"channel_multiple": 1}, None, 1),       # the command line wins
    ({}, "weight", 1),                        # weight masks have no widths to round
])
def test_the_profiles_channel_multiple_reaches_the_recipe(opts, regularity, expected):
    from rcomp.config import load_profile
    from rcomp.pipeline import build_job

    values = {"model_name": "tiny_cnn", "data_spec": "synthetic:64", "target_ops": 0.5, **opts}
    if regularity:
        values["regularity"] = regularity
    job = build_job(values, profile=load_profile(LENIENT), out="unused", method=None)
    assert job.train.channel_multiple == expected


@pytest.mark.parametrize("data_spec, recipe, expected", [
    ("digits", "", True),                       # small data: 510 steps, the multiplier winds up
    ("synthetic:64", "", True),
    ("imagefolder:/data/cifar10", "", False),   # rcomp's default, as the benchmark rows trained
    ("digits", "dual_reset: false\n", False),  # a recipe wins over the data's default
])
def test_small_data_runs_reset_the_budget_multiplier_unless_the_recipe_says_otherwise(tmp_path, data_spec, recipe,
                                                                                       expected):
    from rcomp.pipeline import build_job

    values = {"model_name": "tiny_cnn", "data_spec": data_spec, "target_ops": 0.5}
    if recipe:
        (tmp_path / "recipe.yaml").write_text(recipe)
        values["recipe"] = str(tmp_path / "recipe.yaml")
    job = build_job(values, profile=None, out="unused", method=None)
    assert job.train.dual_reset is expected


@pytest.mark.slow
def test_check_gate_exit_codes(job, tmp_path):
    out, _, _ = job
    onnx, adv = out / "model.onnx", out / "adv.npz"
    code, text = run("check", onnx, "--profile", LENIENT, "--attack-set", adv, "--latency-runs", 5,
                     "--report-dir", tmp_path / "no-dense")
    assert code == 1 and "needs --dense" in text  # fractions of dense are judged from a graph, never from metadata
    code, text = run("check", onnx, "--profile", LENIENT, "--attack-set", adv, "--latency-runs", 5,
                     "--dense", out / "dense.onnx", "--report-dir", tmp_path / "ok")
    assert code == 0, text
    assert json.loads((tmp_path / "ok" / "report.json").read_text())["passed"] is True

    tight = yaml.safe_load(LENIENT.read_text())
    tight["budgets"]["mops"] = 0.01
    (tmp_path / "tight.yaml").write_text(yaml.safe_dump(tight))
    code, text = run("check", onnx, "--profile", tmp_path / "tight.yaml", "--attack-set", adv, "--latency-runs", 5,
                     "--dense", out / "dense.onnx", "--report-dir", tmp_path / "tight")
    assert code == 1, text
    rows = json.loads((tmp_path / "tight" / "report.json").read_text())["rows"]
    assert any(r["name"] == "mops" and r["passed"] is False for r in rows)

    fake = tmp_path / "notes.onnx"
    fake.write_text("this is a text file\n")
    code, text = run("check", fake, "--profile", LENIENT, "--report-dir", tmp_path / "bad")
    assert code == 2 and "not an ONNX model" in text
    assert not (tmp_path / "bad").exists()

    broken = yaml.safe_load(LENIENT.read_text())
    broken["budgets"]["mopz"] = 1.0
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(broken))
    code, text = run("check", onnx, "--profile", tmp_path / "broken.yaml", "--attack-set", adv)
    assert code == 2 and "budgets.mopz" in text


@pytest.mark.slow
def test_eval_reevaluates_a_saved_model_on_any_split(job, tmp_path):
    out, _, _ = job
    code, text = run("eval", out / "model.pt", "--data", "digits", "--split", "val", "--n", 40, "--pgd-steps", 3,
                     "--json", tmp_path / "e.json")
    assert code == 0, text
    acc = json.loads((tmp_path / "e.json").read_text())["accuracy"]
    assert acc["clean"] >= acc["pgd-3"]


@pytest.mark.slow
def test_eval_draws_its_attacks_from_its_seed_so_a_rerun_repeats_the_figures(job, tmp_path, monkeypatch):
    import rcomp.attacks

    out, _, _ = job
    starts, real_pgd = [], rcomp.attacks.pgd

    def recording_pgd(*args, generator=None, **kw):
        starts.append(None if generator is None else generator.initial_seed())
        return real_pgd(*args, generator=generator, **kw)

    monkeypatch.setattr(rcomp.attacks, "pgd", recording_pgd)
    args = ["eval", out / "model.pt", "--data", "digits", "--split", "val", "--n", 40, "--pgd-steps", 3]
    figures = []
    for i, seed in enumerate([7, 7, 8]):
        code, text = run(*args, "--seed", seed, "--json", tmp_path / f"e{i}.json")
        assert code == 0, text
        figures.append(json.loads((tmp_path / f"e{i}.json").read_text()))
    assert starts == [7, 7, 8]  # one batch of 40 per evaluation, each attack from its --seed
    assert figures[0]["accuracy"] == figures[1]["accuracy"]
    assert [f["attack_seed"] for f in figures] == [7, 7, 8]


@pytest.mark.slow
def test_eval_no_progress_keeps_bars_out_of_logs(job):
    out, _, _ = job
    args = ["eval", str(out / "model.pt"), "--data", "digits", "--split", "val", "--n", "8", "--pgd-steps", "1"]
    with_bars, quiet = CliRunner().invoke(cli, args), CliRunner().invoke(cli, args + ["--no-progress"])
    assert with_bars.exit_code == quiet.exit_code == 0, quiet.output
    assert "eval val" in with_bars.stderr and "eval val" not in quiet.stderr
    assert quiet.stdout == with_bars.stdout  # the same table either way


@pytest.mark.slow
def test_eval_worst_case_counts_an_image_only_if_every_attack_failed_on_it(job, tmp_path, monkeypatch):
    """Two fake attacks that fool different images: the worst case is their per-image AND, not the lower figure."""
    import torch

    import rcomp.attacks
    from rcomp.data import load_data
    from rcomp.pipeline import eval_subset
    from rcomp.surgery import load_pruned

    out, _, _ = job
    model, meta = load_pruned(out / "model.pt")
    dataset = eval_subset(load_data("digits", tuple(meta["input_shape"]), splits=["val"]).split("val"), 40)
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])

    def neighbour_pgd(net, xb, yb, steps, **kw):
        """Each image swapped for the one 1 (PGD-3) or 2 (PGD-50) places before it in the batch."""
        return torch.roll(xb, 1 if steps == 3 else 2, dims=0)

    with torch.no_grad():
        ok = {shift: model.eval()(torch.roll(x, shift, dims=0)).argmax(1) == y for shift in (0, 1, 2)}
    assert not torch.equal(ok[1], ok[2]), "the two fake attacks must spare different images"
    monkeypatch.setattr(rcomp.attacks, "pgd", neighbour_pgd)
    code, text = run("eval", out / "model.pt", "--data", "digits", "--split", "val", "--n", 40, "--pgd-steps", 3,
                     "--pgd50", "--restarts", 1, "--batch-size", 40, "--json", tmp_path / "e.json")
    assert code == 0, text
    acc = json.loads((tmp_path / "e.json").read_text())["accuracy"]
    n = len(y)
    assert acc["clean"] == pytest.approx(float(ok[0].sum()) / n)
    assert acc["pgd-3"] == pytest.approx(float(ok[1].sum()) / n)
    assert acc["pgd-50x1"] == pytest.approx(float(ok[2].sum()) / n)
    assert acc["worst-case"] == pytest.approx(float((ok[0] & ok[1] & ok[2]).sum()) / n)
    assert acc["worst-case"] < min(acc["pgd-3"], acc["pgd-50x1"])
    assert "worst-case" in text


@pytest.mark.slow
def test_count_and_export_of_the_checkpoint(job, tmp_path):
    out, _, _ = job
    code, text = run("count", out / "model.pt", "--profile", LENIENT)
    assert code == 0 and "verdict" in text
    code, text = run("export", out / "model.pt", "--profile", LENIENT, "--out", tmp_path / "m.onnx", "--parity-n", 8)
    assert code == 0 and "top-1 agreement 100.00%" in text


@pytest.mark.slow
def test_a_failed_job_keeps_the_previous_folder(job, tmp_path, monkeypatch):
    out, _, _ = job
    target = tmp_path / "run"
    shutil.copytree(out, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    import rcomp.export.onnx_export as onnx_export

    def boom(*a, **k):
        raise RuntimeError("simulated crash during export")

    monkeypatch.setattr(onnx_export, "export_onnx", boom)
    code, text = run("prune", "--profile", LENIENT, "--out", target, "--target-ops", "0.5", *FAST)
    assert code == 4 and "internal error: RuntimeError: simulated crash" in text  # a bug, not exit 1 (docs/bad-input.md)
    after = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    assert after == before
    partial = target.with_name("run.partial")
    assert (partial / "checkpoints").is_dir() and not (partial / "model.onnx").exists()
    code, text = run("prune", "--profile", LENIENT, "--out", target, "--target-ops", "0.5", *FAST)
    assert code == 2 and "--resume" in text


@pytest.mark.slow
def test_posttrain_baseline_meets_the_same_budget(tmp_path):
    out = tmp_path / "post"
    code, output = run("train", "--method", "posttrain", "--target-ops", "0.5", "--out", out,
                       "--model", "tiny_cnn", "--data", "digits", "--epochs", "3", "--batch-size", "64", "--no-progress")
    assert code == 0, output
    t = json.loads((out / "train.json").read_text())
    assert t["method"] == "posttrain"
    assert 0.45 * t["dense_macs"] <= t["macs"] <= 0.5 * t["dense_macs"]
    assert set(t["phase_seconds"]) == {"dense", "prune", "finetune", "total"}
    assert len(t["dense_history"]) == 2 and len(t["history"]) == 1  # 2 dense epochs + 1 fine-tuning epoch
    code, text = run("count", out / "model.pt")
    assert code == 0 and f"{t['macs'] / 1e6:.3f} MOps" in text


@pytest.mark.slow
def test_posttrain_reusing_a_finished_dense_phase_is_charged_its_recorded_time(tmp_path):
    """The bench shares one dense phase between post-train runs; each must still pay for it."""
    common = ["--method", "posttrain", "--model", "tiny_cnn", "--data", "digits", "--epochs", "3",
              "--batch-size", "64", "--no-progress"]
    first = tmp_path / "p50"
    code, output = run("train", "--target-ops", "0.5", "--out", first, *common)
    assert code == 0, output
    second = tmp_path / "p30"
    shutil.copytree(first / "dense", second.with_name("p30.partial") / "dense")
    code, output = run("train", "--target-ops", "0.3", "--out", second, "--resume", *common)
    assert code == 0, output
    t1, t2 = (json.loads((d / "train.json").read_text()) for d in (first, second))
    assert t2["dense_history"] == t1["dense_history"]  # the same dense model, not a retrained one
    recorded = sum(h["seconds"] for h in t1["dense_history"])
    assert recorded <= t2["phase_seconds"]["dense"] < recorded + t1["phase_seconds"]["finetune"] + 30
    phases = t2["phase_seconds"]
    assert phases["total"] == pytest.approx(phases["dense"] + phases["prune"] + phases["finetune"])
    assert t2["wall_seconds"] == phases["total"] > t2["process_seconds"]  # the whole method, not this process's share
    assert t2["macs"] <= 0.3 * t2["dense_macs"]


@pytest.mark.slow
def test_posttrain_on_its_own_schedule_prunes_the_dense_baseline_then_fine_tunes(tmp_path):
    """--finetune-epochs: the dense phase is all of --epochs, so a dense run's checkpoints are that phase."""
    common = ["--model", "tiny_cnn", "--data", "digits", "--epochs", "2", "--batch-size", "64", "--no-progress"]
    dense = tmp_path / "dense"
    code, output = run("train", "--method", "dense", "--out", dense, *common)
    assert code == 0, output
    post = tmp_path / "post"
    shutil.copytree(dense / "checkpoints", post.with_name("post.partial") / "dense" / "checkpoints")
    code, output = run("train", "--method", "posttrain", "--target-ops", "0.5", "--finetune-epochs", "3",
                       "--out", post, "--resume", *common)
    assert code == 0, output
    assert "dense robust training for 2 epochs" in output and "fine-tuning for 3 epochs" in output
    td, tp = (json.loads((d / "train.json").read_text()) for d in (dense, post))
    assert tp["dense_history"] == td["history"]  # the dense baseline itself, resumed, not retrained
    assert len(tp["history"]) == 3 and tp["recipe"]["finetune_epochs"] == 3
    assert tp["macs"] <= 0.5 * tp["dense_macs"]


@pytest.mark.parametrize("method", ["intrain", "dense"])
def test_finetune_epochs_is_refused_where_nothing_is_fine_tuned(tmp_path, method):
    budget = ["--target-ops", "0.5"] if method == "intrain" else []
    code, output = run("train", "--method", method, *budget, "--finetune-epochs", "2", "--out", tmp_path / "x",
                       "--model", "tiny_cnn", "--data", "digits", "--epochs", "1", "--no-progress")
    assert code == 2 and "--finetune-epochs applies to the post-train methods" in output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_eval_n_takes_a_fixed_random_subset_not_the_first_class():
    """Image folders list a split class by class: a prefix of 50 would be one class here."""
    import torch

    from rcomp.pipeline import eval_subset

    labels = torch.arange(1000) // 100  # sorted by class, as an image folder's split is
    dataset = torch.utils.data.TensorDataset(torch.zeros(1000, 1), labels)
    picked = eval_subset(dataset, 50)
    classes = [int(picked[i][1]) for i in range(len(picked))]
    assert len(classes) == 50 and len(set(classes)) >= 8
    again = eval_subset(dataset, 50)
    assert classes == [int(again[i][1]) for i in range(len(again))]  # every model sees the same images
    assert eval_subset(dataset, None) is dataset and eval_subset(dataset, 5000) is dataset


@pytest.mark.slow
def test_a_resumed_train_charges_its_wall_time_the_epochs_before_the_resume(tmp_path):
    import torch

    from rcomp.checkpoint import CheckpointManager

    args = ["train", "--model", "tiny_cnn", "--data", "digits", "--epochs", "2", "--batch-size", "64", "--no-progress"]
    code, output = run(*args, "--out", tmp_path / "a")
    assert code == 0, output
    # an interrupted run: epoch 1's checkpoint alone, its epoch logged as 1,000 s by the process that trained it
    state = torch.load(tmp_path / "a" / "checkpoints" / "ckpt-epoch0001.pt", weights_only=False)
    state["history"][0]["seconds"] = 1000.0
    CheckpointManager(tmp_path / "b.partial" / "checkpoints").save(state, 1)
    code, output = run(*args, "--out", tmp_path / "b", "--resume")
    assert code == 0, output
    t = json.loads((tmp_path / "b" / "train.json").read_text())
    assert t["resumed_from"] == 1 and t["wall_seconds"] > 1000.0


@pytest.mark.slow
def test_arch_from_trains_a_pruned_models_widths_from_the_seeds_initial_weights(job, tmp_path):
    """The from-scratch baseline: the pruned run's architecture, counted against the same dense
    model, starting from the zoo model's seed-0 weights cut to those widths (not the trained ones)."""
    from rcomp.data import load_data
    from rcomp.pipeline import _build_model, _zoo_model, build_job
    from rcomp.surgery import load_pruned

    pruned_path = job[0] / "model.pt"
    scratch = tmp_path / "scratch"
    code, output = run("train", "--arch-from", pruned_path, "--data", "digits", "--epochs", "1", "--batch-size", "32",
                       "--no-progress", "--out", scratch)
    assert code == 0, output
    tp, ts = (json.loads((d / "train.json").read_text()) for d in (job[0], scratch))
    assert ts["method"] == "dense" and ts["model"] == "tiny_cnn" and ts["arch_from"] == str(pruned_path)
    assert (ts["macs"], ts["params"], ts["dense_macs"]) == (tp["macs"], tp["params"], tp["dense_macs"])
    assert ts["macs"] <= 0.5 * ts["dense_macs"]
    trained_pruned, meta = load_pruned(pruned_path)
    trained_scratch, _ = load_pruned(scratch / "model.pt")
    shapes = {k: v.shape for k, v in trained_pruned.state_dict().items()}
    assert {k: v.shape for k, v in trained_scratch.state_dict().items()} == shapes

    opts = {"arch_from": str(pruned_path), "data_spec": "digits", "seed": 0, "epochs": 1}
    scratch_job = build_job(opts, profile=None, out=None, method=None)
    bundle = load_data("digits", scratch_job.input_shape)
    start, zoo = _build_model(scratch_job, bundle).state_dict(), _zoo_model(scratch_job, bundle).state_dict()
    assert meta["pruned_channels"], "the fixture's model must have lost channels"
    compared = 0
    for root, removed in meta["pruned_channels"]:  # every removed group, rows of its root conv
        weight = f"{root}.weight"
        kept = [i for i in range(zoo[weight].shape[0]) if i not in removed]
        rows = zoo[weight][kept]
        if start[weight].shape[1] == rows.shape[1]:  # the root's inputs were not pruned too
            assert torch.equal(start[weight], rows), root
            compared += 1
        assert not torch.equal(start[weight], trained_pruned.state_dict()[weight]), root
    assert compared, "no pruned root with whole inputs to compare"


@pytest.mark.slow
@pytest.mark.parametrize("extra, message", [
    (["--target-ops", "0.5"], "without a budget"),
    (["--model", "resnet20"], "is a pruned tiny_cnn, not --model resnet20"),
])
def test_arch_from_is_refused_with_a_budget_or_another_model(job, tmp_path, extra, message):
    code, output = run("train", "--arch-from", job[0] / "model.pt", *extra, "--data", "digits", "--epochs", "1",
                       "--no-progress", "--out", tmp_path / "x")
    assert code == 2 and message in output, output
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


@pytest.mark.slow
def test_the_main_job_benchmark_reads_its_row_from_the_jobs_own_files(job, tmp_path, load_bench):
    """bench/main_job.py's figures are the report's and train.json's, not its own measurements; a job
    that stopped before its report is recorded as such; rows are appended, never rewritten."""
    bench = load_bench("main_job")
    out = job[0]
    report, train = (json.loads((out / name).read_text()) for name in ("report.json", "train.json"))
    row = bench.job_figures(out)
    assert row["verdict"] == "PASS" and report["passed"]
    assert row["epochs"] == 4 and len(row["ops_ratio_per_epoch"]) == 4
    assert row["ops_ratio"] == train["macs"] / train["dense_macs"] <= 0.5
    assert row["mops"] == pytest.approx(report["metrics"]["mops"], rel=0.01)  # fvcore's count and the graph's
    assert row["onnx_adv_acc"] == report["metrics"]["adv_acc"]
    assert [c["name"] for c in row["checks"]] == [r["name"] for r in report["rows"]]
    assert bench.job_figures(tmp_path / "missing") == {"verdict": bench.NO_REPORT}

    results = tmp_path / "main_job.json"
    first = bench.record({**row, "rcomp_command": "rcomp prune", "exit_code": 0, "wall_seconds": 60.0}, "", results)
    failed = {"verdict": bench.NO_REPORT, "rcomp_command": "rcomp prune", "exit_code": 3, "wall_seconds": 6.0}
    doc = bench.record(failed, "a note", results)
    assert doc["runs"][0] == first["runs"][0] and len(doc["runs"]) == 2
    table = bench.render_table(doc).splitlines()
    assert "| PASS | 4 |" in table[2] and f"({row['ops_ratio']:.3f})" in table[2]
    assert "| 3 | " + bench.NO_REPORT in table[3]
    assert "note: a note" in table[5] and "Newest run, epoch by epoch" not in "\n".join(table)


@pytest.mark.slow
def test_eval_reports_each_class_and_autoattack_beside_pgd(job, tmp_path):
    """Per-class figures add up to the overall ones; AutoAttack sits in the worst case; the worst
    class is named in the text."""
    out, _, _ = job
    code, text = run("eval", out / "model.pt", "--data", "digits", "--split", "val", "--n", 40, "--pgd-steps", 3,
                     "--autoattack", "fast", "--json", tmp_path / "e.json")
    assert code == 0, text
    result = json.loads((tmp_path / "e.json").read_text())
    acc, per_class = result["accuracy"], result["per_class"]
    assert sum(c["n"] for c in per_class.values()) == result["n"] == 40
    for name in ("clean", "pgd-3", "autoattack-fast", "worst-case"):
        assert sum(c["n"] * c[name] for c in per_class.values()) == pytest.approx(acc[name] * 40)
    assert acc["worst-case"] <= min(acc["pgd-3"], acc["autoattack-fast"]) <= acc["clean"]
    worst = min(per_class, key=lambda k: (per_class[k]["clean"], per_class[k]["worst-case"]))
    assert f"worst class: {worst} " in text
