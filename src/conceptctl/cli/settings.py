"""``conceptctl config``: show and change user settings (default backbone, device, dtype, paths)."""

from __future__ import annotations

from typing import Annotated

import typer

from conceptctl.cli import console, options

app = typer.Typer(
    help="Show or change settings (stored in config.toml; CONCEPTCTL_HOME moves it).",
    no_args_is_help=True,
)


@app.command("show")
def show(json_output: options.Json = False) -> None:
    """Print the effective settings and the file they come from."""
    from conceptctl.settings import config_file, load_settings

    data = load_settings().as_dict()
    if json_output:
        console.out.print_json(data={"file": str(config_file()), "settings": data})
        return
    console.out.print(f"# {config_file()}")
    for key, value in data.items():
        if isinstance(value, dict):
            for name, path in value.items():
                console.out.print(f"backbone-path.{name} = {path}")
        else:
            console.out.print(f"{key} = {value}")


@app.command("set")
def set_(
    key: Annotated[str, typer.Argument(help="default-backbone, device, dtype, cache-dir or "
                                            "backbone-path.NAME")],
    value: Annotated[str, typer.Argument(help="The new value.")],
) -> None:
    """Set one setting."""
    from conceptctl.settings import set_setting

    path = set_setting(key, value)
    console.err.print(f"{key} set in {path}")


@app.command("unset")
def unset(
    key: Annotated[str, typer.Argument(help="The setting to return to its default.")],
) -> None:
    """Remove one setting (it returns to its default)."""
    from conceptctl.settings import set_setting

    path = set_setting(key, None)
    console.err.print(f"{key} removed from {path}")
