"""rcomp.budget: exact differentiable cost, constraints, penalty schedule and projection."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rcomp.budget import BudgetController, Constraint, CostModel, constraints_from_profile, constraints_from_targets
from rcomp.count import count_model
from rcomp.errors import RcompError
from rcomp.masks import attach_masks
from rcomp.models import create_model

X = torch.rand(1, 3, 32, 32)


def _masked(name="tiny_cnn", regularity="channel", seed=0):
    torch.manual_seed(seed)
    return attach_masks(create_model(name), regularity, X)


def _randomize(masked, seed=1, low=-1.0, high=1.0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in masked.masks.params:
            p.copy_(torch.empty(p.shape).uniform_(low, high, generator=g))


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet20"])
@pytest.mark.parametrize("regularity", ["channel", "weight"])
def test_dense_cost_matches_fvcore(name, regularity):
    masked = _masked(name, regularity)
    cost = CostModel.build(masked, X)
    report = count_model(create_model(name), (3, 32, 32))
    assert cost.dense_ops == report.macs and cost.dense_params == report.params
    assert float(cost.ops().detach()) == report.macs and float(cost.params().detach()) == report.params  # all masks on


def test_build_restores_mode_and_table_adds_up():
    masked = _masked("resnet20")
    masked.train()
    cost = CostModel.build(masked, X)
    assert masked.training
    _randomize(masked)
    rows = cost.layer_table()
    assert sum(r["macs"] for r in rows) == float(cost.ops().detach())
    conv_rows = [r for r in rows if r["kind"] == "conv"]
    assert conv_rows[0]["in"] == 3  # the first conv's inputs are never pruned
    fc = [r for r in rows if r["kind"] == "linear"][0]
    assert fc["out"] == 10  # nor the classifier's outputs


def test_ops_and_params_are_differentiable():
    masked = _masked("tiny_cnn")
    cost = CostModel.build(masked, X)
    (cost.ops() / cost.dense_ops + cost.params() / cost.dense_params).backward()
    for p in masked.masks.params:
        assert p.grad is not None and (p.grad > 0).all()  # every channel costs something


def test_weight_regularity_counts_nonzeros():
    masked = _masked("tiny_cnn", "weight")
    _randomize(masked)
    cost = CostModel.build(masked, X)
    nnz = sum(int(masked.masks.binary(i).sum()) for i in range(len(masked.masks)))
    masked_numel = sum(p.numel() for p in masked.masks.params)
    assert float(cost.params().detach()) == cost.dense_params - masked_numel + nnz
    cost.ops().backward()
    assert all(p.grad is not None for p in masked.masks.params)


@pytest.mark.parametrize("regularity", ["weight", "channel"])
def test_grouped_conv_left_alone_and_costed_exactly(regularity):
    """A non-depthwise grouped conv (ResNeXt, RegNet) is never channel-masked: the groups touching it
    are left alone and reported, the rest is pruned, and the cost model still matches fvcore."""
    import copy

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.c = nn.Conv2d(8, 8, 1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(self.c(self.b(self.a(x))).mean((2, 3)))

    model = Grouped()
    fvcore = count_model(copy.deepcopy(model), X.shape)
    masked = attach_masks(model, regularity, X)
    cost = CostModel.build(masked, X)
    assert (cost.dense_ops, cost.dense_params) == (fvcore.macs, fvcore.params)
    if regularity == "channel":
        assert [g.name for g in masked.masks.groups] == ["c"]
        assert {name for name, _ in masked.masks.skipped} == {"a", "b"}
        assert all("grouped convolution (groups=2)" in why for _, why in masked.masks.skipped)


def test_constraints_from_targets_and_profile():
    cost = CostModel.build(_masked(), X)
    cs = constraints_from_targets(cost, target_ops=0.5, params=1000, mops=2.5)
    assert [(c.metric, c.limit) for c in cs] == [("ops", 0.5 * cost.dense_ops), ("ops", 2.5e6), ("params", 1000.0)]
    assert "--target-ops 0.5" in cs[0].source
    for bad in (0, 1.5, -0.1):
        with pytest.raises(RcompError):
            constraints_from_targets(cost, target_ops=bad)
    profile = SimpleNamespace(name="jetson", budgets=SimpleNamespace(mops=3.0, params=None, ops_fraction=None, params_fraction=0.4))
    cs = constraints_from_profile(cost, profile)
    assert [(c.metric, c.limit) for c in cs] == [("ops", 3e6), ("params", 0.4 * cost.dense_params)]
    assert cs[0].source == "profile jetson: budgets.mops"
    assert constraints_from_profile(cost, SimpleNamespace(name="x", budgets=None)) == []


def test_schedule_penalty_and_freeze():
    masked = _masked()
    cost = CostModel.build(masked, X)
    c = Constraint("ops", 0.5 * cost.dense_ops, "test")
    ctl = BudgetController(cost, [c], penalty_weight=2.0, warmup_fraction=0.3, freeze_fraction=0.8)
    assert ctl.limit_at(c, 0.0) == cost.dense_ops
    assert ctl.limit_at(c, 0.15) == pytest.approx(0.75 * cost.dense_ops)
    assert ctl.limit_at(c, 0.3) == c.limit and ctl.limit_at(c, 1.0) == c.limit
    assert not ctl.should_freeze(0.79) and ctl.should_freeze(0.8) and ctl.should_freeze(1.0)
    late = BudgetController(cost, [c], warmup_fraction=0.2, start_fraction=0.3)
    assert late.limit_at(c, 0.0) == late.limit_at(c, 0.3) == cost.dense_ops  # dense until the masks start
    assert late.limit_at(c, 0.4) == pytest.approx(0.75 * cost.dense_ops) and late.limit_at(c, 0.5) == c.limit
    # all on: within the schedule at the start, over budget at the end
    assert float(ctl.penalty(0.0).detach()) == 0.0
    pen = ctl.penalty(1.0)
    assert pen.dtype == torch.float32 and float(pen.detach()) == pytest.approx(2.0 * (1 / 0.5 - 1))
    pen.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in masked.masks.params)
    assert not ctl.satisfied()
    # under budget: zero penalty, zero gradient
    ctl.project()
    assert ctl.satisfied()
    for p in masked.masks.params:
        p.grad = None
    pen = ctl.penalty(1.0)
    assert float(pen.detach()) == 0.0
    pen.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in masked.masks.params)


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet20"])
@pytest.mark.parametrize("seed", [1, 2])
def test_project_lands_just_below_the_ops_limit(name, seed):
    masked = _masked(name)
    _randomize(masked, seed, low=-0.2, high=1.0)  # mostly on: projection has to switch units off
    cost = CostModel.build(masked, X)
    ctl = BudgetController(cost, constraints_from_targets(cost, target_ops=0.5))
    summary = ctl.project()
    ops, limit = float(cost.ops().detach()), 0.5 * cost.dense_ops
    assert ops <= limit and ops >= 0.95 * limit
    assert summary["ops_after"] == ops and summary["units_changed"] > 0
    assert all(int(h.sum()) >= 1 for h in masked.masks.hard())
    st = ctl.status()
    assert st["satisfied"] and st["ops_ratio"] <= 0.5


def test_project_refills_when_far_under_budget():
    masked = _masked("resnet20")
    _randomize(masked, 3, low=-1.0, high=0.1)  # mostly off: projection switches units back on
    cost = CostModel.build(masked, X)
    assert float(cost.ops().detach()) < 0.3 * cost.dense_ops
    ctl = BudgetController(cost, constraints_from_targets(cost, target_ops=0.6))
    summary = ctl.project()
    assert summary["units_turned_on"] > 0
    assert 0.95 * 0.6 * cost.dense_ops <= float(cost.ops().detach()) <= 0.6 * cost.dense_ops


def test_project_meets_ops_and_params_together():
    masked = _masked("resnet20")
    _randomize(masked, 4)
    cost = CostModel.build(masked, X)
    cs = constraints_from_targets(cost, target_ops=0.6, target_params=0.3)
    ctl = BudgetController(cost, cs)
    ctl.project()
    ops, params = float(cost.ops().detach()), float(cost.params().detach())
    assert ops <= cs[0].limit and params <= cs[1].limit
    assert params >= 0.9 * cs[1].limit  # the binding constraint is met closely


def test_project_weight_regularity():
    masked = _masked("tiny_cnn", "weight")
    _randomize(masked, 5)
    cost = CostModel.build(masked, X)
    cs = constraints_from_targets(cost, target_ops=0.3, target_params=0.4)
    BudgetController(cost, cs).project()
    assert float(cost.ops().detach()) <= cs[0].limit and float(cost.params().detach()) <= cs[1].limit
    assert float(cost.ops().detach()) >= 0.99 * cs[0].limit or float(cost.params().detach()) >= 0.99 * cs[1].limit


def test_unreachable_budget_is_reported():
    masked = _masked()
    cost = CostModel.build(masked, X)
    ctl = BudgetController(cost, [Constraint("ops", 1000.0, "--mops 0.001")])
    with pytest.raises(RcompError, match="cannot be met"):
        ctl.project()


def test_lagrange_multiplier_rises_while_over_budget_and_falls_below():
    from rcomp.budget import MAX_MULTIPLIER

    model = create_model("tiny_cnn")
    masked = attach_masks(model, "channel", torch.rand(1, 3, 16, 16))
    cost = CostModel.build(masked, torch.rand(1, 3, 16, 16))
    ctl = BudgetController(cost, constraints_from_targets(cost, target_ops=0.5), warmup_fraction=0.0, dual_lr=0.1)
    for _ in range(3):
        ctl.update(1.0)  # dense network: 2x over the limit
    assert ctl.multipliers[0] == pytest.approx(0.3)
    for _ in range(1000):
        ctl.update(1.0)
    assert ctl.multipliers[0] == MAX_MULTIPLIER  # bounded: no wind-up
    state = ctl.state_dict()
    ctl2 = BudgetController(cost, constraints_from_targets(cost, target_ops=0.5), warmup_fraction=0.0)
    ctl2.load_state_dict(state)
    assert ctl2.multipliers == ctl.multipliers
    ctl.project()  # now just under the limit: the tightest constraint's multiplier decreases
    before = ctl.multipliers[0]
    ctl.update(1.0)
    assert ctl.multipliers[0] < before


def test_dual_reset_spends_the_stored_pressure_once_the_limit_holds():
    """Anti-windup: a positive multiplier built while over budget drops to zero (then goes on
    integrating the now negative excess) the first step the constraint holds; without the reset
    it only shrinks by one dual step."""
    def controller(dual_reset):
        model = create_model("tiny_cnn")
        masked = attach_masks(model, "channel", torch.rand(1, 3, 16, 16))
        cost = CostModel.build(masked, torch.rand(1, 3, 16, 16))
        return BudgetController(cost, constraints_from_targets(cost, target_ops=0.5), warmup_fraction=0.0,
                                dual_lr=0.1, dual_reset=dual_reset)

    reset, plain = controller(True), controller(False)
    for ctl in (reset, plain):
        for _ in range(5):
            ctl.update(1.0)  # dense network: 2x over the limit
        assert ctl.multipliers[0] == pytest.approx(0.5)  # identical while the constraint is violated
        ctl.project()
        assert ctl.satisfied()
        ctl.update(1.0)
    assert 0.0 < plain.multipliers[0] < 0.5
    assert -0.1 <= reset.multipliers[0] <= 0.0
    # below the limit the reset multiplier keeps integrating down: it may pull masks back on
    reset.update(1.0)
    assert reset.multipliers[0] < 0.0


def test_penalty_pushes_masks_down_only_through_the_budget_term():
    model = create_model("tiny_cnn")
    masked = attach_masks(model, "channel", torch.rand(1, 3, 16, 16))
    cost = CostModel.build(masked, torch.rand(1, 3, 16, 16))
    ctl = BudgetController(cost, constraints_from_targets(cost, target_ops=0.5), warmup_fraction=0.0, penalty_weight=0.0)
    ctl.multipliers = [1.0]
    ctl.penalty(1.0).backward()
    grads = torch.cat([p.grad.flatten() for p in masked.masks.params])
    assert bool((grads >= 0).all()) and bool((grads > 0).any())  # gradient descent lowers M: fewer ops


def _widths(masked):
    return [int(h.sum()) for h in masked.masks.hard()]


def test_allowed_widths_are_multiples_above_the_floor_plus_the_whole_group():
    masks = _masked("resnet20").masks
    masks.min_keep_fraction = 0.2
    sizes = [g.size for g in masks.groups]
    masks.channel_multiple = 8
    for i, size in enumerate(sizes):
        widths = masks.allowed_widths(i)
        assert widths == sorted(widths) and widths[-1] == size
        assert all(w % 8 == 0 for w in widths) and widths[0] >= masks.min_channels(i)
    masks.channel_multiple = 1
    assert masks.allowed_widths(0) == list(range(masks.min_channels(0), sizes[0] + 1))


def _odd_groups():
    """A conv net whose group widths (12, 20) are not multiples of 8: the whole group is allowed too."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                        nn.Conv2d(12, 20, 3, padding=1), nn.BatchNorm2d(20), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(20, 10))
    return attach_masks(net, "channel", X)


@pytest.mark.parametrize("target", [0.9, 0.6, 0.35])
def test_odd_group_widths_project_to_multiples_or_the_whole_group(target):
    masked = _odd_groups()
    masked.masks.channel_multiple = 8
    cost = CostModel.build(masked, X)
    BudgetController(cost, constraints_from_targets(cost, target_ops=target)).project()
    assert float(cost.ops().detach()) <= target * cost.dense_ops
    for width, group in zip(_widths(masked), masked.masks.groups):
        assert width % 8 == 0 or width == group.size


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("target", [0.5, 0.3])
def test_project_to_channel_multiples_is_within_budget_and_maximal(seed, target):
    masked = _masked("resnet20")
    masked.masks.min_keep_fraction = 0.2
    masked.masks.channel_multiple = 8
    _randomize(masked, seed, low=-0.2, high=1.0)
    cost = CostModel.build(masked, X)
    limit = target * cost.dense_ops
    BudgetController(cost, constraints_from_targets(cost, target_ops=target)).project()
    widths = _widths(masked)
    assert float(cost.ops().detach()) <= limit
    assert all(w in masked.masks.allowed_widths(i) for i, w in enumerate(widths))
    # maximal: no group can take its next width without breaking the budget
    scores = [s.detach().clone() for s in masked.masks.scores()]
    for i, w in enumerate(widths):
        allowed = masked.masks.allowed_widths(i)
        if w == allowed[-1]:
            continue
        keep = torch.zeros(len(scores[i]), dtype=torch.bool)
        keep[torch.argsort(scores[i], descending=True)[: allowed[allowed.index(w) + 1]]] = True
        before = masked.masks.hard()[i].bool()
        masked.masks.set_hard(i, keep)
        assert float(cost.ops().detach()) > limit, f"group {i} could have kept {allowed[allowed.index(w) + 1]}"
        masked.masks.set_hard(i, before)


def test_project_to_channel_multiples_keeps_the_best_scoring_channels():
    masked = _masked("resnet20")
    masked.masks.channel_multiple = 8
    _randomize(masked, 7)
    cost = CostModel.build(masked, X)
    BudgetController(cost, constraints_from_targets(cost, target_ops=0.5)).project()
    for score, keep in zip(masked.masks.scores(), masked.masks.hard()):
        kept, dropped = score[keep.bool()], score[~keep.bool()]
        assert dropped.numel() == 0 or kept.min() >= dropped.max()


def test_channel_multiple_that_cannot_meet_the_budget_is_reported():
    masked = _masked("resnet20")
    masked.masks.channel_multiple = 16  # every ResNet20 group at 16 channels or more
    cost = CostModel.build(masked, X)
    with pytest.raises(RcompError, match="multiples of 16"):
        BudgetController(cost, constraints_from_targets(cost, target_ops=0.3)).project()


def test_projection_keeps_the_residual_streams_at_their_own_floor():
    """At 0.3 of the ops these masks project the stage-3 stream to 28 of 64 without the stream floor."""
    target = 0.3
    masked = _masked("resnet20")
    masks = masked.masks
    masks.min_keep_fraction, masks.min_keep_stream_fraction = 0.2, 0.5
    _randomize(masked, seed=3, low=-1.0, high=0.2)  # most units off: the floors decide
    cost = CostModel.build(masked, X)
    BudgetController(cost, constraints_from_targets(cost, target_ops=target)).project()
    widths = _widths(masked)
    assert float(cost.ops().detach()) <= target * cost.dense_ops
    streams = [i for i, g in enumerate(masks.groups) if g.is_stream]
    assert len(streams) == 3 and all(widths[i] >= masks.groups[i].size // 2 for i in streams)
    assert all(w >= masks.min_channels(i) for i, w in enumerate(widths))
