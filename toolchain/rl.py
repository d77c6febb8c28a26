"""AMC-style RL post-train pruning with a KL robustness reward: the poster's "Fast AT + RLPrune".

The comparison system of the poster (its table "comparison with RL based pruning"): AMC
(He et al., ECCV 2018) searches per-layer pruning ratios for a FastAT-trained dense model, the
reward is made robustness-aware with a KL score, and the chosen network is FastAT fine-tuned.

1. **Dense.** FastAT-train the dense model (the same epoch split as ``rcomp.posttrain``).
2. **Search.** A DDPG agent walks the prunable channel groups (``ChannelMasks.groups``, in network
   order) one by one. State = AMC's layer embedding (:data:`STATE_FEATURES`), each feature in
   [0, 1]. Action = the group's pruning ratio in [0, 1 - min_keep], rounded to the nearest width
   the masks allow (``ChannelMasks.allowed_widths``: every width, or multiples of the config's
   ``channel_multiple``); the group's lowest group-magnitude channels (``rcomp.posttrain.magnitude_scores``) are switched off with
   ``masks.set_hard`` — no surgery during the search. AMC's resource-constrained rule raises each
   action to the least pruning that keeps every budget reachable when all later groups prune as
   much as they may (:meth:`PruningEnv.clip`), so *every* episode meets the target, exactly as
   counted by ``CostModel`` (the fvcore convention). An episode ends with one evaluation without
   fine-tuning: the BatchNorm statistics are re-estimated for the pruned network (adaptive BN,
   :func:`recalibrate_bn`; no weight changes), then accuracy and PGD-KL are measured on a fixed
   subset of the *training* images (as in AMC, so the validation split stays unbiased):
   ``reward = acc · log10(ψ_kl)`` (:func:`reward_value`), or AMC's plain accuracy.
3. **Fine-tune.** The best-reward policy is applied, the channels are removed
   (``rcomp.surgery.remove_channels``) and the network is FastAT fine-tuned for the rest of the epochs.

Exploration follows AMC: uniformly random actions for the warm-up episodes, then the actor's
action plus truncated-normal noise whose sigma decays by ``sigma_decay`` per episode; every
transition of an episode receives the episode's reward, normalised by a moving baseline in each
update; target networks follow by soft updates.

Resumable like post-train pruning: both training phases checkpoint per epoch; the search is not
checkpointed (it restarts if interrupted) but its result is written atomically to
``rl-policy.json`` and the pruned network to ``rl-pruned.pt``, so a resumed run skips what is done.
``phase_seconds`` accounts the cost: dense, search (episodes plus the final surgery), finetune, total.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rcomp.errors import CheckpointError, RcompError
from rcomp.posttrain import PostTrainResult, PruneOutcome, split_epochs, train_in_three_phases

POLICY_FILE = "rl-policy.json"
POLICY_FORMAT = "rcomp.rl-policy/1"
REWARDS = ("acc_kl", "acc")
STATE_FEATURES = ("index", "out_channels", "in_channels", "stride", "kernel", "ops", "ops_reduced", "ops_rest",
                  "previous_action")


@dataclass
class RLConfig:
    """Search settings; training settings stay in ``TrainConfig``.

    The DDPG settings are AMC's (``amc_search.py``: 300 hidden units, lr 1e-4 actor / 1e-3 critic,
    batch 64, tau 0.01, discount 1, sigma 0.5 decaying by 0.95, baseline rate 0.5, replay of 100
    per layer). AMC runs 100 warm-up + 800 episodes; the default here is 100 in all, because each
    episode also runs a PGD attack: on ResNet20 / CIFAR-10 one episode costs about 8 s on one CPU core.
    """

    episodes: int = 100
    warmup: int | None = None  # random-action episodes; None: a quarter of the episodes
    reward: str = "acc_kl"  # acc_kl (the poster) | acc (AMC)
    search_size: int = 500  # fixed training images the reward is measured on
    calibration_size: int = 500  # other training images for adaptive BN (0: off, AMC without compensation)
    pgd_steps: int = 3
    kl_offset: float = 0.1  # kappa in psi_kl = 1 + 1 / (KL + kappa)
    hidden: int = 300
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    batch_size: int = 64
    tau: float = 0.01
    discount: float = 1.0
    sigma: float = 0.5
    sigma_decay: float = 0.95
    moving_alpha: float = 0.5
    replay_per_group: int = 100
    seed: int = 0

    @property
    def warmup_episodes(self) -> int:
        return self.episodes // 4 if self.warmup is None else min(self.warmup, self.episodes)

    def validate(self) -> None:
        if self.episodes < 1:
            raise RcompError(f"the RL search needs at least 1 episode, got {self.episodes}")
        if self.reward not in REWARDS:
            raise RcompError(f"unknown RL reward {self.reward!r}; expected one of {', '.join(REWARDS)}")
        if self.search_size < 1 or self.pgd_steps < 1 or self.kl_offset <= 0 or self.calibration_size < 0:
            raise RcompError("search_size and pgd_steps must be at least 1, calibration_size >= 0 and kl_offset > 0")


# --------------------------------------------------------------------------------------------
# reward


def kl_divergence(logits_clean: Tensor, logits_adv: Tensor) -> Tensor:
    """Per-example KL(p(x) ‖ p(x_adv)) in nats, from logits."""
    log_p, log_q = F.log_softmax(logits_clean, 1), F.log_softmax(logits_adv, 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)


def robustness_score(kl: float, kl_offset: float = 0.1) -> float:
    """ψ_kl = 1 + 1 / (KL + κ): larger for a more robust network (predictions that move less).

    The poster does not spell ψ_kl out. Read literally as 1 / KL, log10 ψ turns negative once
    KL > 1 nat, and a *more accurate* network would then get a *lower* reward. The ``1 +`` keeps
    log10 ψ > 0 for every KL; κ bounds it by log10(1 + 1/κ) (1.04 for κ = 0.1), so a collapsed
    network — constant output, KL = 0 — cannot buy reward with robustness it gets for free.
    """
    return 1.0 + 1.0 / (max(float(kl), 0.0) + kl_offset)


def reward_value(accuracy: float, kl: float | None, kind: str = "acc_kl", kl_offset: float = 0.1) -> float:
    """The episode's reward: ``acc · log10(ψ_kl)`` (``acc_kl``, the poster) or ``acc`` (AMC).

    acc = clean top-1 accuracy of the pruned, not fine-tuned network on the search images;
    KL = mean over those images of KL(p(x) ‖ p(x_adv)) in nats, x_adv = PGD (cross-entropy, eps 8/255,
    seeded random start) crafted on the pruned network itself (:func:`evaluate_pruned`);
    ψ_kl = 1 + 1 / (KL + κ) (:func:`robustness_score`). The reward is > 0 for acc > 0, strictly
    increasing in acc, and strictly increasing in robustness (decreasing in KL) for acc > 0.
    """
    if kind == "acc":
        return float(accuracy)
    if kind == "acc_kl":
        return float(accuracy) * math.log10(robustness_score(kl, kl_offset))
    raise RcompError(f"unknown RL reward {kind!r}; expected one of {', '.join(REWARDS)}")


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: Tensor, chunk: int = 100) -> None:
    """Adaptive BN (Li et al., EagleEye, ECCV 2020): re-estimate the BatchNorm statistics of the
    pruned network on ``x``; no weight changes, every other module stays in eval mode.

    Removing channels shifts what every later BatchNorm sees. With the dense network's statistics,
    measured on a FastAT ResNet20 (digits, 16x16), every policy at 0.3-0.5 of the ops scored chance
    accuracy (9-15 %) and the reward carried no signal; recalibrated, the same policies spread over
    25-99 %. AMC compensates the same shift by least-squares reconstruction of the next layer.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta, was_training = [bn.momentum for bn in norms], model.training
    model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the chunks
        bn.train()
    try:
        for i in range(0, len(x), chunk):
            model(x[i:i + chunk])
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        model.train(was_training)


def evaluate_pruned(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, steps: int, seed: int = 0,
                    chunk: int = 250) -> tuple[float, float | None]:
    """(clean accuracy, mean KL(p(x) ‖ p(x_adv))) with PGD-``steps`` crafted on ``model`` itself.

    The PGD random start comes from a generator seeded the same way in every episode, so two
    policies are compared on the same attack, not on attack noise. ``steps=0`` skips the attack
    (AMC's accuracy reward needs none) and returns KL None.
    """
    from functools import partial

    from rcomp.attacks import evaluate_examples, pgd

    model.eval()
    attacks = {}
    if steps:
        g = torch.Generator(device=x.device).manual_seed(seed)
        attacks["pgd"] = partial(pgd, eps=eps, alpha=max(eps / 4, 2.5 * eps / steps), steps=steps, generator=g)
    res = evaluate_examples(model, (x, y), attacks, batch_size=chunk, keep_logits=bool(steps))
    if not steps:
        return res.accuracy(), None
    return res.accuracy(), float(kl_divergence(res.logits["clean"], res.logits["pgd"]).mean())


# --------------------------------------------------------------------------------------------
# environment


@dataclass(frozen=True)
class GroupSpec:
    """One step of an episode: a channel group and the static part of its embedding."""

    index: int  # position in masks.groups
    name: str
    size: int
    min_keep: int
    in_channels: int
    stride: int
    kernel: int


class PruningEnv:
    """The masked dense model as AMC's environment: one step per channel group, in network order.

    ``keeps`` (a list of channels kept per step) describes a policy; :meth:`apply` sets the hard
    masks to it, keeping each group's highest group-magnitude channels.
    """

    def __init__(self, masked, cost, constraints, scores: list[Tensor], max_ratio: float):
        self.masked, self.cost, self.constraints = masked, cost, list(constraints)
        self.max_ratio = float(max_ratio)
        self.specs = _group_specs(masked)
        self.widths = [masked.masks.allowed_widths(s.index) for s in self.specs]
        self.ranks = [torch.argsort(scores[s.index], descending=True, stable=True) for s in self.specs]
        self.group_ops = [self._prunable_ops(t) for t in range(len(self))]
        self.static = _minmax_columns(torch.tensor(
            [[t, s.size, s.in_channels, s.stride, s.kernel, self.group_ops[t]] for t, s in enumerate(self.specs)],
            dtype=torch.float64))
        if not self.fits(self.min_keeps()):
            raise RcompError("the budget cannot be met even with every group at its minimum width "
                             f"({self._floors()}): " + self._over_budget())

    def __len__(self) -> int:
        return len(self.specs)

    def _floors(self) -> str:
        """The floors the minimum widths come from, as the user set them (recipe keys)."""
        masks = self.masked.masks
        floors = f"min keep {1 - self.max_ratio:g} of each group"
        stream = masks.min_keep_stream_fraction
        if stream is not None and any(masks.groups[s.index].is_stream for s in self.specs):
            floors += f", {stream:g} of each residual stream"
        if masks.channel_multiple > 1:
            floors += f", widths in multiples of {masks.channel_multiple}"
        return floors

    # ---------------------------------------------------------------- costs
    def dense_keeps(self) -> list[int]:
        return [s.size for s in self.specs]

    def min_keeps(self) -> list[int]:
        return [s.min_keep for s in self.specs]

    def apply(self, keeps: list[int]) -> None:
        """Hard masks = the top-``keeps[t]`` channels of every group by group magnitude."""
        masks = self.masked.masks
        for spec, rank, k in zip(self.specs, self.ranks, keeps):
            keep = torch.zeros(spec.size, dtype=torch.bool)
            keep[rank[:k]] = True
            masks.set_hard(spec.index, keep)

    def values(self, keeps: list[int]) -> dict[str, float]:
        self.apply(keeps)
        with torch.no_grad():
            return {m: float(v) for m, v in self.cost.values().items()}

    def fits(self, keeps: list[int]) -> bool:
        """Every budget holds for ``keeps`` (same tolerance as ``BudgetController.project``)."""
        v = self.values(keeps)
        return all(v[c.metric] <= c.limit + 1e-6 for c in self.constraints)

    def _prunable_ops(self, t: int) -> float:
        """The ops group ``t`` can save on its own: AMC's per-layer FLOPs, for coupled groups."""
        keeps = self.dense_keeps()
        keeps[t] = self.specs[t].min_keep
        return self.cost.dense_ops - self.values(keeps)["ops"]

    def _over_budget(self) -> str:
        v = self.values(self.min_keeps())
        return ", ".join(f"{c.metric} {v[c.metric]:,.0f} > {c.limit:,.0f}" for c in self.constraints
                         if v[c.metric] > c.limit + 1e-6)

    # ---------------------------------------------------------------- AMC's action clipping
    def required_pruning(self, t: int, committed: list[int]) -> int:
        """Fewest channels step ``t`` must remove so every budget stays reachable.

        AMC's resource-constrained rule: with the earlier groups at their committed widths and the
        later ones pruned as far as they may, the largest width of group ``t`` that still fits is
        found by bisection (costs grow monotonically with the kept channels).
        """
        spec, future = self.specs[t], self.min_keeps()[t + 1:]
        def fits(k: int) -> bool:
            return self.fits([*committed, k, *future])

        if fits(spec.size):
            return 0
        widths = self.widths[t]
        lo, hi = 0, len(widths) - 1  # indices into the allowed widths: lo fits, hi does not
        if not fits(widths[lo]):
            raise RcompError(f"budget unreachable at group {spec.name}: earlier groups kept too many channels")
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(widths[mid]) else (lo, mid)
        return spec.size - widths[lo]

    def clip(self, t: int, committed: list[int], action: float) -> tuple[int, float]:
        """(channels removed, executed action in [0, 1]) for the agent's normalised ``action``."""
        spec = self.specs[t]
        wanted = round(min(max(float(action), 0.0), 1.0) * self.max_ratio * spec.size)
        keep = min(self.widths[t], key=lambda w: (abs(w - (spec.size - wanted)), w))  # nearest allowed width
        removed = min(max(spec.size - keep, self.required_pruning(t, committed)), spec.size - spec.min_keep)
        return removed, self.normalised(t, removed)

    def normalised(self, t: int, removed: int) -> float:
        if self.max_ratio <= 0:
            return 0.0
        return min(1.0, removed / self.specs[t].size / self.max_ratio)

    # ---------------------------------------------------------------- state
    def state(self, t: int, committed: list[int], previous: float) -> Tensor:
        """AMC's embedding of step ``t``: static features min-max scaled, dynamic ones as fractions."""
        keeps = list(committed) + self.dense_keeps()[len(committed):]
        reduced = 1.0 - self.values(keeps)["ops"] / self.cost.dense_ops
        rest = sum(self.group_ops[t + 1:]) / max(sum(self.group_ops), 1.0)
        dynamic = torch.tensor([reduced, rest, previous], dtype=torch.float64)
        return torch.cat([self.static[t], dynamic]).float().clamp(0.0, 1.0)


def _group_specs(masked) -> list[GroupSpec]:
    """The channel groups in network order (the order of their root modules in the model)."""
    modules = list(masked.model.named_modules())
    position = {name: i for i, (name, _) in enumerate(modules)}
    lookup = dict(modules)
    masks = masked.masks
    specs = []
    for i, group in enumerate(masks.groups):
        root = lookup[group.name]
        conv = isinstance(root, nn.Conv2d)
        specs.append(GroupSpec(i, group.name, group.size, masks.allowed_widths(i)[0],
                               root.in_channels if conv else root.in_features,
                               root.stride[0] if conv else 1, root.kernel_size[0] if conv else 1))
    return sorted(specs, key=lambda s: position[s.name])


def _minmax_columns(table: Tensor) -> Tensor:
    lo, hi = table.min(0).values, table.max(0).values
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return (table - lo) / span


# --------------------------------------------------------------------------------------------
# DDPG


def _mlp_head(hidden: int) -> nn.Linear:
    """AMC initialises the output layer in ±3e-3 so the first actions and values are near neutral."""
    head = nn.Linear(hidden, 1)
    nn.init.uniform_(head.weight, -3e-3, 3e-3)
    nn.init.uniform_(head.bias, -3e-3, 3e-3)
    return head


class Actor(nn.Module):
    """state → normalised action in [0, 1] (sigmoid output, as in AMC)."""

    def __init__(self, state_dim: int, hidden: int = 300):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 _mlp_head(hidden), nn.Sigmoid())

    def forward(self, state: Tensor) -> Tensor:
        return self.net(state)


class Critic(nn.Module):
    """(state, action) → Q; state and action enter through separate first layers, as in AMC."""

    def __init__(self, state_dim: int, hidden: int = 300):
        super().__init__()
        self.state_in, self.action_in = nn.Linear(state_dim, hidden), nn.Linear(1, hidden)
        self.body = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), _mlp_head(hidden))

    def forward(self, state: Tensor, action: Tensor) -> Tensor:
        return self.body(self.state_in(state) + self.action_in(action))


class ReplayBuffer:
    """A ring buffer of (state, action, reward, next state, done)."""

    def __init__(self, capacity: int, state_dim: int):
        self.capacity, self.size, self.cursor = int(capacity), 0, 0
        self.state, self.next_state = torch.zeros(capacity, state_dim), torch.zeros(capacity, state_dim)
        self.action, self.reward, self.done = torch.zeros(capacity, 1), torch.zeros(capacity, 1), torch.zeros(capacity, 1)

    def __len__(self) -> int:
        return self.size

    def add(self, state: Tensor, action: float, reward: float, next_state: Tensor, done: bool) -> None:
        i = self.cursor
        self.state[i], self.next_state[i] = state, next_state
        self.action[i, 0], self.reward[i, 0], self.done[i, 0] = action, reward, float(done)
        self.cursor, self.size = (i + 1) % self.capacity, min(self.size + 1, self.capacity)

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        idx = torch.randint(self.size, (min(n, self.size),), generator=generator)
        return self.state[idx], self.action[idx], self.reward[idx], self.next_state[idx], self.done[idx]


def truncated_normal(mu: float, sigma: float, low: float, high: float, generator: torch.Generator) -> float:
    """One draw of N(mu, sigma²) truncated to [low, high], by inverting the CDF (AMC's exploration noise)."""
    if sigma <= 0:
        return min(max(mu, low), high)
    a, b = (torch.special.ndtr(torch.tensor((v - mu) / sigma, dtype=torch.float64)) for v in (low, high))
    u = a + (b - a) * torch.rand((), generator=generator, dtype=torch.float64)
    x = mu + sigma * float(torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12)))
    return min(max(x, low), high)


class DDPGAgent:
    """AMC's DDPG: actor, critic, their target copies, a replay buffer and a moving reward baseline."""

    def __init__(self, state_dim: int, rl: RLConfig, capacity: int):
        self.rl = rl
        self.generator = torch.Generator().manual_seed(rl.seed)
        self.actor, self.critic = Actor(state_dim, rl.hidden), Critic(state_dim, rl.hidden)
        self.actor_target, self.critic_target = copy.deepcopy(self.actor), copy.deepcopy(self.critic)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=rl.lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=rl.lr_critic)
        self.buffer = ReplayBuffer(capacity, state_dim)
        self.baseline: float | None = None

    def random_action(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def explorer(self, sigma: float | None):
        """state → action: uniform at random (``sigma`` None, AMC's warm-up) or the actor plus noise."""
        if sigma is None:
            return lambda state: self.random_action()
        return lambda state: self.act(state, sigma)

    @torch.no_grad()
    def act(self, state: Tensor, sigma: float = 0.0) -> float:
        mu = float(self.actor(state.unsqueeze(0)))
        return truncated_normal(mu, sigma, 0.0, 1.0, self.generator)

    def update(self) -> tuple[float, float]:
        """One critic and one actor step on a replay batch; returns (critic loss, actor loss)."""
        state, action, reward, next_state, done = self.buffer.sample(self.rl.batch_size, self.generator)
        with torch.no_grad():
            target = self._normalise(reward) + self.rl.discount * (1 - done) * self.critic_target(
                next_state, self.actor_target(next_state))
        critic_loss = F.mse_loss(self.critic(state, action), target)
        self.critic_opt.zero_grad()
        critic_loss.backward()
        self.critic_opt.step()
        actor_loss = -self.critic(state, self.actor(state)).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()
        self._soft_update()
        return critic_loss.item(), actor_loss.item()

    def _normalise(self, reward: Tensor) -> Tensor:
        """AMC's moving baseline: rewards minus a running mean of the batch means (variance reduction)."""
        mean = float(reward.mean())
        self.baseline = mean if self.baseline is None else self.baseline + self.rl.moving_alpha * (mean - self.baseline)
        return reward - self.baseline

    @torch.no_grad()
    def _soft_update(self) -> None:
        for target, source in ((self.actor_target, self.actor), (self.critic_target, self.critic)):
            for t, s in zip(target.parameters(), source.parameters()):
                t.mul_(1 - self.rl.tau).add_(self.rl.tau * s)


# --------------------------------------------------------------------------------------------
# search


@dataclass
class SearchResult:
    """The best policy found and one log row per episode."""

    keeps: list[int]
    groups: list[str]
    sizes: list[int]
    reward: float
    accuracy: float
    kl: float | None
    ops_ratio: float
    params_ratio: float
    episode: int
    episodes: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def policy(self) -> list[dict]:
        return [{"group": g, "size": s, "keep": k, "ratio": (s - k) / s}
                for g, s, k in zip(self.groups, self.sizes, self.keeps)]


@dataclass
class SearchData:
    """Reward images and labels, and the disjoint images adaptive BN is calibrated on."""

    x: Tensor
    y: Tensor
    x_cal: Tensor

    def to(self, device) -> SearchData:
        return SearchData(self.x.to(device), self.y.to(device), self.x_cal.to(device))


def search_data(bundle, rl: RLConfig, seed: int = 0) -> SearchData:
    """Fixed, disjoint random subsets of the *training* images (AMC, too, measures its reward on
    training images, so the validation split stays unbiased for the reported accuracy)."""
    train = bundle.split("train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n = min(rl.search_size, len(train))
    x, y = _images(train, order[:n])
    x_cal, _ = _images(train, order[n:n + rl.calibration_size])
    return SearchData(x, y, x_cal)


def _images(dataset, positions: list[int]) -> tuple[Tensor, Tensor]:
    if not positions:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    if hasattr(dataset, "get_batch"):
        x, y = dataset.get_batch(positions)
        return x.float(), torch.as_tensor(y, dtype=torch.long)
    xs, ys = zip(*(dataset[i] for i in positions))
    return torch.stack(xs).float(), torch.tensor(ys, dtype=torch.long)


def run_episode(env: PruningEnv, action_fn) -> tuple[list[int], list[tuple]]:
    """Walk the groups once; ``action_fn(state)`` proposes, :meth:`PruningEnv.clip` disposes.

    The replay buffer stores the *executed* (clipped) action: that is what produced the reward.
    """
    committed, transitions, previous = [], [], 0.0
    state = env.state(0, committed, previous)
    for t, spec in enumerate(env.specs):
        removed, executed = env.clip(t, committed, action_fn(state))
        committed.append(spec.size - removed)
        last = t == len(env) - 1
        next_state = state if last else env.state(t + 1, committed, executed)
        transitions.append((state, executed, next_state, last))
        state, previous = next_state, executed
    return committed, transitions


def search(env: PruningEnv, data: SearchData, rl: RLConfig, *, eps: float, log=print) -> SearchResult:
    """AMC's search loop: warm-up episodes at random, then DDPG with decaying exploration noise."""
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(rl.seed)
        agent = DDPGAgent(len(STATE_FEATURES), rl, rl.replay_per_group * len(env))
    best, rows = None, []
    for episode in range(1, rl.episodes + 1):
        warm = episode <= rl.warmup_episodes
        sigma = rl.sigma * rl.sigma_decay ** max(0, episode - rl.warmup_episodes - 1)
        keeps, transitions = run_episode(env, agent.explorer(None if warm else sigma))
        row = _score(env, keeps, data, rl, eps)
        row.update(episode=episode, sigma=None if warm else sigma)
        _learn(agent, transitions, row["reward"], update=not warm)
        if row["satisfied"] and (best is None or row["reward"] > best[1]["reward"]):
            best = (keeps, row)
        rows.append(row)
        log(_format_episode(row, rl.episodes, best[1] if best else None))
    if best is None:
        raise RcompError("the RL search found no policy that meets the budget")
    keeps, row = best
    return SearchResult(keeps, [s.name for s in env.specs], [s.size for s in env.specs], row["reward"],
                        row["accuracy"], row["kl"], row["ops_ratio"], row["params_ratio"], row["episode"], rows,
                        time.perf_counter() - started)


def _score(env: PruningEnv, keeps: list[int], data: SearchData, rl: RLConfig, eps: float) -> dict:
    values = env.values(keeps)  # also leaves the masks set to the policy for the evaluation
    if len(data.x_cal):
        recalibrate_bn(env.masked, data.x_cal)
    steps = rl.pgd_steps if rl.reward == "acc_kl" else 0
    acc, kl = evaluate_pruned(env.masked, data.x, data.y, eps=eps, steps=steps, seed=rl.seed)
    return {"reward": reward_value(acc, kl, rl.reward, rl.kl_offset), "accuracy": acc, "kl": kl,
            "ops_ratio": values["ops"] / env.cost.dense_ops, "params_ratio": values["params"] / env.cost.dense_params,
            "satisfied": all(values[c.metric] <= c.limit + 1e-6 for c in env.constraints), "keeps": list(keeps)}


def _learn(agent: DDPGAgent, transitions: list[tuple], reward: float, update: bool) -> None:
    """AMC gives every step of an episode the episode's final reward, one update per step."""
    for state, action, next_state, done in transitions:
        agent.buffer.add(state, action, reward, next_state, done)
        if update:
            agent.update()


def _format_episode(row: dict, episodes: int, best: dict | None) -> str:
    noise = "random" if row["sigma"] is None else f"sigma {row['sigma']:.3f}"
    kl = "-" if row["kl"] is None else f"{row['kl']:.3f}"
    text = (f"rl: episode {row['episode']}/{episodes} reward {row['reward']:.4f} acc {row['accuracy']:.1%} "
            f"kl {kl} ops {row['ops_ratio']:.3f} params {row['params_ratio']:.3f} ({noise})")
    return text + (f" | best {best['reward']:.4f} at episode {best['episode']}" if best else "")


# --------------------------------------------------------------------------------------------
# the method: dense → search → fine-tune


@dataclass
class RLResult(PostTrainResult):
    """``PostTrainResult``'s fields, plus the search's summary (what ``rl-policy.json`` holds)."""

    search: dict = field(default_factory=dict)


def build_env(model: nn.Module, config, example: Tensor) -> PruningEnv:
    """Masks on the trained dense model, its cost model, the budgets, and the magnitude ranking."""
    from rcomp.posttrain import budgeted_masks, magnitude_scores

    masked, cost, constraints = budgeted_masks(model, config, example, "rl")
    masked.masks.freeze()  # the search never trains the masks
    scores = magnitude_scores(model, masked.masks, example)
    return PruningEnv(masked, cost, constraints, scores, max_ratio=1.0 - config.min_keep)


def train_rl(config, bundle, model: nn.Module, *, model_name: str, model_kwargs: dict, out_dir,
             resume: bool = False, log=print, rl: RLConfig | None = None, pretrained: bool = False) -> RLResult:
    """The three phases with the same total epochs as ``config.epochs``; see the module docstring."""
    rl = rl or RLConfig()
    rl.validate()
    out_dir = Path(out_dir)

    def prune(dense: nn.Module) -> PruneOutcome:
        pruned, meta = _search_and_prune(config, bundle, dense, rl, out_dir, resume, log, model_name)
        return PruneOutcome(pruned, meta["status"], meta["projection"], meta["search_seconds"],
                            extra={"search": meta["search"]})

    result, meta = train_in_three_phases(config, bundle, model, method="rl", phase="search", prune=prune,
                                         model_name=model_name, model_kwargs=model_kwargs, out_dir=out_dir,
                                         resume=resume, log=log, pretrained=pretrained)
    return RLResult(**{f.name: getattr(result, f.name) for f in dataclasses.fields(result)}, search=meta["search"])


def _search_and_prune(config, bundle, dense_model: nn.Module, rl: RLConfig, out_dir: Path, resume: bool, log,
                      model_name: str):
    """Search (or reuse a finished search's ``rl-policy.json``), apply the best policy, remove channels."""
    from rcomp.budget import BudgetController
    from rcomp.surgery import remove_channels

    t0 = time.perf_counter()
    example = torch.rand(1, *bundle.input_shape)
    env = build_env(dense_model.cpu().eval(), config, example)
    fingerprint = _fingerprint(env, config, rl, model_name)
    doc = _read_policy(out_dir / POLICY_FILE, fingerprint, log) if resume else None
    reused = doc is not None
    if not reused:
        doc = _fresh_search(env, config, bundle, rl, fingerprint, out_dir, log)
    env.apply([p["keep"] for p in doc["policy"]])
    if rl.calibration_size:  # fine-tune the network the reward was measured on
        recalibrate_bn(env.masked, search_data(bundle, rl, config.seed).x_cal)
    status = BudgetController(env.cost, env.constraints).status()
    pruned = remove_channels(env.masked, example)
    projection = _projection(env, status, doc)
    log(f"rl: best policy of episode {doc['best']['episode']}: reward {doc['best']['reward']:.4f}, "
        f"ops ratio {status['ops_ratio']:.3f}, params ratio {status['params_ratio']:.3f}")
    # a reused search adds its recorded time to this run's set-up and surgery
    seconds = (doc["search_seconds"] if reused else 0.0) + time.perf_counter() - t0
    summary = {k: doc[k] for k in ("best", "policy", "rl", "search_seconds")}
    return pruned, {"status": status, "projection": projection, "search": summary, "search_seconds": seconds}


def _fresh_search(env: PruningEnv, config, bundle, rl: RLConfig, fingerprint: dict, out_dir: Path, log) -> dict:
    """Run the search on the training device and persist its result atomically as ``rl-policy.json``."""
    from rcomp.reports import write_json_atomic

    log(f"rl: phase 2/3, AMC search over {len(env)} channel groups for {rl.episodes} episodes "
        f"({rl.warmup_episodes} warm-up), reward {rl.reward}")
    device = torch.device(config.device)
    env.masked.to(device)
    result = search(env, search_data(bundle, rl, config.seed).to(device), rl, eps=config.eps, log=log)
    env.masked.cpu()
    doc = _policy_document(result, fingerprint)
    write_json_atomic(out_dir / POLICY_FILE, doc)
    return doc


def _fingerprint(env: PruningEnv, config, rl: RLConfig, model_name: str) -> dict:
    """What a finished search depends on: a resumed run reuses its policy only if all of it matches."""
    return json.loads(json.dumps({
        "model": model_name, "groups": [[s.name, s.size] for s in env.specs],
        "constraints": [[c.metric, c.limit] for c in env.constraints], "min_keep": config.min_keep,
        "eps": config.eps, "seed": config.seed,
        "dense_epochs": split_epochs(config.epochs, finetune_epochs=config.finetune_epochs)[0],
        "rl": dataclasses.asdict(rl),
    }))


def _policy_document(result: SearchResult, fingerprint: dict) -> dict:
    best = {k: getattr(result, k) for k in ("reward", "accuracy", "kl", "ops_ratio", "params_ratio", "episode")}
    return {"format": POLICY_FORMAT, "fingerprint": fingerprint, "rl": fingerprint["rl"], "best": best,
            "policy": result.policy(), "search_seconds": result.seconds, "episodes": result.episodes}


def _read_policy(path: Path, fingerprint: dict, log) -> dict | None:
    """A finished search's policy, or None when there is none; a policy for other settings is an error."""
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable RL policy ({exc}); delete it to search again") from None
    if not isinstance(doc, dict) or doc.get("format") != POLICY_FORMAT or doc.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{path}: written for other settings (model, budget or search options differ); "
                              "use a new output folder or the same settings")
    log(f"rl: reusing the finished search in {path}")
    return doc


def _projection(env: PruningEnv, status: dict, doc: dict) -> dict:
    """The same keys as ``BudgetController.project()``, for reports that read either method."""
    off = sum(p["size"] - p["keep"] for p in doc["policy"])
    return {"ops_before": round(env.cost.dense_ops), "ops_after": status["ops"],
            "params_before": round(env.cost.dense_params), "params_after": status["params"],
            "units_changed": off, "units_turned_on": 0, "units_turned_off": off,
            "limits": status["limits"], "satisfied": status["satisfied"],
            "source": f"rl policy of episode {doc['best']['episode']}"}
