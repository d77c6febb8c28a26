"""The training recipe's groups: flat keys, one validation per group, recipe files checked the same way."""

import dataclasses
import hashlib
import json
import math

import pytest

from rcomp.errors import ConfigError
from rcomp.pipeline import load_recipe, recipe_hash
from rcomp.recipe import (MACHINE_FIELDS, RECIPE_GROUPS, AttackConfig, BudgetConfig, MaskConfig, ScheduleConfig,
                          key_checks)
from rcomp.train import TrainConfig


def test_train_config_keys_stay_flat_with_the_schedule_attack_and_budget_first():
    config = TrainConfig(eps=4 / 255, target_ops=0.5, regularity="channel", mask_start=0.2)
    assert (config.eps, config.target_ops, config.mask_start) == (4 / 255, 0.5, 0.2)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    grouped = [f.name for group in RECIPE_GROUPS for f in dataclasses.fields(group)]
    assert names[:len(grouped)] == grouped  # the groups in reading order, then any key no group declares
    first = {f.name for g in (ScheduleConfig, AttackConfig, BudgetConfig) for f in dataclasses.fields(g)}
    assert {"epochs", "lr_max", "attack", "eps", "target_ops", "mops"} <= first
    assert "dual_lr" not in first and "cost_exponent" not in first  # expert keys stand apart
    recipe = dataclasses.asdict(config)  # what train.json's "recipe" holds: one flat dict of plain values
    assert set(recipe) == set(names) and all(not isinstance(v, dict) for v in recipe.values())


@pytest.mark.parametrize("key, value", [
    ("epochs", 0), ("batch_size", 0), ("lr_max", 0.0), ("lr_max", math.nan), ("lr_max", math.inf),
    ("peak_fraction", 1.0), ("schedule", "linear"), ("finetune_epochs", 0), ("attack", "pgd"),
    ("eps", 0.0), ("eps", 1.5), ("eps", math.nan), ("alpha", -0.1), ("attack_labels", "guessed"),
    ("target_ops", 1.5), ("target_params", 0.0), ("mops", -5.0), ("mops", math.inf), ("channel_multiple", 0),
    ("momentum", -0.1), ("weight_decay", math.nan), ("grad_clip", 0.0), ("penalty_weight", 0.0),
    ("dual_lr", -1.0), ("warmup_fraction", 0.0), ("freeze_fraction", 1.2), ("mask_start", -0.1),
    ("mask_start", 0.9), ("mask_init", "random"), ("mask_weight_decay", -1e-4), ("max_switch_off", 0.0),
    ("min_keep", 1.5), ("min_keep_stream", 2.0), ("cost_exponent", math.nan), ("eval_size", 0),
    ("eval_pgd_steps", 0), ("eval_every", 0), ("co_drop", -0.1), ("num_workers", -1), ("epochs", 2.5),
    ("hflip", "yes"), ("lr_max", "0.1"),
])
def test_validate_rejects_each_out_of_range_value_naming_its_key(key, value):
    base = dict(regularity="channel", target_ops=0.5) if key not in ("target_ops", "target_params") else {}
    config = TrainConfig(**{**base, key: value})
    with pytest.raises(ConfigError, match=f"^{key}: "):
        config.validate()


@pytest.mark.parametrize("line", ["eval_size: 0", "lr_max: .nan", "eps: .inf", "mask_start: 0.9x", "attack: pgd",
                                  "target_ops: 1.5", "co_drop: -1", "mask_init: random"])
def test_a_recipe_file_is_checked_by_the_same_key_checks(tmp_path, line):
    path = tmp_path / "r.yaml"
    path.write_text(line + "\n")
    key = line.split(":")[0]
    with pytest.raises(ConfigError, match=f"r.yaml: {key}: expected"):
        load_recipe(str(path))


def test_a_recipe_file_reads_yaml_spellings_into_values_validate_accepts(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("eps: 8/255\nweight_decay: 1e-4\nmask_start: 0\nregularity: channel\ntarget_ops: 0.5\n")
    values = load_recipe(str(path))
    assert values["eps"] == pytest.approx(8 / 255) and values["weight_decay"] == 1e-4 and values["mask_start"] == 0
    TrainConfig(**values).validate()
    assert not set(MACHINE_FIELDS) & set(key_checks(TrainConfig))  # machine settings come from the command line


def test_each_group_validates_itself_and_the_rules_across_groups_hold_on_the_whole():
    with pytest.raises(ConfigError, match="^regularity: a budget"):
        BudgetConfig(target_ops=0.5).validate()
    BudgetConfig(target_ops=0.5, regularity="channel").validate()
    with pytest.raises(ConfigError, match="^mask_start: "):
        MaskConfig(mask_start=0.5, freeze_fraction=0.5).validate()
    MaskConfig(slim_at_freeze=True).validate()  # needs channel masks, which only the whole recipe knows
    with pytest.raises(ConfigError, match="^slim_at_freeze: "):
        TrainConfig(slim_at_freeze=True, regularity="weight", target_ops=0.5).validate()
    with pytest.raises(ConfigError, match="^min_keep_stream: "):
        TrainConfig(min_keep_stream=0.5, regularity="weight", target_ops=0.5).validate()


def test_the_recipe_hash_does_not_depend_on_the_key_order():
    """train.json and the ONNX metadata carry recipe_hash: composing the config from groups moved the
    keys' order, which must not change the hash of the same recipe."""
    config = TrainConfig(target_ops=0.5, regularity="channel")
    shuffled = dict(reversed(list(dataclasses.asdict(config).items())))
    recipe = {k: v for k, v in shuffled.items() if k not in MACHINE_FIELDS}
    assert recipe_hash(config) == hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
