"""The ``conceptctl`` command line: the app, its plugin-provided commands, one error boundary.

Commands are registered through the ``register_commands`` hook (built-ins by a default plugin),
and ``main`` turns every known error into one red line plus a hint. Nothing here imports torch:
commands import what they need when they run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.markup import escape

from conceptctl import __version__
from conceptctl.cli import console
from conceptctl.errors import ConceptctlError

ENV_DEBUG = "CONCEPTCTL_DEBUG"

# command name -> plugin that added it, filled while the app is built (for 'conceptctl plugins').
COMMAND_OWNERS: dict[str, str] = {}


def _version(value: bool) -> None:
    if value:
        console.out.print(f"conceptctl {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Erase concepts from text-to-image diffusion models, prove they are gone, ship the result."""


def _command_names(app: typer.Typer) -> set[str]:
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    names |= {g.name or "" for g in app.registered_groups}
    return names


def build_app() -> typer.Typer:
    """The root app with every loaded plugin's commands."""
    from conceptctl.plugins import call_each_plugin

    app = typer.Typer(
        name="conceptctl",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_root)
    COMMAND_OWNERS.clear()
    seen = _command_names(app)

    def args_for(plugin: str) -> dict:
        return {"app": app}

    for plugin in call_each_plugin("register_commands", args_for):
        now = _command_names(app)
        COMMAND_OWNERS.update({name: plugin for name in now - seen})
        seen = now
    return app


def report_error(err: ConceptctlError) -> None:
    # One line, whatever a wrapped library message contained.
    message = " ".join(err.message.splitlines())
    console.err.print(f"[bold red]error:[/] {escape(message)}")
    if err.hint:
        console.err.print(f"[dim]hint:[/] {escape(err.hint)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code. The one place errors become messages."""
    debug = os.environ.get(ENV_DEBUG, "") not in ("", "0")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        command = typer.main.get_command(build_app())
        if not args:
            args = ["--help"]
        result = command.main(args=args, prog_name="conceptctl", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except ConceptctlError as err:
        if debug:
            raise
        report_error(err)
        return err.exit_code
    except typer.TyperException as err:  # bad usage caught by the parser (click)
        if debug:
            raise
        report_error(ConceptctlError(err.format_message(),
                                     hint="add --help to the command to see its options"))
        return getattr(err, "exit_code", 2)
    except (KeyboardInterrupt, typer.Abort):
        console.err.print("[red]aborted[/]")
        return 130
    except Exception as err:
        if debug:
            raise
        report_error(ConceptctlError(
            f"unexpected {type(err).__name__}: {err}",
            hint=f"this is a bug in conceptctl or a plugin; rerun with {ENV_DEBUG}=1 for the "
            "traceback and report it",
        ))
        return 1
