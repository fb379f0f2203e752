"""Docs must match the code: every hook and every CLI command and option is documented."""

import inspect
from pathlib import Path

import typer

from conceptctl import hookspecs
from conceptctl.cli import build_app

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hookspecs():
    return [fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "conceptctl_spec")]


def test_every_hook_is_documented_with_its_exact_signature():
    text = (DOCS / "plugins.md").read_text()
    specs = _hookspecs()
    assert specs, "no hookspecs found"
    for fn in specs:
        signature = f"def {fn.__name__}{inspect.signature(fn)}"
        assert f"### {fn.__name__}" in text, f"{fn.__name__} has no section in docs/plugins.md"
        assert signature in text, f"docs/plugins.md lacks the signature {signature}"


def _commands(group, prefix=""):
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if hasattr(command, "commands"):
            yield from _commands(command, path + " ")
        else:
            yield path, command


def test_every_command_and_option_is_in_cli_md():
    text = (DOCS / "cli.md").read_text()
    root = typer.main.get_command(build_app())
    for path, command in _commands(root):
        top = path.split()[0]
        assert f"## conceptctl {top}" in text, f"'{top}' has no section in docs/cli.md"
        section = text.split(f"## conceptctl {top}", 1)[1].split("\n## ", 1)[0]
        assert f"conceptctl {path}" in section, f"docs/cli.md does not show 'conceptctl {path}'"
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--") and opt != "--help":
                    assert f"`{opt}" in section, f"{opt} of '{path}' is not in docs/cli.md"
