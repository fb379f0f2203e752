"""Docs must match the code: every hook and every CLI command and option is documented."""

import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import typer

from conceptctl import hookspecs
from conceptctl.backbones.spec import BackboneSpec
from conceptctl.cli import build_app
from conceptctl.erasure.config import EraseConfig
from conceptctl.registry import KINDS, get_registry

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hookspecs():
    return [fn for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
            if hasattr(fn, "conceptctl_spec")]


@pytest.mark.parametrize("fn", _hookspecs(), ids=lambda fn: fn.__name__)
def test_every_hook_is_documented_with_its_exact_signature(fn):
    text = (DOCS / "plugins.md").read_text()
    signature = f"def {fn.__name__}{inspect.signature(fn)}"
    assert f"### {fn.__name__}" in text, f"{fn.__name__} has no section in docs/plugins.md"
    section = text.split(f"### {fn.__name__}", 1)[1].split("\n### ", 1)[0]
    assert signature in section, f"docs/plugins.md lacks the signature {signature}"
    kind = {hook: kind for kind, hook in KINDS.items()}.get(fn.__name__)
    if kind is not None:  # the factory contract is stated and every built-in is named
        missing = [e.name for e in get_registry(kind) if e.plugin.startswith("builtin-")
                   and f"`{e.name}`" not in section]
        assert not missing, f"the {fn.__name__} section does not name the built-in {missing}"
        assert "factory(" in section or "register(" in section, (
            f"the {fn.__name__} section does not say what to register or what a factory gets")


def test_there_are_hooks():
    assert len(_hookspecs()) >= 10


def test_every_backbone_spec_field_is_in_the_plugins_table():
    text = (DOCS / "plugins.md").read_text()
    for field in fields(BackboneSpec):
        assert f"`{field.name}`" in text, f"BackboneSpec.{field.name} is not in docs/plugins.md"


def test_every_erase_setting_is_in_the_erase_table():
    text = (DOCS / "erase.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for field in fields(EraseConfig):
        assert any(f"`{field.name}`" in row.split("|")[1] for row in rows), (
            f"EraseConfig.{field.name} has no row in docs/erase.md")


def test_every_built_in_attack_option_is_in_the_evaluate_table():
    rows = [line for line in (DOCS / "evaluate.md").read_text().splitlines()
            if line.startswith("| `")]
    attacks = [e for e in get_registry("attack") if e.plugin.startswith("builtin-")]
    assert {e.name for e in attacks} >= {"unlearndiffatk", "embedding", "paraphrase"}
    for entry in attacks:
        attack = entry.value.build(options={"cases": 1})
        row = next((r for r in rows if r.split("|")[1].strip() == f"`{entry.name}`"), "")
        missing = [key for key in attack.options if f"`{key}`" not in row]
        assert row and not missing, f"docs/evaluate.md: attack {entry.name} lacks {missing}"


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
