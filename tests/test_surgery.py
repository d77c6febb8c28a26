"""rcomp.surgery: physical removal equals masking, the cost model agrees with fvcore, checkpoints."""

import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from rcomp.budget import CostModel
from rcomp.count import count_model, sparse_macs
from rcomp.errors import CheckpointError
from rcomp.masks import attach_masks
from rcomp.models import create_model
from rcomp.surgery import apply_pruning, fold_weight_masks, load_pruned, remove_channels, save_pruned

SHAPE = (3, 32, 32)


def _model(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = create_model(name)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.empty(n).uniform_(-0.5, 0.5, generator=g))
                m.running_var.copy_(torch.empty(n).uniform_(0.5, 2.0, generator=g))
                m.weight.copy_(torch.empty(n).uniform_(0.5, 1.5, generator=g))
                m.bias.copy_(torch.empty(n).uniform_(-0.5, 0.5, generator=g))
    return model.eval()


def _random_channel_masks(masked, seed: int = 1) -> None:
    """Random keep/drop per channel in every group (residual streams included), >= 1 kept per group."""
    g = torch.Generator().manual_seed(seed)
    for i, group in enumerate(masked.masks.groups):
        keep_fraction = 0.2 + 0.7 * torch.rand((), generator=g).item()
        keep = torch.rand(group.size, generator=g) < keep_fraction
        kept = int(torch.randint(group.size, (1,), generator=g))
        keep[kept] = True
        if keep.all() and group.size > 1:
            keep[(kept + 1) % group.size] = False
        masked.masks.set_hard(i, keep)


def _state_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


@pytest.fixture(scope="module")
def pruned_resnet20():
    model = _model("resnet20")
    x = torch.rand(1, *SHAPE)
    masked = attach_masks(model, "channel", x)
    _random_channel_masks(masked, seed=7)
    return masked, remove_channels(masked, x)


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "vgg16", "mobilenet_v2"])
def test_pruned_equals_masked_and_cost_matches_fvcore(name):
    model = _model(name)
    x = torch.rand(4, *SHAPE)
    masked = attach_masks(model, "channel", x[:1])
    _random_channel_masks(masked)
    cost = CostModel.build(masked, x[:1])
    hard = masked.masks.hard()
    assert all(0 < int(h.sum()) < h.numel() for h in hard if h.numel() > 1)  # every group really pruned

    pruned = remove_channels(masked, x[:1])
    net = pruned.model.eval()
    assert not any(m._forward_hooks for m in net.modules())
    with torch.no_grad():
        expected, got = masked(x), net(x)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5

    report = count_model(net, SHAPE)
    assert report.macs == cost.ops().item()
    assert report.params == cost.params().item() == sum(p.numel() for p in net.parameters())
    assert report.macs < cost.dense_ops and report.params < cost.dense_params
    assert len(pruned.pruned_channels) == len(masked.masks.groups)
    for (gname, removed), group, h in zip(pruned.pruned_channels, masked.masks.groups, hard):
        assert gname == group.name and removed == torch.nonzero(h == 0).flatten().tolist()
    # the masked model is untouched and still masks
    with torch.no_grad():
        assert torch.equal(masked(x), expected)


def test_pruned_model_is_really_smaller(pruned_resnet20):
    masked, pruned = pruned_resnet20
    dense = create_model("resnet20")
    dense_params = sum(p.numel() for p in dense.parameters())
    params = sum(p.numel() for p in pruned.model.parameters())
    cost = CostModel.build(masked, torch.rand(1, *SHAPE))
    assert params == cost.params().item() < 0.8 * dense_params
    # serialized size follows the tensor sizes (float32) up to a small per-tensor overhead
    numel = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    dense_bytes, pruned_bytes = _state_bytes(dense), _state_bytes(pruned.model)
    assert pruned_bytes < dense_bytes
    assert abs(pruned_bytes - numel(pruned.model)) < 64_000 and abs(dense_bytes - numel(dense)) < 64_000
    # widths follow the masks: e.g. the first residual stream
    stream = masked.masks.groups[[g.name for g in masked.masks.groups].index("net.conv1")]
    kept = int(masked.masks.hard()[masked.masks.groups.index(stream)].sum())
    assert pruned.model.net.conv1.out_channels == kept == pruned.model.net.layer1[2].conv2.out_channels
    assert pruned.model.net.layer1[0].conv1.in_channels == kept


def test_apply_pruning_replays_on_a_fresh_model(pruned_resnet20):
    _, pruned = pruned_resnet20
    fresh = apply_pruning(create_model("resnet20"), pruned.pruned_channels, torch.rand(1, *SHAPE))
    shapes = {k: v.shape for k, v in fresh.state_dict().items()}
    assert shapes == {k: v.shape for k, v in pruned.model.state_dict().items()}


@pytest.mark.slow
def test_checkpoint_roundtrip_in_another_process(pruned_resnet20, tmp_path):
    _, pruned = pruned_resnet20
    path = tmp_path / "pruned.pt"
    kwargs = {"num_classes": 10, "in_channels": 3, "mean": (0.5, 0.5, 0.5), "std": [0.25, 0.25, 0.25]}
    save_pruned(path, pruned, model_name="resnet20", model_kwargs=kwargs, input_shape=SHAPE, extra={"acc": 0.5, "tag": [1, 2]})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "rcomp.pruned/1" and not list(tmp_path.glob(".*tmp*"))

    model, meta = load_pruned(path)
    assert meta["model_name"] == "resnet20" and meta["input_shape"] == SHAPE and meta["extra"]["tag"] == [1, 2]
    assert meta["regularity"] == "channel" and not model.training
    pruned.model.eval()
    torch.manual_seed(123)
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        # the saved weights (normalization included) are what the rebuilt model uses
        ref = pruned.model(x)
        assert torch.equal(model(x), ref)
    code = textwrap.dedent(
        f"""
        import torch
        from rcomp.surgery import load_pruned
        model, meta = load_pruned({str(path)!r})
        torch.manual_seed(123)
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            y = model(x)
        print(repr(float(y.double().sum())), repr(float(y.double().abs().sum())))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    s, a = (float(v) for v in out.stdout.split())
    assert s == pytest.approx(float(ref.double().sum()), abs=1e-5)
    assert a == pytest.approx(float(ref.double().abs().sum()), abs=1e-5)


def test_checkpoint_errors(pruned_resnet20, tmp_path):
    _, pruned = pruned_resnet20
    with pytest.raises(CheckpointError, match="not found"):
        load_pruned(tmp_path / "missing.pt")

    path = tmp_path / "good.pt"
    save_pruned(path, pruned, model_name="resnet20", model_kwargs={}, input_shape=SHAPE)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_pruned(truncated)
    assert "\n" not in str(info.value)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError):
        load_pruned(text)

    other = tmp_path / "other.pt"
    torch.save({"format": "rcomp.train/1", "state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="format"):
        load_pruned(other)

    # same removals, wrong architecture name: the weights do not fit resnet56
    wrong = tmp_path / "wrong.pt"
    save_pruned(wrong, pruned, model_name="resnet56", model_kwargs={}, input_shape=SHAPE)
    with pytest.raises(CheckpointError, match="checkpoint is for resnet56.*does not match|checkpoint is for resnet56.*do not match") as info:
        load_pruned(wrong)
    assert "\n" not in str(info.value)

    with pytest.raises(CheckpointError, match="plain Python value"):
        save_pruned(tmp_path / "bad.pt", pruned, model_name="resnet20", model_kwargs={}, input_shape=SHAPE, extra={"x": object()})
    assert not (tmp_path / "bad.pt").exists()


def test_fold_weight_masks_keeps_zeros_and_outputs(tmp_path):
    model = _model("resnet20")
    x = torch.rand(4, *SHAPE)
    masked = attach_masks(model, "weight", x[:1])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in masked.masks.params:
            p.copy_(torch.empty(p.shape).uniform_(-1.0, 0.5, generator=g))  # ~2/3 zeros
    cost = CostModel.build(masked, x[:1])
    mask_zeros = sum(int((masked.masks.binary(i) == 0).sum()) for i in range(len(masked.masks)))
    total = sum(p.numel() for p in masked.masks.params)

    pruned = fold_weight_masks(masked)
    net = pruned.model.eval()
    assert pruned.regularity == "weight" and pruned.pruned_channels == []
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in net.modules())
    assert pruned.sparsity == pytest.approx(mask_zeros / total, abs=1e-4)  # plus any exact-zero weights
    with torch.no_grad():
        assert (net(x) - masked(x)).abs().max().item() <= 1e-5
    assert sparse_macs(net, SHAPE) == cost.ops().item()
    report = count_model(net, SHAPE)
    assert report.macs == cost.dense_ops  # dense runtimes run the dense shapes
    assert report.params == cost.dense_params
    # masked model still masked
    assert torch.nn.utils.parametrize.is_parametrized(masked.model.net.conv1)

    path = tmp_path / "w.pt"
    save_pruned(path, pruned, model_name="resnet20", model_kwargs={}, input_shape=SHAPE)
    loaded, meta = load_pruned(path)
    assert meta["regularity"] == "weight" and meta["sparsity"] == pytest.approx(pruned.sparsity)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
