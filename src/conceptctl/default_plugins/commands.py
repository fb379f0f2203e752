"""The built-in commands, added through the same hook third-party plugins use."""

from conceptctl.hookspecs import hookimpl


@hookimpl
def register_commands(app):
    from conceptctl.cli import erase, evaluate, export, inventory, sample, settings

    app.command("erase")(erase.erase)
    app.command("evaluate")(evaluate.evaluate)
    app.command("eval", help="Alias of 'evaluate'.")(evaluate.evaluate)
    app.command("sample")(sample.sample)
    app.command("export")(export.export)
    app.command("plugins")(inventory.plugins)
    app.command("backbones")(inventory.backbones)
    app.add_typer(settings.app, name="config")
