"""--model by reference (torchvision:NAME, file.py:factory), --weights, and models rcomp cannot fully prune.

The user's model lives in tests/user_models.py, outside the zoo: a depthwise-separable block, a
squeeze-and-excitation block, a concatenation skip and a 1x1 projection shortcut.
"""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rcomp.cli import cli
from rcomp.errors import RcompError
from rcomp.models import create_model
from rcomp.models.reference import load_weights, parse_model_kwargs

HERE = Path(__file__).resolve().parent
USER = f"{HERE / 'user_models.py'}"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_model_kwargs_are_parsed_to_plain_values():
    assert parse_model_kwargs("width=32,se=true,act=relu,drop=0.1,n=None") == {
        "width": 32, "se": True, "act": "relu", "drop": 0.1, "n": None}
    assert parse_model_kwargs(None) == {}
    with pytest.raises(RcompError, match="key=value"):
        parse_model_kwargs("width")


def test_count_torchvision_and_user_models_by_reference():
    tv = run("count", "torchvision:mobilenet_v3_small", "--input", "1,64,64")
    assert tv.exit_code == 0, tv.output
    assert "total" in tv.output.lower()
    small = run("count", f"{USER}:factory", "--input", "3,32,32", "--model-kwargs", "width=8")
    wide = run("count", f"{USER}:factory", "--input", "3,32,32", "--model-kwargs", "width=16")
    assert small.exit_code == 0 and wide.exit_code == 0, small.output + wide.output
    assert small.output != wide.output  # the kwargs reached the factory


def test_torchvision_model_takes_the_data_channels():
    model = create_model("torchvision:resnet18", 7, 1)
    assert model.net.conv1.in_channels == 1
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("ref, extra, message", [
    ("nowhere/missing.py:factory", [], "file not found: nowhere/missing.py"),
    (f"{USER}:nope", [], "has no 'nope'"),
    (f"{USER}:raises", [], "the factory raised ValueError: width must be a multiple of 8"),
    (f"{USER}:not_a_module", [], "returned a dict, not a torch.nn.Module"),
    (f"{USER}:wrong_output", [], "output shape [2, 8] at input 2x3x32x32, expected [N, num_classes] = [2, 10]"),
    (f"{USER}:factory", ["--model-kwargs", "depth=3"], "takes no argument depth"),
    ("torchvision:resnet_19", [], "not a torchvision classification model"),
    ("no_such_package_xyz:build", [], "module not found"),
    ("resnet20", ["--model-kwargs", "width=3"], "not to the zoo"),
])
def test_bad_model_references_exit_2_with_one_line(ref, extra, message):
    result = run("count", "--model", ref, "--input", "3,32,32", *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    if "resnet20" not in ref:  # the training commands check the reference before any work too
        train = run("train", "--model", ref, *extra, "--epochs", "1", "--out", "unused-out", "--no-progress")
        assert train.exit_code == 2 and message in train.output, train.output


def test_weights_mismatch_is_named(tmp_path):
    model = create_model(f"{USER}:factory", 10, 3)
    state = {k: v.clone() for k, v in model.net.state_dict().items()}
    good = tmp_path / "good.pt"
    torch.save({"epoch": 3, "model": state}, good)
    assert load_weights(create_model(f"{USER}:factory", 10, 3), good, "model") == "net"
    with pytest.raises(RcompError, match="pass --weights-key model"):
        load_weights(model, good)
    bad = dict(state)
    del bad["head.bias"]
    bad["extra.weight"] = torch.zeros(1)
    bad["stem.0.weight"] = torch.zeros(16, 1, 3, 3)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(RcompError) as err:
        load_weights(model, tmp_path / "bad.pt")
    text = str(err.value)
    assert "1 missing: head.bias" in text and "1 unexpected: extra.weight" in text
    assert "stem.0.weight [16, 1, 3, 3] vs model [16, 3, 3, 3]" in text


def test_weights_with_pickled_code_are_refused(tmp_path):
    path = tmp_path / "whole-model.pt"
    torch.save(create_model(f"{USER}:factory", 10, 3).net, path)  # a whole pickled module, not a state dict
    with pytest.raises(RcompError, match="weights_only=True refuses"):
        load_weights(create_model(f"{USER}:factory", 10, 3), path)


def test_user_model_pruned_exactly_and_costed_like_fvcore():
    """Every block of the user model is pruned, removal computes what the masks did, cost = fvcore."""
    from rcomp.budget import BudgetController, CostModel, constraints_from_targets
    from rcomp.count import count_model
    from rcomp.masks import attach_masks
    from rcomp.surgery import remove_channels

    torch.manual_seed(0)
    x = torch.rand(1, 3, 16, 16)
    masked = attach_masks(create_model(f"{USER}:factory", 10, 3), "channel", x)
    assert masked.masks.skipped == []
    assert {"net.dws.dw.0", "net.se.fc1", "net.cat.f.0", "net.proj.a.0"} <= {g.name for g in masked.masks.groups}
    cost = CostModel.build(masked, x)
    with torch.no_grad():
        for p in masked.masks.params:
            p.uniform_(0.05, 1.0)
    BudgetController(cost, constraints_from_targets(cost, target_ops=0.5)).project()
    masked.eval()
    pruned = remove_channels(masked, x).model.eval()
    probe = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(masked(probe), pruned(probe), atol=1e-5)
    assert count_model(pruned, (1, 3, 16, 16)).macs == int(cost.ops().item()) <= 0.5 * cost.dense_ops


def test_channel_shuffle_group_left_alone_and_reported():
    from rcomp.masks import attach_masks

    masked = attach_masks(create_model(f"{USER}:shuffle", 10, 3), "channel", torch.rand(1, 3, 16, 16))
    assert [name for name, _ in masked.masks.skipped] == ["net.a.0"]
    assert "transpose of the channel axis" in masked.masks.skipped[0][1]
    assert {g.name for g in masked.masks.groups} == {"net.b.0", "net.c.0"}


def test_model_with_nothing_prunable_exits_2_naming_the_layer(tmp_path):
    result = run("train", "--model", f"{USER}:only_groupnorm", "--target-ops", "0.5", "--epochs", "1",
                 "--out", tmp_path / "out", "--no-progress")
    assert result.exit_code == 2, result.output
    assert "no channel group rcomp can prune" in result.output and "net.norm: GroupNorm" in result.output


@pytest.mark.slow
def test_prune_user_model_with_weights_end_to_end(tmp_path, monkeypatch):
    """``rcomp prune --model tests/user_models.py:factory --weights W`` with a profile; the pruned
    checkpoint rebuilds from its reference and count / export / eval / check take it; posttrain
    with --weights skips its dense phase."""
    monkeypatch.chdir(HERE.parent)
    torch.manual_seed(0)
    weights = tmp_path / "trained.pt"
    torch.save({"state_dict": create_model("tests/user_models.py:factory", 10, 3).net.state_dict()}, weights)
    out = tmp_path / "run"
    result = run("prune", "--profile", "jetson", "--model", "tests/user_models.py:factory", "--data", "digits",
                 "--epochs", "1", "--weights", weights, "--weights-key", "state_dict", "--out", out, "--no-progress",
                 "--attack-set-size", "50", "--square-queries", "0", "--latency-runs", "5")
    assert result.exit_code in (0, 1), result.output  # 1: a robustness floor missed after one epoch
    assert "verdict:" in result.output
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["model_name"] == "tests/user_models.py:factory"
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["macs"] <= 24e6
    for args in (["count", out / "model.pt", "--profile", "jetson"],
                 ["export", out / "model.pt", "--out", tmp_path / "again.onnx"],
                 ["eval", out / "model.pt", "--data", "digits", "--n", "20", "--no-progress"],
                 ["check", tmp_path / "again.onnx", "--profile", "jetson", "--attack-set", out / "adv.npz",
                  "--square-queries", "0", "--latency-runs", "5"]):
        res = run(*args)
        assert res.exit_code in (0, 1), (args, res.output)
    post = run("train", "--model", "tests/user_models.py:factory", "--method", "posttrain", "--target-ops", "0.5",
               "--epochs", "1", "--weights", weights, "--weights-key", "state_dict", "--data", "digits",
               "--out", tmp_path / "post", "--no-progress")
    assert post.exit_code == 0, post.output
    train = json.loads((tmp_path / "post" / "train.json").read_text())
    assert train["dense_history"] == [] and train["phase_seconds"]["dense"] == 0.0
    assert len(train["history"]) == 1 and train["macs"] <= 0.5 * train["dense_macs"]


def test_pruned_foreign_checkpoint_rebuilds_with_kwargs_and_flag(tmp_path):
    """model.pt of a file.py:factory model stores reference, factory kwargs and the normalization flag
    (plain values, weights_only=True) and load_pruned rebuilds the same pruned network from them."""
    from rcomp.budget import BudgetController, CostModel, constraints_from_targets
    from rcomp.masks import attach_masks
    from rcomp.surgery import load_pruned, remove_channels, save_pruned

    ref, kwargs = f"{USER}:factory", {"width": 8}
    torch.manual_seed(0)
    model = create_model(ref, 10, 1, factory_kwargs=kwargs, normalizes=True)
    assert type(model).__name__ == "UserNet" and model.stem[0].in_channels == 1  # no Normalize wrapper
    x = torch.rand(1, 1, 16, 16)
    masked = attach_masks(model, "channel", x)
    cost = CostModel.build(masked, x)
    with torch.no_grad():
        for p in masked.masks.params:
            p.uniform_(0.05, 1.0)
    BudgetController(cost, constraints_from_targets(cost, target_ops=0.4)).project()
    pruned = remove_channels(masked.eval(), x)
    save_pruned(tmp_path / "model.pt", pruned, model_name=ref, input_shape=(1, 16, 16),
                model_kwargs={"num_classes": 10, "in_channels": 1, "mean": [0.5], "std": [0.5],
                              "factory_kwargs": kwargs, "normalizes": True})
    loaded, meta = load_pruned(tmp_path / "model.pt")
    assert meta["model_kwargs"]["factory_kwargs"] == kwargs and meta["model_kwargs"]["normalizes"] is True
    probe = torch.rand(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(probe), pruned.model.eval()(probe))
