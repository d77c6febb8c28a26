"""A linter for the Dockerfile: no Docker daemon needed, so it runs wherever the tests run.

What it holds the images to: a pinned base image; every ``rcomp`` command the Dockerfile runs or
shows is a real subcommand with real options that the README documents; the package is installed
from pyproject.toml (``.``, ``.[extra]`` or the ``runtime`` extra), never from a second list of
versions that could drift; the runtime target installs no torch; nothing downloads at run time;
the declared volumes are the documented ones.
"""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10, which requires-python allows: the test extra installs tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
RUNTIME_PACKAGES = {"onnxruntime", "onnx", "numpy", "pyyaml", "click"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages, name = {}, None
    for word, args in _instructions():
        if word == "FROM":
            name = args.split()[-1] if " as " in args.lower() else args
            stages[name] = []
        stages[name].append((word, args))
    return stages


def _documented_commands() -> list[str]:
    """What the header's ``docker run IMAGE COMMAND`` examples run: COMMAND, for images it builds."""
    text = "\n".join(line.lstrip("#").strip() for line in DOCKERFILE.splitlines() if line.startswith("#"))
    lines = text.replace("\\\n", " ").splitlines()
    tags = {m.group(1) for m in re.finditer(r"docker build .*?-t (\S+)", text)}
    commands = []
    for line in lines:
        if line.startswith("docker run"):
            tokens = shlex.split(line)
            start = next(i for i, t in enumerate(tokens) if t in tags) + 1
            commands.append(shlex.join(tokens[start:]))
    return commands


def _run_segments() -> list[str]:
    return [seg.strip() for word, args in _instructions() if word == "RUN" for seg in args.split("&&")]


def _exec_form(args: str) -> str:
    return " ".join(json.loads(args))


def _rcomp_invocations() -> list[list[str]]:
    """Token lists starting at ``rcomp``: CMD/ENTRYPOINT, RUN steps and the documented examples."""
    texts = [_exec_form(a) for w, a in _instructions() if w in ("CMD", "ENTRYPOINT")]
    texts += _run_segments() + _documented_commands()
    found = []
    for text in texts:
        tokens = shlex.split(text)
        found += [tokens[tokens.index("rcomp"):]] if "rcomp" in tokens else []
    return found


def _resolve(tokens: list[str]) -> tuple[list[str], click.Command]:
    """The subcommand words of an invocation and the click command they name (AssertionError if none)."""
    from rcomp.cli import cli

    words, command = [], cli
    for token in tokens[1:]:
        if token.startswith("-") or not isinstance(command, click.Group):
            break
        assert token in command.commands, f"'rcomp {' '.join(words + [token])}': no such subcommand"
        words.append(token)
        command = command.commands[token]
    return words, command


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower()


# --------------------------------------------------------------------------------------------


def test_base_images_are_pinned_to_an_exact_version():
    names = set()
    for word, args in _instructions():
        if word != "FROM":
            continue
        image = args.split()[0]
        if image not in names:
            assert "@sha256:" in image or re.search(r":\d+\.\d+\.\d+", image), f"FROM {image}: not pinned"
        names.add(args.split()[-1])


def test_every_rcomp_command_is_real_and_documented():
    invocations = _rcomp_invocations()
    assert any(t[:2] == ["rcomp", "--help"] for t in invocations)
    for tokens in invocations:
        words, command = _resolve(tokens)
        shown = " ".join(["rcomp", *words]) if words else " ".join(tokens[:2])
        assert shown in README, f"{shown!r} runs in the Dockerfile but the README does not document it"
        options = {o for p in command.params for o in p.opts + p.secondary_opts} | {"--help"}
        for token in tokens[1 + len(words):]:
            if token.startswith("--"):
                assert token.split("=")[0] in options, f"{' '.join(tokens)}: {command.name} has no option {token}"


def test_the_package_is_installed_from_pyproject_only():
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for segment in _run_segments():
        tokens = shlex.split(segment)
        if tokens[:2] != ["pip", "install"]:
            continue
        args, i = tokens[2:], 0
        while i < len(args):
            token = args[i]
            if token in ("-r", "--requirement"):
                extra = re.search(r"\['optional-dependencies'\]\['(\w+)'\][^>]*> *" + re.escape(args[i + 1]),
                                  " ".join(_run_segments()))
                assert extra and extra.group(1) in extras, f"{segment}: {args[i + 1]} is not made from pyproject.toml"
                i += 2
            elif token.startswith("--") and token in ("--extra-index-url", "--index-url"):
                i += 2
            elif token.startswith("-"):
                i += 1
            else:
                m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", token)
                assert m, f"{segment}: installs {token!r}; install '.' or '.[extra]' so pyproject.toml stays the one list"
                assert set(filter(None, (m.group(1) or "").split(","))) <= extras, f"{segment}: unknown extra"
                i += 1


def test_the_runtime_extra_is_the_light_set_with_the_same_pins():
    runtime = PYPROJECT["project"]["optional-dependencies"]["runtime"]
    assert {_requirement_name(s) for s in runtime} == RUNTIME_PACKAGES
    assert set(runtime) <= set(PYPROJECT["project"]["dependencies"]), "runtime pins differ from the dependencies"


def test_the_runtime_target_installs_no_torch():
    runtime = _stages()["runtime"]
    for word, args in runtime:
        assert word != "RUN" or "torch" not in args
        if word == "RUN" and re.search(r"pip install (?:\S+ )*\.(\s|$)", args):
            assert "--no-deps ." in args, "the runtime target must install rcomp itself with --no-deps"


def test_nothing_downloads_at_run_time():
    for word, args in _instructions():
        if word in ("CMD", "ENTRYPOINT"):
            assert not re.search(r"pip|curl|wget|http|--download|apt", args), f"{word} {args}"
    for tokens in _rcomp_invocations():
        assert "--download" not in tokens
    assert _exec_form(dict(_stages()["full"])["CMD"]) == "rcomp --help"
    assert _exec_form(dict(_stages()["runtime"])["CMD"]) == "rcomp --help"
    assert list(_stages())[-1] == "full"  # `docker build .` without --target builds the full image


def test_declared_volumes_are_documented():
    for word, args in _instructions():
        if word == "VOLUME":
            for volume in json.loads(args):
                assert f":{volume}" in README, f"VOLUME {volume} is not shown mounted in the README"


def test_light_commands_run_without_the_training_dependencies():
    """What the runtime image has: `rcomp --help`, `rcomp profiles list`, `rcomp check --help` need no torch."""
    heavy = ["torch", "torchvision", "onnxsim", "fvcore", "torch_pruning", "tqdm", "sklearn"]
    code = (f"import sys\nfor m in {heavy!r}: sys.modules[m] = None\n"
            "from rcomp.cli import cli\n"
            "for args in (['--help'], ['profiles', 'list'], ['check', '--help']):\n"
            "    try:\n        cli.main(args, prog_name='rcomp', standalone_mode=False)\n"
            "    except SystemExit as e:\n        assert not e.code, (args, e.code)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "jetson" in proc.stdout
