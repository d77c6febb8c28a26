"""The CI gate: pass/fail against profiles, bad input as RcompError, reports, torch-free import."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rcomp import config
from rcomp.errors import RcompError
from rcomp.export.check import load_attack_set, make_attack_set, run_check, write_report
from rcomp.export.runtime import make_session, predict


SHAPE = (1, 3, 32, 32)
EPS = 8 / 255


def profile(name="test", shape=SHAPE, robustness=None, **budgets):
    return config.Profile(
        name=name, description="", input_shape=shape, opset=17,
        target=config.Target(runtime="onnxruntime", execution_provider="CPUExecutionProvider",
                             threads=1, graph_optimization="all"),
        budgets=config.Budgets(**budgets), robustness=robustness,
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny_cnn as the 'pruned' model with the metadata the pipeline writes (true figures), resnet20 as
    the dense reference (no metadata)."""
    import torch
    from rcomp.export.onnx_export import export_onnx
    from rcomp.models import create_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("check")
    meta = {"mops": "6.340928", "params": "24026", "dense_mops": "40.813184", "dense_params": "272474"}
    export_onnx(create_model("tiny_cnn"), SHAPE, d / "model.onnx", opset=17, metadata=meta, check_n=1)
    export_onnx(create_model("resnet20"), SHAPE, d / "dense.onnx", opset=17, metadata={}, check_n=1)
    return d


@pytest.fixture(scope="module")
def attack_set(models):
    """Labels = the model's own predictions, x_adv = a random ±eps corner (a weak stand-in for PGD)."""
    rng = np.random.default_rng(0)
    x = rng.random((24,) + SHAPE[1:], dtype=np.float32)
    sess = make_session(models / "model.onnx", threads=1, graph_optimization="all")
    y = predict(sess, x).argmax(1)
    x_adv = np.clip(x + rng.choice([-EPS, EPS], size=x.shape).astype(np.float32), 0, 1)
    x_adv = np.clip(x_adv, x - np.float32(EPS) * 0.999, x + np.float32(EPS) * 0.999)
    path = models / "adv.npz"
    make_attack_set(path, x, y, x_adv, EPS, "noise")
    return path


GENEROUS = dict(mops=100.0, params=1e6, ops_fraction=0.9, params_fraction=0.9, latency_p90_ms=1e4)
FLOORS = config.Robustness(eps=EPS, min_clean_acc=0.9, min_adv_acc=0.1)


def test_passes_under_generous_budgets(models, attack_set, tmp_path):
    report = run_check(models / "model.onnx", profile(robustness=FLOORS, **GENEROUS), attack_set=attack_set,
                       latency_runs=5, square_queries=10, square_n=8, dense_onnx=models / "dense.onnx")
    assert report.passed, report.to_text()
    rows = {r.name: r for r in report.rows}
    assert set(rows) == {"opset", "metadata", "mops", "params", "ops_fraction", "params_fraction", "latency_p90_ms",
                         "clean_acc", "adv_acc"}
    assert rows["mops"].value == pytest.approx(6.340928)
    assert rows["params"].value == 23853 and "graph" in rows["params"].detail  # stored elements, BN folded
    assert rows["ops_fraction"].value == pytest.approx(6.340928 / 40.813184)
    assert rows["params_fraction"].value == pytest.approx(23853 / 271021)
    assert rows["metadata"].value == 0 and "match" in rows["metadata"].detail
    assert rows["opset"].value == 17
    assert rows["clean_acc"].value == 1.0
    assert report.metrics["square_n"] == 8 and "Square" in report.metrics["adv_source"]
    assert report.latency["model"]["runs"] == 5
    json_path, md_path = write_report(report, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["passed"] is True and {r["status"] for r in data["rows"]} == {"pass"}
    assert "PASS" in md_path.read_text() and "PASS" in report.to_text()


def test_fails_against_a_tighter_profile(models):
    tight = profile(mops=1.0, params=1e6, latency_p90_ms=1e4)
    report = run_check(models / "model.onnx", tight, latency_runs=5)
    assert not report.passed
    rows = {r.name: r for r in report.rows}
    assert rows["mops"].status == "fail" and rows["params"].status == "pass"
    assert "FAIL" in report.to_text()
    mops = next(r for r in report.to_dict()["rows"] if r["name"] == "mops")
    assert mops == {"name": "mops", "value": pytest.approx(6.340928), "limit": 1.0, "unit": "MOps", "passed": False,
                    "status": "fail", "detail": "conv+linear MACs from the graph", "bound": "max"}


def test_unevaluable_checks_fail(models):
    report = run_check(models / "dense.onnx", profile(robustness=FLOORS, ops_fraction=0.9, params_fraction=0.9))
    rows = {r.name: r for r in report.rows if r.name != "opset"}
    assert not report.passed
    assert all(r.status == "not evaluated" and r.passed is False for r in rows.values())
    assert "--attack-set" in rows["adv_acc"].detail and "--dense" in rows["ops_fraction"].detail


def test_fractions_come_from_the_dense_graph_the_user_passes(models):
    report = run_check(models / "dense.onnx", profile(params=1e6, ops_fraction=1.0), latency_runs=5,
                       dense_onnx=models / "model.onnx")
    rows = {r.name: r for r in report.rows}
    assert rows["params"].value == 271021 and "metadata" not in rows  # dense.onnx carries no rcomp.* figures
    assert rows["ops_fraction"].value == pytest.approx(40.813184 / 6.340928) and rows["ops_fraction"].status == "fail"
    assert set(report.latency) == {"model", "dense"} and report.metrics["speedup_p50"] > 0
    assert "vs dense" in report.to_text()


def test_bad_inputs_raise(models, attack_set, tmp_path):
    p = profile(mops=100.0)
    text = tmp_path / "model.onnx"
    text.write_text("not a model\n")
    with pytest.raises(RcompError, match="not an ONNX model"):
        run_check(text, p)
    with pytest.raises(RcompError, match="no such file"):
        run_check(tmp_path / "missing.onnx", p)
    with pytest.raises(RcompError, match=r"\(1, 3, 32, 32\).*\(1, 3, 64, 64\)"):
        run_check(models / "model.onnx", profile(shape=(1, 3, 64, 64), mops=100.0))
    other_eps = profile(mops=100.0, robustness=config.Robustness(eps=4 / 255, min_adv_acc=0.1))
    with pytest.raises(RcompError, match="larger than the profile's eps"):
        run_check(models / "model.onnx", other_eps, attack_set=attack_set)


def test_attack_set_validation(tmp_path):
    x = np.zeros((2,) + SHAPE[1:], np.float32)
    path = tmp_path / "a.npz"
    np.savez(path, x_clean=x, y=np.zeros(2, np.int64), x_adv=x)
    with pytest.raises(RcompError, match="lacks eps, attack"):
        load_attack_set(path, SHAPE, EPS)
    with pytest.raises(RcompError, match="more than its eps"):
        make_attack_set(tmp_path / "b.npz", x, [0, 1], x + 0.5, EPS, "pgd")
    make_attack_set(tmp_path / "c.npz", x, [0, 1], x + np.float32(EPS / 2), EPS, "pgd")
    with pytest.raises(RcompError, match="do not fit the model input"):
        load_attack_set(tmp_path / "c.npz", (1, 3, 16, 16), EPS)
    assert load_attack_set(tmp_path / "c.npz", SHAPE, EPS).attack == "pgd"


def test_gradient_masking_is_flagged_not_failed(models, tmp_path):
    """x_adv that the model gets *more* right than the clean inputs: a sign of a broken attack."""
    rng = np.random.default_rng(1)
    x_adv = rng.random((16,) + SHAPE[1:], dtype=np.float32)
    sess = make_session(models / "model.onnx", threads=1, graph_optimization="all")
    y = predict(sess, x_adv).argmax(1)
    x_clean = np.zeros_like(x_adv)
    assert (predict(sess, x_clean).argmax(1) != y).any()
    make_attack_set(tmp_path / "odd.npz", x_clean, y, x_adv, 1.0, "pgd")
    p = profile(mops=100.0, robustness=config.Robustness(eps=1.0, min_adv_acc=0.0))
    report = run_check(models / "model.onnx", p, attack_set=tmp_path / "odd.npz")
    assert report.passed
    assert any("gradient masking" in f for f in report.flags)


def test_light_modules_import_and_run_without_torch(models):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # any 'import torch' now raises ImportError
        import rcomp.export, rcomp.export.onnx_count, rcomp.export.runtime, rcomp.export.square
        from rcomp.export.check import run_check
        from rcomp.config import Profile, Target, Budgets
        p = Profile(name="t", description="", input_shape=(1, 3, 32, 32), opset=17,
                    target=Target("onnxruntime", "CPUExecutionProvider", 1, "all"), budgets=Budgets(mops=100.0))
        assert run_check({str(models / 'model.onnx')!r}, p).passed
        assert sys.modules["torch"] is None
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_the_report_names_the_class_with_the_lowest_clean_accuracy(models, attack_set):
    from rcomp.export.check import worst_class

    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    correct = np.array([1, 1, 1, 0, 0, 1, 1, 1, 0], dtype=bool)
    assert worst_class(correct, y) == {"class": 1, "n": 3, "clean_acc": pytest.approx(1 / 3), "classes_checked": 3}
    assert worst_class(correct[:2], y[:2]) is None  # one class: nothing to single out
    a = np.load(attack_set)
    p = predict(make_session(models / "model.onnx", threads=1, graph_optimization="all"), a["x_clean"]).argmax(1)
    y = np.where(np.arange(len(p)) < 16, p, (p + 1) % 10)  # the last 8 labelled one class past the prediction
    path = models / "two-classes.npz"
    make_attack_set(path, a["x_clean"], y, a["x_adv"], float(a["eps"]), "noise")
    report = run_check(models / "model.onnx", profile(robustness=FLOORS, **GENEROUS), attack_set=path,
                       latency_runs=5, square_queries=0, dense_onnx=models / "dense.onnx")
    worst = report.metrics["worst_class"]
    assert worst["clean_acc"] == 0.0 and worst["class"] in set((p[16:] + 1) % 10)
    assert f"worst class: {worst['class']} ({worst['n']} images): clean 0.00%" in report.to_text()
