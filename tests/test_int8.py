"""INT8: rcomp quantize (onnxruntime static QDQ), the fake-quant twin, and the check's INT8 gate.

One small CNN (normalization, conv, residual add, global pooling, linear: the ops rcomp's models
export) trained for a second on digits at 8x8, exported once per module.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

from rcomp import config
from rcomp.cli import cli
from rcomp.errors import RcompError
from rcomp.export.check import make_attack_set, run_check
from rcomp.export.quantize import is_quantized, quantize_onnx
from rcomp.export.runtime import make_session, predict

SHAPE = (1, 3, 8, 8)
EPS = 4 / 255


class SmallNet(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem((x - self.mean) / self.std)
        x = torch.relu(self.block(x) + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def profile(robust=True, graph_optimization="all"):
    rob = config.Robustness(eps=EPS, min_clean_acc=0.5, min_adv_acc=0.05) if robust else None
    return config.Profile(name="int8-test", description="", input_shape=SHAPE, opset=17,
                          target=config.Target(runtime="onnxruntime", execution_provider="CPUExecutionProvider",
                                               threads=1, graph_optimization=graph_optimization),
                          budgets=config.Budgets(mops=100.0), robustness=rob)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    """(folder, train images, val images, val labels): the float ONNX model and a PGD attack set on it."""
    from rcomp.attacks import pgd
    from rcomp.data import load_data
    from rcomp.export.onnx_export import export_onnx

    bundle = load_data("digits", SHAPE[1:], progress=False)
    tr, va = bundle.split("train"), bundle.split("val")
    x = torch.stack([tr[i][0] for i in range(len(tr))])
    y = torch.tensor([tr[i][1] for i in range(len(tr))])
    torch.manual_seed(0)
    model = SmallNet(bundle.mean, bundle.std)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(3):
        for i in range(0, len(x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
    model.eval()
    d = tmp_path_factory.mktemp("int8")
    export_onnx(model, SHAPE, d / "model.fp32.onnx", opset=17, metadata={"mops": "0.01"}, check_n=1)
    xv = torch.stack([va[i][0] for i in range(len(va))])
    yv = torch.tensor([va[i][1] for i in range(len(va))])
    xa = pgd(model, xv, yv, eps=EPS, alpha=EPS / 4, steps=10, generator=torch.Generator().manual_seed(0))
    make_attack_set(d / "adv.npz", xv.numpy(), yv.numpy(), xa.numpy(), EPS, "pgd-10")
    return d, x[:128].numpy(), xv.numpy(), yv.numpy()


@pytest.fixture(scope="module")
def int8_model(float_model):
    d, calib, _, _ = float_model
    quantize_onnx(d / "model.fp32.onnx", d / "model.onnx", calib, calibration_note={"data": "digits", "split": "train"})
    return d / "model.onnx"


def test_int8_model_passes_the_checker_runs_on_cpu_and_records_its_settings(float_model, int8_model):
    d, calib, xv, yv = float_model
    m = onnx.load(int8_model)
    onnx.checker.check_model(m, full_check=True)
    assert is_quantized(m) and not is_quantized(d / "model.fp32.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in m.graph.node}
    sess = make_session(int8_model, threads=1, graph_optimization="all", provider="CPUExecutionProvider")
    acc = float(np.mean(predict(sess, xv).argmax(1) == yv))
    f_acc = float(np.mean(predict(make_session(d / "model.fp32.onnx", threads=1, graph_optimization="all"), xv).argmax(1) == yv))
    assert acc > 0.5 and abs(acc - f_acc) < 0.05  # 10 classes: chance is 0.1; 8 bits cost little here
    meta = {p.key: p.value for p in m.metadata_props}
    assert meta["rcomp.int8.calibration_method"] == "minmax" and meta["rcomp.int8.format"] == "QDQ"
    assert meta["rcomp.int8.per_channel"] == "true" and meta["rcomp.int8.float_model"] == "model.fp32.onnx"
    calibration = json.loads(meta["rcomp.int8.calibration"])
    assert calibration["n"] == len(calib) and calibration["split"] == "train" and len(calibration["sha256"]) == 64
    assert meta["rcomp.mops"] == "0.01"  # the float export's metadata is kept


def test_the_twin_computes_what_the_int8_session_computes(float_model, int8_model):
    from rcomp.export.qdq_twin import build_twin

    _, _, xv, _ = float_model
    with torch.no_grad():
        twin = build_twin(int8_model)(torch.from_numpy(xv)).numpy()
    ort = predict(make_session(int8_model, threads=1, graph_optimization="all"), xv)
    assert np.mean(twin.argmax(1) == ort.argmax(1)) >= 0.98
    assert np.abs(twin - ort).max() < 0.1 * np.abs(ort).max()


def test_the_check_reports_all_three_attacks_and_their_minimum(float_model, int8_model):
    d = float_model[0]
    report = run_check(int8_model, profile(), attack_set=d / "adv.npz", latency_runs=5, square_queries=50, square_n=40)
    info = report.metrics["int8"]
    for key in ("transfer_acc", "square_acc", "twin_pgd_acc", "adv_acc_min", "float_top1_agreement"):
        assert info[key] is not None, key
    assert info["adv_acc_min"] <= min(info["transfer_acc"], info["twin_pgd_acc"]) + 1e-9
    assert info["twin_session_agreement"] >= 0.98
    assert set(info["latency_p50_ms"]) == {"int8", "float"}
    row = next(r for r in report.rows if r.name == "adv_acc")
    assert row.value == pytest.approx(info["adv_acc_min"]) and "twin PGD" in row.detail
    text = report.to_text()
    assert "INT8 adversarial accuracy: transfer" in text and "per-image minimum" in text and "agreement" in text


def test_the_gate_catches_int8_robustness_below_float_robustness(float_model, tmp_path):
    """A calibration sample darker than the data (ranges too narrow: activations clamp) makes an
    INT8 model less robust than its float model, and the float model's transfer set misses it:
    the gate's minimum comes from the attacks on the INT8 model itself."""
    d, calib, _, _ = float_model
    coarse = tmp_path / "coarse.onnx"
    quantize_onnx(d / "model.fp32.onnx", coarse, calib * 0.6)
    float_report = run_check(d / "model.fp32.onnx", profile(), attack_set=d / "adv.npz", latency_runs=5, square_queries=0)
    float_robust = float_report.metrics["transfer_acc"]  # white-box PGD on the float model itself
    report = run_check(coarse, profile(), attack_set=d / "adv.npz", latency_runs=5, square_queries=50, square_n=40)
    info = report.metrics["int8"]
    assert info["twin_pgd_acc"] < info["transfer_acc"]  # the transfer set overstates the INT8 model's robustness
    assert info["adv_acc_min"] < info["transfer_acc"] and info["adv_acc_min"] < float_robust
    assert not report.passed or info["adv_acc_min"] >= 0.05  # the floor is judged on the minimum


def test_without_torch_the_twin_attack_is_reported_not_evaluated(float_model, int8_model, monkeypatch):
    d = float_model[0]
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    report = run_check(int8_model, profile(), attack_set=d / "adv.npz", latency_runs=5, square_queries=20, square_n=10)
    info = report.metrics["int8"]
    assert info["twin_pgd_acc"] is None and "not evaluated" in info["twin_pgd"]
    assert info["square_acc"] is not None and any("twin PGD not evaluated" in f for f in report.flags)


def test_float_model_beside_is_used_only_if_its_checksum_matches(float_model, int8_model, tmp_path):
    import shutil

    d = float_model[0]
    shutil.copy(int8_model, tmp_path / "model.onnx")
    (tmp_path / "model.fp32.onnx").write_bytes((d / "model.fp32.onnx").read_bytes() + b"\0")  # another file
    report = run_check(tmp_path / "model.onnx", profile(robust=False), latency_runs=5)
    assert "sha256 differs" in report.metrics["int8"]["float_model"]
    assert "float_top1_agreement" not in report.metrics["int8"]


def run_cli(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def write_profile(path: Path, precision="fp32") -> Path:
    doc = {"name": "int8-test", "target": {"runtime": "onnxruntime", "execution_provider": "CPUExecutionProvider",
                                           "threads": 1, "graph_optimization": "all", "precision": precision},
           "input_shape": list(SHAPE), "opset": 17, "budgets": {"mops": 100.0}}
    path.write_text(yaml.safe_dump(doc))
    return path


def test_quantize_cli_writes_a_checked_int8_model(float_model, tmp_path):
    d = float_model[0]
    code, out = run_cli("quantize", d / "model.fp32.onnx", "--profile", write_profile(tmp_path / "p.yaml"), "--data", "digits",
                        "--calibration", "percentile", "--calibration-size", "32", "--out", tmp_path / "q.onnx")
    assert code == 0, out
    assert "onnx.checker passed" in out and is_quantized(tmp_path / "q.onnx")
    meta = {p.key: p.value for p in onnx.load(tmp_path / "q.onnx").metadata_props}
    assert meta["rcomp.int8.calibration_method"] == "percentile"
    assert json.loads(meta["rcomp.int8.calibration"]) | {"sha256": ""} == {
        "n": 32, "sha256": "", "data": "digits", "split": "train", "seed": 0, "subset": "rcomp.data.fixed_subset"}


def test_bad_inputs_exit_2_with_one_line(float_model, int8_model, tmp_path):
    d = float_model[0]
    prof = write_profile(tmp_path / "p.yaml")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    cases = [
        (int8_model, ["--data", "digits"], "already quantized"),
        (junk, ["--data", "digits"], "not an ONNX model"),
        (tmp_path / "missing.onnx", ["--data", "digits"], "no such file"),
        (d / "model.fp32.onnx", ["--data", "digits", "--calibration", "kl"], "kl"),
    ]
    for model, extra, words in cases:
        code, out = run_cli("quantize", model, "--profile", prof, "--out", tmp_path / "q.onnx", *extra)
        assert code == 2 and words in out, out
        assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(RcompError, match="empty"):
        quantize_onnx(d / "model.fp32.onnx", tmp_path / "q.onnx", np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(RcompError, match="unknown calibration method"):
        quantize_onnx(d / "model.fp32.onnx", tmp_path / "q.onnx", float_model[1], method="kl")
    assert not (tmp_path / "q.onnx").exists()


def test_profile_precision_key():
    doc = {"name": "p", "target": {"runtime": "onnxruntime", "execution_provider": "CPUExecutionProvider", "threads": 1,
                                   "graph_optimization": "all"}, "input_shape": [1, 3, 8, 8], "opset": 17, "budgets": {"mops": 1}}
    assert config.parse_profile(doc).target.precision == "fp32"
    doc["target"]["precision"] = "int8"
    assert config.parse_profile(doc).target.precision == "int8"
    doc["target"]["precision"] = "fp16"
    with pytest.raises(config.ConfigError, match="precision"):
        config.parse_profile(doc)


def test_quantize_and_the_int8_check_import_no_torch():
    code = "import sys, rcomp.export.quantize, rcomp.export.int8_check, rcomp.export.check; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.slow
def test_prune_with_precision_int8_ships_and_checks_the_int8_model(tmp_path):
    lenient = Path(__file__).resolve().parent / "data" / "profiles" / "test-lenient.yaml"
    doc = yaml.safe_load(lenient.read_text())
    doc["target"]["precision"] = "int8"
    prof = tmp_path / "int8.yaml"
    prof.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    code, output = run_cli("prune", "--profile", prof, "--out", out, "--target-ops", "0.5", "--model", "tiny_cnn",
                           "--data", "digits", "--epochs", "2", "--batch-size", "32", "--no-progress",
                           "--attack-set-size", "64", "--latency-runs", "5")
    assert code in (0, 1), output
    assert is_quantized(out / "model.onnx") and not is_quantized(out / "model.fp32.onnx")
    report = json.loads((out / "report.json").read_text())
    assert report["metrics"]["int8"]["twin_pgd_acc"] is not None
    assert report["metrics"]["int8"]["float_model"] == "model.fp32.onnx"
    assert "model.fp32.onnx (model.onnx is INT8)" in output and "INT8 adversarial accuracy" in output
