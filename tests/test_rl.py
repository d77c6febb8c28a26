"""AMC-style RL post-train pruning: action clipping, reward monotonicity, the method end to end."""

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from click.testing import CliRunner

from rcomp.cli import cli
from rcomp.rl import (DDPGAgent, RLConfig, build_env, kl_divergence, recalibrate_bn, reward_value, robustness_score,
                      run_episode, search_data, truncated_normal)

LENIENT = Path(__file__).resolve().parent / "data" / "profiles" / "test-lenient.yaml"


def _config(target_ops, min_keep=0.2, target_params=None, channel_multiple=1, min_keep_stream=None):
    return SimpleNamespace(min_keep=min_keep, target_ops=target_ops, target_params=target_params, mops=None, params=None,
                           channel_multiple=channel_multiple, min_keep_stream=min_keep_stream)


@pytest.fixture(scope="module")
def resnet20():
    from rcomp.models import create_model

    torch.manual_seed(0)
    return create_model("resnet20", 10, 3).eval()


# --------------------------------------------------------------------------------------------
# AMC's resource-constrained clipping


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3, 0.1])
def test_clipping_keeps_the_ops_target_reachable_for_any_actions(resnet20, target):
    """Property: after every step, the budget still holds with all later groups at their minimum width."""
    env = build_env(resnet20, _config(target), torch.rand(1, 3, 32, 32))
    rng = random.Random(int(target * 100))
    for trial in range(6):
        biased = [0.0, 1.0, None][trial % 3]  # never prune, always prune fully, uniform
        committed = []
        for t, spec in enumerate(env.specs):
            action = rng.random() if biased is None else biased
            removed, executed = env.clip(t, committed, action)
            wanted = round(action * env.max_ratio * spec.size)
            assert 0 <= removed <= spec.size - spec.min_keep and 0.0 <= executed <= 1.0
            assert removed >= min(wanted, spec.size - spec.min_keep)  # clipping only raises the pruning
            committed.append(spec.size - removed)
            assert env.fits(committed + env.min_keeps()[t + 1:])
            if removed > wanted:  # raised: one channel less would have made the target unreachable
                assert not env.fits(committed[:-1] + [committed[-1] + 1] + env.min_keeps()[t + 1:])
        assert env.values(committed)["ops"] <= target * env.cost.dense_ops + 1e-6


@pytest.mark.parametrize("target", [0.7, 0.5, 0.3])
def test_clipping_to_channel_multiples_keeps_allowed_widths_and_the_target(resnet20, target):
    """With ``channel_multiple`` 8 every executed width is a multiple of 8 (or the whole group), the
    budget stays reachable, and a raised action is raised only as far as the next allowed width."""
    env = build_env(resnet20, _config(target, channel_multiple=8), torch.rand(1, 3, 32, 32))
    rng = random.Random(7)
    for trial in range(6):
        committed = []
        for t, spec in enumerate(env.specs):
            removed, _ = env.clip(t, committed, rng.random() if trial % 3 else float(trial % 2))
            width = spec.size - removed
            assert width in env.widths[t] and (width % 8 == 0 or width == spec.size)
            committed.append(width)
            assert env.fits(committed + env.min_keeps()[t + 1:])
        assert env.values(committed)["ops"] <= target * env.cost.dense_ops + 1e-6
    assert [s.min_keep for s in env.specs] == [w[0] for w in env.widths]


def test_clipping_holds_every_budget_and_groups_walk_in_network_order(resnet20):
    env = build_env(resnet20, _config(0.6, target_params=0.4), torch.rand(1, 3, 32, 32))
    names = [n for n, _ in resnet20.named_modules()]
    positions = [names.index(s.name) for s in env.specs]
    assert positions == sorted(positions) and len(env) == 12
    keeps, transitions = run_episode(env, lambda state: 0.0)
    v = env.values(keeps)
    assert v["ops"] <= 0.6 * env.cost.dense_ops + 1e-6 and v["params"] <= 0.4 * env.cost.dense_params + 1e-6
    states = torch.stack([s for s, *_ in transitions])
    assert states.shape == (12, 9) and float(states.min()) >= 0.0 and float(states.max()) <= 1.0


def test_post_train_searches_never_take_a_stream_below_its_floor(resnet20):
    """The magnitude and RL baselines build their masks with ``budgeted_masks``: the stream floor holds there too."""
    env = build_env(resnet20, _config(0.3, min_keep_stream=0.5), torch.rand(1, 3, 32, 32))
    groups = env.masked.masks.groups
    floors = {s.name: s.min_keep for s in env.specs}
    assert all(floors[g.name] == (g.size + 1) // 2 if g.is_stream else floors[g.name] == -(-g.size // 5) for g in groups)
    keeps, _ = run_episode(env, lambda state: 1.0)  # prune every group as far as it may go
    assert all(k >= s.min_keep for k, s in zip(keeps, env.specs))


def test_unreachable_budget_is_refused(resnet20):
    from rcomp.errors import RcompError

    with pytest.raises(RcompError, match="cannot be met") as refused:
        build_env(resnet20, _config(0.01, min_keep=0.5), torch.rand(1, 3, 32, 32))
    assert "min keep 0.5 of each group" in str(refused.value) and "stream" not in str(refused.value)
    with pytest.raises(RcompError, match="0.5 of each residual stream, widths in multiples of 4"):
        build_env(resnet20, _config(0.1, min_keep_stream=0.5, channel_multiple=4), torch.rand(1, 3, 32, 32))


# --------------------------------------------------------------------------------------------
# reward


def test_reward_rises_with_accuracy_and_with_robustness():
    accs = [0.05, 0.1, 0.3, 0.5, 0.8, 1.0]
    kls = [0.0, 1e-4, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 30.0]  # smaller KL = more robust
    for kl in kls:
        rewards = [reward_value(a, kl) for a in accs]
        assert all(r > 0 for r in rewards)
        assert all(a < b for a, b in itertools.pairwise(rewards)), kl
    for acc in accs:
        rewards = [reward_value(acc, kl) for kl in kls]  # robustness falls along the list
        assert all(a > b for a, b in itertools.pairwise(rewards)), acc
    assert reward_value(0.7, 30.0, "acc") == reward_value(0.7, 0.0, "acc") == 0.7
    assert robustness_score(0.0) == pytest.approx(11.0)  # bounded: a constant output gains little


def test_kl_is_zero_for_equal_predictions_and_positive_otherwise():
    a = torch.randn(8, 10)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(8), atol=1e-6)
    assert bool((kl_divergence(a, torch.randn(8, 10)) > 0).all())


def test_truncated_normal_stays_in_bounds():
    g = torch.Generator().manual_seed(0)
    draws = [truncated_normal(0.95, 0.5, 0.0, 1.0, g) for _ in range(200)]
    assert 0.0 <= min(draws) and max(draws) <= 1.0
    assert truncated_normal(0.3, 0.0, 0.0, 1.0, g) == 0.3


def test_ddpg_learns_a_one_step_bandit():
    """Reward = action, one step per episode: the actor must move towards the largest action."""
    agent = DDPGAgent(9, RLConfig(hidden=32, lr_actor=1e-3, batch_size=32, seed=0), capacity=256)
    state = torch.full((9,), 0.5)
    start = agent.act(state)
    for _ in range(200):
        a = agent.random_action()
        agent.buffer.add(state, a, a, state, True)
        agent.update()
    assert agent.act(state) > max(start + 0.2, 0.8)


def test_adaptive_bn_changes_only_batchnorm_statistics():
    from rcomp.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny_cnn", 10, 3).eval()
    params = {k: v.clone() for k, v in model.named_parameters()}
    bn = model.net.bn_a
    before, momentum = bn.running_mean.clone(), bn.momentum
    recalibrate_bn(model, torch.rand(64, 3, 16, 16))
    assert not model.training and bn.momentum == momentum
    assert not torch.allclose(bn.running_mean, before)
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())


def test_search_images_come_from_train_and_calibration_images_are_disjoint():
    from rcomp.data import load_data

    bundle = load_data("digits", (1, 8, 8), progress=False)
    data = search_data(bundle, RLConfig(search_size=100, calibration_size=50), seed=0)
    assert data.x.shape == (100, 1, 8, 8) and data.x_cal.shape == (50, 1, 8, 8) and len(data.y) == 100
    flat, cal = data.x.flatten(1), data.x_cal.flatten(1)
    assert not any(bool((flat == c).all(1).any()) for c in cal)  # digits has few exact duplicates
    assert len(search_data(bundle, RLConfig(search_size=100, calibration_size=0)).x_cal) == 0


def test_config_validation():
    from rcomp.errors import RcompError

    with pytest.raises(RcompError, match="reward"):
        RLConfig(reward="kl").validate()
    assert RLConfig(episodes=8).warmup_episodes == 2


# --------------------------------------------------------------------------------------------
# end to end through the CLI


@pytest.mark.slow
def test_rcomp_train_method_rl_meets_the_target(tmp_path):
    from rcomp.count import count_model
    from rcomp.models import create_model
    from rcomp.surgery import load_pruned

    profile = yaml.safe_load(LENIENT.read_text())
    profile["input_shape"] = [1, 3, 16, 16]
    (tmp_path / "p16.yaml").write_text(yaml.safe_dump(profile))
    out = tmp_path / "run"
    args = ["train", "--method", "rl", "--target-ops", "0.5", "--model", "tiny_cnn", "--data", "digits",
            "--profile", tmp_path / "p16.yaml", "--epochs", "2", "--batch-size", "64", "--rl-episodes", "3",
            "--no-progress", "--out", out]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    model, _ = load_pruned(out / "model.pt")
    dense = create_model("tiny_cnn", 10, 3)
    assert count_model(model, (1, 3, 16, 16)).macs <= 0.5 * count_model(dense, (1, 3, 16, 16)).macs
    t = json.loads((out / "train.json").read_text())
    assert t["method"] == "rl" and len(t["history"]) == 1 and len(t["dense_history"]) == 1
    assert set(t["phase_seconds"]) == {"dense", "search", "finetune", "total"}
    assert t["budget"]["satisfied"] and t["rl_search"]["best"]["ops_ratio"] <= 0.5
    policy = json.loads((out / "rl-policy.json").read_text())
    assert len(policy["episodes"]) == 3 and [p["keep"] for p in policy["policy"]]


def test_rl_episodes_needs_method_rl(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--target-ops", "0.5", "--rl-episodes", "3", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--rl-episodes applies to --method rl only" in result.output
