"""A removal-based width signal for channel masks: what switching one more channel off costs.

Why: on batch statistics a BatchNorm undoes any common scale of its inputs, so the task-loss
gradients of a channel group's masks sum to zero and the loss never asks for the group's width
(``bench/mask_gradients.py``); the budget alone decides how wide each group ends. Letting the masks
see running statistics instead made the loss ask for narrower groups nearly everywhere, because in
the middle of FastAT it falls when the logits shrink (``mask_norm_stats: mask-pass``). This probe
measures the width's value directly, on the statistics the weights train with: every ``every``
mask-learning steps it switches off, one group at a time, that group's next channel to go (the one
on with the lowest mask) and records how much the loss on the step's adversarial batch rises.
A running mean of that rise is the group's *marginal value* ``v_g``; each mask of the group then
gets ``-v_g`` (through the straight-through slope) on top of its task gradient: the width
derivative the batch-statistics gradient lacks, in the loss's own units (one 0/1 mask unit = one
channel). The budget's controller still holds the total, so the intent is that groups whose next
channel costs the loss least give up their width first.

It costs one forward without gradients per group and one for the baseline, every ``every`` steps
of the mask phase only: at ``every`` 10 a ResNet20 mask-phase epoch took 1.35-1.42x an epoch after
the freeze, against 1.04-1.07x without the probe. On CIFAR-10 it did not beat the recipe without
it (README, ablation section: ``-probe-`` rows), so it is off by default.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from rcomp import distributed
from rcomp.errors import RcompError
from rcomp.masks import ChannelMasks, ste_slope

#: Weight of the newest measurement in a group's running marginal value (about the last five count).
PROBE_MOMENTUM = 0.2


@contextlib.contextmanager
def untracked_batch_norms(model: nn.Module):
    """BatchNorms in training mode normalize by the batch, as in the step, but leave their running
    statistics alone: the probe's extra forwards must not count the batch again."""
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class WidthProbe:
    """Per channel group, the running marginal value of its next channel (see the module's doc)."""

    def __init__(self, masks: ChannelMasks, every: int):
        if masks.regularity != "channel":
            raise RcompError("the width probe switches channels off; it needs channel masks")
        self.masks, self.every = masks, every
        self.values = torch.zeros(len(masks))
        self.measured = torch.zeros(len(masks), dtype=torch.bool)

    def due(self, mask_step: int) -> bool:
        """Whether the ``mask_step``-th step of the mask phase (from 0) takes a measurement."""
        return mask_step % self.every == 0

    @torch.no_grad()
    def measure(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss rise on ``(x, y)`` when each group loses its next channel; NaN for a group at its floor."""
        rises = torch.full((len(self.masks),), float("nan"))
        with untracked_batch_norms(model):
            base = F.cross_entropy(model(x), y)
            for i in range(len(self.masks)):
                channel = self._next_channel(i)
                if channel is None:
                    continue
                with self._switched_off(i, channel):
                    rises[i] = float(F.cross_entropy(model(x), y) - base)
        return rises

    def _next_channel(self, i: int) -> int | None:
        """The channel of group ``i`` the budget would switch off next: on, lowest mask; None at the floor."""
        on = self.masks.binary(i).detach() > 0
        if int(on.sum()) <= self.masks.min_channels(i):
            return None
        scores = self.masks.params[i].detach().masked_fill(~on, float("inf"))
        return int(scores.argmin())

    @contextlib.contextmanager
    def _switched_off(self, i: int, channel: int):
        p = self.masks.params[i]
        kept = p.data[channel].clone()
        p.data[channel] = -1.0
        try:
            yield
        finally:
            p.data[channel] = kept

    def update(self, rises: torch.Tensor) -> None:
        """Fold one measurement into the running values (averaged over the ranks first under DDP)."""
        device = self.masks.params[0].device  # NCCL reduces device tensors only
        rises = rises.to(device).clone()
        valid = ~torch.isnan(rises)
        rises[~valid] = 0.0
        counts = valid.float()
        distributed.average_tensors([rises, counts])
        rises, counts = rises.cpu(), counts.cpu()
        valid = counts > 0
        rises = torch.where(valid, rises / counts.clamp_min(1e-12), rises)
        first = valid & ~self.measured
        again = valid & self.measured
        self.values[first] = rises[first]
        self.values[again] += PROBE_MOMENTUM * (rises[again] - self.values[again])
        self.measured |= valid

    def gradients(self) -> list[torch.Tensor]:
        """Each mask's width term: ``-v_g`` through the straight-through slope of its binarization."""
        return [-value * ste_slope(p) for value, p in zip(self.values.tolist(), self.masks.params)]

    def state_dict(self) -> dict:
        return {"values": self.values.tolist(), "measured": self.measured.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.values = torch.tensor(state["values"], dtype=torch.float32)
        self.measured = torch.tensor(state["measured"], dtype=torch.bool)
