"""Latency tables: built torch-free from a layers file, refused when from another runtime or profile,
and used as a budget by the projection, the post-train baseline and in-train pruning."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rcomp.budget import BudgetController, CostModel, Constraint, latency_constraints
from rcomp.cli import cli
from rcomp.config import resolve_profile
from rcomp.export import latency_table as lt
from rcomp.latency import emit_layers
from rcomp.masks import attach_masks
from rcomp.models import create_model

SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def tiny_table(tmp_path_factory):
    """tiny_cnn's layers file and a quickly measured jetson table (few runs: the values are rough)."""
    d = tmp_path_factory.mktemp("latency")
    profile = resolve_profile("jetson")
    layers = emit_layers("tiny_cnn", profile, d / "layers.json")
    table = lt.measure_table(layers, profile, runs=20, rounds=4, warmup=2, cache_dir=d / "cache",
                             dense_onnx=str(d / "layers.onnx"))
    path = d / "table.json"
    path.write_text(json.dumps(table))
    return d, layers, table, path


def test_table_measures_every_conv_at_its_widths(tiny_table):
    d, layers, table, _ = tiny_table
    assert [e["name"] for e in table["layers"]] == [l["name"] for l in layers["layers"]]
    first = table["layers"][0]
    assert first["in_widths"] == [3]  # the image's channels are never pruned
    for e in table["layers"]:
        assert e["out_widths"][-1] == e["out"] and all(w % 8 == 0 for w in e["out_widths"])  # jetson: multiples of 8
        assert len(e["p50_ms"]) == len(e["out_widths"]) and all(len(r) == len(e["in_widths"]) for r in e["p50_ms"])
        assert all(v >= 0 for r in e["p50_ms"] for v in r)
    assert table["measured_on"]["onnxruntime"] and table["profile"]["name"] == "jetson"
    assert table["calibration"]["measured_p50_ms"] > 0
    assert {f["op"] for f in table["fixed"]} >= {"Gemm", "GlobalAveragePool"}
    # the dense prediction is the sum of the full-width entries, the fixed ops and the overhead
    full = sum(e["p50_ms"][-1][-1] for e in table["layers"])
    assert lt.dense_ms(table, calibrated=False) == pytest.approx(full + table["fixed_ms"] + table["overhead_ms"])
    # a second build of the same layers comes entirely from the cache
    again = lt.measure_table(layers, resolve_profile("jetson"), runs=20, rounds=4, warmup=2, cache_dir=d / "cache")
    assert again["layers"] == table["layers"] and again["method"]["cache_hits"] > 0


def test_interpolation_is_exact_on_the_grid_and_linear_between():
    entry = {"out_widths": [8, 16], "in_widths": [8, 16], "p50_ms": [[1.0, 2.0], [3.0, 4.0]]}
    assert lt.interpolate(entry, 16, 8) == 3.0
    assert lt.interpolate(entry, 12, 12) == pytest.approx(2.5)
    assert lt.width_grid(64, 1, True) == [1, 9, 17, 25, 33, 40, 48, 56, 64]
    assert lt.width_grid(64, 8, False) == [64]


def test_latency_table_command_runs_without_torch(tiny_table, tmp_path):
    """What the Dockerfile's runtime image can run: the board half of the workflow."""
    d = tiny_table[0]
    heavy = ["torch", "torchvision", "onnxsim", "fvcore", "torch_pruning", "tqdm", "sklearn"]  # not in the runtime image
    code = (f"import sys\nfor m in {heavy!r}: sys.modules[m] = None\n"
            "from rcomp.cli import main\n"
            f"sys.argv = ['rcomp', 'latency-table', '--profile', 'jetson', '--layers', {str(d / 'layers.json')!r}, "
            f"'--out', {str(tmp_path / 't.json')!r}, '--cache', {str(d / 'cache')!r}, '--runs', '6']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = json.loads((tmp_path / "t.json").read_text())
    assert table["format"] == lt.TABLE_FORMAT and table["calibration"] is not None  # the dense ONNX beside the layers


def reachable(table) -> float:
    """A latency target between the table's floor (every prunable side at its smallest measured
    width) and dense: reachable whatever this (loaded) machine measured."""
    smallest = {e["name"]: (min(e["out_widths"]), min(e["in_widths"])) for e in table["layers"]}
    floor = lt.predict_widths(table, smallest) / lt.dense_ms(table)
    return round((1.0 + floor) / 2, 3)


def _invoke(*args):
    return CliRunner().invoke(cli, list(args))


def test_table_from_another_runtime_or_profile_is_refused(tiny_table, tmp_path):
    _, _, table, path = tiny_table
    other = dict(table, measured_on=dict(table["measured_on"], onnxruntime="1.0.0"))
    bad = tmp_path / "old-ort.json"
    bad.write_text(json.dumps(other))
    r = _invoke("train", "--model", "tiny_cnn", "--latency-table", str(bad), "--target-latency", "0.5", "--out",
                str(tmp_path / "a"))
    assert r.exit_code == 2 and "onnxruntime 1.0.0" in r.output
    r = _invoke("train", "--model", "tiny_cnn", "--profile", "automotive-ecu", "--latency-table", str(path),
                "--target-latency", "0.5", "--out", str(tmp_path / "b"))
    assert r.exit_code == 2 and "profile jetson" in r.output
    r = _invoke("train", "--model", "tiny_cnn", "--target-latency", "0.5", "--out", str(tmp_path / "c"))
    assert r.exit_code == 2 and "--latency-table" in r.output
    assert not any((tmp_path / n).exists() for n in "abc")


def _masked_cost(table, multiple=8):
    torch.manual_seed(0)
    x = torch.rand(SHAPE)
    masked = attach_masks(create_model("tiny_cnn"), "channel", x)
    masked.masks.channel_multiple = multiple
    for p in masked.masks.params:
        p.data.uniform_(0.1, 1.0)
    return masked, CostModel.build(masked, x).attach_latency(table)


def test_projection_meets_the_latency_budget_and_the_tightest_binds(tiny_table):
    table = tiny_table[2]
    masked, cost = _masked_cost(table)
    latency = cost.latency_ms()
    latency.backward()
    assert float(latency.detach()) == pytest.approx(cost.dense_latency)
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in masked.masks.params)
    limit = reachable(table) * cost.dense_latency
    status = _project(cost, [Constraint("latency", limit)])
    assert status["latency_ms"] <= limit and status["satisfied"]
    # exported widths predict the same value the cost model computed
    widths = {row["name"]: (row["out"], row["in"]) for row in cost.layer_table() if row["kind"] == "conv"}
    assert lt.predict_widths(table, widths) == pytest.approx(status["latency_ms"])
    # with an ops budget tighter than the latency one, ops binds and latency still holds
    masked, cost = _masked_cost(table)
    status = _project(cost, [Constraint("latency", limit), Constraint("ops", 0.2 * cost.dense_ops)])
    assert status["ops"] <= 0.2 * cost.dense_ops and status["latency_ms"] <= limit


def _project(cost, constraints):
    controller = BudgetController(cost, constraints)
    controller.project()
    return controller.status()


def test_posttrain_baseline_prunes_to_the_latency_budget(tiny_table):
    from rcomp.posttrain import prune_by_magnitude
    from rcomp.train import TrainConfig

    torch.manual_seed(0)
    target = reachable(tiny_table[2])
    config = TrainConfig(target_latency=target, latency_table=str(tiny_table[3]), channel_multiple=8)
    pruned, info = prune_by_magnitude(create_model("tiny_cnn").eval(), config, torch.rand(SHAPE))
    assert info["status"]["satisfied"] and info["status"]["latency_ratio"] <= target


def test_rl_episodes_keep_to_the_latency_budget(tiny_table):
    import random

    from rcomp.rl import build_env, run_episode
    from rcomp.train import TrainConfig

    torch.manual_seed(0)
    config = TrainConfig(target_latency=reachable(tiny_table[2]), latency_table=str(tiny_table[3]))
    env = build_env(create_model("tiny_cnn").eval(), config, torch.rand(SHAPE))
    assert [c.metric for c in env.constraints] == ["latency"]
    rng = random.Random(0)
    for _ in range(3):  # AMC's action clipping keeps every episode within the budget, whatever the agent asks
        keeps, _ = run_episode(env, lambda state: rng.random())
        assert env.values(keeps)["latency"] <= env.constraints[0].limit + 1e-9


def test_latency_budget_needs_its_table():
    from types import SimpleNamespace

    from rcomp.errors import RcompError

    x = torch.rand(SHAPE)
    cost = CostModel.build(attach_masks(create_model("tiny_cnn"), "channel", x), x)
    with pytest.raises(RcompError, match="latency table"):
        latency_constraints(cost, SimpleNamespace(latency_table=None, target_latency=0.5, latency_p90_ms=None))


@pytest.mark.slow
def test_intrain_run_meets_the_latency_target_by_the_table(tiny_table, tmp_path):
    from rcomp.export.onnx_export import export_onnx
    from rcomp.surgery import load_pruned

    _, _, table, path = tiny_table
    out, target = tmp_path / "run", reachable(table)
    r = _invoke("train", "--model", "tiny_cnn", "--data", "digits", "--epochs", "2", "--latency-table", str(path),
                "--target-latency", str(target), "--channel-multiple", "8", "--out", str(out), "--no-progress")
    assert r.exit_code == 0, r.output
    budget = json.loads((out / "train.json").read_text())["budget"]
    assert budget["satisfied"] and budget["latency_ratio"] <= target
    model = load_pruned(out / "model.pt")[0].eval()
    export_onnx(model, SHAPE, tmp_path / "m.onnx", opset=17, metadata={})
    assert lt.predict_onnx(table, tmp_path / "m.onnx") <= target * lt.dense_ms(table) + 1e-9
