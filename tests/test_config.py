"""Hardware profiles: the shipped ones load, and every malformed file fails with file + key + expectation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rcomp.config import (
    PROFILES_DIR,
    Budgets,
    Field,
    Profile,
    Section,
    integer,
    list_profiles,
    load_profile,
    number,
    parse_profile,
    resolve_profile,
    validate,
)
from rcomp.errors import ConfigError, RcompError

REPO = Path(__file__).resolve().parent.parent
LENIENT = REPO / "tests" / "data" / "profiles" / "test-lenient.yaml"
DENSE_RESNET20_MOPS = 40.81
DENSE_RESNET20_PARAMS = 272_474

GOOD = """\
name: demo
target:
  runtime: onnxruntime
  execution_provider: CPUExecutionProvider
  threads: 2
  graph_optimization: all
input_shape: [1, 3, 32, 32]
opset: 17
budgets:
  mops: 24
robustness:
  eps: 8/255
"""


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edited(**changes) -> str:
    """GOOD with some keys replaced (a dotted key path -> new value; None deletes the key)."""
    data = yaml.safe_load(GOOD)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = data
        for p in parents:
            node = node[p]
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return yaml.safe_dump(data)


def error_for(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": "), message  # always names the file first
    assert "\n" not in message
    return message


# ---- shipped profiles


def test_shipped_profiles_load_and_are_consistent():
    loaded = dict(list_profiles(PROFILES_DIR))
    names = {p.name for p in loaded}
    assert {"jetson.yaml", "raspberry-pi.yaml", "automotive-ecu.yaml"} <= names
    for path, profile in loaded.items():
        assert isinstance(profile, Profile), f"{path}: {profile}"
        assert profile.name == path.stem
        assert profile.input_shape == (1, 3, 32, 32)
        assert profile.target.execution_provider == "CPUExecutionProvider"
        assert profile.robustness is not None and profile.robustness.eps == pytest.approx(8 / 255)
        assert profile.robustness.pgd_step_size == pytest.approx(2 / 255)


@pytest.mark.parametrize(
    "name, kept_ops",
    [("jetson", 0.50), ("raspberry-pi", 0.40), ("automotive-ecu", 0.30)],
)
def test_shipped_budgets_admit_the_intended_pruning_level(name, kept_ops):
    """A ResNet20 pruned to the intended fraction fits; the dense one never does."""
    budgets = resolve_profile(name).budgets
    limit = budgets.mops_limit(DENSE_RESNET20_MOPS)
    assert kept_ops * DENSE_RESNET20_MOPS <= limit < DENSE_RESNET20_MOPS
    params = budgets.params_limit(DENSE_RESNET20_PARAMS)
    assert params is None or kept_ops * DENSE_RESNET20_PARAMS <= params < DENSE_RESNET20_PARAMS


def test_ecu_keeps_an_opset_tidl_style_importers_accept():
    assert resolve_profile("automotive-ecu").opset <= 19


def test_every_key_parses(tmp_path):
    profile = load_profile(LENIENT)
    assert profile.budgets.items() == [
        ("mops", 1000.0),
        ("params", 1e8),
        ("ops_fraction", 1.0),
        ("params_fraction", 1.0),
        ("latency_p90_ms", 1000.0),
    ]
    assert profile.robustness.pgd_steps == 2 and profile.robustness.pgd_step_size == pytest.approx(4 / 255)
    assert profile.chw == (3, 32, 32) and profile.target.channel_multiple == 8
    round_trip = parse_profile(profile.to_dict(), "round-trip")
    assert round_trip == profile


def test_defaults(tmp_path):
    profile = load_profile(write(tmp_path, GOOD))
    assert profile.description == "" and profile.target.arch == "" and profile.target.channel_multiple == 1
    assert profile.robustness.pgd_steps == 10
    assert profile.robustness.pgd_step_size == pytest.approx(2 / 255)  # eps / 4
    assert profile.source == str(tmp_path / "x.yaml")
    assert load_profile(write(tmp_path, edited(robustness=None))).robustness is None


def test_budget_limits_take_the_tighter_of_absolute_and_fraction():
    b = Budgets(mops=30.0, ops_fraction=0.5)
    assert b.mops_limit(40.0) == 20.0 and b.mops_limit(100.0) == 30.0
    assert Budgets(latency_p90_ms=5).mops_limit() is None
    with pytest.raises(ValueError):
        Budgets(ops_fraction=0.5).mops_limit()


def test_config_module_does_not_import_torch():
    code = "import sys, rcomp.config; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- resolving names


def test_resolve_by_name_suffix_and_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_profile("jetson").name == "jetson"
    assert resolve_profile("jetson.yaml").name == "jetson"
    assert resolve_profile(PROFILES_DIR / "jetson.yaml").name == "jetson"
    write(tmp_path, GOOD, "mine.yaml")
    assert resolve_profile("mine").name == "demo"  # the current directory is searched too


def test_resolve_unknown_name_suggests(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'jetson'"):
        resolve_profile("jetsn")
    with pytest.raises(ConfigError, match="no such profile"):
        resolve_profile(str(tmp_path / "missing" / "jetson.yaml"))


def test_list_profiles_reports_bad_files_without_raising(tmp_path):
    write(tmp_path, GOOD, "good.yaml")
    write(tmp_path, "name: [", "broken.yml")
    (tmp_path / "notes.txt").write_text("ignored")
    result = dict((p.name, v) for p, v in list_profiles(tmp_path))
    assert set(result) == {"good.yaml", "broken.yml"}
    assert isinstance(result["good.yaml"], Profile)
    assert isinstance(result["broken.yml"], ConfigError)
    with pytest.raises(ConfigError, match="not found"):
        list_profiles(tmp_path / "nope")


# ---- errors


@pytest.mark.parametrize(
    "changes, key, expected",
    [
        ({"budgets__mops": -5}, "budgets.mops", "expected a number > 0, got -5"),
        ({"budgets__mops": 0}, "budgets.mops", "expected a number > 0, got 0"),
        ({"budgets__mops": True}, "budgets.mops", "got true (a YAML boolean"),
        ({"budgets__mops": "lots"}, "budgets.mops", "expected a number > 0, got 'lots'"),
        ({"budgets__params": float("nan")}, "budgets.params", "expected a number > 0"),
        ({"budgets__ops_fraction": 1.5}, "budgets.ops_fraction", "expected a number in (0, 1], got 1.5"),
        ({"budgets__params_fraction": 0}, "budgets.params_fraction", "in (0, 1]"),
        ({"budgets__latency_p90_ms": -1}, "budgets.latency_p90_ms", "> 0"),
        ({"robustness__eps": 8}, "robustness.eps", "expected a number in (0, 1], got 8"),
        ({"robustness__eps": "0/255"}, "robustness.eps", "in (0, 1]"),
        ({"robustness__eps": None}, "robustness.eps", "required key is missing"),
        ({"robustness__min_clean_acc": 1.2}, "robustness.min_clean_acc", "in [0, 1]"),
        ({"robustness__pgd_steps": 0}, "robustness.pgd_steps", "an integer >= 1"),
        ({"target__threads": 0}, "target.threads", "expected an integer >= 1, got 0"),
        ({"target__threads": 2.5}, "target.threads", "an integer"),
        ({"target__channel_multiple": 0}, "target.channel_multiple", "expected an integer >= 1, got 0"),
        ({"target__runtime": "tflite"}, "target.runtime", "one of onnxruntime"),
        ({"target__graph_optimization": "max"}, "target.graph_optimization", "disable, basic, extended, all"),
        ({"target__execution_provider": "CPU"}, "target.execution_provider", "ExecutionProvider"),
        ({"input_shape": [2, 3, 32, 32]}, "input_shape", "batch 1"),
        ({"input_shape": [1, 3, 32]}, "input_shape", "a list of 4 integers"),
        ({"opset": 22}, "opset", "an integer in [7, 21], got 22"),
        ({"name": None}, "name", "required key is missing"),
        ({"target": None}, "target", "required key is missing"),
        ({"budgets": None}, "budgets", "required key is missing"),
        ({"budgets": 24}, "budgets", "expected a mapping"),
        ({"budgets": {}}, "budgets", "expected at least one of mops"),
        (
            {"robustness__min_clean_acc": 0.3, "robustness__min_adv_acc": 0.4},
            "robustness.min_adv_acc",
            "<= min_clean_acc",
        ),
    ],
)
def test_bad_values_name_file_key_and_expectation(tmp_path, changes, key, expected):
    message = error_for(tmp_path, edited(**changes))
    assert f": {key}: " in message
    assert expected in message


def test_yaml_yes_is_not_a_number(tmp_path):
    message = error_for(tmp_path, GOOD.replace("mops: 24", "mops: yes"))
    assert "budgets.mops: expected a number > 0, got true" in message


def test_unknown_key_suggests_the_closest(tmp_path):
    message = error_for(tmp_path, GOOD.replace("mops: 24", "mop: 24"))
    assert "budgets.mop: unknown key; did you mean 'mops'?" in message
    message = error_for(tmp_path, GOOD + "colour: red\n")
    assert ": colour: unknown key; known keys: name," in message


def test_syntax_error_gives_line_and_column(tmp_path):
    message = error_for(tmp_path, GOOD.replace("opset: 17", "opset: [17"))
    assert "YAML syntax error at line" in message and "column" in message


def test_duplicate_keys_are_rejected(tmp_path):
    message = error_for(tmp_path, GOOD + "opset: 13\n")
    assert "duplicate key 'opset'" in message and "line" in message


@pytest.mark.parametrize(
    "text, expected",
    [("", "file is empty"), ("- a\n- b\n", "expected a mapping"), ("just text", "expected a mapping")],
)
def test_top_level_must_be_a_mapping(tmp_path, text, expected):
    assert expected in error_for(tmp_path, text)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConfigError, match="file not found") as info:
        load_profile(tmp_path / "nope.yaml")
    assert isinstance(info.value, RcompError) and info.value.path == str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_profile(tmp_path)


# ---- the generic validator (for training recipes later)


def test_generic_validator_nested_defaults_and_key_paths():
    schema = {
        "epochs": Field(integer(ge=1), required=True),
        "optim": Section({"lr": Field(number(gt=0), default=0.1), "momentum": Field(number(ge=0, lt=1))}),
    }
    assert validate({"epochs": 3}, schema, source="r.yaml") == {"epochs": 3, "optim": None}
    out = validate({"epochs": 3, "optim": {"momentum": 0.9}}, schema, source="r.yaml")
    assert out["optim"] == {"lr": 0.1, "momentum": 0.9}
    with pytest.raises(ConfigError, match=r"^r\.yaml: optim\.momentum: expected a number in \[0, 1\), got 1$"):
        validate({"epochs": 3, "optim": {"momentum": 1}}, schema, source="r.yaml")
    with pytest.raises(ConfigError, match="optim.lrr: unknown key; did you mean 'lr'"):
        validate({"epochs": 3, "optim": {"lrr": 1}}, schema, source="r.yaml")
