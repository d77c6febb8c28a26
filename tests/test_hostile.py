"""Hostile and careless inputs (issue 55, docs/bad-input.md): no code runs from a data file, YAML
bombs fail fast, outputs are locked and checked before any work, and every failure has its exit code.

Each test runs the real CLI (a subprocess, as a CI would) or the function it guards, on tiny data.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcomp.errors import ConfigError, DataError, RcompError

REPO = Path(__file__).resolve().parent.parent
LENIENT = REPO / "tests" / "data" / "profiles" / "test-lenient.yaml"


def rcomp(args: list[str], cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RCOMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "rcomp", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env, **kw)


def cli(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """``rcomp ARGS`` in this process (click's CliRunner): the same exit codes and stderr as the
    subprocess, without a torch import per test. The end-to-end and signal tests use ``rcomp``."""
    import contextlib

    from click.testing import CliRunner

    from rcomp.cli import cli as group

    args = [str(a) for a in args]
    with contextlib.chdir(cwd):
        result = CliRunner().invoke(group, args, env={"RCOMP_DEBUG": None, "OMP_NUM_THREADS": "1"})
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback the real CLI would print: let the test show it
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a failure prints, and no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _checkpoint(path: Path, *, num_classes: int = 10, poison: bool = False) -> Path:
    import torch

    from rcomp.models import create_model
    from rcomp.surgery import PrunedModel, save_pruned

    model = create_model("tiny_cnn", num_classes=num_classes, in_channels=3)
    if poison:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
    save_pruned(path, PrunedModel(model, [], "dense", 0.0), model_name="tiny_cnn",
                model_kwargs={"num_classes": num_classes, "in_channels": 3}, input_shape=(3, 32, 32))
    return path


# --------------------------------------------------------------------------------------------
# 1. No code execution through a dataset folder (cifar10:DIR pickles)
# --------------------------------------------------------------------------------------------


class _Payload:
    """Unpickled by plain pickle.load, this creates ``marker``: what a planted file could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _cifar_folder(root: Path, planted: dict[str, object] | None = None, per_batch: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "labels": list(range(per_batch))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{k}" for k in range(10)]}))
    for name, obj in (planted or {}).items():
        (folder / name).write_bytes(pickle.dumps(obj))
    return root


def test_cifar_pickle_payload_runs_nothing_and_exits_2(tmp_path):
    marker = tmp_path / "pwned"
    root = _cifar_folder(tmp_path / "c10", {"data_batch_3": {"data": _Payload(marker), "labels": [0]}})
    proc = rcomp(["train", "--model", "tiny_cnn", "--data", f"cifar10:{root}", "--epochs", "1", "--out", tmp_path / "out"],
                 tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "data_batch_3" in one_error_line(proc)
    assert not marker.exists(), "the pickle's payload ran"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cifar_meta_payload_is_refused(tmp_path):
    from rcomp.data import load_data

    marker = tmp_path / "pwned"
    root = _cifar_folder(tmp_path / "c10", {"batches.meta": _Payload(marker)})
    with pytest.raises(DataError, match="batches.meta"):
        load_data(f"cifar10:{root}")
    assert not marker.exists()


def test_cifar_python2_layout_still_loads(tmp_path):
    """The published batches name numpy.core.multiarray._reconstruct (protocol 2, latin-1 strings):
    rewrite a batch that way and it must still load through the restricted unpickler."""
    from rcomp.data import load_data

    root = _cifar_folder(tmp_path / "c10")
    path = root / "cifar-10-batches-py" / "test_batch"
    x = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({"batch_label": "testing batch 1 of 1", "data": x, "labels": [3, 7],
                        "filenames": ["a.png", "b.png"]}, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    path.write_bytes(raw)
    test = load_data(f"cifar10:{root}").split("test")
    assert test.targets == [3, 7]
    assert np.array_equal((test[1][0] * 255).round().byte().numpy().reshape(-1), x[1])


def test_no_plain_unpickling_in_the_toolchain():
    """Every loader of a file rcomp did not write goes through a restricted path."""
    offenders = []
    for folder in ("toolchain", "export", "models"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            for needle in ("pickle.load(", "pickle.loads(", "allow_pickle=True", "weights_only=False"):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    assert offenders == []


# --------------------------------------------------------------------------------------------
# 2. YAML bombs and files that are not profiles
# --------------------------------------------------------------------------------------------

def billion_laughs(key: str, depth: int = 9) -> str:
    """``key``'s value: nine levels of nine aliases of the level below, 9**9 strings once expanded.

    PyYAML shares aliased lists rather than copying them, so loading is cheap; quoting the value
    back in an error (its repr) is what took minutes and gigabytes."""
    levels = ['&a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    levels += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, depth)]
    return f"{key}: [{', '.join(levels)}]\n"


#: A profile whose ``description`` (checked second, after ``name``) is the bomb.
PROFILE_BOMB = "name: bomb\n" + billion_laughs("description")
#: A recipe whose one key is the bomb.
RECIPE_BOMB = billion_laughs("lr_max")


def test_billion_laughs_fails_in_under_a_second(tmp_path):
    from rcomp.config import load_profile

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(PROFILE_BOMB)
    assert len(PROFILE_BOMB) < 1000
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases") as err:
        load_profile(bomb)
    assert time.perf_counter() - started < 1.0
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("kind", ["profile", "recipe"])
def test_yaml_aliases_exit_2(tmp_path, kind):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(PROFILE_BOMB if kind == "profile" else RECIPE_BOMB)
    args = (["profiles", "validate", bomb] if kind == "profile"
            else ["train", "--model", "tiny_cnn", "--recipe", bomb, "--out", tmp_path / "out"])
    proc = cli(args, tmp_path)
    assert proc.returncode == 2
    assert "aliases" in one_error_line(proc)
    assert len(proc.stderr) < 400 and "lol" not in proc.stderr


def test_a_harmless_alias_is_refused_too(tmp_path):
    from rcomp.config import read_yaml

    path = tmp_path / "alias.yaml"
    path.write_text("a: &x 3\nb: *x\n")
    with pytest.raises(ConfigError, match="aliases"):
        read_yaml(path)


def test_huge_yaml_is_refused_without_reading_it_all(tmp_path):
    from rcomp.config import read_yaml

    path = tmp_path / "big.yaml"
    path.write_text("name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="larger than"):
        read_yaml(path)


def test_a_file_outside_the_project_is_not_echoed(tmp_path):
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key=SECRET-TOKEN-0123456789\nanother line of SECRET-TOKEN-0123456789\n")
    proc = cli(["profiles", "validate", secret], tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert "SECRET" not in proc.stderr and "expected a mapping" in line


def test_a_long_value_is_quoted_as_a_short_excerpt(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(LENIENT.read_text().replace("opset: 17", "opset: " + "SECRET" * 5000))
    assert "SECRET" in path.read_text()
    proc = cli(["profiles", "validate", path], tmp_path)
    assert proc.returncode == 2
    assert "opset" in one_error_line(proc) and len(proc.stderr) < 400


# --------------------------------------------------------------------------------------------
# 3. Integrity of outputs: the lock, paths checked before any work, no empty OUT.partial/
# --------------------------------------------------------------------------------------------

TRAIN = ["train", "--model", "tiny_cnn", "--data", "synthetic:64", "--epochs", "1", "--no-progress"]


def test_a_second_job_on_a_locked_out_exits_2_at_once(tmp_path):
    from rcomp.guards import OutputLock

    out = tmp_path / "out"
    with OutputLock(out):  # the first job, alive
        started = time.perf_counter()
        proc = cli([*TRAIN, "--out", out], tmp_path)
        elapsed = time.perf_counter() - started
    assert proc.returncode == 2
    assert "another rcomp job" in one_error_line(proc)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert elapsed < 10  # it never trained


def test_the_lock_dies_with_a_killed_process(tmp_path):
    from rcomp.guards import OutputLock, lock_path

    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from rcomp.guards import OutputLock; "
                               f"OutputLock({str(out)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RcompError, match="another rcomp job"):
            OutputLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).exists()  # left behind by kill -9 ...
    with OutputLock(out):  # ... and free all the same
        pass
    assert not lock_path(out).exists()


def test_out_naming_an_existing_file_is_refused_before_any_work(tmp_path):
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes\n")
    proc = cli([*TRAIN, "--out", mine], tmp_path)
    assert proc.returncode == 2
    assert "existing file" in one_error_line(proc)
    assert mine.read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("bad", [["--target-ops", "0.0001"], ["--data", "imagefolder:nowhere"]],
                         ids=["budget no width can meet", "data read after the lock"])
def test_an_exit_2_after_the_output_opened_leaves_no_partial(tmp_path, bad):
    """Errors raised once OUT is locked and OUT.partial/ made (an impossible budget found by the
    trainer, a data spec read after the lock) must not leave an empty OUT.partial/ behind."""
    proc = cli([*TRAIN, *bad, "--out", tmp_path / "out"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    one_error_line(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_run_keeps_a_partial_with_checkpoints(tmp_path):
    from rcomp.pipeline import StagedOutput

    with pytest.raises(RuntimeError):
        with StagedOutput(tmp_path / "out", resume=False) as staged:
            (staged.partial / "checkpoints").mkdir()
            (staged.partial / "checkpoints" / "ckpt-epoch0001.pt").write_bytes(b"x")
            raise RuntimeError("failed after a checkpoint")
    assert (tmp_path / "out.partial" / "checkpoints" / "ckpt-epoch0001.pt").exists()


@pytest.mark.parametrize("where", ["missing folder", "a folder"])
def test_json_into_a_bad_path_exits_2_up_front(tmp_path, where):
    target = tmp_path / "missing" / "count.json" if where == "missing folder" else tmp_path
    proc = cli(["count", "tiny_cnn", "--json", target], tmp_path)
    assert proc.returncode == 2
    assert "--json" in one_error_line(proc)
    assert not (tmp_path / "missing").exists()


def test_json_into_an_unwritable_folder_exits_2_up_front(tmp_path, monkeypatch):
    """Permission bits mean nothing to root (these tests run as root), so the folder's access check
    is made to answer as it would for a user who may not write there."""
    import rcomp.guards

    real = os.access
    monkeypatch.setattr(rcomp.guards.os, "access", lambda path, mode: False if Path(path) == tmp_path else real(path, mode))
    proc = cli(["count", "tiny_cnn", "--json", tmp_path / "count.json"], tmp_path)
    assert proc.returncode == 2
    assert "not writable" in one_error_line(proc)


def test_a_write_the_os_refuses_exits_2(monkeypatch):
    result = _invoke(monkeypatch, PermissionError(13, "Permission denied", "/read-only/report.json"))
    assert result.exit_code == 2 and "/read-only/report.json: Permission denied" in result.output


def test_export_out_into_a_missing_folder_exits_2_up_front(tmp_path):
    ckpt = _checkpoint(tmp_path / "m.pt")
    proc = cli(["export", ckpt, "--out", tmp_path / "missing" / "m.onnx"], tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in one_error_line(proc)


# --------------------------------------------------------------------------------------------
# 4. Exit codes a CI can trust
# --------------------------------------------------------------------------------------------


def _invoke(monkeypatch, exc: BaseException, debug: bool = False):
    """``rcomp count tiny_cnn`` with its work replaced by ``raise exc``, in process."""
    from click.testing import CliRunner

    import rcomp.pipeline
    from rcomp.cli import cli

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(rcomp.pipeline, "count_command", boom)
    if debug:
        monkeypatch.setenv("RCOMP_DEBUG", "1")
    else:
        monkeypatch.delenv("RCOMP_DEBUG", raising=False)
    return CliRunner().invoke(cli, ["count", "tiny_cnn"])


def test_an_internal_error_exits_4_not_1(monkeypatch):
    result = _invoke(monkeypatch, ZeroDivisionError("division by zero"))
    assert result.exit_code == 4
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "internal error" in lines[0] and "RCOMP_DEBUG=1" in lines[0]
    assert "Traceback" not in result.output


def test_rcomp_debug_shows_the_traceback(monkeypatch):
    result = _invoke(monkeypatch, ZeroDivisionError("division by zero"), debug=True)
    assert result.exit_code == 4 and "Traceback" in result.output


def test_out_of_memory_is_bad_input(monkeypatch):
    result = _invoke(monkeypatch, MemoryError())
    assert result.exit_code == 2 and "out of memory" in result.output


def test_more_classes_in_the_data_than_in_the_model_exits_2(tmp_path):
    ckpt = _checkpoint(tmp_path / "two.pt", num_classes=2)
    proc = cli(["eval", ckpt, "--data", "synthetic:40", "--n", "8", "--pgd-steps", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "2 classes" in one_error_line(proc)


def test_a_checkpoint_with_nan_weights_is_not_evaluated(tmp_path):
    ckpt = _checkpoint(tmp_path / "nan.pt", poison=True)
    proc = cli(["eval", ckpt, "--data", "synthetic:40", "--n", "8", "--pgd-steps", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert "non-finite" in one_error_line(proc)


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 32x32 PNG whose header claims ``width`` x ``height``: a few hundred bytes."""
    Image.new("L", (32, 32)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def test_a_decompression_bomb_image_exits_2(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "bomb" / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (32, 32)).save(tmp_path / "bomb" / "train" / c / f"{i}.png")
    _png_claiming(tmp_path / "bomb" / "train" / "a" / "0.png", 60_000, 60_000)
    proc = cli([*TRAIN, "--data", f"imagefolder:{tmp_path / 'bomb'}", "--out", tmp_path / "out"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "refusing a decompression-bomb image" in one_error_line(proc)


@pytest.mark.parametrize("args", [
    ["count", "resnet20", "--input", "3,100000,100000"],
    ["profiles", "validate", "{huge}"],
])
def test_a_huge_input_shape_exits_2_before_allocating(tmp_path, args):
    huge = tmp_path / "huge.yaml"
    huge.write_text(LENIENT.read_text().replace("[1, 3, 32, 32]", "[1, 3, 100000, 100000]"))
    assert "100000" in huge.read_text()
    proc = cli([a.replace("{huge}", str(huge)) for a in args], tmp_path)
    assert proc.returncode == 2
    assert "100000" in one_error_line(proc)


@pytest.mark.parametrize("option, value", [("--lr", "nan"), ("--lr", "inf"), ("--target-ops", "nan")])
def test_non_finite_cli_floats_exit_2(tmp_path, option, value):
    proc = cli([*TRAIN, option, value, "--out", tmp_path / "out"], tmp_path)
    assert proc.returncode == 2
    assert "finite" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line", ["min_keep: 1.5", "eval_size: 0", "lr_max: .nan"])
def test_recipe_values_out_of_range_exit_2(tmp_path, line):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(line + "\n")
    proc = cli([*TRAIN, "--recipe", recipe, "--out", tmp_path / "out"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert line.split(":")[0] in one_error_line(proc)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.slow
def test_ctrl_c_exits_130_and_resume_continues(tmp_path):
    """SIGINT during training: exit 130, one line, the epoch checkpoints kept; --resume goes on from them."""
    out = tmp_path / "out"
    args = [*TRAIN[:5], "--epochs", "40", "--batch-size", "32", "--no-progress", "--out", out]
    proc = subprocess.Popen([sys.executable, "-m", "rcomp", *map(str, args)], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))
    first = out.with_name("out.partial") / "checkpoints" / "ckpt-epoch0001.pt"
    deadline = time.monotonic() + 240
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in one_error_line(subprocess.CompletedProcess(args, 130, stdout, stderr))
    assert not out.exists()
    saved = sorted(p.name for p in (tmp_path / "out.partial" / "checkpoints").glob("ckpt-*.pt"))
    assert saved and saved[-1] != "ckpt-epoch0040.pt"
    resumed = rcomp([*args, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert (out / "model.pt").exists() and not (tmp_path / "out.partial").exists()
