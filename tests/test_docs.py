"""Every example command in the README and in the commands' --help parses: no stale flags or commands."""
from __future__ import annotations

import re
import shlex

import click
import pytest

from cli import cli

from .conftest import ROOT, needs_fashion_mnist


def _examples() -> list[str]:
    lines = []
    in_code = False
    text = re.sub(r"\\\n\s*", " ", (ROOT / "README.md").read_text())   # a command continued on the next line is one command
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code and line.strip().startswith("compress "):
            lines.append(line.strip())
    for name, cmd in cli.commands.items():
        for line in (cmd.epilog or "").splitlines():
            if line.strip().startswith("compress "):
                lines.append(line.strip())
    for line in (cli.epilog or "").splitlines():
        if line.strip().startswith("compress "):
            lines.append(line.strip())
    return lines


EXAMPLES = _examples()


def test_there_are_examples_for_every_command():
    used = {shlex.split(re.sub(r"\s+#.*$|\s+\(.*\)$", "", e))[1] for e in EXAMPLES}
    assert set(cli.commands) <= used, f"commands without an example: {set(cli.commands) - used}"


@pytest.mark.parametrize("line", EXAMPLES)
def test_example_command_parses(line):
    line = re.sub(r"\s+#.*$", "", line)           # trailing comments
    line = re.sub(r"\s+\([^)]*\)\s*$", "", line)  # trailing notes in parentheses
    args = shlex.split(line)[1:]
    while args and args[0].startswith("--"):
        args.pop(0)                               # global flags before the command
    name, rest = args[0], args[1:]
    assert name in cli.commands, f"unknown command in example: {line}"
    cmd = cli.commands[name]
    with click.Context(cli) as parent:
        cmd.make_context(name, list(rest), parent=parent)  # raises on unknown options or missing arguments


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python block, as a notebook user would paste it (in an empty folder): every verb, a real model."""
    needs_fashion_mnist()
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "onnx" in printed and (tmp_path / "runs" / "api-int8" / "manifest.json").is_file()
    assert (tmp_path / "runs" / "api-demo" / "report.html").is_file()
