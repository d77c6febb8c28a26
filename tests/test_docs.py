"""The README and docs/ stay true to the CLI and to the results files.

Every ``rcomp ...`` command in a README code block names a real subcommand and only options that
subcommand has (a renamed or removed option fails here, not in a user's shell); every rendered
section of README.md and docs/*.md is exactly what its results file renders today (a hand edit
between the ``<!-- bench:NAME -->`` markers, or a results file changed without re-rendering, fails);
the README links only to files that exist.
"""

import importlib
import re
import shlex
import shutil
import sys
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
#: The user guide's companions (method, results, ablations, design); feature pages of docs/ are
#: held to their own tests.
GUIDE_DOCS = [ROOT / "docs" / f"{name}.md" for name in ("method", "results", "ablations", "design")]


def code_blocks(text: str) -> list[str]:
    """The bodies of the fenced code blocks of a markdown text."""
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(block: str, strict: bool = True) -> list[list[str]]:
    """Each command line of a code block as tokens: continuations joined, comments and pipes cut.
    Not strict: lines that are no shell (pseudo-code blocks of the docs) are skipped."""
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        line = line.split(" # ", 1)[0].strip()
        for part in re.split(r"\s(?:\||&&)\s", line):
            try:
                tokens = shlex.split(part)
            except ValueError:
                if strict:
                    raise
                continue
            if tokens:
                commands.append(tokens)
    return commands


def rcomp_invocations(text: str, strict: bool = True) -> list[list[str]]:
    """Token lists starting at the subcommand of every ``rcomp`` / ``-m rcomp`` call in the code blocks."""
    found = []
    for block in code_blocks(text):
        for tokens in shell_commands(block, strict):
            for i, token in enumerate(tokens):
                if token == "rcomp" and (i == 0 or tokens[i - 1] == "-m"):
                    found.append(tokens[i + 1:])
                    break
    return found


def check_invocation(args: list[str]) -> None:
    """AssertionError unless ``args`` names an rcomp subcommand and uses only its options."""
    from rcomp.cli import cli

    command, words = cli, []
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        assert args[0] in command.commands, f"'rcomp {' '.join(words + [args[0]])}': no such subcommand"
        words.append(args[0])
        command, args = command.commands[args[0]], args[1:]
    options = {o for p in command.params for o in p.opts + p.secondary_opts} | {"--help", "-h"}
    if command is cli:
        options |= {"--version"}
    for token in args:
        if token.startswith("-") and not re.fullmatch(r"-?\d+(\.\d+)?", token):
            assert token.split("=")[0] in options, f"rcomp {' '.join(words)}: no option {token}"


def test_the_readme_shows_rcomp_commands_and_each_parses_against_the_cli():
    invocations = rcomp_invocations(README.read_text())
    subcommands = {tokens[0] for tokens in invocations if tokens}
    assert {"prune", "train", "count", "export", "check", "eval", "profiles"} <= subcommands
    for tokens in invocations:
        check_invocation(tokens)


def test_the_check_catches_an_unknown_option_and_an_unknown_subcommand():
    for bad in (["prune", "--profil", "jetson"], ["profiles", "lst"], ["fly"]):
        try:
            check_invocation(bad)
        except AssertionError:
            continue
        raise AssertionError(f"{bad} passed the check")


def test_the_docs_commands_that_call_rcomp_parse_too():
    for doc in GUIDE_DOCS:
        for tokens in rcomp_invocations(doc.read_text(), strict=False):
            check_invocation(tokens)


def test_the_readme_is_a_short_guide_with_install_main_job_and_own_model_first():
    text = README.read_text()
    assert len(text.splitlines()) < 400
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings[:3] == ["Install", "Run the main job", "Use your own model and data"]
    assert "### Your own model" in text


def test_local_links_of_the_readme_and_docs_point_to_files_that_exist():
    for doc in [README, *GUIDE_DOCS]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


def test_every_rendered_section_matches_what_its_results_file_renders(tmp_path, monkeypatch):
    """Render every section into a copy of the docs (plots kept as committed) and compare."""
    monkeypatch.syspath_prepend(str(BENCH))
    before = set(sys.modules)
    try:
        render = importlib.import_module("render")
        copies = {}
        for name in render.DOC_FILES:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, tmp_path / name)
            copies[name] = (ROOT / name).read_text()
        monkeypatch.setattr(render, "ROOT", tmp_path)
        monkeypatch.setattr(render, "PLOTS", False)
        for marker_file in copies.values():
            for marker in re.findall(r"<!-- bench:(\w+) -->", marker_file):  # empty every section first
                render.replace_section(marker, "")
        render.render_all()
        for script, renderers in (("intrain_ablation", ["render"]), ("label_leaking", ["render"]),
                                  ("latency", ["render"]), ("mask_overhead", ["render"]),
                                  ("mask_gradients", ["render", "render_training"])):
            module = importlib.import_module(script)
            results = {"render": "RESULTS", "render_training": "TRAINING_RESULTS"}
            for fn in renderers:
                getattr(module, fn)(__import__("json").loads(getattr(module, results[fn]).read_text()))
        for name, committed in copies.items():
            assert (tmp_path / name).read_text() == committed, (
                f"{name}: a rendered section differs from its results file; run the renderers "
                "(python bench/render.py and each script's --render)")
    finally:  # the bench scripts only: the libraries they imported stay (torch cannot import twice)
        for name in set(sys.modules) - before:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(BENCH)):
                del sys.modules[name]


def test_every_rendered_section_is_closed():
    for doc in [README, *DOCS]:
        text = doc.read_text()
        opened = re.findall(r"<!-- bench:(\w+) -->", text)
        assert sorted(opened) == sorted(re.findall(r"<!-- /bench:(\w+) -->", text)), doc
