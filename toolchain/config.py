"""Hardware profiles: what a target board can afford, as a small YAML file.

A profile is the contract between the training side (which prunes until the model fits) and the
checking side (which measures the exported ONNX file on the board). It is loaded on the board too,
so this module imports only the standard library and PyYAML — never torch.

Schema (every key is checked; unknown keys are rejected with a "did you mean" hint)::

    name: jetson                      # required; letters, digits, '.', '_', '-'
    description: "..."                # optional free text
    target:                           # required
      runtime: onnxruntime            # required; the only runtime supported
      execution_provider: CPUExecutionProvider   # required; an ONNX Runtime EP name
      threads: 4                      # required; intra-op threads, >= 1
      graph_optimization: all         # required; disable | basic | extended | all
      arch: "aarch64 Cortex-A78AE"    # optional free text
      channel_multiple: 8             # optional, >= 1 (default 1); pruned widths are multiples of it
      precision: int8                 # optional, fp32 | int8 (default fp32); int8: prune ships the INT8 model
      notes: "..."                    # optional free text
    input_shape: [1, 3, 32, 32]       # required; [N, C, H, W] with N == 1 (batch-1 deployment)
    opset: 17                         # required; ONNX opset, 7..21
    budgets:                          # required; at least one of:
      mops: 24.0                      # MACs of one inference, in millions (> 0)
      params: 120000                  # parameter count (> 0)
      ops_fraction: 0.6               # MACs as a fraction of the dense model, in (0, 1]
      params_fraction: 0.5            # parameters as a fraction of the dense model, in (0, 1]
      latency_p90_ms: 10              # 90th-percentile latency of one inference, ms (> 0)
    robustness:                       # optional; omit for a pure-compression profile
      eps: 8/255                      # required; L-inf radius in pixel units, in (0, 1]
      min_clean_acc: 0.5              # optional floor, in [0, 1]
      min_adv_acc: 0.2                # optional floor, in [0, 1], <= min_clean_acc
      pgd_steps: 10                   # optional, >= 1 (default 10)
      pgd_step_size: 2/255            # optional, in (0, 1] (default eps / 4)

Numbers may be written as fractions in quotes or bare (``8/255``) because that is how eps is
quoted in papers, and as exponent strings (``1.2e5``) because PyYAML reads those as text.
YAML booleans (``yes``/``no``/``on``/``off``) are never accepted as numbers.

Every error is a :class:`rcomp.errors.ConfigError` naming the file, the key path and what was
expected, e.g. ``profiles/x.yaml: budgets.mops: expected a number > 0, got -5``.

The validator (:class:`Field`, :class:`Section`, :func:`validate` and the checker factories
:func:`number`, :func:`integer`, :func:`text`, :func:`boolean`, :func:`int_list`) is generic so
that other YAML files (training recipes) get the same error messages.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from rcomp.errors import ConfigError
from rcomp.guards import MAX_INPUT_CHANNELS, MAX_INPUT_SIDE, MAX_YAML_BYTES, excerpt

def _shipped_profiles_dir() -> Path:
    """``profiles/`` of a source checkout, else the copy a wheel install carries as ``rcomp.profiles``."""
    checkout = Path(__file__).resolve().parent.parent / "profiles"
    if checkout.is_dir():
        return checkout
    return Path(__file__).resolve().parent / "profiles"


PROFILES_DIR = _shipped_profiles_dir()
"""The shipped profiles (``profiles/`` at the repository root, or inside the installed package)."""

GRAPH_OPTIMIZATIONS = ("disable", "basic", "extended", "all")
BUDGET_KEYS = ("mops", "params", "ops_fraction", "params_fraction", "latency_p90_ms")

# --------------------------------------------------------------------------------------------
# Generic validator
# --------------------------------------------------------------------------------------------


class Invalid(ValueError):
    """Raised by a checker with the text of what was expected; :func:`validate` adds where/got."""


@dataclass(frozen=True)
class Field:
    """One scalar (or list) key: ``check`` converts the YAML value or raises :class:`Invalid`."""

    check: Callable[[Any], Any]
    required: bool = False
    default: Any = None


@dataclass(frozen=True)
class Section:
    """A nested mapping, validated recursively so key paths read ``budgets.mops``."""

    fields: Mapping[str, "Field | Section"]
    required: bool = False


def validate(
    data: Any, schema: Mapping[str, Field | Section], *, source: str | None, prefix: str = ""
) -> dict[str, Any]:
    """Check ``data`` against ``schema`` and return a dict with every key (defaults filled in).

    A key written as ``null`` counts as absent: that lets a YAML file switch an optional setting
    off explicitly. Absent optional sections come back as ``None``.
    """
    if not isinstance(data, dict):
        what = f"a mapping with keys {', '.join(schema)}"
        # At the top level the value is the whole file (a text file read as YAML is one string):
        # name its type only, so that pointing rcomp at a secret never prints it.
        got = describe(data) if prefix else _kind(data)
        raise ConfigError(f"expected {what}, got {got}", path=source, key=prefix or None)
    _reject_unknown(data, schema, source, prefix)
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        path = f"{prefix}.{key}" if prefix else key
        value = data.get(key)
        if value is None:
            if spec.required:
                raise ConfigError("required key is missing", path=source, key=path)
            out[key] = None if isinstance(spec, Section) else spec.default
        elif isinstance(spec, Section):
            out[key] = validate(value, spec.fields, source=source, prefix=path)
        else:
            out[key] = _check(spec, value, source, path)
    return out


def _reject_unknown(data: dict, schema: Mapping[str, Any], source: str | None, prefix: str) -> None:
    for key in data:
        if key in schema:
            continue
        path = f"{prefix}.{excerpt(key)}" if prefix else excerpt(key)
        close = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown key; {hint}known keys: {', '.join(schema)}", path=source, key=path)


def _check(spec: Field, value: Any, source: str | None, path: str) -> Any:
    try:
        return spec.check(value)
    except Invalid as exc:
        raise ConfigError(f"expected {exc}, got {describe(value)}", path=source, key=path) from None


def describe(value: Any) -> str:
    """How a bad value is quoted back; booleans get a hint because YAML's ``yes`` surprises people."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a YAML boolean: yes/no/on/off/true/false are booleans)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (int, float, list)):
        return excerpt(repr(value))
    if isinstance(value, str):
        return excerpt(repr(value))
    return type(value).__name__


def _kind(value: Any) -> str:
    """A value's kind, without its content."""
    if value is None:
        return "an empty file"
    if isinstance(value, str):
        return f"a text of {len(value)} characters"
    return {list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), type(value).__name__)




_FRACTION = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _as_number(value: Any) -> float | None:
    """YAML number, ``"8/255"`` or an exponent string; ``None`` for anything else (bools too)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m:
            den = float(m.group(2))
            return float(m.group(1)) / den if den else None
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _range_text(gt=None, ge=None, lt=None, le=None) -> str:
    low = f"({gt}" if gt is not None else (f"[{ge}" if ge is not None else None)
    high = f"{lt})" if lt is not None else (f"{le}]" if le is not None else None)
    if low and high:
        return f" in {low}, {high}"
    if low:
        return f" > {gt}" if gt is not None else f" >= {ge}"
    if high:
        return f" < {lt}" if lt is not None else f" <= {le}"
    return ""


def _in_range(x: float, gt=None, ge=None, lt=None, le=None) -> bool:
    return not (
        (gt is not None and x <= gt)
        or (ge is not None and x < ge)
        or (lt is not None and x >= lt)
        or (le is not None and x > le)
    )


def number(*, gt=None, ge=None, lt=None, le=None) -> Callable[[Any], float]:
    """A finite real number (int, float, ``"a/b"``) within the given bounds."""
    expected = "a number" + _range_text(gt, ge, lt, le)

    def check(value: Any) -> float:
        x = _as_number(value)
        if x is None or not math.isfinite(x) or not _in_range(x, gt, ge, lt, le):
            raise Invalid(expected)
        return x

    return check


def integer(*, ge=None, le=None) -> Callable[[Any], int]:
    """A whole number; ``4.0`` is refused so that a typo like ``threads: 4.5`` cannot slip through."""
    expected = "an integer" + _range_text(ge=ge, le=le)

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not _in_range(value, ge=ge, le=le):
            raise Invalid(expected)
        return value

    return check


def text(*, choices=None, pattern: str | None = None, nonempty: bool = False) -> Callable[[Any], str]:
    """A string, optionally one of ``choices`` or matching ``pattern`` (full match)."""
    if choices:
        expected = "one of " + ", ".join(choices)
    elif pattern:
        expected = f"a string matching {pattern}"
    else:
        expected = "a non-empty string" if nonempty else "a string"

    def check(value: Any) -> str:
        ok = isinstance(value, str)
        ok = ok and (not choices or value in choices)
        ok = ok and (not pattern or re.fullmatch(pattern, value) is not None)
        ok = ok and (not nonempty or bool(value.strip()))
        if not ok:
            raise Invalid(expected)
        return value

    return check


def boolean() -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid("true or false")
        return value

    return check


def int_list(*, length: int | None = None, ge: int | None = None) -> Callable[[Any], tuple[int, ...]]:
    """A list of integers (returned as a tuple, so it can live in a frozen dataclass)."""
    expected = "a list of " + (f"{length} " if length else "") + "integers" + _range_text(ge=ge)
    item = integer(ge=ge)

    def check(value: Any) -> tuple[int, ...]:
        if not isinstance(value, list) or (length is not None and len(value) != length):
            raise Invalid(expected)
        try:
            return tuple(item(v) for v in value)
        except Invalid:
            raise Invalid(expected) from None

    return check


# --------------------------------------------------------------------------------------------
# YAML reading
# --------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one otherwise) and
    anchors and aliases: profiles and recipes never need them, and nested aliases (a "billion
    laughs" file of a few hundred bytes) expand to gigabytes."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None, "anchors and aliases (&name, *name) are not allowed in rcomp files", event.start_mark
            )
        return super().compose_node(parent, index)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {excerpt(repr(key))} (first at line {seen[key]})", mark
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> Any:
    """Parse a YAML file, turning every I/O and syntax failure into a one-line ConfigError."""
    source = str(path)
    try:
        raw = _read_capped(Path(path)).decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("file not found", path=source) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, expected a YAML file", path=source) from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", path=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path=source) from None
    try:
        return yaml.load(raw, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_message(exc), path=source) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {excerpt(str(exc), 160)}", path=source) from None


def _read_capped(path: Path) -> bytes:
    """At most MAX_YAML_BYTES of a file: a huge file (or /dev/zero) is refused, not read into memory."""
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)
    if len(data) > MAX_YAML_BYTES:
        raise ConfigError(f"larger than {MAX_YAML_BYTES // 1024} KB: not a profile or recipe", path=str(path))
    return data


def _yaml_message(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = excerpt(" ".join(str(p) for p in (exc.context, exc.problem) if p), 160)
    kind = "YAML error" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
    return f"{kind}{where}: {what}"


# --------------------------------------------------------------------------------------------
# Profile dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    runtime: str
    execution_provider: str
    threads: int
    graph_optimization: str
    arch: str = ""
    notes: str = ""
    channel_multiple: int = 1
    precision: str = "fp32"  # "int8": rcomp prune ships the INT8 model (rcomp.export.quantize), check judges it


@dataclass(frozen=True)
class Budgets:
    mops: float | None = None
    params: float | None = None
    ops_fraction: float | None = None
    params_fraction: float | None = None
    latency_p90_ms: float | None = None

    def items(self) -> list[tuple[str, float]]:
        """The budgets that are set, in schema order (for reports)."""
        return [(k, getattr(self, k)) for k in BUDGET_KEYS if getattr(self, k) is not None]

    def mops_limit(self, dense_mops: float | None = None) -> float | None:
        """The tighter of the absolute and the relative ops budget, so both sides agree on one number."""
        return _tighter(self.mops, self.ops_fraction, dense_mops)

    def params_limit(self, dense_params: float | None = None) -> float | None:
        return _tighter(self.params, self.params_fraction, dense_params)


def _tighter(absolute: float | None, fraction: float | None, dense: float | None) -> float | None:
    limits = [absolute] if absolute is not None else []
    if fraction is not None:
        if dense is None:
            raise ValueError("a fractional budget needs the dense model's cost")
        limits.append(fraction * dense)
    return min(limits) if limits else None


@dataclass(frozen=True)
class Robustness:
    eps: float
    min_clean_acc: float | None = None
    min_adv_acc: float | None = None
    pgd_steps: int = 10
    pgd_step_size: float | None = None

    def __post_init__(self) -> None:
        # Resolve the default here so no consumer ever sees None and invents its own step size.
        if self.pgd_step_size is None:
            object.__setattr__(self, "pgd_step_size", self.eps / 4)


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    target: Target
    input_shape: tuple[int, int, int, int]
    opset: int
    budgets: Budgets
    robustness: Robustness | None = None
    source: str | None = field(default=None, compare=False)

    @property
    def chw(self) -> tuple[int, int, int]:
        """The per-sample shape, what :func:`rcomp.data.load_data` wants."""
        return tuple(self.input_shape[1:])  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """YAML-shaped plain values (for ONNX metadata and reports); ``source`` left out."""
        d = asdict(self)
        d.pop("source")
        d["input_shape"] = list(self.input_shape)
        d["budgets"] = {k: v for k, v in d["budgets"].items() if v is not None}
        return d


# --------------------------------------------------------------------------------------------
# Profile schema and loading
# --------------------------------------------------------------------------------------------

_FRACTION_BUDGET = number(gt=0, le=1)
_ACCURACY = number(ge=0, le=1)

PROFILE_SCHEMA: dict[str, Field | Section] = {
    "name": Field(text(pattern=r"[A-Za-z0-9._-]+"), required=True),
    "description": Field(text(), default=""),
    "target": Section(
        {
            "runtime": Field(text(choices=("onnxruntime",)), required=True),
            "execution_provider": Field(text(pattern=r"[A-Za-z0-9]+ExecutionProvider"), required=True),
            "threads": Field(integer(ge=1), required=True),
            "graph_optimization": Field(text(choices=GRAPH_OPTIMIZATIONS), required=True),
            "arch": Field(text(), default=""),
            "channel_multiple": Field(integer(ge=1), default=1),
            "precision": Field(text(choices=("fp32", "int8")), default="fp32"),
            "notes": Field(text(), default=""),
        },
        required=True,
    ),
    "input_shape": Field(int_list(length=4, ge=1), required=True),
    "opset": Field(integer(ge=7, le=21), required=True),
    "budgets": Section(
        {
            "mops": Field(number(gt=0)),
            "params": Field(number(gt=0)),
            "ops_fraction": Field(_FRACTION_BUDGET),
            "params_fraction": Field(_FRACTION_BUDGET),
            "latency_p90_ms": Field(number(gt=0)),
        },
        required=True,
    ),
    "robustness": Section(
        {
            "eps": Field(number(gt=0, le=1), required=True),
            "min_clean_acc": Field(_ACCURACY),
            "min_adv_acc": Field(_ACCURACY),
            "pgd_steps": Field(integer(ge=1), default=10),
            "pgd_step_size": Field(number(gt=0, le=1)),
        }
    ),
}


def parse_profile(data: Any, source: str | None = None) -> Profile:
    """Validate an already-parsed YAML document; ``source`` is only used in error messages."""
    if data is None:
        raise ConfigError("file is empty; expected a mapping with name, target, input_shape, ...", path=source)
    v = validate(data, PROFILE_SCHEMA, source=source)
    _check_profile_rules(v, source)
    return Profile(
        name=v["name"],
        description=v["description"],
        target=Target(**v["target"]),
        input_shape=v["input_shape"],
        opset=v["opset"],
        budgets=Budgets(**v["budgets"]),
        robustness=Robustness(**v["robustness"]) if v["robustness"] else None,
        source=source,
    )


def _check_profile_rules(v: dict[str, Any], source: str | None) -> None:
    """Rules that span keys, which the per-key schema cannot express."""
    if v["input_shape"][0] != 1:
        raise ConfigError(
            f"expected [1, C, H, W] (batch 1: budgets are per inference), got {list(v['input_shape'])}",
            path=source,
            key="input_shape",
        )
    c, h, w = v["input_shape"][1:]
    if max(h, w) > MAX_INPUT_SIDE or c > MAX_INPUT_CHANNELS:
        raise ConfigError(f"expected at most {MAX_INPUT_CHANNELS} channels and {MAX_INPUT_SIDE} pixels a side, "
                          f"got {list(v['input_shape'])}", path=source, key="input_shape")
    if all(value is None for value in v["budgets"].values()):
        raise ConfigError(f"expected at least one of {', '.join(BUDGET_KEYS)}", path=source, key="budgets")
    rob = v["robustness"]
    if rob and None not in (rob["min_clean_acc"], rob["min_adv_acc"]) and rob["min_adv_acc"] > rob["min_clean_acc"]:
        raise ConfigError(
            f"expected a floor <= min_clean_acc ({rob['min_clean_acc']}), got {rob['min_adv_acc']}: "
            "adversarial accuracy cannot exceed clean accuracy",
            path=source,
            key="robustness.min_adv_acc",
        )


def load_profile(path: str | os.PathLike) -> Profile:
    return parse_profile(read_yaml(path), str(path))


validate_profile_file = load_profile  # the name used in docs/DESIGN.md


def list_profiles(directory: str | os.PathLike = PROFILES_DIR) -> list[tuple[Path, Profile | ConfigError]]:
    """Every ``*.yaml``/``*.yml`` in ``directory`` with its Profile or the error that stops it.

    Errors are returned, not raised, so ``rcomp profiles`` can list the good ones and flag the bad.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ConfigError("profile directory not found", path=str(root))
    files = sorted(p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    out: list[tuple[Path, Profile | ConfigError]] = []
    for p in files:
        try:
            out.append((p, load_profile(p)))
        except ConfigError as exc:
            out.append((p, exc))
    return out


def resolve_profile(name_or_path: str | os.PathLike) -> Profile:
    """Load a profile given as a path, or as a bare name looked up in ``.`` then in ``profiles/``."""
    given = Path(name_or_path)
    if given.is_file():
        return load_profile(given)
    for candidate in _candidates(str(name_or_path)):
        if candidate.is_file():
            return load_profile(candidate)
    known = sorted(p.stem for p in PROFILES_DIR.glob("*.y*ml")) if PROFILES_DIR.is_dir() else []
    close = difflib.get_close_matches(given.stem, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(
        f"no such profile file or name (looked in . and {PROFILES_DIR}); {hint}known: {', '.join(known) or 'none'}",
        path=str(name_or_path),
    )


def _candidates(name: str) -> list[Path]:
    if os.sep in name or (os.altsep and os.altsep in name):
        return []  # a path that does not exist: do not reinterpret it as a name
    names = [name] if name.endswith((".yaml", ".yml")) else [f"{name}.yaml", f"{name}.yml"]
    return [folder / n for folder in (Path.cwd(), PROFILES_DIR) for n in names]
