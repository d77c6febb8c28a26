"""The training recipe: the groups of keys ``rcomp.train.TrainConfig`` is composed of, each validated
in one place, and the keys it no longer takes.

A user sets the schedule, the attack and the budget (:class:`ScheduleConfig`, :class:`AttackConfig`,
:class:`BudgetConfig`); the optimizer, the masks' learning and the guard are expert keys
(:class:`OptimizerConfig`, :class:`MaskConfig`, :class:`GuardConfig`); :class:`RunConfig` says where
it runs. ``TrainConfig`` inherits every group, so its keys stay flat (``cfg.eps``, recipe YAML keys,
train.json's "recipe"). Each key carries its check; :func:`validate_recipe` runs them all and the
rules across groups, and recipe files are read with the same checks (:func:`key_checks`).

Imports no torch, so recipes can be checked where only the light runtime is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from rcomp.config import Invalid, boolean, describe, integer, number, text
from rcomp.errors import ConfigError

#: The commit where the removed options' code last existed (``git checkout`` it to run them again).
REMOVED_AT = "6311216"

#: Options the benchmarks measured as no gain or a loss (docs/ablations.md), with the value that
#: meant "off": a resumed checkpoint that holds that value trained exactly as rcomp trains now.
REMOVED_KEYS: dict[str, Any] = {
    "mask_norm_stats": "batch",   # BatchNorm on running statistics / a mask pass: -15.4 / -4.1 / -1.0 points
    "width_probe_every": 0,       # removal-based width signal: -1.9 / -0.9 points, 1.35-1.42x slower mask epochs
    "mask_momentum": None,        # with mask_lr_scale: -7.9 points
    "mask_lr_scale": 1.0,
    "lr_restart": False,          # a warm restart after the freeze: -2.5 points at 0.3 of the ops
}


def reject_removed_keys(values: Mapping[str, Any], source: str | None = None, *, only_changed: bool = False) -> None:
    """Refuse a recipe (or a checkpoint's config) that names an option rcomp no longer has.

    Why: silently ignoring it would train something else than the recipe says. A checkpoint
    stores every key, the removed ones at their "off" value too; ``only_changed`` lets those
    through, because such a run trained exactly as the code without the option does.
    """
    for key, off in REMOVED_KEYS.items():
        if key in values and not (only_changed and values[key] == off):
            raise ConfigError(f"was removed from rcomp (no measured gain, docs/ablations.md); its code last existed "
                              f"at commit {REMOVED_AT}: drop the key", path=source, key=key)


# --------------------------------------------------------------------------------------------
# The recipe's keys, in groups: what most runs set first, the expert keys apart
# --------------------------------------------------------------------------------------------

#: Training attacks by name (rcomp.attacks.ATTACKS holds their functions) and the labels they ascend.
ATTACK_NAMES = ("fgsm-rs", "nfgsm", "none")
ATTACK_LABELS = ("true", "predicted")
SCHEDULES = ("cyclic", "cosine")
REGULARITIES = ("channel", "weight")
#: How the masks are set when they start learning: all at ``MASK_INIT``, or from group magnitude.
MASK_INITS = ("constant", "magnitude")
#: Keys a resumed run may change and a recipe may not set: where and how this machine runs.
MACHINE_FIELDS = ("device", "num_workers", "progress")

_FRACTION = number(gt=0, le=1)


def key(default: Any, check: Callable[[Any], Any], doc: str):
    """A recipe key: its default, the check of its values (None means "off" and is not checked), and what it does."""
    return field(default=default, metadata={"check": check, "doc": doc})


class _Group:
    """A group of recipe keys that validates itself: every key against its check, then the group's own rules."""

    def validate(self) -> None:
        validate_recipe(self)

    def _rules(self) -> None:
        """Rules between the group's keys (none by default)."""


@dataclass
class ScheduleConfig(_Group):
    """How long and how fast: the keys every run sets first."""

    epochs: int = key(10, integer(ge=1), "training epochs")
    batch_size: int = key(128, integer(ge=1), "global batch (shared among the ranks under torchrun)")
    lr_max: float = key(0.2, number(gt=0), "peak learning rate")
    schedule: str = key("cyclic", text(choices=SCHEDULES), "cyclic (triangular, Wong et al.) or cosine")
    peak_fraction: float = key(0.4, number(gt=0, lt=1), "where the cyclic schedule peaks, as a fraction of the steps")
    finetune_epochs: int | None = key(None, integer(ge=1), "post-train methods: fine-tune this long after a dense "
                                      "phase of all epochs")
    seed: int = key(0, integer(ge=0), "initial weights, data order, augmentation and attack draws")
    hflip: bool = key(True, boolean(), "random horizontal flips; off for data whose mirror image is another class "
                      "(traffic signs)")


@dataclass
class AttackConfig(_Group):
    """The training attack (FastAT / N-FGSM) and its radius."""

    attack: str = key("fgsm-rs", text(choices=ATTACK_NAMES), "fgsm-rs (FastAT), nfgsm, or none (plain training)")
    eps: float = key(8 / 255, number(gt=0, le=1), "L-inf radius in pixel units, e.g. 8/255")
    alpha: float | None = key(None, number(gt=0, le=1), "step size; None: 1.25*eps for fgsm-rs, eps for nfgsm")
    attack_labels: str = key("true", text(choices=ATTACK_LABELS), "the label the attack ascends: the ground truth "
                             "or the model's prediction (against label leaking)")


@dataclass
class BudgetConfig(_Group):
    """What the pruned model may cost, and at which granularity it is pruned."""

    regularity: str | None = key(None, text(choices=(*REGULARITIES, "none")), "channel or weight masks; None: dense")
    target_ops: float | None = key(None, _FRACTION, "ops budget as a fraction of the dense model")
    target_params: float | None = key(None, _FRACTION, "params budget as a fraction of the dense model")
    mops: float | None = key(None, number(gt=0), "ops budget in millions of MACs")
    params: float | None = key(None, number(gt=0), "params budget, a count")
    channel_multiple: int = key(1, integer(ge=1), "projected group widths are multiples of this (or the whole group)")
    target_latency: float | None = key(None, _FRACTION, "latency budget as a fraction of the dense model's, by latency_table")
    latency_p90_ms: float | None = key(None, number(gt=0), "latency budget in ms (a profile's budgets.latency_p90_ms), by latency_table")
    latency_table: str | None = key(None, text(nonempty=True), "a per-layer latency table from `rcomp latency-table` (docs/latency.md)")

    @property
    def has_budget(self) -> bool:
        return any(getattr(self, k, None) is not None for k in BUDGET_KEYS)

    def _rules(self) -> None:
        if self.has_budget and self.regularity is None:
            raise ConfigError(f"a budget ({'/'.join(BUDGET_KEYS)}) needs a regularity", key="regularity")
        if self.regularity == "none":
            raise ConfigError("expected channel or weight; a dense run has no regularity (None)", key="regularity")
        if self.channel_multiple > 1 and self.regularity == "weight":
            raise ConfigError("channel_multiple rounds channel widths; weight masks have none", key="channel_multiple")


#: The keys that set a budget (a latency budget joins them where a latency table is given).
BUDGET_KEYS = ("target_ops", "target_params", "mops", "params", "target_latency", "latency_p90_ms")


@dataclass
class OptimizerConfig(_Group):
    """Expert: SGD's settings (rcomp's defaults are FastAT's)."""

    momentum: float = key(0.9, number(ge=0), "SGD momentum")
    nesterov: bool = key(True, boolean(), "Nesterov momentum")
    weight_decay: float = key(5e-4, number(ge=0), "weight decay, the masks' too unless mask_weight_decay is set")
    grad_clip: float | None = key(None, number(gt=0), "clip the gradient norm to this")


@dataclass
class MaskConfig(_Group):
    """Expert: how the masks learn and how the budget controller pushes them (docs/method.md)."""

    penalty_weight: float = key(1.0, number(gt=0), "hinge on the excess over the scheduled limit")
    dual_lr: float = key(0.05, number(gt=0), "Lagrange-multiplier step per optimizer step (BudgetController)")
    dual_reset: bool = key(False, boolean(), "anti-windup: a positive multiplier drops to 0 once its constraint holds")
    warmup_fraction: float = key(0.3, _FRACTION, "fraction of the mask steps over which the limit ramps to the budget")
    freeze_fraction: float = key(0.8, _FRACTION, "fraction of the steps after which the masks are projected and frozen")
    slim_at_freeze: bool = key(False, boolean(), "channel masks: remove the switched-off channels at the freeze and "
                               "train the slim network")
    mask_start: float = key(0.0, number(ge=0, lt=1), "fraction of the steps trained dense before the masks and the "
                            "budget start")
    mask_init: str = key("constant", text(choices=MASK_INITS), "masks start at one value, or from group magnitude")
    mask_weight_decay: float | None = key(None, number(ge=0), "None: the weights' weight decay (the poster's shared "
                                          "regulariser)")
    max_switch_off: float = key(0.002, _FRACTION, "fraction of mask units that may switch off per step (at least 1)")
    min_keep: float = key(0.2, _FRACTION, "fraction of every channel group that stays")
    min_keep_stream: float | None = key(None, _FRACTION, "the residual-stream groups' floor instead of min_keep")
    cost_exponent: float = key(0.5, number(gt=0), "budget gradient of a unit scaled by (its cost / mean cost) "
                               "** -cost_exponent")

    def _rules(self) -> None:
        if self.mask_start >= self.freeze_fraction:
            raise ConfigError(f"expected a fraction in [0, freeze_fraction={self.freeze_fraction}), got "
                              f"{self.mask_start}", key="mask_start")


@dataclass
class GuardConfig(_Group):
    """Expert: the per-epoch validation and the catastrophic-overfitting guard."""

    eval_size: int = key(500, integer(ge=1), "validation images per epoch")
    eval_pgd_steps: int = key(10, integer(ge=1), "PGD steps of the per-epoch validation and the guard")
    eval_every: int = key(1, integer(ge=1), "validate every N epochs (and the last)")
    co_guard: bool = key(True, boolean(), "restore the best state and step down on catastrophic overfitting")
    co_drop: float = key(0.2, number(ge=0, le=1), "PGD drop below its best that counts as a collapse")


@dataclass
class RunConfig(_Group):
    """Where it runs: machine settings (on the command line, not in a recipe; amp excepted)."""

    device: str = key("cpu", text(nonempty=True), "cpu, cuda, cuda:N or auto")
    num_workers: int = key(0, integer(ge=0), "DataLoader workers")
    progress: bool = key(True, boolean(), "progress bars")
    amp: bool = key(False, boolean(), "fp16 autocast + GradScaler on CUDA; ignored on CPU")


#: The groups in the order a user reads them: the keys that matter first, the expert ones after.
RECIPE_GROUPS = (ScheduleConfig, AttackConfig, BudgetConfig, OptimizerConfig, MaskConfig, GuardConfig, RunConfig)


def _group_fields(cls) -> list:
    """The fields of a composed config that no group declares (checked by their type alone)."""
    grouped = {f.name for g in RECIPE_GROUPS for f in fields(g)}
    return [f for f in fields(cls) if f.name not in grouped]


def validate_recipe(config) -> None:
    """Validate a composed config (``rcomp.train.TrainConfig``): each group, its own keys, then the
    rules across groups. The one place recipe values are checked; the CLI and YAML loading use the
    same per-key checks (:func:`key_checks`)."""
    groups = [group for group in RECIPE_GROUPS if isinstance(config, group)]
    for f in [f for group in groups for f in fields(group)] + _group_fields(type(config)):
        _check_key(f, getattr(config, f.name))
    for group in groups:
        group._rules(config)
    if all(isinstance(config, group) for group in RECIPE_GROUPS):
        _rules_across_groups(config)


def _rules_across_groups(c) -> None:
    if c.min_keep_stream is not None and c.regularity == "weight":
        raise ConfigError("min_keep_stream is a floor on residual-stream channel groups; weight masks have none",
                          key="min_keep_stream")
    if c.slim_at_freeze and c.regularity != "channel":
        raise ConfigError("slim_at_freeze removes the channels that channel masks switch off; "
                          f"it needs regularity: channel, got {c.regularity or 'none'}", key="slim_at_freeze")


def _check_key(f, value: Any) -> None:
    """One key's value: None is "off" for an optional key; anything else must pass the key's check as it is
    (a Python caller's text is not parsed into a number: YAML loading does that, :func:`key_checks`)."""
    if value is None and f.default is None:
        return
    check = f.metadata.get("check") or _check_by_type(f)
    try:
        checked = check(value)
    except Invalid as exc:
        raise ConfigError(f"expected {exc}, got {describe(value)}", key=f.name) from None
    if isinstance(value, str) and not isinstance(checked, str):
        raise ConfigError(f"expected a number, got {describe(value)}", key=f.name)


def _check_by_type(f) -> Callable[[Any], Any]:
    """For a key no group declares: the check its default's type implies (a positive number, a non-negative integer)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if "bool" in kind:
        return boolean()
    if "float" in kind:
        return number(gt=0)
    if "int" in kind:
        return integer(ge=0)
    return text()


def key_checks(config_type) -> dict[str, Callable[[Any], Any]]:
    """Every recipe key of ``config_type`` (machine settings left out) with its value check, which also
    reads YAML's spellings (``8/255``, ``1e-4``): the schema of a recipe file."""
    return {f.name: f.metadata.get("check") or _check_by_type(f) for f in fields(config_type)
            if f.name not in MACHINE_FIELDS}
