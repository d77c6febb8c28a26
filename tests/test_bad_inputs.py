"""Bad inputs a user will try (README, "Bad input"): each gives one line, exit 2, no traceback, no file changed.

Run directly (``python tests/test_bad_inputs.py``) to print the README table of what each case gives.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
LENIENT = REPO / "tests" / "data" / "profiles" / "test-lenient.yaml"


def _profile(tmp: Path, name: str, text: str | None = None, **changes) -> Path:
    path = tmp / f"{name}.yaml"
    if text is not None:
        path.write_text(text)
        return path
    doc = yaml.safe_load(LENIENT.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = doc
        for p in parents:
            node = node[p]
        if value is None:
            del node[key]
        else:
            node[key] = value
    path.write_text(yaml.safe_dump(doc))
    return path


def _imagefolder(tmp: Path, name: str, sizes=((32, 32),) * 4, classes=("a", "b")) -> Path:
    root = tmp / name
    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i, size in enumerate(sizes):
            Image.fromarray(np.full((*size[::-1], 3), 40 * i, dtype=np.uint8)).save(root / "train" / c / f"{i}.png")
    return root


def _onnx(tmp: Path, name: str, shape=(1, 3, 32, 32), model: str = "tiny_cnn") -> Path:

    from rcomp.export.onnx_export import export_onnx
    from rcomp.models import create_model

    path = tmp / f"{name}.onnx"
    export_onnx(create_model(model, in_channels=shape[1]).eval(), shape, path, opset=17, metadata={})
    return path


def _checkpoint(tmp: Path, name: str, model: str) -> Path:

    from rcomp.models import create_model
    from rcomp.surgery import PrunedModel, save_pruned

    path = tmp / f"{name}.pt"
    save_pruned(path, PrunedModel(create_model(model), [], "dense", 0.0), model_name=model,
                model_kwargs={"num_classes": 10, "in_channels": 3}, input_shape=(3, 32, 32))
    return path


def _other_architecture(tmp: Path) -> Path:
    """A resnet56 state dict under a resnet20 name: what a mixed-up checkpoint looks like."""
    import torch

    path = _checkpoint(tmp, "r56", "resnet56")
    state = torch.load(path, weights_only=True)
    state["model_name"] = "resnet20"
    torch.save(state, path)
    return path


TRAIN = ["train", "--model", "tiny_cnn", "--epochs", "1", "--out", "{tmp}/out"]

# (case, builder(tmp) -> args, expected words in the error)
CASES = [
    ("malformed YAML profile", lambda t: ["profiles", "validate", str(_profile(t, "bad", "name: x\nbudgets: [1, 2\n"))], "line"),
    ("unknown key in a profile", lambda t: ["profiles", "validate", str(_profile(t, "unk", budgets__mopz=3))], "budgets.mopz"),
    ("negative budget", lambda t: ["profiles", "validate", str(_profile(t, "neg", budgets__mops=-5))], "budgets.mops"),
    ("missing required field", lambda t: ["profiles", "validate", str(_profile(t, "miss", opset=None))], "opset"),
    ("eps out of range", lambda t: ["profiles", "validate", str(_profile(t, "eps", robustness__eps=2))], "robustness.eps"),
    ("unknown key in a recipe", lambda t: TRAIN + ["--recipe", str(_profile(t, "recipe", "lr_maxx: 0.1\n"))], "lr_maxx"),
    ("missing data folder", lambda t: TRAIN + ["--data", f"imagefolder:{t}/nowhere"], "nowhere"),
    ("empty ImageFolder", lambda t: TRAIN + ["--data", f"imagefolder:{_imagefolder(t, 'empty', sizes=())}"], "empty"),
    ("image of the wrong size", lambda t: TRAIN + ["--data", f"imagefolder:{_imagefolder(t, 'mixed', sizes=((32, 32), (32, 32), (40, 30)))}"], "2.png"),
    ("ONNX input shape differs from the profile", lambda t: ["check", str(_onnx(t, "m16", (1, 3, 16, 16))), "--profile", str(LENIENT)], "16"),
    ("corrupt ONNX file", lambda t: ["check", str(_corrupt(_onnx(t, "corrupt"))), "--profile", str(LENIENT)], "corrupt.onnx"),
    ("text file renamed .onnx", lambda t: ["check", str(_text(t / "notes.onnx")), "--profile", str(LENIENT)], "not an ONNX model"),
    ("checkpoint from another architecture", lambda t: ["eval", str(_other_architecture(t)), "--n", "4"], "resnet20"),
    ("truncated checkpoint", lambda t: ["count", str(_truncate(_checkpoint(t, "cut", "tiny_cnn")))], "cut.pt"),
    ("conflicting options", lambda t: ["train", "--model", "tiny_cnn", "--method", "dense", "--target-ops", "0.5", "--out", f"{t}/out"], "--method dense"),
    ("--arch-from an unpruned model", lambda t: TRAIN[:1] + ["--arch-from", str(_checkpoint(t, "whole", "tiny_cnn"))] + TRAIN[3:],
     "no channels were removed"),
]


def _corrupt(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data[: len(data) // 2]))
    return path


def _text(path: Path) -> Path:
    path.write_text("not a model\n")
    return path


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[:1000])
    return path


def _snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run_case(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    return subprocess.run([sys.executable, "-m", "rcomp", *args], capture_output=True, text=True, cwd=tmp, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("case, build, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path, case, build, expected):
    args = build(tmp_path)
    before = _snapshot(tmp_path)
    proc = run_case(args, tmp_path)
    assert proc.returncode == 2, (case, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(("error:", "Error:"))]
    assert len(errors) == 1, proc.stderr
    assert expected in errors[0], errors[0]
    assert _snapshot(tmp_path) == before, "a file changed"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


if __name__ == "__main__":  # print the README table
    import tempfile

    print("| bad input | what rcomp says (exit code 2) |\n|---|---|")
    for case, build, _ in CASES:
        with tempfile.TemporaryDirectory() as d:
            proc = run_case(build(Path(d)), Path(d))
            line = next(l for l in proc.stderr.splitlines() if l.startswith(("error:", "Error:")))
            line = line.replace(d, "…")
            print(f"| {case} | `{line}` (exit {proc.returncode}) |")
