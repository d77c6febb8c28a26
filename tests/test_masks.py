"""Trainable masks: STE gradients, exact binarization, exact zeros downstream of a pruned group."""

import pytest
import torch
from torch import nn

from rcomp.errors import RcompError
from rcomp.masks import MASK_INIT, SCORE_INIT_LOW, ChannelMasks, attach_masks, ste_binarize
from rcomp.models import create_model


def test_binarized_mask_is_exactly_zero_or_one():
    m = torch.linspace(-3, 3, 101)
    mb = ste_binarize(m)
    assert set(mb.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mb, (m > 0).float())


def test_straight_through_estimator_passes_gradient_to_m():
    m = torch.tensor([-0.5, 0.2, 1.0], requires_grad=True)
    (ste_binarize(m) * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    expected = 0.5 * (1 - torch.tanh(m.detach()) ** 2) * torch.tensor([1.0, 2.0, 3.0])
    assert torch.allclose(m.grad, expected)


def test_masks_start_on_and_reach_the_loss():
    model = create_model("tiny_cnn")
    masked = attach_masks(model, "channel", torch.rand(1, 3, 16, 16))
    assert masked.masks.density() == 1.0
    masked(torch.rand(4, 3, 16, 16)).logsumexp(1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in masked.masks.params)


def test_resnet20_has_the_twelve_coupled_groups():
    masked = attach_masks(create_model("resnet20"), "channel", torch.rand(1, 3, 32, 32))
    groups = masked.masks.groups
    assert len(groups) == 12  # 3 residual streams + 9 block-internal
    streams = [g for g in groups if len(g.apply_at) > 1]
    assert sorted(len(g.apply_at) for g in streams) == [4, 4, 4]  # 3 blocks' bn2 + stem/shortcut bn


def _record_outputs(model: nn.Module, names):
    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone())) for n in names]
    return seen, hooks


def test_pruned_channel_is_exactly_zero_downstream_including_residual_adds():
    torch.manual_seed(0)
    model = create_model("resnet20")
    masked = attach_masks(model, "channel", torch.rand(1, 3, 32, 32))
    masks: ChannelMasks = masked.masks
    stream = next(g for g in masks.groups if g.name == "net.conv1")  # stage-1 residual stream
    gi = masks.groups.index(stream)
    off = torch.zeros(stream.size, dtype=torch.bool)
    off[[1, 5, 9]] = True
    masks.set_hard(gi, ~off)
    # every block output of stage 1 is relu(masked bn2 + shortcut): the add must keep the zeros
    block_outputs = ["net.layer1.0", "net.layer1.1", "net.layer1.2"]
    seen, hooks = _record_outputs(model, block_outputs + ["net.layer1.0.bn2"])
    model.train()
    masked(torch.rand(8, 3, 32, 32))  # train-mode BN: biases and batch statistics are non-zero
    masked.eval()(torch.rand(8, 3, 32, 32))
    for h in hooks:
        h.remove()
    for name in block_outputs:
        assert torch.count_nonzero(seen[name][:, off]) == 0, name
        assert torch.count_nonzero(seen[name][:, ~off]) > 0, name


def test_a_group_never_loses_all_its_channels():
    masked = attach_masks(create_model("tiny_cnn"), "channel", torch.rand(1, 3, 16, 16))
    masks = masked.masks
    masks.set_hard(0, torch.zeros(masks.groups[0].size, dtype=torch.bool))
    assert masks.hard()[0].sum() == 1


def test_weight_masks_multiply_the_weights():
    torch.manual_seed(0)
    model = create_model("tiny_cnn")
    masked = attach_masks(model, "weight", torch.rand(1, 3, 16, 16))
    masks = masked.masks
    keep = torch.rand(masks.params[0].shape) > 0.5
    masks.set_hard(0, keep)
    conv = dict(model.named_modules())[masks.names[0]]
    assert torch.equal(conv.weight == 0, ~keep | (conv.parametrizations.weight.original == 0))
    masked(torch.rand(2, 3, 16, 16)).sum().backward()
    assert masks.params[0].grad is not None
    assert sum(1 for k in masked.state_dict() if k.startswith("masks.")) == len(masks)


def test_a_mask_that_does_not_learn_is_reused_until_m_or_its_floor_changes():
    masked = attach_masks(create_model("tiny_cnn"), "channel", torch.rand(1, 3, 16, 16))
    masks = masked.masks
    with torch.no_grad():
        masks.params[0].copy_(-torch.arange(1, masks.groups[0].size + 1, dtype=torch.float))  # all off
    learning = masks.binary(0)  # requires grad: the STE, with its graph
    assert learning.requires_grad
    masks.freeze()
    constant = masks.binary(0)
    assert not constant.requires_grad and torch.equal(constant, learning.detach())
    assert masks.binary(0) is constant  # M unchanged: not binarized again
    masks.min_keep_fraction = 0.5  # the floor the binarization reads
    assert int(masks.binary(0).sum()) == masks.min_channels(0) > int(constant.sum())
    masks.set_hard(0, torch.ones(masks.groups[0].size, dtype=torch.bool))
    assert bool(masks.binary(0).all())
    masks.freeze(False)
    with torch.no_grad():  # evaluation: constant as well
        assert masks.binary(0) is masks.binary(0)


def test_a_frozen_mask_set_anew_reaches_the_next_forward():
    torch.manual_seed(0)
    model = create_model("tiny_cnn").eval()
    masked = attach_masks(model, "channel", torch.rand(1, 3, 16, 16))
    masks = masked.masks
    masks.freeze()
    producer = masks.groups[0].apply_at[0].module
    seen, hooks = _record_outputs(model, [producer])
    x = torch.rand(2, 3, 16, 16)
    masked(x)
    assert torch.count_nonzero(seen[producer][:, 0]) > 0
    keep = torch.ones(masks.groups[0].size, dtype=torch.bool)
    keep[0] = False
    masks.set_hard(0, keep)
    masked(x)
    for h in hooks:
        h.remove()
    assert torch.count_nonzero(seen[producer][:, 0]) == 0


def test_min_keep_fraction_keeps_the_best_channels_of_a_group():
    masked = attach_masks(create_model("tiny_cnn"), "channel", torch.rand(1, 3, 16, 16))
    masks = masked.masks
    masks.min_keep_fraction = 0.25
    size = masks.groups[0].size
    with torch.no_grad():
        masks.params[0].copy_(-torch.arange(1, size + 1, dtype=torch.float))  # all off, channel 0 the best
    hard = masks.hard()[0]
    assert int(hard.sum()) == masks.min_channels(0) == -(-size // 4)
    assert hard[: masks.min_channels(0)].all()


@pytest.mark.parametrize("regularity", ["channel", "weight"])
def test_masks_initialised_from_scores_stay_on_and_keep_the_order(regularity):
    masked = attach_masks(create_model("tiny_cnn"), regularity, torch.rand(1, 3, 16, 16))
    masks = masked.masks
    torch.manual_seed(0)
    scores = [torch.rand(p.shape) + i for i, p in enumerate(masks.params)]
    masks.init_from_scores(scores)
    flat_m = torch.cat([p.detach().flatten() for p in masks.params])
    flat_s = torch.cat([s.flatten() for s in scores])
    assert float(flat_m.min()) == pytest.approx(SCORE_INIT_LOW) and float(flat_m.max()) == pytest.approx(MASK_INIT)
    assert bool(masks.snapshot().all())  # nothing switched off: the forward pass is unchanged
    in_score_order = flat_m[torch.argsort(flat_s)]
    assert bool((in_score_order[1:] >= in_score_order[:-1]).all())  # a more important unit starts further on
    with pytest.raises(RcompError):
        masks.init_from_scores(scores[:-1])


def test_switch_offs_per_step_are_limited_to_the_most_decisive():
    masked = attach_masks(create_model("tiny_cnn"), "channel", torch.rand(1, 3, 16, 16))
    masks = masked.masks
    before = masks.on_states()
    with torch.no_grad():
        masks.params[0][:5] = torch.tensor([-0.5, -0.1, -0.9, -0.2, -0.3])
    held = masks.limit_switch_off(before, max_off=2)
    assert held == 3
    off = (masks.params[0] <= 0).nonzero().flatten().tolist()
    assert off == [0, 2]  # the two most negative went off; the others stay on at the boundary
    assert bool((masks.params[0][[1, 3, 4]] > 0).all())


def test_masks_are_clipped_to_the_bound():
    masked = attach_masks(create_model("tiny_cnn"), "channel", torch.rand(1, 3, 16, 16))
    with torch.no_grad():
        masked.masks.params[0].fill_(-7.0)
    masked.masks.clip_(1.0)
    assert float(masked.masks.params[0].detach().min()) == -1.0


@pytest.mark.parametrize("name, streams", [("resnet20", {"net.conv1", "net.layer2.0.shortcut.0", "net.layer3.0.shortcut.0"}),
                                            ("tiny_cnn", {"net.down.0"}), ("vgg16", set())])
def test_residual_streams_are_the_groups_several_layers_add_into(name, streams):
    masks = attach_masks(create_model(name), "channel", torch.rand(1, 3, 32, 32)).masks
    assert {g.name for g in masks.groups if g.is_stream} == streams


def test_min_keep_stream_sets_the_floor_of_the_streams_only():
    masks = attach_masks(create_model("resnet20"), "channel", torch.rand(1, 3, 32, 32)).masks
    masks.min_keep_fraction = 0.2
    masks.min_keep_stream_fraction = 0.5
    for i, group in enumerate(masks.groups):
        assert masks.min_channels(i) == -(-group.size * (5 if group.is_stream else 2) // 10)
    with torch.no_grad():
        for p in masks.params:
            p.fill_(-1.0)  # all off: every group at its floor
    assert [int(h.sum()) for h in masks.hard()] == [masks.min_channels(i) for i in range(len(masks))]


def _width_shares(masked, x, y) -> dict[str, float]:
    """|sum| / sum of |.| of each group's loss gradient with respect to its 0/1 mask values."""
    params = list(masked.masks.params)
    grads = torch.autograd.grad(nn.functional.cross_entropy(masked(x), y), params)
    slopes = [0.5 * (1 - torch.tanh(p.detach()) ** 2) for p in params]
    return {group.name: float((g / s).sum().abs() / (g / s).abs().sum())
            for group, g, s in zip(masked.masks.groups, grads, slopes)}


def test_batchnorm_leaves_the_loss_no_say_in_a_group_width_only_the_last_stream_feels_it():
    """Why the budget, not the loss, sets the widths (README, bench/mask_gradients.py): with BatchNorm on
    batch statistics after every consumer of a group, scaling the whole group leaves the loss unchanged,
    so the mask gradients of its channels sum to zero. Only ResNet20's stage-3 stream, read by the
    classifier through the pooling, escapes; on running statistics (eval mode) no group does."""
    torch.manual_seed(0)
    masked = attach_masks(create_model("resnet20"), "channel", torch.rand(1, 3, 16, 16))
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 10, (16,))
    train_shares = _width_shares(masked.train(), x, y)
    last_stream = "net.layer3.0.shortcut.0"
    assert all(share < 1e-4 for name, share in train_shares.items() if name != last_stream)
    assert train_shares[last_stream] > 1e-2
    assert min(_width_shares(masked.eval(), x, y).values()) > 1e-3
