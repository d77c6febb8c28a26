"""The gate holds against hostile model files and attack sets (issue 55): every case here passed
(or loaded gigabytes) before the fix.

Forged metadata, an opset above the profile's, an attack set whose adversarial images are the
clean ones, a NaN eps, labels outside the model's classes, a zip bomb, and a weak replayed set
that only the gate's own Square attack exposes.
"""

import json
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from rcomp.cli import cli
from rcomp.errors import RcompError
from rcomp.export.check import load_attack_set, run_check
from rcomp.export.runtime import make_session, predict

config = pytest.importorskip("rcomp.config")

SHAPE = (1, 3, 32, 32)
EPS = 8 / 255


def profile(shape=SHAPE, opset=17, robustness=None, **budgets):
    return config.Profile(
        name="hostile", description="", input_shape=shape, opset=opset,
        target=config.Target(runtime="onnxruntime", execution_provider="CPUExecutionProvider",
                             threads=1, graph_optimization="all"),
        budgets=config.Budgets(**budgets), robustness=robustness,
    )


def write_profile(path, shape=SHAPE, **budgets) -> str:
    doc = {"name": "hostile", "description": "t", "input_shape": list(shape), "opset": 17,
           "target": {"runtime": "onnxruntime", "execution_provider": "CPUExecutionProvider", "threads": 1,
                      "graph_optimization": "all"},
           "budgets": budgets, "robustness": {"eps": "8/255", "min_clean_acc": 0.5, "min_adv_acc": 0.2}}
    path.write_text(json.dumps(doc))  # JSON is YAML
    return str(path)


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory):
    """resnet20 (40.8 MOps, 271k stored params) at opset 17 and tiny_cnn at opset 18."""
    import torch
    from rcomp.export.onnx_export import export_onnx
    from rcomp.models import create_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hostile")
    export_onnx(create_model("resnet20"), SHAPE, d / "resnet20.onnx", opset=17, metadata={}, check_n=1)
    export_onnx(create_model("tiny_cnn"), SHAPE, d / "tiny18.onnx", opset=18, metadata={}, check_n=1)
    return d


def with_metadata(src, dst, **props):
    model = onnx.load(src)
    onnx.helper.set_model_props(model, {f"rcomp.{k}": v for k, v in props.items()})
    onnx.save(model, dst)
    return dst


def save_set(path, x_clean, y, x_adv, eps, attack="pgd-10"):
    """np.savez directly: make_attack_set would refuse these sets where they are made."""
    np.savez(path, x_clean=np.asarray(x_clean, np.float32), y=np.asarray(y, np.int64),
             x_adv=np.asarray(x_adv, np.float32), eps=np.float64(eps), attack=np.str_(attack))
    return path


# ------------------------------------------------------------------------------------------------
# The model file
# ------------------------------------------------------------------------------------------------


def test_forged_metadata_does_not_pass_the_budgets(onnx_dir, tmp_path):
    """resnet20 claiming 1,000 params and a dense reference of 400 MOps: judged from the graph, and
    the lie itself is a FAIL row."""
    forged = with_metadata(onnx_dir / "resnet20.onnx", tmp_path / "forged.onnx",
                           mops="4.0", params="1000", dense_mops="400", dense_params="3000000")
    p = profile(mops=50.0, params=100_000, ops_fraction=0.5, params_fraction=0.5)
    report = run_check(forged, p, latency_runs=5)
    rows = {r.name: r for r in report.rows}
    assert not report.passed
    assert rows["params"].status == "fail" and rows["params"].value == 271021
    assert rows["ops_fraction"].status == "not evaluated" and "--dense" in rows["ops_fraction"].detail
    assert rows["metadata"].status == "fail" and rows["metadata"].value == 2  # rcomp.mops and rcomp.params
    assert "rcomp.params='1000'" in rows["metadata"].detail and "rcomp.mops='4.0'" in rows["metadata"].detail

    with_dense = run_check(forged, p, latency_runs=5, dense_onnx=onnx_dir / "resnet20.onnx")
    rows = {r.name: r for r in with_dense.rows}
    assert rows["ops_fraction"].value == 1.0 and rows["ops_fraction"].status == "fail"
    assert rows["metadata"].value == 4  # the dense claims are now checkable, and wrong


def test_forged_metadata_fails_on_the_command_line(onnx_dir, tmp_path):
    forged = with_metadata(onnx_dir / "resnet20.onnx", tmp_path / "forged.onnx", params="1000")
    code, out = run("check", forged, "--profile", write_profile(tmp_path / "p.yaml", mops=50.0, params=300000),
                    "--latency-runs", 5, "--report-dir", tmp_path / "r")
    assert code == 1, out
    assert "FAILED metadata" in out and "rcomp.params='1000'" in out


def test_an_opset_above_the_profiles_fails(onnx_dir):
    report = run_check(onnx_dir / "tiny18.onnx", profile(mops=100.0), latency_runs=5)
    rows = {r.name: r for r in report.rows}
    assert not report.passed
    assert rows["opset"].status == "fail" and rows["opset"].value == 18 and rows["opset"].limit == 17
    assert run_check(onnx_dir / "tiny18.onnx", profile(opset=18, mops=100.0), latency_runs=5).passed


# ------------------------------------------------------------------------------------------------
# The attack set
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(onnx_dir):
    """24 random images labelled with resnet20's own predictions (clean accuracy 1.0)."""
    x = np.random.default_rng(0).random((24,) + SHAPE[1:], dtype=np.float32)
    y = predict(make_session(onnx_dir / "resnet20.onnx", threads=1, graph_optimization="all"), x).argmax(1)
    return x, y


def test_an_unperturbed_attack_set_is_refused(onnx_dir, images, tmp_path):
    x, y = images
    path = save_set(tmp_path / "replay.npz", x, y, x.copy(), EPS)
    with pytest.raises(RcompError, match="not an attack"):
        run_check(onnx_dir / "resnet20.onnx", profile(robustness=config.Robustness(eps=EPS, min_adv_acc=0.5)),
                  attack_set=path, latency_runs=5)
    one_pixel = x.copy()
    one_pixel[:, 0, 0, 0] = np.clip(one_pixel[:, 0, 0, 0] + EPS / 2, 0, 1)  # L-inf eps/2, but nothing else moves
    with pytest.raises(RcompError, match="not an attack"):
        load_attack_set(save_set(tmp_path / "pixel.npz", x, y, one_pixel, EPS), SHAPE, EPS)


def test_a_nan_eps_does_not_skip_the_eps_checks(images, tmp_path):
    x, y = images
    far = np.clip(x + 0.5, 0, 1)  # far outside any L-inf ball of 8/255
    path = save_set(tmp_path / "nan.npz", x, y, far, float("nan"))
    with pytest.raises(RcompError, match="finite"):
        load_attack_set(path, SHAPE, EPS)
    with pytest.raises(RcompError, match="finite"):
        load_attack_set(path, SHAPE, None)  # a profile without robustness floors checks it too


def test_labels_outside_the_models_classes_are_bad_input(onnx_dir, images, tmp_path):
    x, y = images
    x_adv = np.clip(x + np.float32(EPS / 2), 0, 1)
    p = write_profile(tmp_path / "p.yaml", mops=100.0)
    for bad in (10, -1):
        labels = y.copy()
        labels[3] = bad
        path = save_set(tmp_path / f"labels{bad}.npz", x, labels, x_adv, EPS)
        code, out = run("check", onnx_dir / "resnet20.onnx", "--profile", p, "--attack-set", path,
                        "--report-dir", tmp_path / "r")
        assert code == 2 and "10 classes" in out, out


def _bomb(path, n: int):
    """A valid-looking attack set whose x_clean is n zero images deflated: 12 KiB per MiB on disk."""
    shape = (n,) + SHAPE[1:]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("x_clean.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            block = bytes(64 << 20)
            left = n * int(np.prod(SHAPE[1:])) * 4
            while left:
                f.write(block[:min(left, len(block))])
                left -= min(left, len(block))
        for key, arr in (("y", np.zeros(n, np.int64)), ("x_adv", np.zeros((1,) + SHAPE[1:], np.float32)),
                         ("eps", np.float64(EPS)), ("attack", np.str_("pgd"))):
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(arr))
    return path


def test_an_attack_set_that_expands_to_gigabytes_is_refused_before_loading(tmp_path):
    """1.1 GiB of zeros in a ~5 MB file: refused from the .npy headers, the arrays never allocated
    (peak memory of the refusing process stays far below the bomb's size)."""
    path = _bomb(tmp_path / "bomb.npz", 96_000)
    assert path.stat().st_size < 20 << 20
    code = textwrap.dedent(f"""
        from rcomp.errors import RcompError
        from rcomp.export.check import load_attack_set
        try:
            load_attack_set({str(path)!r}, (1, 3, 32, 32), 8 / 255)
        except RcompError as exc:
            print("refused:", exc)
        hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))  # this process's peak
        print("peak_mb", int(hwm.split()[1]) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in out.stdout and "GiB" in out.stdout, out.stdout + out.stderr
    assert int(out.stdout.split("peak_mb")[1]) < 400, out.stdout


def test_a_header_claiming_gigabytes_is_refused_on_the_command_line(onnx_dir, tmp_path):
    """A 1 kB file whose headers claim 10^6 images: exit 2 naming the size, nothing allocated."""
    path = tmp_path / "liar.npz"
    n = 10**6
    with zipfile.ZipFile(path, "w") as zf:
        for key, descr, shape in (("x_clean", "<f4", (n, 3, 32, 32)), ("y", "<i8", (n,)), ("x_adv", "<f4", (n, 3, 32, 32))):
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        for key, arr in (("eps", np.float64(EPS)), ("attack", np.str_("pgd"))):
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(arr))
    assert path.stat().st_size < 2000
    code, out = run("check", onnx_dir / "resnet20.onnx", "--profile", write_profile(tmp_path / "p.yaml", mops=100.0),
                    "--attack-set", path, "--report-dir", tmp_path / "r")
    assert code == 2, out
    assert "expand to 22.90 GiB" in out and len(out.strip().splitlines()) == 1, out


# ------------------------------------------------------------------------------------------------
# The gate's own attack
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp(trained, tmp_path_factory):
    """conftest's prototype MLP (not adversarially trained) as ONNX, input 1x8x8, and 60 test images."""
    from rcomp.export.onnx_export import export_onnx

    model, x, y = trained
    d = tmp_path_factory.mktemp("mlp")
    export_onnx(model.eval(), (1, 1, 8, 8), d / "mlp.onnx", opset=17, metadata={}, check_n=1)
    return d / "mlp.onnx", x[:60].numpy(), y[:60].numpy()


def test_the_gate_attacks_by_default_and_a_weak_replayed_set_does_not_certify(mlp, tmp_path):
    """Noise at a fifth of eps replays as 'robust'; the default Square attack shows it is not."""
    path, x, y = mlp
    rng = np.random.default_rng(0)
    weak = np.clip(x + np.float32(0.2 * EPS) * rng.choice([-1, 1], size=x.shape).astype(np.float32), 0, 1)
    aset = save_set(tmp_path / "weak.npz", x, y, weak, EPS, "noise")
    p = profile(shape=(1, 1, 8, 8), robustness=config.Robustness(eps=EPS, min_clean_acc=0.5, min_adv_acc=0.5))
    replay_only = run_check(path, p, attack_set=aset, latency_runs=5, square_queries=0)
    assert replay_only.metrics["adv_acc"] >= 0.9 and replay_only.passed
    assert any("ran no attack of its own" in f for f in replay_only.flags)
    default = run_check(path, p, attack_set=aset, latency_runs=5)
    m = default.metrics
    assert m["square_queries"] == 100 and m["square_n"] == 60
    assert m["adv_acc"] == min(m["adv_acc_whole_set"], m["adv_acc_square_subset"]) < 0.5
    assert not default.passed and {r.name for r in default.rows if r.status == "fail"} == {"adv_acc"}
    assert "Square" in next(r.detail for r in default.rows if r.name == "adv_acc")
