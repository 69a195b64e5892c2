"""Every command on the README's first screen (its first fenced code block) exists.

``make X`` needs a Makefile target X (and, where make is installed, ``make -n X`` must succeed and
the modules / scripts its recipe runs must exist); ``python -m M`` needs an importable module M.
The block holds exactly two commands.
"""
import importlib.util
import os
import re
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_code_block(text: str) -> list[str]:
    """Lines of the first fenced (```) code block of a markdown text."""
    m = re.search(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    assert m, "README.md has no fenced code block"
    return m.group(1).splitlines()


def commands(lines: list[str]) -> list[str]:
    """The commands of a shell block: lines without comments, blank lines dropped."""
    out = []
    for line in lines:
        cmd = line.split("#", 1)[0].strip()
        if cmd:
            out.append(cmd)
    return out


def makefile_targets(text: str) -> set[str]:
    """Targets of explicit rules (``a b: deps``), with simple variables expanded."""
    vars_ = {}
    for m in re.finditer(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?=|:=|::=|=)\s*(.*)$", text, flags=re.M):
        vars_.setdefault(m.group(1), m.group(2).strip())

    def expand(s: str) -> str:
        for _ in range(10):
            s2 = re.sub(r"\$[({]([A-Za-z_][A-Za-z0-9_]*)[)}]", lambda m: vars_.get(m.group(1), ""), s)
            if s2 == s:
                break
            s = s2
        return s

    targets = set()
    for line in text.splitlines():
        if line.startswith(("\t", "#")) or not line.strip():
            continue
        m = re.match(r"^([^:=#]+?)\s*::?(?![=])", line)  # "targets:" but not "VAR := ..."
        if m:
            targets.update(expand(m.group(1)).split())
    return targets


def read(name: str) -> str:
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


README_COMMANDS = commands(first_code_block(read("README.md")))


def test_first_screen_shows_exactly_two_commands():
    assert len(README_COMMANDS) == 2, README_COMMANDS
    assert all(c.startswith(("make ", "python -m ")) for c in README_COMMANDS), README_COMMANDS


def test_parsers():
    assert commands(["make demo   # comment", "", "# only a comment", "python -m x.y --a=1"]) == [
        "make demo", "python -m x.y --a=1"]
    mk = "A := out\n.PHONY: t\nt: dep\n\techo\n$(A)/bin:\n\ttrue\nX ?= 1\nu v :: w\n"
    assert makefile_targets(mk) == {".PHONY", "t", "out/bin", "u", "v"}
    assert first_code_block("text\n```bash\nmake a\n```\n```\nmake b\n```\n") == ["make a"]


@pytest.mark.parametrize("command", README_COMMANDS)
def test_command_exists(command):
    argv = shlex.split(command)
    if argv[0] == "make":
        targets = [a for a in argv[1:] if not a.startswith("-") and "=" not in a]
        assert targets, command
        defined = makefile_targets(read("Makefile"))
        for t in targets:
            assert t in defined, f"{command!r}: the Makefile has no target {t!r} (targets: {sorted(defined)})"
        if shutil.which("make"):
            _check_recipe(targets)
    elif argv[:2] == ["python", "-m"]:
        assert len(argv) > 2, command
        assert importlib.util.find_spec(argv[2]) is not None, f"{command!r}: module {argv[2]} is not importable"
    else:
        pytest.fail(f"unknown kind of command on the README's first screen: {command!r}")


def _check_recipe(targets):
    """``make -n`` resolves the whole rule chain without running it; the modules and scripts it
    would run must exist."""
    r = subprocess.run(["make", "-n", "-C", ROOT, *targets], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for line in r.stdout.splitlines():
        if line.startswith("make"):  # "make: Entering directory ..."
            continue
        for module in re.findall(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)", line):
            if module in ("pip", "venv", "pytest"):
                continue  # come with the interpreter / the install step
            assert importlib.util.find_spec(module) is not None, f"recipe line {line!r}: no module {module}"
        for script in re.findall(r"(?:^|\s)(?:bash|sh)\s+(\S+\.sh)\b", line):
            assert os.path.isfile(os.path.join(ROOT, script)), f"recipe line {line!r}: no file {script}"
