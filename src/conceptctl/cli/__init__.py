"""The ``conceptctl`` command line: the app, its plugin-provided commands, one error boundary.

Commands are registered through the ``register_commands`` hook (built-ins by a default plugin),
and ``main`` turns every known error into one red line plus a hint. Nothing here imports torch:
commands import what they need when they run.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.markup import escape
from typer.models import CommandInfo, TyperInfo

from conceptctl import __version__
from conceptctl.cli import console
from conceptctl.cli.aliases import context_settings
from conceptctl.errors import ConceptctlError, PluginError

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


class _Ledger:
    """The app's commands as of the last plugin whose commands were accepted.

    Plugins get the real app (the hook's contract), so what one plugin did is found by comparing
    with this, and what a failing or refused plugin did is undone by restoring it.
    """

    def __init__(self, app: typer.Typer) -> None:
        self.app = app
        self.accept()

    def accept(self) -> None:
        self.commands = list(self.app.registered_commands)
        self.groups = list(self.app.registered_groups)

    def restore(self) -> None:
        self.app.registered_commands = list(self.commands)
        self.app.registered_groups = list(self.groups)

    def added(self) -> list:
        """Commands and groups added since; PluginError if an accepted one was taken away."""
        now = [*self.app.registered_commands, *self.app.registered_groups]
        kept = {id(item) for item in [*self.commands, *self.groups]}
        if len(kept & {id(item) for item in now}) < len(kept):
            raise PluginError("removed commands that other plugins registered")
        return [item for item in now if id(item) not in kept]


def _names_of(item: CommandInfo | TyperInfo) -> list[str]:
    """The top-level names one registration gives, as typer resolves them (a group added
    without a name adds its commands). Building it here also catches a command typer rejects."""
    probe = typer.Typer()
    if isinstance(item, CommandInfo):
        probe.registered_commands.append(item)
    else:
        probe.registered_groups.append(item)
    try:
        return list(typer.main.get_group(probe).commands)
    except Exception as err:
        raise PluginError(f"added a command typer cannot build: {type(err).__name__}: "
                          f"{' '.join(str(err).split())}") from err


def _accept_commands(ledger: _Ledger, plugin: str) -> None:
    """Record the commands ``plugin`` just added; PluginError if one is not acceptable."""
    mine: list[str] = []
    for item in ledger.added():
        for name in _names_of(item):
            first = COMMAND_OWNERS.get(name, plugin if name in mine else None)
            if first is not None:  # refused, like a duplicate component name
                raise PluginError(f"command {name!r} is registered twice: by plugin {first!r} "
                                  f"and by plugin {plugin!r}")
            mine.append(name)
    COMMAND_OWNERS.update(dict.fromkeys(mine, plugin))
    ledger.accept()


def build_app() -> typer.Typer:
    """The root app with every loaded plugin's commands.

    A plugin whose hook fails, or whose commands clash with commands already there (built-ins
    come first), adds none of them and is recorded as failed: the other commands keep working.
    """
    from conceptctl.plugins import call_each_plugin, record_failure

    app = typer.Typer(
        name="conceptctl",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        # Every command inherits the underscore spellings (--output_dir, --mixed_precision).
        context_settings={"help_option_names": ["-h", "--help"], **context_settings()},
    )
    app.callback()(_root)
    COMMAND_OWNERS.clear()
    ledger = _Ledger(app)

    def args_for(plugin: str) -> dict:
        ledger.restore()  # drop what a plugin whose hook raised had added before it failed
        return {"app": app}

    for plugin in call_each_plugin("register_commands", args_for):
        try:
            _accept_commands(ledger, plugin)
        except PluginError as err:
            record_failure(plugin, f"{err.message}; the commands of {plugin!r} are left out")
    ledger.restore()
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
    except OSError as err:
        if debug:
            raise
        known = _file_system_error(err)
        if known is None:
            report_error(_unexpected(err))
            return 1
        report_error(known)
        return known.exit_code
    except Exception as err:
        if debug:
            raise
        report_error(_unexpected(err))
        return 1


# What the file system refuses is the user's to fix, not a bug: a full disk, a read-only or
# forbidden folder. errno -> (what happened, how to fix it).
_FILE_SYSTEM = {
    errno.ENOSPC: ("no space left on the device holding {path}",
                   "free some space, or write elsewhere (--output; the cache: 'conceptctl config "
                   "set cache-dir DIR')"),
    errno.EDQUOT: ("disk quota exceeded writing {path}", "free some space, or write elsewhere"),
    errno.EROFS: ("{path} is on a read-only file system", "write somewhere writable"),
    errno.EACCES: ("permission denied: {path}",
                   "choose a folder you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted: {path}",
                  "choose a folder you may write to, or fix its permissions"),
}


def _file_system_error(err: OSError) -> ConceptctlError | None:
    if err.errno not in _FILE_SYSTEM:
        return None
    message, hint = _FILE_SYSTEM[err.errno]
    path = err.filename if err.filename is not None else "a file conceptctl was writing"
    return ConceptctlError(message.format(path=path), hint=hint)


def _unexpected(err: BaseException) -> ConceptctlError:
    return ConceptctlError(
        f"unexpected {type(err).__name__}: {err}",
        hint=f"this is a bug in conceptctl or a plugin; rerun with {ENV_DEBUG}=1 for the "
        "traceback and report it")
