"""The command line as a user meets it: subcommands, counts, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from rcomp.cli import cli

REPO = Path(__file__).resolve().parent.parent


def run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_help_lists_every_subcommand():
    code, out = run("--help")
    assert code == 0
    for sub in ("prune", "train", "export", "count", "check", "eval", "profiles"):
        assert f"  {sub}" in out


@pytest.mark.parametrize("sub", ["prune", "train", "export", "count", "check", "eval", "profiles"])
def test_every_subcommand_has_help_with_examples(sub):
    code, out = run(sub, "--help")
    assert code == 0
    assert "Examples:" in out


def test_count_prints_the_resnet20_closed_form(tmp_path):
    code, out = run("count", "--model", "resnet20", "--input", "1,3,32,32", "--json", str(tmp_path / "c.json"))
    assert code == 0
    assert "40.813 MOps, 272,474 params" in out
    assert "not counted:" in out and "add x9" in out
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["macs"] == 40_813_184 and doc["params"] == 272_474


def test_count_resnet56_closed_form():
    code, out = run("count", "resnet56")
    assert code == 0 and "125.748 MOps" in out


def test_count_against_a_profile_gives_verdicts():
    code, out = run("count", "resnet20", "--profile", "jetson")
    assert code == 1  # dense ResNet20 (40.8 MOps) is over jetson's 24 MOps
    assert "mops" in out and "FAIL" in out


def test_profiles_list_shows_the_shipped_profiles():
    code, out = run("profiles", "list")
    assert code == 0
    for name in ("jetson", "raspberry-pi", "automotive-ecu"):
        assert name in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["count", "resnet21"], "unknown model 'resnet21'"),
        (["train", "--model", "resnet21", "--out", "x"], "unknown model 'resnet21'"),
        (["train", "--model", "tiny_cnn", "--data", "imagefolder:/does/not/exist", "--epochs", "1", "--out", "{tmp}/o"], "/does/not/exist"),
        (["train", "--model", "tiny_cnn", "--data", "nosuchkind:abc", "--epochs", "1", "--out", "{tmp}/o"], "nosuchkind"),
        (["train", "--model", "tiny_cnn", "--data", "imagefolder:", "--epochs", "1", "--out", "{tmp}/o"], "imagefolder"),
        (["count", "resnet20", "--input", "1,3,a,32"], "--input"),
        (["prune", "--profile", "no-such-board"], "no-such-board"),
        (["train", "--model", "tiny_cnn", "--method", "dense", "--target-ops", "0.5", "--out", "{tmp}/o"], "--method dense"),
        (["train", "--model", "tiny_cnn", "--method", "intrain", "--out", "{tmp}/o"], "needs a budget"),
        (["train", "--model", "tiny_cnn", "--eps", "300/255", "--out", "{tmp}/o"], "(0, 1]"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-m", "rcomp", *args], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert message in proc.stderr, proc.stderr
    assert len([line for line in lines if line.startswith("error:") or line.startswith("Error:")]) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["0", "two", "1.5"])
def test_recipe_finetune_epochs_must_be_a_positive_integer(tmp_path, value):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"finetune_epochs: {value}\n")
    code, out = run("train", "--model", "tiny_cnn", "--method", "posttrain", "--target-ops", "0.5",
                    "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2 and "finetune_epochs" in out and "an integer" in out, out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("line", ["grad_clip: abc", "mops: abc", "mask_weight_decay: -1e-4", "min_keep_stream: abc", "min_keep_stream: 2"])
def test_recipe_optional_numbers_are_checked_as_numbers(tmp_path, line):
    """Keys whose default is None (off) were once taken as text and failed mid-run with a traceback."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(line + "\n")
    code, out = run("train", "--model", "tiny_cnn", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2 and line.split(":")[0] in out and "expected a number" in out, out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("line", ["lr_restart: true", "mask_norm_stats: batch", "width_probe_every: 10",
                                  "mask_momentum: 0.99", "mask_lr_scale: 0.1"])
def test_recipe_naming_a_removed_option_says_it_was_removed_and_where_it_last_existed(tmp_path, line):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\n" + line + "\n")
    code, out = run("train", "--model", "tiny_cnn", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert f"{line.split(':')[0]}: was removed" in out and "6311216" in out, out
    assert not (tmp_path / "o").exists()


def test_recipe_with_unknown_key_names_file_and_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("epochs: 2\nlr_maxx: 0.1\n")
    code, out = run("train", "--model", "tiny_cnn", "--recipe", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2
    assert "recipe.yaml" in out and "lr_maxx" in out and "lr_max" in out


def test_no_hflip_reaches_the_training_recipe():
    """Traffic signs: a mirrored 'turn left' is a 'turn right', so the flag must turn the flips off."""
    from rcomp.pipeline import build_job

    base = {"data_spec": "digits", "model_name": "tiny_cnn"}
    assert build_job(dict(base, hflip=False), profile=None, out="x", method="dense").train.hflip is False
    assert build_job(dict(base), profile=None, out="x", method="dense").train.hflip is True


def test_augmentation_without_flips_never_mirrors_an_image():
    import torch

    from rcomp.data import augment_batch

    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4).repeat(16, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(x, padding=0, flip=False, generator=g), x)
    flipped = augment_batch(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    mirrored = [torch.equal(f, xi.flip(-1)) for f, xi in zip(flipped, x)]
    assert any(mirrored) and all(m or torch.equal(f, xi) for m, f, xi in zip(mirrored, flipped, x))
